"""Speed of fitting + scoring every stage on a synthetic task of the production size.

    .venv/bin/python benchmarks/stages_speed.py [--queries 5000] [--classes 400] [--shots 4] [--dim 512]
                                                [--backbones 2] [--full-inmap]
                                                [--balance check|always|none] [--no-balance-refit]
                                                [--refit-check X|false] [--no-refit-with-val]
                                                [--domains K] [--profile N] [--repeat R]

Features are synthetic (seeded): per backbone, class centres on the unit sphere, support/query rows =
normalise(centre + noise), text = normalise(centre + noise). Prints seconds per stage and for the whole
default Cascade (fit on support, predict on the queries: InMaP over all classes on the joint features +
LP++ per backbone). ``--full-inmap`` also times the authors' 2000-step InMaP without early stopping.
The synthetic query set is not balanced, so the default check does not balance it; ``--balance always`` times
the cascade where it does (with the refinement refitted on the balanced pool unless ``--no-balance-refit``; that
refit is judged by its check, ``--refit-check``, which drops it on this synthetic task: a large threshold keeps it
and still times the check, ``false`` skips the check; the validation rows join that refit unless
``--no-refit-with-val``).
``--domains K`` (default 4, the challenge's four domains) splits the classes into K consecutive blocks, each a
domain: the default cascade then scores every query again with its domain's own cascade (``per_domain``), and the
last line says how many queries each scored; ``--domains 1`` times one cascade over all classes. With several
domains the global distribution is the inductive experts' pool alone, neither refined nor balanced, with no InMaP
over all classes (each domain's cascade decides for itself), so ``--balance`` and ``--refit-check`` concern the
domain cascades.
Every line gives wall seconds and this process's CPU seconds (all its threads); ``--profile N`` then lists the N
functions of the cascade's fit + predict with the most CPU seconds (cProfile on process time, cumulative), which
says where the time of each step goes when other jobs make the wall clock meaningless (cProfile sees the calling
thread only: work run side by side in threads, such as the domain cascades, shows as waiting; profile with
``--domains 1`` to see the global cascade's steps). ``--repeat R`` times the
same predict R more times (same fitted cascade, same result): the spread of one version under the same load. With
``OPENBLAS_NUM_THREADS=1`` the CPU seconds count the work alone, not OpenBLAS's threads waiting for each other.

Nearly all the time is float32 matrix products in numpy's BLAS, so the BLAS line printed first matters (the line
after it gives the products' throughput at the two main shapes, InMaP's step and LP++'s epoch; the next, numpy's
float32 ``exp`` per element, the floor of the element-wise work, which every softmax pays): an
environment that forces an older OpenBLAS kernel (e.g. ``OPENBLAS_CORETYPE=Haswell`` on an AVX-512 CPU) makes
every product ~1.6x slower. To measure what a stock numpy does on the machine, run it with those variables
removed for that one command: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/stages_speed.py``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cascade.config import default_cascade  # noqa: E402
from cascade.stages import InMaP, LinearProbePP, ZeroShot  # noqa: E402


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_task(n_query, n_classes, shots, dim, n_backbones, seed=0, val_per_class=0):
    rng = np.random.default_rng(seed)
    yq = rng.integers(0, n_classes, n_query)
    ys = np.repeat(np.arange(n_classes), shots)
    yv = np.repeat(np.arange(n_classes), val_per_class)
    support, query, text, val = {}, {}, {}, {}
    for b in range(n_backbones):
        centres = _unit(rng.standard_normal((n_classes, dim)))
        noise = 1.0 / np.sqrt(dim)
        text[f"bb{b}"] = _unit(centres + 1.2 * noise * rng.standard_normal((n_classes, dim)) * np.sqrt(dim) / 3)
        support[f"bb{b}"] = _unit(centres[ys] + 1.5 * rng.standard_normal((ys.size, dim)) / np.sqrt(dim))
        query[f"bb{b}"] = _unit(centres[yq] + 1.5 * rng.standard_normal((n_query, dim)) / np.sqrt(dim))
        val[f"bb{b}"] = _unit(centres[yv] + 1.5 * rng.standard_normal((yv.size, dim)) / np.sqrt(dim))
    return support, ys, query, yq, text, (val, yv)


def blas_info() -> str:
    """numpy's BLAS library, the kernel it runs and its threads (threadpoolctl), plus any OPENBLAS_* overrides:
    every figure here is matrix products, so this line says what they ran on."""
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} threads={i.get('num_threads')}"
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception as exc:  # noqa: BLE001  (diagnostics only)
        libs = [f"unknown ({exc})"]
    env = {k: v for k, v in os.environ.items() if k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                         "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    over = f"; environment overrides {env}" if env else ""
    return "; ".join(libs) + over


def cpu_info() -> str:
    """The CPU's model name and which of the vector extensions the BLAS kernels use it has (from /proc/cpuinfo;
    "unknown" elsewhere): an AVX-512 machine runs the same products faster than an AVX2 one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    present = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    return f"{model}; flags {' '.join(present) or 'none of avx2 fma avx512f'}"


