"""Leave one fold out and refit: the one fold loop of the cascade.

Every weight and temperature of the cascade is fitted on labelled rows the expert did not train on. Without
validation rows, the support rows stand in for them, each scored by the expert refitted without its fold.
:func:`class_folds` assigns the folds; :func:`out_of_fold` runs the loop, the caller says what to refit.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .threads import run_parallel


def class_folds(y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each row, per class round-robin after a seeded shuffle.

    Every fold then holds about the same share of every class, and each training part keeps every class. The
    rows of a class with a single row get -1: they cannot be held out. (scikit-learn's ``StratifiedKFold`` would
    put such a row in a fold, leaving its class out of that fold's training part, and it warns wherever a class has
    fewer rows than folds. The specialist's folds, which keep an image's views together, are its
    ``StratifiedGroupKFold``.)"""
    rng = np.random.default_rng(seed)
    fold = np.full(y.shape[0], -1)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if idx.size >= 2:
            fold[idx] = np.arange(idx.size) % min(n_folds, idx.size)
    return fold


def out_of_fold(folds: np.ndarray, score_fold: Callable[[int, np.ndarray], "np.ndarray | list"],
                parallel: bool = True):
    """Scores of all rows, fold by fold: ``score_fold(f, rows)`` refits without fold ``f`` and scores ``rows``
    (the indices of the rows of fold ``f``; for ``f = -1``, rows never held out, the caller uses its full model).
    The folds' refits run side by side (:func:`~cascade.router.threads.run_parallel`) unless ``parallel`` is
    False (each refit's memory freed before the next starts).

    ``score_fold`` returns one array [len(rows), ...] or a list of them; the result is the same (an array or a
    list) over all rows, in float64."""
    out, single = None, False
    fold_rows = [(int(f), np.flatnonzero(folds == f)) for f in np.unique(folds)]
    scored = run_parallel([lambda f=f, rows=rows: score_fold(f, rows) for f, rows in fold_rows], parallel=parallel)
    for (f, rows), parts in zip(fold_rows, scored):
        if out is None:
            single = isinstance(parts, np.ndarray)
            out = [np.empty((folds.shape[0],) + np.shape(p)[1:]) for p in ([parts] if single else parts)]
        for o, p in zip(out, [parts] if single else parts):
            o[rows] = p
    if out is None:
        raise ValueError("out_of_fold: no rows to score")
    return out[0] if single else out
