"""LP++: a linear probe blended with the text classifier (Huang et al., arXiv 2404.02285).

Same procedure as the authors' ``LinearProbe_P2`` (FereshteShakeri/FewShot-CLIP-Strong-Baseline), written
independently. Logits of a feature x for class k::

    z_k(x) = w_k . x + b_k + alpha_k * (x . t_k)

* ``w_k`` starts at the SUM of class k's support features; ``b`` like a freshly built torch ``nn.Linear``
  bias, uniform in +-1/sqrt(D) (seeded, numpy generator);
* every ``alpha_k`` starts at ``alpha_scale`` (250) x the mean over classes of the mean similarity between a
  class's support features and its own text embedding;
* ``w, b``: full-batch SGD with momentum 0.9 (torch convention: buf = 0.9 buf + g, p -= lr buf) on the mean
  cross-entropy, step ``4 N / lambda_max(F^T F)``;
* ``alpha``: every ``alpha_every`` (10) epochs, ``alpha -= N / (4 max_k sum_i (f_i . t_k)^2) * G`` where G
  is alpha's gradient ACCUMULATED over all epochs so far (the reference never zeroes it);
* ``epochs`` (300) epochs; with validation rows given, the parameters after the epoch with the best
  validation accuracy are kept (ties go to the later epoch), else the last epoch's.

``select="auto"`` (an extension, the cascade's setting) keeps the last epoch unless the best-validation epoch is
SIGNIFICANTLY better on the validation rows: its accuracy minus the last epoch's, row by row, must exceed
``AUTO_SELECT_Z`` (2) standard errors of that paired difference. It checks the validation rows after each of the
first 10 epochs, then every 10th and the last (a fifth of the products of checking every epoch of 100). Where the
probe trains well the arg-max over epochs mostly picks noise (and the cascade calibrates the last epoch on the
validation rows anyway); where the classes are hard to separate, the full-batch steps overfit the few shots badly
(docs/stages.md, "Harder images") and the validation rows say so clearly.
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np

from .base import Interval, Options, Stage, check_features, check_support, register_stage, softmax
from .calibration import paired_difference

AUTO_SELECT_Z = 2.0     # select="auto": standard errors by which the best epoch must beat the last on validation


@register_stage("lpp")
class LinearProbePP(Stage):
    """LP++ stage over the classes of ``text`` (each needs at least one support row).

    Parameters (authors' defaults)
    ----------
    epochs : int, 300
    alpha_scale : float, 250.0    initial alpha = alpha_scale x mean own-class text similarity.
    momentum : float, 0.9
    alpha_every : int, 10         epochs between alpha updates.
    select : "val" | "last" | "auto", "val"
        With val data: keep the best-validation epoch ("val"), the last ("last"), or the last unless the best
        beats it significantly on the validation rows ("auto", see the module docstring).
    random_state : int, 0         seed of the bias initialisation.
    """

    _parameter_constraints = {
        "epochs": [Interval(Integral, 1, None)],
        "alpha_scale": [Interval(Real)],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "alpha_every": [Interval(Integral, 1, None)],
        "select": [Options("val", "last", "auto")],
        "random_state": [Interval(Integral), Options(None)],
    }

    def __init__(self, epochs: int = 300, alpha_scale: float = 250.0, momentum: float = 0.9,
                 alpha_every: int = 10, select: str = "val", random_state: int = 0):
        self.epochs = epochs
        self.alpha_scale = alpha_scale
        self.momentum = momentum
        self.alpha_every = alpha_every
        self.select = select
        self.random_state = random_state

    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "LinearProbePP":
        """Train on support features ``X`` [N, D] with labels ``y`` in 0..K-1 and ``text`` [K, D].

        ``val``: optional ``(val_x, val_y)`` used only to choose the epoch (``select="val"`` or ``"auto"``).
        ``query`` is ignored (an inductive stage).
        """
        self._validate_params()
        X, y, text, val = check_support(X, y, text, val, require_all=True)
        K, D = text.shape
        N = X.shape[0]
        F = X.astype(np.float32)
        T = text.astype(np.float32)
        Y = np.zeros((N, K), np.float32)
        Y[np.arange(N), y] = 1.0
        S = F @ T.T                                     # [N, K] text similarities
        counts = Y.sum(axis=0)

        W = Y.T @ F                                     # per-class sum of support features
        bound = 1.0 / np.sqrt(D)
        b = np.random.default_rng(self.random_state).uniform(-bound, bound, K).astype(np.float32)
        own = (Y * S).sum(axis=0) / counts              # mean own-class similarity per class
        alpha = np.full(K, self.alpha_scale * float(own.astype(np.float64).mean()), np.float32)
        lam_max = float(np.linalg.eigvalsh(F.T.astype(np.float64) @ F.astype(np.float64))[-1])
        lr_w = np.float32(4.0 * N / lam_max)
        lr_alpha = np.float32(N / (4.0 * float((S.astype(np.float64) ** 2).sum(axis=0).max())))

        use_val = self.select in ("val", "auto") and val is not None     # None too where val has no rows
        if use_val:
            vx, vy = val
        best = (-1.0, -1, W.copy(), b.copy(), alpha.copy(), None)
        hit = None
        # The logits fold alpha into the weights, z = x . (w_k + alpha_k t_k) + b_k (a [K, D] sum instead of two
        # passes over [N, K] per epoch), and alpha's gradient sum_i g_ik (x_i . t_k) is (G^T X)_k . t_k, read off
        # W's gradient G^T X (a [K, D] pass instead of two over [N, K]).
        # Everything below is float32 and updated in place (no per-epoch allocations of [N, K] or [K, D]).
        A = np.empty_like(W)                            # W + alpha t, the effective weights
        buf_w = np.zeros_like(W)
        buf_b = np.zeros_like(b)
        g_w = np.empty_like(W)
        step_w = np.empty_like(W)
        g_alpha = np.zeros(K, np.float32)
        Z = np.empty((N, K), np.float32)
        rows = np.arange(N)
        mom = np.float32(self.momentum)
        inv_n = np.float32(1.0 / N)
        for epoch in range(self.epochs):
            np.multiply(T, alpha[:, None], out=A)
            A += W
            np.matmul(F, A.T, out=Z)
            Z += b
            softmax(Z, out=Z)
            Z[rows, y] -= 1.0                           # N x dLoss/dlogits
            np.matmul(Z.T, F, out=g_w)
            g_w *= inv_n
            g_b = Z.sum(axis=0) * inv_n
            g_alpha += np.einsum("kd,kd->k", g_w, T)
            if epoch > 0:                               # torch SGD: buf = g at the first step
                buf_w *= mom
                buf_b *= mom
            buf_w += g_w
            buf_b += g_b
            np.multiply(buf_w, lr_w, out=step_w)
            W -= step_w
            b -= lr_w * buf_b
            if (epoch + 1) % self.alpha_every == 0:
                alpha -= lr_alpha * g_alpha
            if use_val and (self.select == "val" or epoch < 10 or (epoch + 1) % 10 == 0
                            or epoch == self.epochs - 1):
                np.multiply(T, alpha[:, None], out=A)
                A += W
                hit = np.argmax(vx @ A.T + b, axis=1) == vy
                acc = float(np.mean(hit))
                if acc >= best[0]:
                    best = (acc, epoch, W.copy(), b.copy(), alpha.copy(), hit)
        if use_val and self.select == "auto" and not _significantly_better(best[5], hit):
            best = (float(np.mean(hit)), self.epochs - 1, W, b, alpha, hit)
        if use_val:
            self.val_accuracy_, self.best_epoch_ = best[0] * 100.0, best[1]
            W, b, alpha = best[2], best[3], best[4]
        else:
            self.best_epoch_ = self.epochs - 1
        self.coef_ = np.ascontiguousarray(W, dtype=np.float32)
        self.intercept_ = np.asarray(b, dtype=np.float32)
        self.alpha_ = np.asarray(alpha, dtype=np.float32)
        self.text_ = T
        self.lr_w_, self.lr_alpha_ = float(lr_w), float(lr_alpha)
        return self

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X = check_features(X, "X", dim=self.coef_.shape[1])
        return X @ self.coef_.T + self.intercept_ + self.alpha_ * (X @ self.text_.T)


def _significantly_better(hit_a: np.ndarray, hit_b: np.ndarray, z: float = AUTO_SELECT_Z) -> bool:
    """Whether the rows' hits ``hit_a`` beat ``hit_b`` (same rows) by more than ``z`` standard errors of the
    paired difference (never with fewer than two rows or no difference at all)."""
    mean, se = paired_difference(hit_a.astype(np.float64) - hit_b.astype(np.float64))
    return bool(mean > 0 and mean > z * se)
