"""Calibration and class-marginal tools shared by the stages and the router.

* :func:`fit_temperature`: the scale of a set of logits that maximises the likelihood of held-out labels (or
  of soft targets);
* :func:`fit_pool_weights`: non-negative weights of a log-linear pool of several experts' log-probabilities,
  by maximum likelihood on held-out labelled rows (a product of experts with fitted exponents);
* where every held-out row is already ranked right (:func:`labels_on_top`, as a few easy rows can be) the labels
  have no optimum: the pool's weights then fit Platt's smoothed targets instead, and so does a temperature when
  asked (``platt``: the router asks where the rows are validation rows);
* :func:`estimate_prior`: the class marginal of an unlabelled set by EM on a classifier's posteriors (Saerens,
  Latinne & Decaestecker 2002), kept only when it beats the uniform marginal by the BIC margin;
* :func:`marginal_test`: the class marginal of a set from its (already transductive) posteriors, with the same
  BIC decision against uniform; :func:`compatible_marginal`: whether another estimate is statistically
  compatible with those posteriors;
* :func:`balancing_bias`: per-class biases that make a classifier's mean posterior over a set equal a given class
  marginal (Sinkhorn's column scaling, kept as a bias so that it can score other rows too).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from .base import log_softmax, softmax

# Row blocks for the computations that see every query at once: their [N, C] and [N, D] temporaries are made
# one block of rows at a time, so memory grows linearly in N with a small constant. Up to CHUNK_ROWS rows there
# is one block and the computation is exactly the unchunked one; beyond, results agree to rounding.
CHUNK_ROWS = 65536
# [N, C] arrays kept across passes over the rows (posteriors, soft labels, the matrices that the balancing and the
# EM iterate on) are float64 up to FLOAT64_ROWS rows and float32 beyond: half the memory at ~7 significant digits.
# Up to this size the computation is exactly the float64 one; the iterations still accumulate in float64.
FLOAT64_ROWS = 65536
# float32 rows are widened to float64 this many at a time inside the iterations (a block that stays in cache)
_CAST_ROWS = 2048


def row_blocks(n: int, size: int | None = None):
    """Slices covering ``range(n)`` in blocks of ``size`` rows (default :data:`CHUNK_ROWS`, read at call time)."""
    size = max(1, int(size or CHUNK_ROWS))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def store_dtype(n_rows: int):
    """dtype of the [N, C] arrays kept for ``n_rows`` rows: float64 up to :data:`FLOAT64_ROWS` (read at call
    time), float32 beyond."""
    return np.float64 if n_rows <= FLOAT64_ROWS else np.float32


def fill_rows(n: int, width: int, block) -> np.ndarray:
    """[n, width] array in :func:`store_dtype` filled with ``block(rows)`` for every block of rows
    (:func:`row_blocks`): how a per-row distribution computed a block of rows at a time is kept."""
    out = np.empty((n, width), dtype=store_dtype(n))
    for b in row_blocks(n):
        out[b] = block(b)
    return out


def _float(a) -> np.ndarray:
    """``a`` as a float32 or float64 array (float32 stays float32: no float64 copy of a large array)."""
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def posterior_blocks(P: np.ndarray):
    """(rows, float64 block) pairs covering ``P``: float64 arrays in blocks of :data:`CHUNK_ROWS` rows (one block,
    the unchunked computation, up to that size), float32 ones widened :data:`_CAST_ROWS` rows at a time."""
    size = None if P.dtype == np.float64 else _CAST_ROWS
    for b in row_blocks(P.shape[0], size):
        yield b, np.asarray(P[b], dtype=np.float64)


def _normalised_mean(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``P^T (1 / (P w))`` [C] over the rows of ``P`` [N, C] (the sum over rows of each row's posterior under the
    class weights ``w``, divided by ``w``), in float64 a block of rows at a time."""
    return _weighted_sums(P, w)[1]


