"""GDA: Gaussian discriminant analysis with one shared, shrunk covariance (linear discriminant analysis).

Each class k is a Gaussian ``N(mu_k, Sigma)`` with its own mean and a covariance shared by all classes, so the
log-posterior is linear in x::

    z_k(x) = x . Sigma^-1 mu_k - mu_k . Sigma^-1 mu_k / 2 + log pi_k

The rows that estimate it may carry hard labels (support rows) or soft labels (a posterior over the classes, e.g.
the cascade's for the unlabelled queries): every row counts towards every class with its weight, so
``mu_k = sum_i y_ik x_i / sum_i y_ik``, ``pi_k`` is proportional to ``sum_i y_ik``, and ``Sigma`` is the pooled
within-class scatter. With few rows per dimension the scatter is shrunk towards a target ``T`` with the same
trace: ``(1 - shrinkage) S + shrinkage T``, where ``T`` is ``tr(S) / D I`` (``target="identity"``, Ledoit & Wolf's;
shrinkage 0 is Fisher's discriminant, 1 the nearest-class-mean rule in Euclidean distance) or ``diag(S)``
(``target="diagonal"``, Schafer & Strimmer's "target D": correlations shrink, each dimension keeps its variance).
The scatter is computed around the weighted means; the means that score are then shrunk towards the rows'
weighted centre ``c``: ``mu_k = c + sum_i y_ik (x_i - c) / (sum_i y_ik + mean_prior)``, the posterior mean when
each class mean has a Gaussian prior at ``c`` worth ``mean_prior`` rows. It matters only for classes with little
weight: fitted on a handful of queries with soft labels, a class that no support row describes (an unseen
class) would otherwise have its mean on the queries themselves and claim them.

In the cascade (``cascade.router``) this is the transductive refinement: fitted on the queries with the
combined posterior of the other stages as soft labels, plus the labelled support rows, it re-scores every
query with the class means and the covariance of the query set itself (the "hard-to-beat" GDA baseline of
Wang et al., ICLR 2024, made transductive).
"""
from __future__ import annotations

from numbers import Real

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from scipy.linalg.blas import ssyrk

from . import calibration
from .base import Interval, Options, Stage, check_features, check_labels, register_stage
from .calibration import row_blocks


