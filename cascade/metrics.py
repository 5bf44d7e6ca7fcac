"""Top-k accuracy helpers shared by the bench, the evaluation command and the tests."""
from __future__ import annotations

import numpy as np

from .stages.calibration import row_blocks


def topk_indices(scores: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first ([N, k], int64).

    Ties are broken by the lower class index (stable), so the result is deterministic. Rows are sorted a block
    at a time, so no [N, C] index temporary is made for large query sets.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D array [N, C], got shape {scores.shape}")
    n_classes = scores.shape[1]
    if not 1 <= k <= n_classes:
        raise ValueError(f"k={k} must be between 1 and the number of classes ({n_classes})")
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for b in row_blocks(scores.shape[0]):
        out[b] = np.argsort(-scores[b], axis=1, kind="stable")[:, :k]
    return out


def topk_accuracy(scores_or_topk: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Percentage of rows whose label is among the top ``k``.

    Accepts either a score matrix [N, C] or an already ranked index matrix [N, >=k] of integers.
    """
    labels = np.asarray(labels).reshape(-1)
    arr = np.asarray(scores_or_topk)
    if arr.ndim != 2 or arr.shape[0] != labels.shape[0]:
        raise ValueError(f"got {arr.shape[0] if arr.ndim == 2 else arr.shape} rows of scores for "
                         f"{labels.shape[0]} labels")
    if labels.size == 0:
        raise ValueError("no labels to score")
    top = arr[:, :k] if np.issubdtype(arr.dtype, np.integer) else topk_indices(arr, k)
    return float(np.mean(np.any(top == labels[:, None], axis=1)) * 100.0)


def top1_top5(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` (top-5 is capped at the number of classes)."""
    k5 = min(5, np.asarray(scores).shape[1])
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, k5)}