def _weighted_sums(P: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """``(sum_i log(P_i . w), P^T (1 / (P w)))`` over the rows of ``P`` [N, C]: the log-likelihood of the rows
    under the class weights ``w`` and :func:`_normalised_mean`, in one pass (float64, a block of rows at a time)."""
    total, acc = 0.0, np.zeros(P.shape[1])
    for _, Pb in posterior_blocks(P):
        s = Pb @ w
        total += float(np.log(s).sum())
        acc += Pb.T @ (1.0 / s)
    return total, acc


def _posteriors(L: np.ndarray, floor: float | None = None) -> np.ndarray:
    """``softmax(L)`` row by row, in the dtype of ``L`` (float32 stays float32), floored at ``floor`` (default: the
    dtype's smallest normal number, so that no posterior is exactly zero)."""
    P = np.empty(L.shape, dtype=L.dtype)
    tiny = np.finfo(L.dtype).tiny if floor is None else floor
    for b in row_blocks(L.shape[0]):
        Pb = softmax(np.asarray(L[b], dtype=np.float64))   # a new float64 block: L is never written
        np.maximum(Pb, tiny, out=Pb)
        P[b] = Pb
    return P


def labels_on_top(scores: np.ndarray, y: np.ndarray) -> bool:
    """Whether every row's label ``y`` has its row's largest score (ties count): then a likelihood fitted to the
    labels alone rises with the scale of the scores without limit, and has no maximum."""
    z = _float(scores)
    y = np.asarray(y, dtype=np.int64)
    return all(bool(np.all(np.asarray(z[b][np.arange(b.stop - b.start), y[b]]) >= z[b].max(axis=1)))
               for b in row_blocks(len(y)))


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds=(1e-2, 1e4), tol: float = 1e-6,
                    platt: bool = False) -> float:
    """Scale ``s`` maximising the mean log-likelihood of labels ``y`` under ``softmax(s * logits)``.

    ``y``: integer labels [N], or soft targets [N, C] (then the mean cross-entropy ``-sum_k y_ik log p_ik``
    is minimised). The negative log-likelihood is convex in ``s`` (its second derivative is the mean variance
    of the logits under ``p``), so Newton's method, kept inside a shrinking bracket (bisection when a step
    leaves it), finds the optimum in a handful of softmax evaluations; ``s`` is clipped to ``bounds``.
    Where every row's integer label has the largest logit (:func:`labels_on_top`) the likelihood has no maximum:
    with ``platt`` the scale then fits Platt's targets, as :func:`fit_pool_weights` does (``1 - 1/(N + 2)`` on the
    label, the rest shared by the row's other finite logits), otherwise it is the upper bound, the maximum
    likelihood's limit. The router asks for Platt's targets on validation rows only: on support rows scored out
    of fold, and in the posterior its marginal test reads, the bound measured better (docs/accuracy.md).
    """
    z = _float(logits)                  # float32 logits stay float32; every block is widened to float64
    n, c = z.shape
    y = np.asarray(y)
    if y.ndim == 2:
        if y.shape != (n, c):
            raise ValueError(f"soft targets must have shape {(n, c)}, got {y.shape}")
        num = den = 0.0
        for b in row_blocks(n):
            Tb = np.asarray(y[b], dtype=np.float64)
            num += np.einsum("ij,ij->", Tb, np.asarray(z[b], dtype=np.float64))
            den += Tb.sum()
        target = num / den
    else:
        y = y.astype(np.int64)
        target = np.asarray(z[np.arange(n), y], dtype=np.float64).mean()
        if platt and n and c > 1 and labels_on_top(z, y):
            target = _platt_target(z, y)
    all_finite = all(bool(np.isfinite(z[b]).all()) for b in row_blocks(n))   # the usual case: no masking
    lo, hi = float(bounds[0]), float(bounds[1])
    m, var = np.empty(n), np.empty(n)

    def derivatives(s):
        for b in row_blocks(n):             # [N, C] temporaries one block of rows at a time
            zb = np.asarray(z[b], dtype=np.float64)
            if not all_finite:
                finite = np.isfinite(zb)
                zb = np.where(finite, zb, 0.0)
            e = s * zb if all_finite else np.where(finite, s * zb, -np.inf)   # exp(-inf) = 0: no mass
            e -= e.max(axis=1, keepdims=True)
            p = np.exp(e, out=e)
            p /= p.sum(axis=1, keepdims=True)
            m[b] = np.einsum("ij,ij->i", p, zb)
            var[b] = np.einsum("ij,ij->i", p, zb * zb) - m[b] * m[b]
        return m.mean() - target, max(var.mean(), 0.0)     # d NLL / ds, d2 NLL / ds2

    g, _ = derivatives(lo)
    if g >= 0:                       # the likelihood only falls from the lower bound on
        return lo
    g, _ = derivatives(hi)
    if g <= 0:
        return hi
    s = 1.0 if lo < 1.0 < hi else np.sqrt(lo * hi)
    for _ in range(100):
        g, h = derivatives(s)
        if g > 0:
            hi = s
        else:
            lo = s
        step = s - g / h if h > 0 else np.nan
        s_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(s_new - s) <= tol * s or hi - lo <= tol * s:
            return float(s_new)
        s = s_new
    return float(s)


