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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stages.base import Stage, log_softmax
from ..stages.calibration import fit_temperature, paired_difference
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

    def fit_predict(self, xq: np.ndarray, soft: np.ndarray):
        """Fit on the queries ``xq`` (soft labels ``soft`` [Nq, C]) and the support rows: (posterior of the
        queries, posterior of the held-out rows or None, temperature).

        The temperature is fitted on the held-out rows (each fold of held-out support rows scored by the stage
        refitted without it), else on the queries' soft labels; 1 when ``calibrate`` is off."""
        sj, onehot = self._support_rows()
        X, Y = np.concatenate([xq, sj]), np.concatenate([soft, onehot])
        g = clone(self.stage).fit(X, Y)
        z = g.decision_function(xq)
        zv = None
        if not self.calibrate:
            t = 1.0
        elif self.held_x is not None and self.held_folds is not None:
            def score_fold(f, rows):
                train = np.concatenate([np.ones(len(xq), bool), self.support_folds != f])
                return clone(self.stage).fit(X[train], Y[train]).decision_function(self.held_x[rows])

            zv = out_of_fold(self.held_folds, score_fold)
            t = fit_temperature(zv, self.held_y)
        elif self.held_x is not None:
            zv = g.decision_function(self.held_x)
            t = fit_temperature(zv, self.held_y)
        else:
            t = fit_temperature(z, soft / soft.sum(axis=1, keepdims=True))
        held = None if zv is None else np.exp(log_softmax(t * zv))
        return np.exp(log_softmax(t * z)), held, t

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
            X = np.concatenate([xq, xv, sj])
            Y = np.concatenate([soft, held_soft, onehot])
            z = clone(self.stage).fit(X, Y).decision_function(xv)
        else:
            def score_fold(f, rows):
                train = self.support_folds != f
                X = np.concatenate([xq, sj[train], xv[rows]])
                Y = np.concatenate([soft, onehot[train], held_soft[rows]])
                return clone(self.stage).fit(X, Y).decision_function(xv[rows])

            z = out_of_fold(folds, score_fold)
        rows = np.arange(len(y))
        d = (log_softmax(fit_temperature(z, y) * z)[rows, y]
             - np.log(np.maximum(held_soft[rows, y], np.finfo(np.float64).tiny)))
        return paired_difference(d)
