"""The refinement of the pooled distribution, and the check that may drop it.

The refine stage (by default a shared-covariance Gaussian classifier, :class:`~cascade.stages.gda.GDA`) is
fitted on the queries, with the pooled distribution as soft labels, plus the labelled support rows. Its
posterior, at a temperature fitted on held-out rows, is the final score over all classes.

On tasks whose classes CLIP separates poorly, a Gaussian fitted to mostly wrong soft labels does worse than the
experts it started from. The check catches this: the refinement is refitted with the held-out rows among its
soft-labelled rows, so that they are scored in sample as the queries are, and it is dropped when its mean
log-likelihood of their labels falls more than ``refine_check`` standard errors below the pool's.

Held-out support rows (no validation rows) are scored fold by fold, by the refinement refitted without their
fold (:func:`~cascade.router.folds.out_of_fold`).

Large query sets: the rows are given to the stage as parts (queries, support rows, held-out rows) that a stage
with ``fit_parts`` (the GDA) fits on without concatenating them, and the queries' posterior is made a block of
rows at a time, kept in ``calibration.store_dtype`` (float32 beyond ``FLOAT64_ROWS`` queries).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stages import calibration
from ..stages.base import Stage, log_softmax
from ..stages.calibration import fill_rows, fit_temperature, paired_difference
from .folds import out_of_fold
from .pool import clone


@dataclass
class Refinement:
    """The refine stage and the labelled rows it is fitted and judged with (joint features throughout)."""
    stage: Stage                          # the prototype, cloned for every fit
    support_x: np.ndarray                 # [Ns, D] support rows, always among the fitted rows with their labels
    support_y: np.ndarray                 # [Ns]
    n_classes: int
    held_x: np.ndarray | None = None      # [Nv, D] held-out labelled rows (None: none)
    held_y: np.ndarray | None = None      # [Nv]
    held_folds: np.ndarray | None = None  # [Nv] their folds when they are support rows (None: validation rows)
    support_folds: np.ndarray | None = None   # [Ns] fold of every support row (with ``held_folds``)
    calibrate: bool = True

    def _support_rows(self):
        onehot = np.zeros((len(self.support_y), self.n_classes))
        onehot[np.arange(len(self.support_y)), self.support_y] = 1.0
        return self.support_x, onehot

    def _fit(self, parts) -> Stage:
        """A clone of the stage fitted on the rows of ``parts`` [(X, soft labels), ...] as on their concatenation.
        Beyond ``CHUNK_ROWS`` rows, without making it when the stage can (its ``fit_parts``, as the GDA's, serves
        its ``fit``), so that the large query set is not copied to add a few labelled rows."""
        g = clone(self.stage)
        cls = type(g)
        owner = next((c for c in cls.__mro__ if "fit_parts" in vars(c)), None)
        if (owner is not None and cls.fit is owner.fit
                and sum(len(X) for X, _ in parts) > calibration.CHUNK_ROWS):
            return g.fit_parts(parts)
        return g.fit(np.concatenate([X for X, _ in parts]), np.concatenate([Y for _, Y in parts]))

    def fit_predict(self, xq: np.ndarray, soft: np.ndarray):
        """Fit on the queries ``xq`` (soft labels ``soft`` [Nq, C]) and the support rows: (posterior of the
        queries, posterior of the held-out rows or None, temperature).

        The temperature is fitted on the held-out rows (each fold of held-out support rows scored by the stage
        refitted without it), else on the queries' soft labels; 1 when ``calibrate`` is off."""
        sj, onehot = self._support_rows()
        n, C = len(xq), self.n_classes
        g = self._fit([(xq, soft), (sj, onehot)])
        z, zv = None, None
        if not self.calibrate:
            t = 1.0
        elif self.held_x is not None and self.held_folds is not None:
            def score_fold(f, rows):
                train = self.support_folds != f
                return self._fit([(xq, soft), (sj[train], onehot[train])]).decision_function(self.held_x[rows])

            zv = out_of_fold(self.held_folds, score_fold, parallel=False)   # each refit holds all queries
            t = fit_temperature(zv, self.held_y)
        elif self.held_x is not None:
            zv = g.decision_function(self.held_x)
            t = fit_temperature(zv, self.held_y)
        else:                       # the temperature from the queries' own scores: kept, in store_dtype
            z = fill_rows(n, C, lambda b: g.decision_function(xq[b]))
            t = fit_temperature(z, soft / soft.sum(axis=1, keepdims=True))
        held = None if zv is None else np.exp(log_softmax(t * zv))
        # the queries' posterior, a block of rows at a time (their scores recomputed unless kept above)
        posterior = fill_rows(n, C, lambda b: np.exp(log_softmax(
            t * (g.decision_function(xq[b]) if z is None else np.asarray(z[b], dtype=np.float64)))))
        return posterior, held, t

    def gain(self, xq: np.ndarray, soft: np.ndarray, held_soft: np.ndarray):
        """Mean and standard error of the per-row difference in log-likelihood of the held-out rows' labels,
        refinement minus ``held_soft`` (the pooled distribution of those rows).

        The refinement is refitted with the held-out rows among its rows, soft-labelled by ``held_soft`` exactly
        as the queries are by ``soft``, so they are scored in sample as the queries are (held-out support rows:
        each fold in turn, the other folds with their labels). Its temperature is fitted on them, as the pool's
        exponents were. At most as many held-out rows as there are queries take part (a seeded random subset):
        more would make the refitted model mostly theirs, not the refinement being judged."""
        sj, onehot = self._support_rows()
        xv, folds, y = self.held_x, self.held_folds, self.held_y
        if len(y) > len(xq):
            keep = np.sort(np.random.default_rng(0).permutation(len(y))[:len(xq)])
            xv, held_soft, y = xv[keep], held_soft[keep], y[keep]
            if folds is not None:
                folds = folds[keep]
        if folds is None:
            z = self._fit([(xq, soft), (xv, held_soft), (sj, onehot)]).decision_function(xv)
        else:
            def score_fold(f, rows):
                train = self.support_folds != f
                return self._fit([(xq, soft), (sj[train], onehot[train]),
                                  (xv[rows], held_soft[rows])]).decision_function(xv[rows])

            z = out_of_fold(folds, score_fold, parallel=False)   # each refit holds all queries
        rows = np.arange(len(y))
        d = (log_softmax(fit_temperature(z, y) * z)[rows, y]
             - np.log(np.maximum(held_soft[rows, y], np.finfo(np.float64).tiny)))
        return paired_difference(d)