def _platt_target(z, y: np.ndarray) -> float:
    """The mean over rows of ``sum_k T_k z_k`` for Platt's targets ``T`` (:func:`fit_temperature`): ``1 - 1/(N + 2)``
    on the label, ``1/(N + 2)`` shared by the row's other finite logits (masked classes have no mass)."""
    n = len(y)
    eps = 1.0 / (n + 2)
    total = 0.0
    for b in row_blocks(n):
        zb = np.asarray(z[b], dtype=np.float64)
        finite = np.isfinite(zb)
        label = zb[np.arange(len(zb)), y[b]]
        others = np.where(finite, zb, 0.0).sum(axis=1) - label
        n_others = finite.sum(axis=1) - 1
        shared = np.where(n_others > 0, others / np.maximum(n_others, 1), label)   # one class: all on the label
        total += np.sum((1.0 - eps) * label + eps * shared)
    return total / n


def fit_pool_weights(log_probs, y) -> np.ndarray:
    """Weights ``w >= 0`` maximising the mean log-likelihood of labels ``y`` under
    ``softmax(sum_j w_j log_probs[j])`` (``log_probs``: a list of [N, C] arrays over the same classes).

    The negative log-likelihood is convex in ``w`` (a softmax of a linear function of it), so L-BFGS-B from
    ``w = 1`` finds the optimum. The weights act as both the experts' relative trust and the pool's temperature.
    Where the fitted pool ranks every row's label first (:func:`labels_on_top`), the labels alone have no optimum
    (scaling ``w`` up raises the likelihood without limit, and the weights end wherever the search stops): they
    are fitted again to Platt's targets, ``1 - 1/(N + 2)`` on the label and the rest shared by the other classes
    (Platt 1999: as if one more row had been seen of each outcome), whose optimum a larger set of rows moves
    towards the labels. The experts' log-probabilities must be finite.
    """
    L = [np.asarray(lp, dtype=np.float64) for lp in log_probs]
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))
    picked = [lp[rows, y] for lp in L]

    def nll(w):
        ls = log_softmax(sum(wj * lp for wj, lp in zip(w, L)))
        p = np.exp(ls)
        grad = [-(pj - (p * lp).sum(axis=1)).mean() for pj, lp in zip(picked, L)]
        return -ls[rows, y].mean(), np.array(grad)

    w = _minimise_pool(nll, len(L))
    pooled = sum(wj * lp for wj, lp in zip(w, L))
    if len(y) == 0 or not labels_on_top(pooled, y):
        return w
    # Platt's targets (Platt 1999, Laplace's rule of succession): 1 - 1/(N + 2) on the label, the rest shared by the
    # C - 1 other classes. With z = sum_j w_j lp_j, a row's target log-likelihood is sum_k T_k z_k - lse(z), and
    # sum_k T_k z_k = sum_j w_j sum_k T_k lp_jk, fixed sums: each evaluation needs z, its log-sum-exp and the
    # experts' means under the pooled posterior (no [N, C] targets, no log-softmax array)
    kept = np.array([_platt_target(lp, y) for lp in L])     # [K]: mean_i sum_k T_ik lp_jik
    # the experts' log-probabilities can differ in scale by orders of magnitude (a temperature at its bound): the
    # search runs on weights relative to each expert's spread, which takes it far fewer steps
    spread = np.array([max(float(np.sqrt(np.mean((lp - lp.mean(axis=1, keepdims=True)) ** 2))), 1e-12) for lp in L])

    def nll_scaled(u):
        w = u / spread
        z = sum(wj * lp for wj, lp in zip(w, L))
        top = z.max(axis=1, keepdims=True)
        p = np.exp(z - top)
        total = p.sum(axis=1)
        p /= total[:, None]
        lse = top[:, 0] + np.log(total)
        grad = np.array([(p * lp).sum(axis=1).mean() for lp in L]) - kept
        return float(lse.mean() - w @ kept), grad / spread

    return _minimise_pool(nll_scaled, len(L)) / spread


def _minimise_pool(nll, n_experts: int) -> np.ndarray:
    """Non-negative pool weights minimising ``nll`` (value and gradient), L-BFGS-B from ``w = 1``."""
    res = minimize(nll, np.ones(n_experts), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * n_experts)
    return np.asarray(res.x, dtype=np.float64)