def product_gflops(shapes=((5000, 1024, 400), (1600, 512, 400)), repeats: int = 3) -> str:
    """Float32 matrix-product throughput of numpy's BLAS at the cascade's two main shapes (InMaP's step, LP++'s
    epoch: ``[M, K] @ [K, N]``), best of ``repeats``: the floor under every time below on this machine."""
    rng = np.random.default_rng(0)
    out = []
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        best = np.inf
        for _ in range(repeats + 1):            # the first product warms the BLAS threads up
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out.append(f"{m}x{k}x{n} {2 * m * k * n / best / 1e9:.0f} GFLOPS")
    return ", ".join(out)


def exp_rate(shape=(5000, 400), calls: int = 10) -> str:
    """numpy's float32 ``exp`` on one thread at the shape of InMaP's softmax (queries x classes), ``calls`` calls after
    one to warm up: the floor of the element-wise work, which every softmax, log-softmax and temperature fit pays.
    The fastest call and the median: on some machines a call in a loop is several times slower than the fastest."""
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float32) - 3.0
    out = np.empty_like(z)
    np.exp(z, out=out)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        np.exp(z, out=out)
        times.append(time.perf_counter() - t0)
    best, median = min(times) / z.size * 1e9, float(np.median(times)) / z.size * 1e9
    return f"{shape[0]}x{shape[1]}, {best:.1f} ns per element (fastest of {calls} calls), {median:.1f} (median)"


def timed(label, fn, rows):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append((label, dt, cpu))
    print(f"  {label:<58}{dt:8.2f} s  (cpu {cpu:6.2f} s)", flush=True)
    return out


