"""Wall time and held-out accuracy of the specialist head's solvers at the default specialist's size.

    .venv/bin/python benchmarks/specialist_head.py [--max-iter 30] [--rounds 2] [--features FILE]

The problem is the one the default specialist solves: 130 classes x 4 support images x 4 views = 2080 rows
of 1024-d L2-normalised, standardised features, inverse regularisation C in {0.01, 0.1, 1.0}. Without
``--features`` the features are generated (class means plus noise, with a few strong shared directions so
that the problem is badly conditioned, as features of a random-weight network are); with ``--features`` an
.npz holding X [M, D], y [M] (and optional groups) is used. Queries are 2 more noisy rows per image.

Solvers, each with the same iteration budget:
  sklearn   scikit-learn LogisticRegression(solver="lbfgs", C, max_iter)
  numpy     cascade's head: the numpy L-BFGS of ``fit_logistic``
  scipy     scipy.optimize L-BFGS-B on the same loss and gradient (``logistic_loss_grad``), with the time split
            between scipy's optimiser and the loss (only where cascade exposes ``logistic_loss_grad``)
Timed rounds alternate between the solvers so that load from other processes hits them alike.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def problem(args):
    if args.features:
        with np.load(args.features, allow_pickle=False) as d:
            X, y = d["X"].astype(np.float64), d["y"]
        rng = np.random.default_rng(0)
        Xq = X + 0.1 * rng.standard_normal(X.shape)
        return X, y, Xq, y
    rng = np.random.default_rng(0)
    K, D, n_img, views = 130, 1024, 4, 4
    means = rng.standard_normal((K, D)) * 0.35
    shared = rng.standard_normal((8, D)) * 4.0       # strong directions common to all classes
    y_img = np.repeat(np.arange(K), n_img)

    def rows(y):
        return means[y] + rng.standard_normal((len(y), 8)) @ shared + rng.standard_normal((len(y), D))

    y = np.repeat(y_img, views)
    X, Xq = rows(y), rows(np.repeat(y_img, 2))
    return X, y, Xq, np.repeat(y_img, 2)


def standardise(X, Xq):
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    Xq = Xq / np.linalg.norm(Xq, axis=1, keepdims=True)
    m, s = X.mean(0), X.std(0)
    s[s < 1e-8] = 1.0
    return (X - m) / s, (Xq - m) / s


def solvers(max_iter, optimiser_time):
    from sklearn.linear_model import LogisticRegression

    import cascade.stages.specialist as sp

    def sk(X, y, C):
        m = LogisticRegression(C=C, max_iter=max_iter).fit(X, y)
        return m.coef_, m.intercept_

    out = {"sklearn": sk, "numpy": lambda X, y, C: sp.fit_logistic(X, y, C, max_iter)}
    if hasattr(sp, "logistic_loss_grad"):
        from scipy.optimize import minimize

        def scipy_lbfgsb(X, y, C):
            fun = sp.logistic_loss_grad(X, y, C)
            spent = [0.0]

            def timed(theta):
                t0 = time.perf_counter()
                r = fun(theta)
                spent[0] += time.perf_counter() - t0
                return r

            K, D = int(y.max()) + 1, X.shape[1]
            t0 = time.perf_counter()
            res = minimize(timed, np.zeros(K * D + K), jac=True, method="L-BFGS-B",
                           options={"maxiter": max_iter, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps})
            optimiser_time.append((time.perf_counter() - t0 - spent[0], spent[0]))
            return res.x[:K * D].reshape(K, D), res.x[K * D:]

        out["scipy"] = scipy_lbfgsb
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--features", help=".npz with X [M, D] and y [M]")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")  # lbfgs "did not converge" at a fixed budget is expected
    X, y, Xq, yq = problem(args)
    X, Xq = standardise(X, Xq)
    split = []
    fns = solvers(args.max_iter, split)
    grid = (0.01, 0.1, 1.0)
    times = {k: [] for k in fns}
    acc = {}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for C in grid:
                W, b = fn(X, y, C)
                acc[(name, C)] = float(np.mean((Xq @ W.T + b).argmax(1) == yq))
            times[name].append(time.perf_counter() - t0)
    print(f"specialist head, {len(np.unique(y))} classes, X {X.shape[0]}x{X.shape[1]}, max_iter={args.max_iter}, "
          f"one fit per C in {grid}, median of {args.rounds} alternating rounds:")
    for name in fns:
        accs = ", ".join(f"C={C:g}: {acc[(name, C)]:.3f}" for C in grid)
        print(f"  {name:8s} {np.median(times[name]):7.2f} s for 3 fits   held-out top-1 {accs}")
    if split:
        opt, loss = (sum(v) for v in zip(*split))
        print(f"  scipy's L-BFGS-B: {opt:.2f} s in the optimiser itself, {loss:.2f} s in the loss and gradient "
              f"(all rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