def balancing_bias(log_probs: np.ndarray, marginal, n_iter: int = 1000, tol: float = 1e-6,
                   method: str = "lbfgs") -> np.ndarray:
    """Per-class log-biases ``b`` [C] with which the mean of ``softmax(log_probs[i] + b)`` over the rows equals
    ``marginal`` (normalised to sum 1).

    This is Sinkhorn's matrix scaling of the posteriors ``P`` [N, C] to row sums ``1/N`` and column sums
    ``marginal`` (what InMaP does to its pseudo-labels): the row scalings only renormalise each row, and the
    column scalings are ``exp(b)``. Kept as a bias, the balancing applies to rows outside the set too (e.g.
    held-out rows that calibrate the expert), which a balanced matrix does not. Every ``P_ik > 0`` guarantees a
    solution (Sinkhorn 1967).

    ``method="rounds"``: iterative proportional fitting, ``w <- w * marginal / mean_i(P_i w / P_i . w)`` (two
    matrix-vector products per round), from ``b = 0`` until no bias moves by more than ``tol``, at most ``n_iter``
    rounds. Where some classes hold little mass it needs hundreds to thousands of rounds, so a small ``n_iter``
    balances only part of the way. ``method="lbfgs"``: the biases minimise the convex function
    ``mean_i log(P_i . exp(b)) - marginal . b`` (its gradient is the mean posterior minus the marginal), which
    L-BFGS (scipy) brings within ``tol`` of the marginal, relative to it, in tens of evaluations of that cost (at
    most ``n_iter``); the rounds then finish from there, usually after one. ``b`` is returned centred (mean 0); a
    class of zero marginal gets a large finite negative bias.
    """
    if method not in ("lbfgs", "rounds"):
        raise ValueError(f"method must be 'lbfgs' or 'rounds', got {method!r}")
    L = _float(log_probs)
    n, c = L.shape
    q = np.asarray(marginal, dtype=np.float64).ravel()
    if q.shape != (c,) or not np.all(np.isfinite(q)) or np.any(q < 0) or q.sum() <= 0:
        raise ValueError(f"marginal must be {c} finite non-negative weights with a positive sum")
    q = np.maximum(q / q.sum(), 1e-300)
    P = _posteriors(L)                  # in the dtype of L (store_dtype for the router's query sets)
    log_w = _minimise_balancing(P, q, n_iter, tol) if method == "lbfgs" else np.zeros(c)
    for _ in range(n_iter):
        w = np.exp(log_w - log_w.max())
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            m = w * _normalised_mean(P, w) / n        # the mean posterior with biases log w
        if not np.all(np.isfinite(m)):
            # some row's mass sits only on classes whose weights underflowed: the same mean in log space
            parts = []
            for b in row_blocks(n):
                Lb = np.asarray(L[b], dtype=np.float64)
                Z = Lb - logsumexp(Lb, axis=1, keepdims=True) + log_w
                parts.append(logsumexp(Z - logsumexp(Z, axis=1, keepdims=True), axis=0))
            total = parts[0] if len(parts) == 1 else logsumexp(np.stack(parts), axis=0)
            m = np.exp(total - np.log(n))
        step = np.log(q) - np.log(np.maximum(m, 1e-300))
        log_w += step
        if np.max(np.abs(step)) <= tol:
            break
    return log_w - log_w.mean()


def _minimise_balancing(P: np.ndarray, q: np.ndarray, max_evals: int, tol: float) -> np.ndarray:
    """Log-biases near the balancing's solution (:func:`balancing_bias`, ``method="lbfgs"``): L-BFGS-B on
    ``f(b) = mean_i log(P_i . exp(b)) - q . b`` from ``b = 0``, stopped once no class with mass in ``q`` is further
    than ``tol`` (relative) from it, or after ``max_evals`` evaluations. A step where the function is not finite (a
    row whose mass sits only on classes whose weights underflowed) counts as a failed step of the line search; if
    even ``b = 0`` gives no finite value, zeros are returned and the rounds start from there."""
    n = P.shape[0]

    def value_and_gradient(b):
        top = b.max()
        w = np.exp(b - top)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            total, acc = _weighted_sums(P, w)
            f, g = total / n + top - q @ b, w * acc / n - q
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            return np.inf, np.zeros_like(b)
        return f, g

    gtol = tol * float(q[q > 1e-250].min())
    res = minimize(value_and_gradient, np.zeros(len(q)), jac=True, method="L-BFGS-B",
                   options={"maxfun": max_evals, "maxiter": max_evals, "gtol": gtol, "ftol": 0.0})
    return res.x if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) else np.zeros(len(q))