def profiled(prof, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, under the profiler ``prof`` when there is one."""
    if prof is None:
        return fn(*args, **kwargs)
    prof.enable()
    try:
        return fn(*args, **kwargs)
    finally:
        prof.disable()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--backbones", type=int, default=2)
    p.add_argument("--val-per-class", type=int, default=10,
                   help="labelled validation rows per class (train.sh's default split keeps 10)")
    p.add_argument("--full-inmap", action="store_true", help="also time InMaP with all 2000 steps")
    p.add_argument("--balance", default="check", choices=("check", "always", "none"),
                   help="the cascade's balance setting (default: check, the default cascade's)")
    p.add_argument("--no-balance-refit", action="store_true",
                   help="balance_refit=False: a balanced final distribution is the refinement's output, balanced")
    p.add_argument("--no-refit-with-val", action="store_true",
                   help="refit_with_val=False: the balanced refit fits without the validation rows")
    p.add_argument("--refit-check", default=None,
                   help="the cascade's refit_check (default: the default cascade's; false: no check)")
    p.add_argument("--domains", type=int, metavar="K", default=4,
                   help="split the classes into K domains of consecutive classes (default 4; 1: one domain)")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="list the N functions of Cascade.fit + predict with the most CPU seconds (cumulative)")
    p.add_argument("--repeat", type=int, metavar="R", default=0,
                   help="time Cascade.predict R more times on the same fitted cascade (each on its own line)")
    a = p.parse_args(argv)
    if not 1 <= a.domains <= a.classes:
        p.error(f"--domains must lie in 1..{a.classes} (the number of classes), got {a.domains}")
    domains = [f"domain{i}" for i in np.arange(a.classes) * a.domains // a.classes]
    support, ys, query, yq, text, val = make_task(a.queries, a.classes, a.shots, a.dim, a.backbones,
                                                  val_per_class=a.val_per_class)
    k0 = next(iter(support))
    print(f"{a.queries} queries x {a.classes} classes x {a.backbones} backbones (D={a.dim}), "
          f"{ys.size} support rows, {val[1].size} validation rows, {a.domains} domain(s); {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print(f"  BLAS: {blas_info()}")
    print(f"  CPU: {cpu_info()}")
    print(f"  float32 products: {product_gflops()}")
    print(f"  float32 exp: {exp_rate()}")
    print("  (wall seconds; cpu = this process's CPU seconds over all threads: on an otherwise idle machine "
          "wall is about cpu / threads)")
    rows = []
    timed("zero-shot fit+score (one backbone)",
          lambda: ZeroShot().fit(text=text[k0]).predict_proba(query[k0]), rows)
    m = timed("LP++ fit 300 epochs + score (one backbone)",
              lambda: LinearProbePP(select="last").fit(support[k0], ys, text=text[k0]).decision_function(query[k0]),
              rows)
    im = default_cascade().transductive  # the default transductive stage of the cascade
    timed("InMaP as in the cascade, fit+score (one backbone)", lambda: im.fit(support[k0], ys, text=text[k0],
                                                                     query=query[k0]).decision_function(query[k0]), rows)
    print(f"    (stopped after {im.n_iter_} steps)")
    if a.full_inmap:
        timed("InMaP authors' 2000 steps fit+score (one backbone)",
              lambda: InMaP().fit(query[k0], text=text[k0]).decision_function(query[k0]), rows)
    casc = default_cascade([f"stages.cascade.balance={a.balance}",
                            f"stages.cascade.balance_refit={str(not a.no_balance_refit).lower()}",
                            f"stages.cascade.refit_with_val={str(not a.no_refit_with_val).lower()}"]
                           + ([f"stages.cascade.refit_check={a.refit_check}"] if a.refit_check is not None else []))
    prof = cProfile.Profile(time.process_time) if a.profile else None
    timed("Cascade.fit (zero-shot + LP++ x backbones, calibration)",
          lambda: profiled(prof, casc.fit, support, ys, text, a.classes, val=val if val[1].size else None,
                           domains=domains), rows)
    res = timed("Cascade.predict (prior, InMaP joint, pools, GDA, routing)",
                lambda: profiled(prof, casc.predict, query), rows)
    total, cpu = rows[-1][1] + rows[-2][1], rows[-1][2] + rows[-2][2]
    print(f"  {'TOTAL default cascade (fit + predict, all stages)':<58}{total:8.2f} s  (cpu {cpu:6.2f} s)")
    steps = res.details.get("n_iter", "none over all classes (each domain's cascade runs its own)")
    print(f"  InMaP steps in the cascade: {steps}; synthetic top-1 "
          f"{np.mean(res.top5[:, 0] == yq) * 100:.1f}%; load average now {os.getloadavg()[0]:.2f}")
    if "balanced" in res.details:              # with several domains, each domain's cascade balances or not
        print(f"  final distribution balanced: {res.details.get('balanced')}; refinement refitted on the balanced "
              f"pool: {res.details.get('balance_refit')}"
              + (f" (its check: gain {res.details['refit_gain']:+.3f} +- {res.details['refit_gain_se']:.3f})"
                 if "refit_gain" in res.details else "")
              + ("; with the validation rows" if res.details.get("refit_with_val") else ""))
    if "domains" in res.details:
        print("  queries scored again per domain (its own cascade): "
              + ", ".join(f"{d['domain']} {d['n_queries'] if d['rescored'] else 0} "
                          f"({'balanced' if d.get('balanced') else 'not balanced'})" for d in res.details["domains"]))
    for i in range(a.repeat):
        timed(f"Cascade.predict again ({i + 1} of {a.repeat})", lambda: casc.predict(query), rows)
    if prof is not None:
        print(f"\n  the {a.profile} functions of Cascade.fit + predict with the most CPU seconds (cumulative, cProfile):")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
