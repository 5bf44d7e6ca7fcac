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
        self._validate_params()
        if y is None:
            raise ValueError("GDA.fit needs labels y ([N] integers or [N, C] class weights)")
        X = check_features(X, "X", normalised=False)              # float32: the large products run in it
        A = _label_weights(y, X.shape[0], None if text is None else np.shape(text)[0])
        N, D = X.shape
        counts = A.sum(axis=0)
        row_w = A.sum(axis=1)
        total = float(row_w.sum())
        present = counts > 0
        # everything about the rows' spread is computed around their weighted centre (no cancellation)
        # (a float32 product: the centre only fixes the origin, every quantity below is computed around it)
        centre = (X.T @ row_w.astype(np.float32)).astype(np.float64) / total
        means = np.zeros((A.shape[1], D))                             # centred class means
        if N <= calibration.CHUNK_ROWS:
            Xc = X - centre.astype(np.float32)
            means[present] = (A[:, present].T.astype(np.float32) @ Xc).astype(np.float64) / counts[present, None]
            scatter = _weighted_scatter(Xc, row_w)
        else:   # the same sums over blocks of rows: no centred copy of all rows, no [N, C] copies
            sums, scatter = np.zeros((int(present.sum()), D)), np.zeros((D, D))
            for b in row_blocks(N):
                Xc = X[b] - centre.astype(np.float32)
                sums += A[b][:, present].T.astype(np.float32) @ Xc
                scatter += _weighted_scatter(Xc, row_w[b])
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


def _label_weights(y, n_rows: int, n_classes: int | None) -> np.ndarray:
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
    y = check_labels(y, n_rows, n_classes, "y", require_all=True)
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
