"""Several CLIP backbones seen as one: backbone weights, joint features and combined logits.

Each backbone gets a weight ``w_b`` (normalised to sum 1). Stages fitted per backbone are combined by summing
their logits times ``w_b``. Stages that run once over all backbones (the transductive stage, zero-shot, the
refinement) see the joint features: the concatenation of the backbones' unit-norm features scaled by
``sqrt(w_b)``, text likewise. A dot product of two joint rows is then the weighted sum of the per-backbone
cosines, and joint rows stay unit-norm. A backbone of weight 0 is left out.

The inputs of ``fit`` and ``predict`` are checked here too: one dict of feature arrays per set, keyed by backbone,
every backbone with the same number of rows.
"""
from __future__ import annotations

import numpy as np

from ..stages.base import check_features, check_labels, stage_name
from ..stages.calibration import row_blocks


def as_feature_dict(name: str, value) -> dict:
    """``value`` if it is a non-empty dict (of feature arrays keyed by backbone name), else a ValueError."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict of feature arrays keyed by backbone name")
    return value


def check_feature_set(feats: dict, keys, name: str, dims: dict, min_rows: int = 1) -> dict:
    """The arrays of ``feats`` for the backbones ``keys``, checked (L2-normalised rows of width ``dims[k]``) and
    all with the same number of rows; errors name the set (``name``) and the backbone."""
    feats = as_feature_dict(name, feats)
    out = {}
    for k in keys:
        if k not in feats:
            raise ValueError(f"{name} features lack backbone {k!r} (have {sorted(feats)})")
        shape = np.shape(feats[k])
        if len(shape) == 2 and shape[1] != dims[k]:       # the width comes from the text features
            raise ValueError(f"{name}[{k!r}]: feature dimension {shape[1]} does not match the text features' "
                             f"{dims[k]} (text[{k!r}])")
        out[k] = check_features(feats[k], f"{name}[{k!r}]", dim=dims[k], min_rows=min_rows)
    rows = {k: v.shape[0] for k, v in out.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{name} backbones have different row counts: {rows}")
    return out


def check_fit_inputs(support, support_y, text, n_seen, val):
    """Validated ``fit`` inputs: (backbones, text, support, labels, n_seen, val) where ``val`` is None or
    ``(features, labels)`` with at least one row. The backbones are those in both ``support`` and ``text``."""
    support = as_feature_dict("support", support)
    text = as_feature_dict("text", text)
    keys = [k for k in text if k in support]
    if not keys:
        raise ValueError(f"no backbone is in both support ({sorted(support)}) and text ({sorted(text)})")
    texts = {k: check_features(text[k], f"text[{k!r}]") for k in keys}
    n_classes = {k: t.shape[0] for k, t in texts.items()}
    if len(set(n_classes.values())) != 1:
        raise ValueError(f"text backbones have different class counts: {n_classes}")
    C = n_classes[keys[0]]
    dims = {k: t.shape[1] for k, t in texts.items()}
    sups = check_feature_set(support, keys, "support", dims)
    if isinstance(n_seen, (bool, np.bool_)) or not isinstance(n_seen, (int, np.integer)) or not 1 <= int(n_seen) <= C:
        raise ValueError(f"n_seen must be an integer in 1..{C}, got {n_seen!r}")
    n_seen = int(n_seen)
    y = check_labels(support_y, sups[keys[0]].shape[0], n_seen, "support_y", require_all=True)
    if val is not None:
        if not isinstance(val, (tuple, list)) or len(val) != 2:
            raise ValueError("val must be a pair (features per backbone, labels), got "
                             + (f"{len(val)} item(s)" if isinstance(val, (tuple, list)) else type(val).__name__))
        vfeat, vy = val
        vfeat = check_feature_set(vfeat, keys, "val", dims, min_rows=0)
        vy = check_labels(vy, vfeat[keys[0]].shape[0], n_seen, "val_y", require_all=False)
        val = (vfeat, vy) if vy.size else None       # zero validation rows: as if none were given
    return keys, texts, sups, y, n_seen, val


def backbone_weights(keys, weights: dict | None) -> dict:
    """Weight of each backbone in ``keys``, normalised to sum 1 (``weights`` None: equal weights; a backbone it
    does not name gets 0)."""
    if weights is None:
        w = {k: 1.0 for k in keys}
    else:
        w = {k: float(weights.get(k, 0.0)) for k in keys}
        if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ValueError(f"backbone_weights must be non-negative with a positive sum over {keys}")
    s = sum(w.values())
    return {k: v / s for k, v in w.items()}


def joint_features(feats: dict, weights: dict) -> np.ndarray:
    """The backbones' features concatenated, each scaled by ``sqrt(weight)`` (float32, C-contiguous), so that dot
    products become weighted sums of the per-backbone ones; backbones of weight 0 are left out."""
    keys = [k for k, w in weights.items() if w > 0]
    dims = [feats[k].shape[1] for k in keys]
    out = np.empty((feats[keys[0]].shape[0], sum(dims)), dtype=np.float32)   # written in place: no copies
    start = 0
    for k, d in zip(keys, dims):
        np.multiply(np.sqrt(weights[k], dtype=np.float32), feats[k], out=out[:, start:start + d])
        start += d
    return out


def combined_logits(per_backbone: dict, feats: dict, weights: dict) -> np.ndarray:
    """Sum over backbones of ``weight * decision_function`` of a stage fitted on each backbone (float64). A stage
    whose scores are not finite (a diverged fit) is named here, not where they would surface."""
    z = None
    for k, st in per_backbone.items():
        if weights[k] == 0:
            continue
        part = weights[k] * st.decision_function(feats[k]).astype(np.float64)
        if not np.isfinite(part).all():
            raise ValueError(f"seen stage {stage_name(st)!r} on backbone {k!r}: non-finite scores (its fit diverged; "
                             f"check its parameters: {st.get_params()})")
        z = part if z is None else z + part
    return z


def joint_logits(x: np.ndarray, text_joint: np.ndarray) -> np.ndarray:
    """Cosine logits [N, C] (float64) of joint features ``x`` [N, D] against the joint text [C, D] (zero-shot CLIP
    over all backbones, both from :func:`joint_features`), a block of rows at a time so that no float64 copy of all
    rows is made."""
    tj = text_joint.T.astype(np.float64)
    out = np.empty((x.shape[0], tj.shape[1]))
    for b in row_blocks(x.shape[0]):
        out[b] = x[b].astype(np.float64) @ tj
    return out
