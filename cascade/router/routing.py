"""Routing: which queries leave the cascade as unseen, and which a specialist re-ranks.

``routing="joint"``: a query whose final arg-max is an unseen class is routed ``unseen`` and leaves the cascade
with that ranking; the others are ``seen``. ``routing="stage1"`` is the seeds' rule: a query whose transductive
arg-max is unseen keeps the transductive stage's probabilities, and the others keep its mass on the unseen
classes.

A specialist then re-ranks, inside its domain, the ``seen`` queries whose top-1 class is one of its classes.
Its features come from the query dict under its key: an array, or a callable that computes the features of the
routed rows only (so an expensive backbone runs on those images alone).
"""
from __future__ import annotations

import numpy as np

from ..stages.base import check_features
from ..stages.calibration import row_blocks

ROUTE_UNSEEN = "unseen"
ROUTE_SEEN = "seen"


def route(scores: np.ndarray, transductive, n_seen: int, routing: str):
    """(scores, unseen mask): the final scores [N, C] after the routing rule (updated in place), and which queries
    are routed unseen. ``transductive(rows)``: the transductive stage's log-probabilities [len(rows), C] of the
    rows ``rows`` (used by ``routing="stage1"``, a block of rows at a time)."""
    n, C = scores.shape
    if n_seen == C:
        return scores, np.zeros(n, bool)
    if routing == "joint":
        return scores, scores.argmax(axis=1) >= n_seen
    # the seeds' rule: stage 1 decides, and keeps its probabilities outside the seen block
    S = n_seen
    unseen = np.empty(n, bool)
    for b in row_blocks(n):
        p1 = np.exp(transductive(b))
        u = p1.argmax(axis=1) >= S
        seen_mass = p1[:, :S].sum(axis=1, keepdims=True)
        # the final distribution's ranking inside the seen block; where it puts no mass there at all (a balanced
        # distribution can underflow to zero on the seen classes), stage 1's own ranking instead of 0 / 0
        final_seen = scores[b, :S].sum(axis=1, keepdims=True)
        block = np.where(final_seen > 0, scores[b, :S] / np.where(final_seen > 0, final_seen, 1.0),
                         p1[:, :S] / np.maximum(seen_mass, np.finfo(np.float64).tiny))
        new = np.concatenate([seen_mass * block, p1[:, S:]], axis=1)
        new[u] = p1[u]
        scores[b], unseen[b] = new, u
    return scores, unseen


def route_names(unseen: np.ndarray) -> list:
    """One route name per query: "unseen" or "seen"."""
    return [ROUTE_UNSEEN if u else ROUTE_SEEN for u in unseen]


def _specialist_features(spec, name: str, query: dict, rows: np.ndarray) -> np.ndarray:
    """The specialist's features of the query rows ``rows`` (computed on demand when the entry is callable)."""
    key = getattr(spec, "query_key", spec.feature_key)
    if key not in query:
        raise ValueError(f"specialist {name!r} needs query features {key!r} (have {sorted(query)})")
    X = query[key]
    if callable(X):  # features computed on demand, for the routed rows only
        X = X(rows)
        if len(X) != rows.size:
            raise ValueError(f"query[{key!r}] returned {len(X)} rows for {rows.size} requested")
    else:
        X = np.asarray(X)[rows]
    return check_features(X, f"query[{key!r}]", normalised=False)


def apply_specialists(specialists, scores: np.ndarray, query: dict, routes: list) -> np.ndarray:
    """Let each specialist re-rank the ``seen`` queries whose top-1 is one of its classes (``scores`` and
    ``routes`` are updated in place: those rows' route becomes ``specialist:<name>``). A specialist may change
    probabilities only inside its classes, and must return finite non-negative ones."""
    if not specialists:
        return scores
    top1 = np.argmax(scores, axis=1)
    for spec in specialists:
        classes = np.asarray(spec.classes_, dtype=np.int64)
        name = getattr(spec, "name", type(spec).__name__)
        rows = np.flatnonzero(np.isin(top1, classes) & np.array([r == ROUTE_SEEN for r in routes]))
        if rows.size == 0:
            continue
        X = _specialist_features(spec, name, query, rows)
        new = np.asarray(spec.rerank(scores[rows].copy(), X), dtype=np.float64)
        if new.shape != (rows.size, scores.shape[1]):
            raise ValueError(f"specialist {name!r} returned shape {new.shape}, expected "
                             f"{(rows.size, scores.shape[1])}")
        others = np.setdiff1d(np.arange(scores.shape[1]), classes)
        if not np.allclose(new[:, others], scores[rows][:, others]):
            raise ValueError(f"specialist {name!r} changed probabilities outside its classes")
        if not np.all(np.isfinite(new)) or np.any(new < 0):
            raise ValueError(f"specialist {name!r} returned negative or non-finite probabilities")
        scores[rows] = new
        for r in rows:
            routes[r] = f"specialist:{name}"
    return scores
