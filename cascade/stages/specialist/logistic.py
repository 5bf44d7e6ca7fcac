"""The specialist head's solver: multinomial logistic regression, full batch, with a small numpy L-BFGS.

The objective is scikit-learn's ``LogisticRegression(C=C)`` (mean cross-entropy + ||W||^2 / (2 C n), the
intercept not penalised), so ``C`` means the same thing. scikit-learn and scipy's L-BFGS-B are not used
here because, at the default specialist's size (130 classes x 1024 features), scipy's L-BFGS-B routine
costs more time than the loss and gradient themselves (docs/specialist.md has the measurement).
"""
from __future__ import annotations

import numpy as np

__all__ = ["fit_logistic", "logistic_loss_grad"]


def logistic_loss_grad(X, y, C: float):
    """The objective as a function ``theta -> (loss, gradient)`` over ``theta = [W.ravel(), b]`` (float64).
    The matrix products run in float32, the sums in float64. X [n, D], y [n] in 0..K-1, K = y.max() + 1."""
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y)
    n, D = X32.shape
    K = int(y.max()) + 1
    Y = np.zeros((n, K), dtype=np.float32)
    Y[np.arange(n), y] = 1.0
    lam = 1.0 / (float(C) * n)

    def loss_grad(theta):
        W = theta[:K * D].reshape(K, D)
        Z = X32 @ W.T.astype(np.float32) + theta[K * D:].astype(np.float32)
        Z -= Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        S = E.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(S[:, 0].astype(np.float64)) - Z[np.arange(n), y]))
        G = (E / S - Y) / n
        gW = (G.T @ X32).astype(np.float64) + lam * W
        return loss + 0.5 * lam * float(np.dot(theta[:K * D], theta[:K * D])), \
            np.concatenate([gW.ravel(), G.sum(axis=0, dtype=np.float64)])

    return loss_grad


def fit_logistic(X, y, C: float, max_iter: int = 100, W0=None, b0=None, tol: float = 1e-4):
    """Minimise :func:`logistic_loss_grad` with :func:`_lbfgs`: at most ``max_iter`` iterations, stopping like
    scikit-learn's lbfgs (max |gradient| <= ``tol``). X [n, D], y [n] in 0..K-1 (every class present);
    (W0 [K, D], b0 [K]) warm-start it. Returns (W [K, D], b [K]) float64."""
    y = np.asarray(y)
    D = np.shape(X)[1]
    K = int(y.max()) + 1
    if K == 1:  # one class: nothing to separate
        return np.zeros((1, D)), np.zeros(1)
    theta0 = np.zeros(K * D + K)
    if W0 is not None:
        theta0[:K * D], theta0[K * D:] = np.asarray(W0, np.float64).ravel(), np.asarray(b0, np.float64)
    theta = _lbfgs(logistic_loss_grad(X, y, C), theta0, int(max_iter), tol)
    return theta[:K * D].reshape(K, D).copy(), theta[K * D:].copy()


def _lbfgs(fun, x, max_iter: int, gtol: float, m: int = 10, ftol: float = 64 * np.finfo(float).eps):
    """Plain L-BFGS (two-loop recursion, memory ``m``) with a backtracking Armijo line search. Stops after
    ``max_iter`` iterations, when max |gradient| <= ``gtol``, or when the relative decrease of the objective
    is <= ``ftol`` (scikit-learn's lbfgs criteria)."""
    f, g = fun(x)
    S, Y = [], []
    for _ in range(max_iter):
        if np.abs(g).max() <= gtol:
            break
        q = g.copy()
        alphas = []
        for s_, y_ in zip(reversed(S), reversed(Y)):
            a = np.dot(s_, q) / np.dot(y_, s_)
            alphas.append(a)
            q -= a * y_
        if S:
            q *= np.dot(S[-1], Y[-1]) / np.dot(Y[-1], Y[-1])
        else:
            q /= max(np.linalg.norm(g), 1e-12)  # first step: unit length along -g
        for (s_, y_), a in zip(zip(S, Y), reversed(alphas)):
            q += (a - np.dot(y_, q) / np.dot(y_, s_)) * s_
        d = -q
        slope = np.dot(g, d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            S.clear(), Y.clear()
            d, slope = -g / max(np.linalg.norm(g), 1e-12), -np.linalg.norm(g)
        step = 1.0
        for _ in range(30):
            f_new, g_new = fun(x + step * d)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease found
        s_, y_ = step * d, g_new - g
        if np.dot(s_, y_) > 1e-10 * np.dot(y_, y_):
            S.append(s_), Y.append(y_)
            if len(S) > m:
                S.pop(0), Y.pop(0)
        x = x + s_
        done = (f - f_new) <= ftol * max(abs(f), abs(f_new), 1.0)
        f, g = f_new, g_new
        if done:
            break
    return x
