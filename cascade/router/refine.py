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

Where the final distribution is balanced, the refinement is refitted on the balanced pool and anchored by it
(``Cascade(balance_refit=True)``); :meth:`Refinement.balanced_gain` judges that refit the same way, the
validation rows taking part in its balancings and its fit as the queries do (``Cascade(refit_check=...)``).

Large query sets: the rows are given to the stage as parts (queries, support rows, held-out rows) that a stage
with ``fit_parts`` (the GDA) fits on without concatenating them, and the queries' posterior is made a block of
rows at a time, kept in ``calibration.store_dtype`` (float32 beyond ``FLOAT64_ROWS`` queries).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stages import calibration
from ..stages.base import Stage, log_softmax
from ..stages.calibration import fill_rows, fit_temperature, paired_difference, row_blocks
from .folds import out_of_fold
from .pool import BALANCE_FLOOR, apply_bias, clone, final_bias, floored_log, held_subset, joint_target


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    """[N, C] float64 rows with a 1 at each row's label: labelled rows as the refinement's class weights."""
    out = np.zeros((len(y), n_classes))
    out[np.arange(len(y)), y] = 1.0
    return out


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
        return self.support_x, one_hot(self.support_y, self.n_classes)

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

    def fit_predict(self, xq: np.ndarray, soft: np.ndarray, labelled=(), temperature: float | None = None,
                    platt: bool = True):
        """Fit on the queries ``xq`` (soft labels ``soft`` [Nq, C]) and the support rows: (posterior of the
        queries, posterior of the held-out rows or None, temperature).

        The temperature is fitted on the held-out rows (each fold of held-out support rows scored by the stage
        refitted without it), else on the queries' soft labels; 1 when ``calibrate`` is off. ``labelled``: more
        rows to fit on, ``[(X, one-hot labels), ...]`` (the validation rows, for the balanced refit), with the
        ``temperature`` given (fitting it on rows fitted on would make it too sharp); no held-out posterior then.
        ``platt``: where validation rows are all ranked right, the temperature fits Platt's targets
        (:func:`~cascade.stages.calibration.fit_temperature`); held-out support rows keep the upper bound."""
        sj, onehot = self._support_rows()
        n, C = len(xq), self.n_classes
        if labelled:
            if temperature is None:
                raise ValueError("fit_predict: labelled rows need the temperature given")
            g = self._fit([(xq, soft), (sj, onehot), *labelled])
            t = float(temperature)
            return fill_rows(n, C, lambda b: np.exp(log_softmax(t * g.decision_function(xq[b])))), None, t
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
            t = fit_temperature(zv, self.held_y, platt=platt)
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
        if folds is None:
            y, xv, held_soft = held_subset(len(xq), y, xv, held_soft)
            z = self._fit([(xq, soft), (xv, held_soft), (sj, onehot)]).decision_function(xv)
        else:
            y, xv, held_soft, folds = held_subset(len(xq), y, xv, held_soft, folds)

            def score_fold(f, rows):
                train = self.support_folds != f
                return self._fit([(xq, soft), (sj[train], onehot[train]),
                                  (xv[rows], held_soft[rows])]).decision_function(xv[rows])

            z = out_of_fold(folds, score_fold, parallel=False)   # each refit holds all queries
        rows = np.arange(len(y))
        d = (log_softmax(fit_temperature(z, y, platt=folds is None) * z)[rows, y]
             - np.log(np.maximum(held_soft[rows, y], np.finfo(np.float64).tiny)))
        return paired_difference(d)

    def balanced_gain(self, xq: np.ndarray, pool: np.ndarray, held_pool: np.ndarray, marginal: np.ndarray,
                      n_seen: int):
        """Mean and standard error of the per-row difference in log-likelihood of the validation rows' labels, the
        balanced refit minus the balanced pool.

        The balanced refit (``Cascade(balance_refit=True)``): the refinement refitted on the pool balanced to
        ``marginal``, its posterior times that balanced pool, balanced again. Here the validation rows take part
        in every step as the queries do, so that they are scored in sample: they join the queries in both
        balancings (:func:`~cascade.router.pool.joint_target`) and the refinement's soft-labelled rows, and the
        refinement's temperature is fitted on them. ``pool`` [Nq, C] / ``held_pool`` [Nv, C]: the pooled
        distribution of the queries and of the validation rows. One [Nq + Nv, C] array is made, in ``pool``'s
        dtype, and rewritten in place. Not for held-out support rows (``held_folds``): scored fold by fold, their
        verdicts dropped refits that gained on the measured tasks (docs/accuracy.md)."""
        if self.held_x is None or self.held_folds is not None:
            raise ValueError("balanced_gain needs validation rows (held_x without held_folds)")
        n = len(xq)
        y, xv, held_pool = held_subset(n, self.held_y, self.held_x, held_pool)
        target = joint_target(n, len(y), marginal, n_seen)
        if target is None or len(y) < 2:
            return 0.0, float("inf")
        tiny = np.finfo(np.float64).tiny
        lp = floored_log(pool, held_pool)
        apply_bias(lp, final_bias(lp, target))    # the balanced pool of both, in place
        sj, onehot = self._support_rows()
        bv = np.asarray(lp[n:], dtype=np.float64)
        g = self._fit([(xq, lp[:n]), (xv, bv), (sj, onehot)])
        zv = g.decision_function(xv)
        t = fit_temperature(zv, y, platt=True)
        rows = np.arange(len(y))
        before = np.log(np.maximum(bv[rows, y], tiny))

        def anchored(z, balanced_pool):           # the refit's posterior times the balanced pool, floored
            out = log_softmax(t * np.asarray(z, dtype=np.float64))
            out += np.log(np.maximum(np.asarray(balanced_pool, dtype=np.float64), tiny))
            return np.maximum(log_softmax(out), np.log(BALANCE_FLOOR))

        for b in row_blocks(n):                   # in place, a block of query rows at a time
            lp[b] = anchored(g.decision_function(xq[b]), lp[b])
        lp[n:] = anchored(zv, bv)
        bias = final_bias(lp, target)
        after = log_softmax(np.asarray(lp[n:], dtype=np.float64) + bias)[rows, y]
        return paired_difference(after - before)