@register_stage("gda")
class GDA(Stage):
    """Shared-covariance Gaussian classifier fitted on hard or soft labels.

    Parameters
    ----------
    shrinkage : float, 0.5
        Weight in [0, 1] of the scaled identity in the covariance (0: the pooled scatter alone).
    class_prior : "fit" | "uniform", "fit"
        "fit": ``log pi_k`` from the (soft) class counts of the rows; "uniform": no prior term.
    target : "identity" | "diagonal", "identity"
        What the scatter is shrunk towards: the identity scaled to its mean variance, or its own diagonal.
    mean_prior : float, 1.0
        Weight, in rows, of a prior observation of every class at the rows' weighted centre ``c``: class k's
        mean is ``c + sum_i y_ik (x_i - c) / (n_k + mean_prior)`` (the posterior mean under a conjugate
        Gaussian prior). A class seen by a fraction of a row stays near the centre instead of sitting on that
        row; 0 gives the plain weighted means.
    """

    soft_labels = True

    _parameter_constraints = {
        "shrinkage": [Interval(Real, 0, 1)],
        "class_prior": [Options("fit", "uniform")],
        "target": [Options("identity", "diagonal")],
        "mean_prior": [Interval(Real, 0, None)],
    }

    def __init__(self, shrinkage: float = 0.5, class_prior: str = "fit", target: str = "identity",
                 mean_prior: float = 1.0):
        self.shrinkage = shrinkage
        self.class_prior = class_prior
        self.target = target
        self.mean_prior = mean_prior

    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "GDA":
        """Fit on rows ``X`` [N, D] and labels ``y``: integer labels [N] or non-negative class weights [N, C]
        (soft labels, as the cascade's refinement gets; rows need not sum to one). The number of classes is the
        number of rows of ``text`` when given, else the soft labels' width or ``max(y) + 1``. ``val`` and
        ``query`` are ignored (the cascade passes the queries as soft-labelled rows of ``X``)."""
        if y is None:
            raise ValueError("GDA.fit needs labels y ([N] integers or [N, C] class weights)")
        return self.fit_parts([(X, y)], n_classes=None if text is None else np.shape(text)[0])

    def fit_parts(self, parts, n_classes: int | None = None) -> "GDA":
        """Fit on the rows of several ``(X, y)`` parts (each as ``fit`` takes them) as on their concatenation,
        without making it: the cascade's refinement fits on a large set of soft-labelled queries plus a few
        labelled rows. Up to :data:`~cascade.stages.calibration.CHUNK_ROWS` rows in all the parts are
        concatenated and the computation is exactly ``fit``'s; beyond, the sums run over blocks of rows of each
        part (no [N, D] or [N, C] copy), in float32 products accumulated in float64."""
        self._validate_params()
        parts = [(check_features(X, "X" if len(parts) == 1 else f"X (part {i})", normalised=False), y)
                 for i, (X, y) in enumerate(parts)]       # float32: the large products run in it
        if any(y is None for _, y in parts):
            raise ValueError("GDA.fit needs labels y ([N] integers or [N, C] class weights)")
        if n_classes is None:
            widths = [np.shape(y)[1] for _, y in parts if np.ndim(y) == 2]
            n_classes = widths[0] if widths else max(int(np.max(y)) + 1 if np.size(y) else 0 for _, y in parts)
        N = sum(X.shape[0] for X, _ in parts)
        D = parts[0][0].shape[1]
        if any(X.shape[1] != D for X, _ in parts):
            raise ValueError(f"X: the parts have different feature dimensions {[X.shape[1] for X, _ in parts]}")
        if N <= calibration.CHUNK_ROWS:             # one block: the rows concatenated (small), exactly as before
            X = parts[0][0] if len(parts) == 1 else np.concatenate([X for X, _ in parts])
            A = [_label_weights(y, X_.shape[0], n_classes, require_all=len(parts) == 1) for X_, y in parts]
            A = A[0] if len(A) == 1 else np.concatenate(A)
            counts = A.sum(axis=0)
            row_w = A.sum(axis=1)
            total = float(row_w.sum())
            present = counts > 0
            # everything about the rows' spread is computed around their weighted centre (no cancellation)
            # (a float32 product: the centre only fixes the origin, every quantity below is computed around it)
            centre = (X.T @ row_w.astype(np.float32)).astype(np.float64) / total
            means = np.zeros((A.shape[1], D))                             # centred class means
            Xc = X - centre.astype(np.float32)
            means[present] = (A[:, present].T.astype(np.float32) @ Xc).astype(np.float64) / counts[present, None]
            scatter = _weighted_scatter(Xc, row_w)
        else:   # the same sums over blocks of rows of every part: no copy of all rows, no [N, C] copies
            counts, centre = np.zeros(n_classes), np.zeros(D)
            for Xb, Ab in _label_blocks(parts, n_classes):
                counts += Ab.sum(axis=0)
                centre += Xb.T @ Ab.sum(axis=1).astype(np.float32)
            total = float(counts.sum())
            centre /= total
            present = counts > 0
            means = np.zeros((n_classes, D))
            sums, scatter = np.zeros((int(present.sum()), D)), np.zeros((D, D))
            for Xb, Ab in _label_blocks(parts, n_classes):
                Xc = Xb - centre.astype(np.float32)
                sums += Ab[:, present].T.astype(np.float32) @ Xc
                scatter += _weighted_scatter(Xc, Ab.sum(axis=1))
            means[present] = sums / counts[present, None]
        # a class without any weight (possible with soft labels that underflowed) sits at the centre and gets
        # the smallest prior below, so it never wins on its own
        scatter -= (means[present] * counts[present, None]).T @ means[present]
        scatter /= total
        scatter = (scatter + scatter.T) / 2.0
        a = float(self.shrinkage)
        cov = (1.0 - a) * scatter
        cov[np.diag_indices(D)] += a * (np.trace(scatter) / D if self.target == "identity" else np.diag(scatter))
        # the class means shrink towards the centre (0 here) as if each class had mean_prior more rows there
        means[present] *= (counts[present] / (counts[present] + float(self.mean_prior)))[:, None]
        coef = _solve_psd(cov, means.T).T                  # [C, D] = (Sigma^-1 mu_k)^T, mu_k centred
        # z_k(x) = (x - centre) . coef_k - mu_k . coef_k / 2 (+ log prior): the centre moves into the intercept
        intercept = -0.5 * np.einsum("kd,kd->k", coef, means) - coef @ centre
        prior = counts / total
        if self.class_prior == "fit":
            intercept += np.log(np.maximum(prior, np.finfo(np.float64).tiny))
        self.means_ = (means + centre).astype(np.float32)
        self.covariance_ = cov
        self.coef_ = np.ascontiguousarray(coef, dtype=np.float32)
        self.intercept_ = intercept
        self.class_prior_ = prior
        self.n_rows_ = int(N)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Log-posteriors up to a constant per row: ``x . coef_k + intercept_k`` (computed around the rows'
        centre, which shifts every class of a row by the same amount)."""
        self._check_fitted()
        X = check_features(X, "X", dim=self.coef_.shape[1], normalised=False)
        out = np.empty((X.shape[0], self.coef_.shape[0]))
        for b in row_blocks(X.shape[0]):
            out[b] = (X[b] @ self.coef_.T).astype(np.float64) + self.intercept_
        return out


def _label_blocks(parts, n_classes: int):
    """(rows [b, D] float32, class weights [b, C] float64) of every part, a block of rows at a time."""
    for i, (X, y) in enumerate(parts):
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[0] != X.shape[0] or y.ndim == 1 and y.shape[0] != X.shape[0]:
            raise ValueError(f"y (part {i}): expected {X.shape[0]} rows, got shape {y.shape}")
        for b in calibration.row_blocks(X.shape[0]):
            yield X[b], _label_weights(y[b], b.stop - b.start, n_classes, require_all=False)


def _label_weights(y, n_rows: int, n_classes: int | None, require_all: bool = True) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2:
        if y.shape[0] != n_rows:
            raise ValueError(f"y: expected {n_rows} rows of class weights, got shape {y.shape}")
        if n_classes is not None and y.shape[1] != n_classes:
            raise ValueError(f"y: {y.shape[1]} class columns but {n_classes} classes")
        A = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(A)) or np.any(A < 0):
            raise ValueError("y: class weights must be finite and non-negative")
        if np.any(A.sum(axis=1) <= 0):
            raise ValueError("y: every row needs a positive total class weight")
        return A
    if y.ndim != 1:
        raise ValueError(f"y: expected labels [N] or class weights [N, C], got shape {y.shape}")
    if n_classes is None:
        n_classes = int(np.max(y)) + 1 if y.size else 0
    y = check_labels(y, n_rows, n_classes, "y", require_all=require_all)
    A = np.zeros((n_rows, n_classes))
    A[np.arange(n_rows), y] = 1.0
    return A


def _weighted_scatter(Xc: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``sum_i w_i x_i x_i^T`` [D, D] (float64) of float32 rows ``Xc`` [N, D] and weights ``w >= 0``: one BLAS
    symmetric rank-k update (half the products of a general matrix product), mirrored."""
    Xs = Xc * np.sqrt(w).astype(np.float32)[:, None]
    upper = ssyrk(1.0, Xs.T, trans=0, lower=0)          # Xs.T is Fortran-ordered: no copy
    out = np.triu(upper).astype(np.float64)
    return out + np.triu(out, 1).T


def _solve_psd(cov: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """cov^-1 rhs for a symmetric positive semi-definite cov (Cholesky; pseudo-inverse when singular)."""
    try:
        return cho_solve(cho_factor(cov, lower=True, check_finite=False), rhs, check_finite=False)
    except LinAlgError:
        w, V = np.linalg.eigh(cov)
        keep = w > w.max() * 1e-10
        return V[:, keep] @ ((V[:, keep].T @ rhs) / w[keep, None])