def paired_difference(d) -> tuple[float, float]:
    """Mean and standard error of per-row paired differences ``d`` (the standard error is infinite with
    fewer than two rows, so no test on it passes)."""
    d = np.asarray(d, dtype=np.float64).ravel()
    if d.size < 2:
        return (float(d.mean()) if d.size else 0.0), float("inf")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def bic_penalty(n_classes: int, n_rows: int) -> float:
    """BIC penalty of a class marginal's ``C - 1`` free parameters on ``N`` rows: ``(C-1)/2 log N``."""
    return 0.5 * (n_classes - 1) * np.log(max(n_rows, 2))


def estimate_prior(log_post: np.ndarray, n_iter: int = 200, tol: float = 1e-8, bic: bool = True):
    """EM estimate of the class marginal of a set of rows from posteriors made under a uniform prior.

    ``log_post`` [N, C] are log-posteriors of a classifier trained with a uniform class prior (Saerens,
    Latinne & Decaestecker 2002). Returns ``(q, gain)``: the estimated marginal and the gain in total
    log-likelihood over the uniform marginal. With ``bic=True`` the estimate is kept only when the gain
    exceeds ``(C-1)/2 * log N`` (the BIC penalty of its ``C-1`` free parameters); otherwise uniform
    is returned, so that a classifier's own bias is not mistaken for class imbalance on small or
    balanced query sets.
    """
    log_post = _float(log_post)
    n, c = log_post.shape
    post = _posteriors(log_post, floor=0.0)    # in the dtype of log_post (float32 for large query sets)
    q = np.full(c, 1.0 / c)
    for _ in range(n_iter):
        # E and M steps without the [N, C] responsibilities r_ik = post_ik w_k / (post_i . w), w = q C:
        # q_k <- mean_i r_ik = w_k mean_i post_ik / (post_i . w), two matrix-vector products
        w = q * c
        q_new = w * _normalised_mean(post, w) / n
        done = np.max(np.abs(q_new - q)) < tol
        q = q_new
        if done:
            break
    ll = 0.0                                            # minus the uniform ll (= 0)
    for _, Pb in posterior_blocks(post):
        ll += np.log(np.maximum(Pb @ (q * c), 1e-300)).sum()
    if bic and ll <= bic_penalty(c, n):
        return np.full(c, 1.0 / c), float(ll)
    return q, float(ll)


def marginal_test(post: np.ndarray):
    """Class marginal of a set of rows from posteriors that already account for it (e.g. a transductive
    model's), or uniform when the data do not support it.

    ``q`` is the mean posterior (the soft class counts over N). As a multinomial model of those soft labels it
    gains ``N * KL(q || uniform)`` in log-likelihood over the uniform marginal; ``q`` is kept only when that
    gain exceeds the BIC penalty ``(C-1)/2 log N``. Returns ``(q, gain, kept)``.
    """
    post = _float(post)
    n, c = post.shape
    q = post.sum(axis=0, dtype=np.float64)          # no float64 copy of float32 posteriors
    q /= q.sum()
    gain = float(n * np.sum(q * np.log(np.maximum(q * c, 1e-300))))
    kept = gain > bic_penalty(c, n)
    return (q if kept else np.full(c, 1.0 / c)), gain, bool(kept)


def compatible_marginal(q: np.ndarray, post: np.ndarray) -> bool:
    """Whether the class marginal ``q`` is compatible with the soft class counts of ``post`` [N, C]: their
    log-likelihood under ``q`` falls short of the best marginal (their mean ``m``) by ``N * KL(m || q)``, and
    ``q`` is compatible when that stays within the BIC penalty ``(C-1)/2 log N`` (a ``q`` with no mass on a
    class that ``post`` gives some is never compatible)."""
    post = _float(post)
    n, c = post.shape
    m = post.sum(axis=0, dtype=np.float64)
    m /= m.sum()
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):     # 0 * log 0 terms are dropped by the where
        kl = float(np.sum(np.where(m > 0, m * (np.log(np.maximum(m, 1e-300)) - np.log(q)), 0.0)))
    return bool(np.isfinite(kl) and n * kl <= bic_penalty(c, n))
