"""InMaP: transductive zero-shot classification with vision proxies (Qian et al., arXiv 2310.19752).

Same equations as the authors' ``idstcv/InMaP`` ``main.py`` (``sinkhorn`` and ``image_opt``), written
independently:

1. pseudo-labels ``P = softmax(X T^T / tau_t)`` for the queries, optionally balanced by Sinkhorn towards a
   class marginal (uniform by default; ``prior`` makes it configurable) with ``n_sinkhorn`` rounds, each
   first fixing the column sums, then the row sums;
2. rows whose largest pseudo-label exceeds ``confidence`` become one-hot;
3. projected gradient descent on the vision proxies ``W`` [C, D], started from the text embeddings:
   ``grad = (softmax(X W^T / tau_i) - P)^T X``, step ``lr / (n tau_i)``, ``lr`` halved whenever the
   gradient's Frobenius norm grows, each proxy re-normalised to unit length after every step.

``tol`` (an extension) stops once a step changes no proxy entry by more than ``tol`` (after at least
``min_iter`` steps); ``tol=None`` runs all ``n_iter`` steps exactly as the authors do.
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy.special import logsumexp

from .base import (BOOL, ArrayLike, Interval, Options, Stage, check_features, check_labels, log_softmax,
                   register_stage, softmax)
from .calibration import estimate_prior, fit_temperature, row_blocks, store_dtype  # noqa: F401  (re-exported)


def sinkhorn(logits: np.ndarray, tau_t: float = 0.01, gamma: float = 0.0, n_iter: int = 20,
             prior: np.ndarray | None = None) -> np.ndarray:
    """Balanced pseudo-labels from ``logits`` [N, C] (rows sum to 1 on return).

    Columns are scaled to the class marginal (``prior``; else ``colsum**gamma`` normalised when
    ``gamma > 0``, as in the authors' code; else uniform ``1/C``), then rows to ``1/N``, ``n_iter`` times.

    The scalings run on probabilities, as the authors' code does, unless some class's column underflows
    to zero (a class no query finds plausible at ``tau_t``: its logits trail every row's best by more
    than ~7 at ``tau_t=0.01``), where they would divide by zero; the same iterations then run on
    log-probabilities, which give the same matrix without the underflow.

    float32 ``logits`` (large query sets, see :func:`~cascade.stages.calibration.store_dtype`) give float32
    pseudo-labels: no float64 copy of the [N, C] matrix is made on the scaling path.
    """
    n, c = logits.shape
    P = np.asarray(logits)
    P = (P if P.dtype in (np.float32, np.float64) else P.astype(np.float64)) / tau_t   # one [N, C] array
    softmax(P, out=P)
    P /= n
    if prior is not None:
        q = np.asarray(prior, dtype=np.float64).reshape(1, c)
        q = q / q.sum()
    elif gamma > 0:
        q = P.sum(axis=0, keepdims=True) ** gamma
        q /= q.sum()
    else:
        q = None
    if np.all(P.sum(axis=0) > 1e-250):
        with np.errstate(divide="raise", invalid="raise", over="raise", under="ignore"):
            try:
                return _sinkhorn_scaling(P, q, n_iter)
            except FloatingPointError:
                pass
    return _sinkhorn_log(np.asarray(logits, dtype=np.float64) / tau_t, q, n_iter)


def _sinkhorn_scaling(P: np.ndarray, q, n_iter: int) -> np.ndarray:
    n, c = P.shape
    for _ in range(n_iter):
        P /= P.sum(axis=0, keepdims=True)
        if q is not None:
            P *= q
        else:
            P /= c
        P /= P.sum(axis=1, keepdims=True)
        P /= n
    P *= n
    return P


def _sinkhorn_log(Z: np.ndarray, q, n_iter: int) -> np.ndarray:
    n, c = Z.shape
    logq = (np.full((1, c), -np.log(c)) if q is None
            else np.log(np.maximum(q, np.finfo(np.float64).tiny)))
    L = Z - logsumexp(Z, axis=1, keepdims=True) - np.log(n)
    for _ in range(n_iter):
        L -= logsumexp(L, axis=0, keepdims=True)
        L += logq
        L -= logsumexp(L, axis=1, keepdims=True)
        L -= np.log(n)
    return np.exp(L + np.log(n))


def sharpen_confident(plabel: np.ndarray, confidence: float = 0.6) -> np.ndarray:
    """Copy of ``plabel`` whose rows with max > ``confidence`` are replaced by one-hot rows."""
    plabel = np.array(plabel, dtype=np.float64, copy=True)
    idx = plabel.argmax(axis=1)
    mask = plabel[np.arange(len(plabel)), idx] > confidence
    plabel[mask] = 0.0
    plabel[np.flatnonzero(mask), idx[mask]] = 1.0
    return plabel


def image_opt(X: np.ndarray, init: np.ndarray, plabel: np.ndarray, lr: float = 10.0, n_iter: int = 2000,
              tau_i: float = 0.04, confidence: float = 0.6, tol: float | None = None, min_iter: int = 0,
              dtype=np.float32):
    """Learn vision proxies [C, D] from queries ``X`` [N, D] and pseudo-labels ``plabel`` [N, C].

    Returns ``(proxies, n_steps, final_lr)``.
    """
    X = np.ascontiguousarray(X, dtype=dtype)
    return proxy_descent(X, init, pseudo_label_target(X, plabel, confidence), lr, n_iter, tau_i, tol, min_iter)


def pseudo_label_target(X: np.ndarray, plabel: np.ndarray, confidence: float = 0.6) -> np.ndarray:
    """``(X^T P)^T`` [C, D], ``P`` the pseudo-labels sharpened by :func:`sharpen_confident`, in the dtype of ``X``:
    the fixed term of the proxies' gradient, summed a block of rows at a time (no [N, C] copy of ``P``)."""
    base = None
    for b in row_blocks(X.shape[0]):
        part = X[b].T @ sharpen_confident(plabel[b], confidence).astype(X.dtype)
        base = part if base is None else base + part
    return base.T


def proxy_descent(X: np.ndarray, init: np.ndarray, base: np.ndarray, lr: float = 10.0, n_iter: int = 2000,
                  tau_i: float = 0.04, tol: float | None = None, min_iter: int = 0):
    """The projected gradient descent of :func:`image_opt` from the target ``base`` of
    :func:`pseudo_label_target` (``X`` [N, D] C-contiguous, its dtype the computation's). The softmax of every
    step is made a block of :data:`~cascade.stages.calibration.CHUNK_ROWS` rows at a time (one block, the
    unchunked computation, up to that many rows). Returns ``(proxies, n_steps, final_lr)``."""
    dtype = X.dtype.type
    n = X.shape[0]
    W = np.array(init, dtype=dtype, copy=True)      # [C, D]
    blocks = list(row_blocks(n))
    logits = np.empty((blocks[0].stop - blocks[0].start, W.shape[0]), dtype=dtype)
    grad = np.empty_like(W)
    prev = np.inf
    inv_tau = dtype(1.0 / tau_i)
    step = 0
    for step in range(1, n_iter + 1):
        for i, b in enumerate(blocks):
            lb = logits[:b.stop - b.start]
            np.matmul(X[b], W.T, out=lb)
            lb *= inv_tau
            softmax(lb, out=lb)
            if len(blocks) == 1:
                np.matmul(lb.T, X[b], out=grad)
            else:                                   # the blocks' sum in float64, then rounded once
                if i == 0:
                    acc = np.zeros(grad.shape)
                acc += lb.T @ X[b]
        if len(blocks) > 1:
            grad[...] = acc
        grad -= base
        norm = float(np.sqrt(np.vdot(grad, grad)))
        if norm > prev:
            lr /= 2.0
        prev = norm
        W_new = W - dtype(lr / (n * tau_i)) * grad
        W_new /= np.linalg.norm(W_new, axis=1, keepdims=True)
        if tol is not None and step >= min_iter:
            change = float(np.max(np.abs(W_new - W)))
            W = W_new
            if change <= tol:
                break
        else:
            W = W_new
    return W, step, lr


@register_stage("inmap")
class InMaP(Stage):
    """Transductive InMaP stage; ``fit`` sees the (unlabelled) queries and the class text embeddings.

    Parameters (authors' defaults)
    ----------
    tau_t : float, 0.01      temperature of the text pseudo-labels.
    tau_i : float, 0.04      temperature of the vision-proxy softmax.
    lr : float, 10.0         initial step (halved when the gradient norm grows).
    n_iter : int, 2000       gradient steps.
    confidence : float, 0.6  pseudo-labels above this become one-hot (the authors' ``alpha``).
    sinkhorn : bool, True    balance the pseudo-labels by Sinkhorn.
    n_sinkhorn : int, 20     Sinkhorn rounds.
    gamma : float, 0.0       authors' marginal exponent (0: uniform marginal).
    prior : "uniform" | "auto" | array
        Class marginal for Sinkhorn. "uniform" is the paper; "auto" estimates it from the queries by EM
        (Saerens et al. 2002) on zero-shot posteriors whose temperature is fitted on the labelled support
        (if given to fit), and keeps the estimate only if it beats uniform by the BIC margin
        ``(C-1)/2 log N`` in log-likelihood (see ``estimate_prior``). An array is used as given.
    tol : float or None, None  early stop once a step changes no proxy entry by more than tol.
    """

    transductive = True
    _parameter_constraints = {
        "tau_t": [Interval(Real, 0, None, closed="neither")],
        "tau_i": [Interval(Real, 0, None, closed="neither")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "n_iter": [Interval(Integral, 1, None)],
        "confidence": [Interval(Real, 0, 1)],
        "sinkhorn": [BOOL],
        "n_sinkhorn": [Interval(Integral, 1, None)],
        "gamma": [Interval(Real, 0, None)],
        "prior": [Options("uniform", "auto"), ArrayLike()],
        "tol": [Interval(Real, 0, None), Options(None)],
    }

    def __init__(self, tau_t: float = 0.01, tau_i: float = 0.04, lr: float = 10.0, n_iter: int = 2000,
                 confidence: float = 0.6, sinkhorn: bool = True, n_sinkhorn: int = 20, gamma: float = 0.0,
                 prior="uniform", tol: float | None = None):
        self.tau_t = tau_t
        self.tau_i = tau_i
        self.lr = lr
        self.n_iter = n_iter
        self.confidence = confidence
        self.sinkhorn = sinkhorn
        self.n_sinkhorn = n_sinkhorn
        self.gamma = gamma
        self.prior = prior
        self.tol = tol

    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "InMaP":
        """Learn the vision proxies from the (unlabelled) queries and ``text`` [C, D].

        The queries are ``query`` [Nq, D]; then ``X``/``y`` are labelled support rows (of some classes, or None),
        used only to calibrate the zero-shot temperature when ``prior="auto"``. Without ``query``, ``X`` itself
        is the query set (and ``y`` must be None). ``val`` is ignored.
        """
        self._validate_params()
        if text is None:
            raise ValueError("InMaP.fit needs the class text embeddings (text=[C, D])")
        if query is None:
            if y is not None:
                raise ValueError("InMaP.fit: labels y without query rows; pass the queries as query=")
            support_x = support_y = None
        else:
            support_x, support_y = (X, y) if X is not None and y is not None else (None, None)
            X = query
        text = check_features(text, "text")
        X = check_features(X, "queries", dim=text.shape[1])
        T = text.T.astype(np.float64)
        # [N, C] arrays in float64 up to FLOAT64_ROWS queries, float32 beyond (calibration.store_dtype)
        logits = np.empty((X.shape[0], T.shape[1]), dtype=store_dtype(X.shape[0]))
        for b in row_blocks(X.shape[0]):            # no float64 copy of all queries at once
            logits[b] = X[b].astype(np.float64) @ T
        if self.sinkhorn:
            prior = self._resolve_prior(logits, text, support_x, support_y)
            plabel = sinkhorn(logits, self.tau_t, self.gamma, self.n_sinkhorn, prior=prior)
        else:
            prior = None
            plabel = softmax(logits / self.tau_t)
        del logits                                  # [N, C]: not needed by the proxies' descent
        X = np.ascontiguousarray(X, dtype=np.float32)
        base = pseudo_label_target(X, plabel, self.confidence)
        del plabel                                  # nor are the pseudo-labels, once summed into the target
        W, steps, lr = proxy_descent(X, text, base, self.lr, self.n_iter, self.tau_i, tol=self.tol)
        self.proxies_ = W
        self.prior_ = (np.full(text.shape[0], 1.0 / text.shape[0]) if prior is None
                       else np.asarray(prior, dtype=np.float64))
        self.n_iter_ = int(steps)
        self.final_lr_ = float(lr)
        return self

    def _resolve_prior(self, logits, text, support_x, support_y):
        prior = self.prior
        if isinstance(prior, str):
            if prior == "uniform":
                return None
            if prior == "auto":
                scale = 1.0 / self.tau_t
                if support_x is not None:
                    sx = check_features(support_x, "support_x", dim=text.shape[1])
                    sy = check_labels(support_y, sx.shape[0], text.shape[0], "support_y", require_all=False)
                    scale = fit_temperature(sx.astype(np.float64) @ text.T.astype(np.float64), sy)
                lp = np.empty_like(logits)          # zero-shot log-posteriors, a block of rows at a time
                for b in row_blocks(logits.shape[0]):
                    lp[b] = log_softmax(np.asarray(logits[b], dtype=np.float64) * scale)
                q, _ = estimate_prior(lp)
                return q
            raise ValueError(f"prior must be 'uniform', 'auto' or an array, got {prior!r}")
        q = np.asarray(prior, dtype=np.float64)
        if q.shape != (text.shape[0],):
            raise ValueError(f"prior must be {text.shape[0]} non-negative weights (one per class), got shape {q.shape}")
        if not np.all(np.isfinite(q)) or np.any(q < 0) or q.sum() <= 0:
            raise ValueError("prior must be finite non-negative weights with a positive sum, got "
                             + ("a negative or non-finite one" if not np.all(np.isfinite(q) & (q >= 0)) else "sum 0"))
        return q / q.sum()

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X = check_features(X, "X", dim=self.proxies_.shape[1])
        return (X @ self.proxies_.T) / np.float32(self.tau_i)
