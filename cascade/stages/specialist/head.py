"""The specialist stage: a classifier for one domain's classes that re-ranks the queries routed there.

Default recipe (fast on a 2-core CPU): a multinomial logistic-regression head on frozen, cached ConvNeXt-V2
features of a few views of each support image (:mod:`.views`). At test time, for the queries routed to the
domain, the specialist's class probabilities are mixed with the CLIP stages' probabilities over the domain's
classes::

    score = (1 - w) * p_clip(domain) + w * p_specialist          (combine="linear")
    score = (1 - w) * log p_clip(domain) + w * log p_specialist  (combine="log")

and the domain's classes are re-ordered by ``score``: the probability values the domain's classes held are
handed out again in the new order. So the specialist only reorders classes inside its domain: the mass and
ranks of every class outside the domain are untouched, the positions the domain's classes occupy in the
top-5 stay the same, and w = 0 gives back the CLIP ranking exactly.

The weight w and the head's regularisation C are chosen by cross-validation on the support set only. The
folds hold out whole support images (scikit-learn's ``StratifiedGroupKFold``: all views of an image stay in
one fold, each class spread over the folds); the CLIP side uses the router's out-of-fold CLIP probabilities
of the support images.

Optional (meant for a GPU, works anywhere): ``finetune="last_stage"`` or ``"all"`` fine-tunes the ConvNeXt
(:mod:`.finetune`) through :meth:`SpecialistStage.fit_images`; CV then fine-tunes once per fold so that the
chosen w stays honest. The tuned weights are part of the learned state and of :meth:`state_dict`.
"""
from __future__ import annotations

import warnings

from numbers import Integral, Real

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ...features import l2_normalize
from ...models.weights import state_sha256
from ...preprocess import DEFAULT_PRESET, Preprocess, preprocess_for
from ..base import Interval, Options, Stage, TypeOf, softmax
from .finetune import encode_views, finetune_backbone, load_images, restore_state, state_arrays
from .logistic import fit_logistic
from .views import support_view_features

__all__ = ["SpecialistStage", "stratified_group_folds"]

_BACKBONE_PREFIX = "backbone_state_/"
_HEAD_ARRAYS = ("classes_", "mean_", "scale_", "coef_", "intercept_")
_STATE_SCALARS = ("C_", "weight_", "n_features_in_", "feature_key_", "cv_accuracy_", "cv_specialist_accuracy_",
                  "cv_clip_accuracy_", "cv_scores_", "backbone_sha256_")


def stratified_group_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per row from scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``): whole groups
    (source images) go to one fold, and each class's groups are spread over the folds (with 4 shots and 4
    folds every fold holds one image of every class). Fewer groups than ``n_folds`` give one fold per group."""
    y, groups = np.asarray(y), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"cross-validation needs at least 2 support images, got {n_groups}")
    folds = np.empty(len(y), dtype=np.int64)
    cv = StratifiedGroupKFold(min(int(n_folds), n_groups), shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # 1- to 3-shot classes cannot reach every fold; that is expected here
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for f, (_, held_out) in enumerate(cv.split(np.zeros((len(y), 1)), y, groups)):
            folds[held_out] = f
    return folds


def _l2(X) -> np.ndarray:
    """Row-wise L2 normalisation in float64 (the feature cache stores normalised features; doing it here too
    makes features from any path agree)."""
    return l2_normalize(X, axis=1, dtype=np.float64)


def _combine(p_clip: np.ndarray, p_spec: np.ndarray, w: float, mode: str) -> np.ndarray:
    if mode == "linear":
        return (1.0 - w) * p_clip + w * p_spec
    return (1.0 - w) * np.log(p_clip + 1e-12) + w * np.log(p_spec + 1e-12)    # "log" (the constraints allow no other)


def _cv_score(score: np.ndarray, y_local: np.ndarray) -> tuple[float, float]:
    """(top-1 accuracy, mean reciprocal rank of the true class) of scores [M, K]; both depend only on the
    ranking, so a flat (uninformative) specialist cannot win by merely smoothing over-confident CLIP
    probabilities."""
    true = score[np.arange(len(y_local)), y_local]
    rank = (score > true[:, None]).sum(axis=1)  # 0 = top-1
    return float(np.mean(rank == 0)), float(np.mean(1.0 / (rank + 1)))


# ------------------------------------------------------------------------------------------------ the stage
class SpecialistStage(Stage):
    """Re-ranks one domain's classes with a classifier trained on its own backbone's features.

    Parameters
    ----------
    domain : the domain this specialist serves (a name from the class list), or None.
    feature_key : key of the query feature dict this specialist reads (e.g. "convnextv2_base").
    n_views : views per support image (1 test view + n_views-1 augmented) for :meth:`fit_images`.
    preset : preprocessing: a preset name (:data:`cascade.preprocess.PRESETS`), a
        :class:`cascade.preprocess.Preprocess` or a dict of its fields.
    C : inverse L2 strength of the logistic head on standardised features, or "auto" (CV over ``C_grid``).
    weight : specialist weight w in [0, 1], or "auto" (CV over ``weight_grid``; needs ``clip_probs`` in fit,
        otherwise ``fallback_weight`` is used with a warning).
    combine : "linear" (mix probabilities) or "log" (mix log-probabilities).
    n_folds : CV folds over support images.
    max_iter : L-BFGS iterations of the logistic head (:func:`.logistic.fit_logistic`). A fixed small budget
        keeps the 13 fits of the default CV sweep (3 C values x 4 folds + the final head) cheap; stopping early
        acts as extra regularisation (each fold's head starts from its solution at the previous, smaller C).
    finetune : "none" (frozen backbone, default), "last_stage" or "all" (see :meth:`fit_images`).
    finetune_epochs, finetune_lr, finetune_weight_decay, finetune_batch_size, label_smoothing : fine-tuning.
    random_state : seed of folds, views and fine-tuning.

    Learned state: ``classes_`` (global class indices of the domain), the head (``mean_``, ``scale_``,
    ``coef_``, ``intercept_``), ``C_``, ``weight_``, the CV scores, ``feature_key_`` (the key of the query
    features :meth:`rerank` expects) and, after fine-tuning, ``backbone_state_`` (the tuned weights as numpy
    arrays), ``backbone_sha256_`` and ``encoder_`` (the tuned network in memory; not saved).
    """

    _parameter_constraints = {
        "domain": [TypeOf(str, "a domain name"), Options(None)],
        "feature_key": [TypeOf(str, "a string")],
        "n_views": [Interval(Integral, 1, None)],
        "preset": [TypeOf((str, dict, Preprocess), "a preset name or table")],
        "C": [Options("auto"), Interval(Real, 0, None, closed="neither")],
        "C_grid": [TypeOf((list, tuple), "a list of numbers")],
        "weight": [Options("auto"), Interval(Real, 0, 1)],
        "weight_grid": [TypeOf((list, tuple), "a list of numbers")],
        "fallback_weight": [Interval(Real, 0, 1)],
        "combine": [Options("linear", "log")],
        "n_folds": [Interval(Integral, 2, None)],
        "max_iter": [Interval(Integral, 1, None)],
        "finetune": [Options("none", "last_stage", "all")],
        "finetune_epochs": [Interval(Integral, 1, None)],
        "finetune_lr": [Interval(Real, 0, None, closed="neither")],
        "finetune_weight_decay": [Interval(Real, 0, None)],
        "finetune_batch_size": [Interval(Integral, 1, None)],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "random_state": [Interval(Integral)],
    }

    def __init__(self, domain: str | None = None, feature_key: str = "convnextv2_base", n_views: int = 4,
                 preset=DEFAULT_PRESET, C="auto", C_grid=(0.01, 0.1, 1.0), weight="auto",
                 weight_grid=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), fallback_weight: float = 0.5,
                 combine: str = "linear", n_folds: int = 4, max_iter: int = 30, finetune: str = "none",
                 finetune_epochs: int = 15, finetune_lr: float = 1e-4, finetune_weight_decay: float = 0.05,
                 finetune_batch_size: int = 32, label_smoothing: float = 0.1, random_state: int = 0):
        self.domain = domain
        self.feature_key = feature_key
        self.n_views = n_views
        self.preset = preset
        self.C = C
        self.C_grid = C_grid
        self.weight = weight
        self.weight_grid = weight_grid
        self.fallback_weight = fallback_weight
        self.combine = combine
        self.n_folds = n_folds
        self.max_iter = max_iter
        self.finetune = finetune
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.finetune_weight_decay = finetune_weight_decay
        self.finetune_batch_size = finetune_batch_size
        self.label_smoothing = label_smoothing
        self.random_state = random_state

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def name(self) -> str | None:
        """The specialist's name in routes and saved models: its domain."""
        return self.domain

    @name.setter
    def name(self, value: str | None) -> None:
        self.domain = value

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "coef_")

    def _reset(self) -> None:
        """Forget what an earlier fit learned."""
        for k in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, k)

    def validate(self) -> "SpecialistStage":
        """Check the hyperparameters (ValueError naming the bad one); called by fit, usable before long work."""
        self._validate_params()
        try:
            preprocess_for(self.preset)  # an unknown preset name fails here
        except ValueError as exc:
            raise ValueError(f"preset: {exc}") from None
        return self

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing this specialist's backbone expects (test view and train views)."""
        return preprocess_for(self.preset)

    def _clip_rows(self, clip_probs, n_rows: int, groups: np.ndarray) -> np.ndarray | None:
        """CLIP probabilities over the domain's classes, renormalised, one row per X row."""
        if clip_probs is None:
            return None
        P = np.asarray(clip_probs, dtype=np.float64)
        if P.ndim != 2:
            raise ValueError(f"clip_probs must be 2-D [rows, classes], got shape {P.shape}")
        if P.shape[0] != n_rows:
            ug = np.unique(groups)
            if np.issubdtype(groups.dtype, np.integer) and P.shape[0] == len(ug) and ug.min() == 0 \
                    and ug.max() == len(ug) - 1:
                P = P[groups]  # one row per source image, indexed by group id
            else:
                raise ValueError(f"clip_probs has {P.shape[0]} rows; expected one per row of X ({n_rows}) or one "
                                 f"per group 0..G-1")
        if P.shape[1] > self.classes_.max():
            P = P[:, self.classes_]
        elif P.shape[1] != len(self.classes_):
            raise ValueError(f"clip_probs has {P.shape[1]} columns: neither all classes (> {self.classes_.max()}) "
                             f"nor the domain's {len(self.classes_)}")
        return P / np.maximum(P.sum(axis=1, keepdims=True), 1e-300)

    def _fit_head(self, X, y_local, C, n_classes, warm=None):
        """Standardise + multinomial logistic regression; returns (mean, scale, coef [K, D], intercept [K]).
        ``warm``: a previous solution (same rows, another C) to start L-BFGS from."""
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale < 1e-8] = 1.0
        present = np.unique(y_local)
        W0 = b0 = None
        if warm is not None:
            W0, b0 = warm[2][present], warm[3][present]
        W, b = fit_logistic((X - mean) / scale, np.searchsorted(present, y_local), C, self.max_iter, W0, b0)
        coef = np.zeros((n_classes, X.shape[1]), dtype=np.float64)
        intercept = np.full(n_classes, -1e4, dtype=np.float64)  # classes absent from training: never predicted
        coef[present], intercept[present] = W, b
        return mean, scale, coef, intercept

    @staticmethod
    def _head_proba(X, mean, scale, coef, intercept):
        return softmax(((np.asarray(X, np.float64) - mean) / scale) @ coef.T + intercept)

    def _select(self, p_spec_by_C: dict, p_clip, y_local):
        """Pick (C, w) maximising CV top-1 accuracy + mean reciprocal rank (the reciprocal rank rewards getting
        the right class near the top, which a top-1 count over a few hundred images is too coarse to see);
        a plateau of exactly equal scores resolves to its middle setting."""
        weights = [float(self.weight)] if self.weight != "auto" else [float(w) for w in self.weight_grid]
        if p_clip is None:
            if self.weight == "auto":
                warnings.warn("SpecialistStage: no clip_probs given, so the specialist weight cannot be "
                              f"cross-validated; using fallback_weight={self.fallback_weight}", RuntimeWarning,
                              stacklevel=3)
                weights = [float(self.fallback_weight)]
        table = {}
        for C, p_spec in p_spec_by_C.items():
            for w in weights:
                s = p_spec if p_clip is None else _combine(p_clip, p_spec, w, self.combine)
                table[(C, w)] = _cv_score(s, y_local)
        best = max(sum(v) for v in table.values())
        tied = sorted(k for k, v in table.items() if sum(v) >= best - 1e-12)
        C, w = tied[(len(tied) - 1) // 2]  # a plateau of equal scores: take its middle (robust to the shift)
        return C, w, table

    # ---------------------------------------------------------------------------------------------- fit
    def fit(self, X, y, clip_probs=None, groups=None) -> "SpecialistStage":
        """Fit on features of support views.

        X [M, D] features (the views of the support images); y [M] GLOBAL class indices of the domain;
        clip_probs: out-of-fold CLIP probabilities of the support images, [M, C_all] row-aligned with X, or
        [G, C_all] indexed by group id (columns: all classes, or just the domain's in ``classes_`` order);
        groups [M]: the source image of each view (default: every row its own image)."""
        self.validate()
        self._reset()
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be [M, D] with one label per row; got X {X.shape}, y {y.shape}")
        X = _l2(X)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} entries for {len(y)} rows")
        classes = np.unique(y).astype(np.int64)
        self.classes_ = classes
        K = len(classes)
        y_local = np.searchsorted(classes, y)
        p_clip = self._clip_rows(clip_probs, len(y), groups)

        C_values = [float(c) for c in self.C_grid] if self.C == "auto" else [float(self.C)]
        cv = {}
        if len(C_values) > 1 or self.weight == "auto":
            folds = stratified_group_folds(y_local, groups, self.n_folds, self.random_state)
            p_spec_by_C = {C: np.zeros((len(y), K)) for C in C_values}
            for f in np.unique(folds):
                tr, te = folds != f, folds == f
                head = None
                for C in sorted(C_values):  # ascending C, each solve starting from the previous one
                    head = self._fit_head(X[tr], y_local[tr], C, K, warm=head)
                    p_spec_by_C[C][te] = self._head_proba(X[te], *head)
            C_best, w_best, table = self._select(p_spec_by_C, p_clip, y_local)
            cv = {"cv_scores_": {f"C={C:g},w={w:g}": acc for (C, w), (acc, _) in table.items()},
                  "cv_specialist_accuracy_": _cv_score(p_spec_by_C[C_best], y_local)[0],
                  "cv_clip_accuracy_": None if p_clip is None else _cv_score(p_clip, y_local)[0],
                  "cv_accuracy_": table[(C_best, w_best)][0]}
        else:
            C_best, w_best = C_values[0], float(self.weight)
        mean, scale, coef, intercept = self._fit_head(X, y_local, C_best, K)
        return self._learned(classes, mean, scale, coef, intercept, C=C_best, weight=w_best, cv=cv)

    def _learned(self, classes, mean, scale, coef, intercept, C, weight, cv, backbone=None) -> "SpecialistStage":
        """Set the whole learned state at once (the only place fit and fit_images write it)."""
        self._reset()
        self.classes_ = np.asarray(classes, dtype=np.int64)
        self.mean_, self.scale_, self.coef_, self.intercept_ = mean, scale, coef, intercept
        self.n_features_in_ = int(coef.shape[1])
        self.C_, self.weight_ = C, float(weight)
        self.cv_scores_ = cv.get("cv_scores_", {})
        for k in ("cv_specialist_accuracy_", "cv_clip_accuracy_", "cv_accuracy_"):
            setattr(self, k, cv.get(k))
        self.feature_key_ = self.feature_key
        if backbone is not None:
            self.encoder_ = backbone
            self.backbone_state_ = state_arrays(backbone)
            self.backbone_sha256_ = state_sha256(self.backbone_state_)
            self.feature_key_ = f"{self.feature_key}@ft-{self.backbone_sha256_[:12]}"
        return self

    @property
    def query_key(self) -> str:
        """Key of the query features :meth:`rerank` expects: ``feature_key`` for a frozen backbone, the
        fine-tuned backbone's own key (``feature_key_``, with its weights' hash) after fine-tuning."""
        return getattr(self, "feature_key_", self.feature_key)

    # ------------------------------------------------------------------------------------------ predict
    def decision_function(self, X) -> np.ndarray:
        """The head's logits [M, K] over ``classes_`` for features X [M, D] (``query_key`` features)."""
        self._check_fitted()
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be [M, {self.n_features_in_}] ({self.query_key} features), got {X.shape}")
        return ((_l2(X) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict(self, X) -> np.ndarray:
        """Global class index of the specialist's top-1 for each row."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def rerank(self, probs, X) -> np.ndarray:
        """Re-order the domain's classes of ``probs`` [M, C] using features ``X`` [M, D] of the same queries.
        Returns a new [M, C] array: outside the domain nothing changes; inside, the values the domain's
        classes held are reassigned in the order of the combined score."""
        self._check_fitted()
        probs = np.asarray(probs)
        if probs.ndim != 2 or probs.shape[1] <= self.classes_.max():
            raise ValueError(f"probs must be [M, C] with C > {self.classes_.max()}, got shape {probs.shape}")
        if len(X) != len(probs):
            raise ValueError(f"probs has {len(probs)} rows but X has {len(X)}")
        out = probs.copy()
        if len(probs) == 0:
            return out
        dom = probs[:, self.classes_].astype(np.float64)
        p_clip = dom / np.maximum(dom.sum(axis=1, keepdims=True), 1e-300)
        score = _combine(p_clip, self.predict_proba(X), self.weight_, self.combine)
        order = np.argsort(-score, axis=1, kind="stable")          # new ranking of the domain's classes
        values = -np.sort(-probs[:, self.classes_], axis=1)        # the values they held, largest first
        new = np.empty_like(values)
        np.put_along_axis(new, order, values, axis=1)
        out[:, self.classes_] = new
        return out

    # --------------------------------------------------------------------------------------- save/load
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, JSON-able meta) of the hyperparameters and the whole learned state, no pickle. The
        fine-tuned backbone's weights are arrays named ``backbone_state_/<parameter>``. ``encoder_`` is not
        saved: :meth:`from_state` keeps the weights, which :func:`cascade.models.convnextv2.model_from_state`
        turns back into a network."""
        self._check_fitted()
        arrays = {k: getattr(self, k) for k in _HEAD_ARRAYS}
        if hasattr(self, "backbone_state_"):
            arrays.update({_BACKBONE_PREFIX + k: v for k, v in self.backbone_state_.items()})
        params = self.get_params()
        if isinstance(params["preset"], Preprocess):
            params["preset"] = params["preset"].as_dict()
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
        state = {k: getattr(self, k) for k in _STATE_SCALARS if hasattr(self, k)}
        state = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in state.items()}
        return arrays, {"class": type(self).__name__, "params": params, "state": state}

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "SpecialistStage":
        """Rebuild a fitted specialist from :meth:`state_dict` (also reads the layout of files saved before
        ``state_dict`` existed: scalars at the top level, arrays without the trailing underscore)."""
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["params"].items()}
        if isinstance(params.get("preset"), dict):
            params["preset"] = Preprocess.from_dict(params["preset"])
        self = cls(**params)
        state = meta.get("state", meta)  # older files kept the scalars at the top level
        for k in _HEAD_ARRAYS:
            old = k[:-1]
            if k not in arrays and old not in arrays:
                raise ValueError(f"specialist state: missing the array {k!r}")
            setattr(self, k, np.asarray(arrays[k] if k in arrays else arrays[old]))
        self.classes_ = self.classes_.astype(np.int64)
        for k in _STATE_SCALARS:
            if k in state:
                setattr(self, k, state[k])
        self.feature_key_ = state.get("feature_key_") or self.feature_key
        backbone = {k[len(_BACKBONE_PREFIX):]: np.asarray(v) for k, v in arrays.items()
                    if k.startswith(_BACKBONE_PREFIX)}
        if backbone:
            self.backbone_state_ = backbone
            self.backbone_sha256_ = state.get("backbone_sha256_") or state_sha256(backbone)
        return self

    # ---------------------------------------------------------------------------------- from images
    def fit_images(self, images, y, backbone, clip_probs=None, progress: bool = True, cache_dir=None):
        """Fit from support images (PIL images or paths; one label each, global class indices).

        ``backbone``: a ConvNeXt-V2 model, or an encoder wrapping one (:class:`cascade.features.ModelEncoder`,
        whose ``cache_key`` lets ``cache_dir`` cache the support views).
        finetune="none": encode ``n_views`` views per image with the frozen ``backbone`` (cached in ``cache_dir``
        when given, see :func:`.views.support_view_features`) and call :meth:`fit`.
        finetune="last_stage"/"all": for each CV fold, fine-tune the backbone (reset to its original weights
        each time) on the other folds' images and score the held-out images (their test views) with its
        head, so the weight w is chosen on images the network never saw; then fine-tune on all images.
        ``backbone`` is fine-tuned IN PLACE; the result keeps it as ``encoder_`` and its weights as
        ``backbone_state_`` (saved by :meth:`state_dict`): encode the queries with it (their features go
        under ``feature_key_``). ``clip_probs``: out-of-fold CLIP probabilities, one row per image."""
        self.validate()
        y = np.asarray(y)
        if self.finetune == "none":
            X, groups = support_view_features(backbone, images, self.n_views, self.preset, self.random_state,
                                              progress=progress, cache_dir=cache_dir)
            return self.fit(X, y[groups], None if clip_probs is None else np.asarray(clip_probs)[groups], groups)
        self._reset()
        if getattr(backbone, "cache_key", None) is not None and hasattr(backbone, "model"):
            backbone = backbone.model  # an encoder: fine-tune the model it holds
        classes = np.unique(y).astype(np.int64)
        self.classes_ = classes  # _clip_rows reads it
        K = len(classes)
        y_local = np.searchsorted(classes, y)
        pil = load_images(images)
        state0 = state_arrays(backbone)
        p_clip = self._clip_rows(clip_probs, len(y), np.arange(len(y)))
        cv = {}
        if self.weight == "auto" and p_clip is not None:
            folds = stratified_group_folds(y_local, np.arange(len(y)), self.n_folds, self.random_state)
            p_spec = np.zeros((len(y), K))
            for f in np.unique(folds):
                tr = np.flatnonzero(folds != f)
                te = np.flatnonzero(folds == f)
                restore_state(backbone, state0)
                W, b = finetune_backbone(backbone, [pil[i] for i in tr], y_local[tr], K, mode=self.finetune,
                                         **self._ft_kwargs(progress))
                feats = encode_views(backbone, [self.preprocess.image(pil[i]) for i in te], self.preset)
                p_spec[te] = softmax(_l2(feats) @ W.T + b)
            _, w_best, table = self._select({0.0: p_spec}, p_clip, y_local)
            cv = {"cv_scores_": {f"w={w:g}": acc for (_, w), (acc, _) in table.items()},
                  "cv_specialist_accuracy_": _cv_score(p_spec, y_local)[0],
                  "cv_clip_accuracy_": _cv_score(p_clip, y_local)[0], "cv_accuracy_": table[(0.0, w_best)][0]}
        else:
            w_best = float(self.fallback_weight if self.weight == "auto" else self.weight)
            if self.weight == "auto":
                warnings.warn("SpecialistStage: no clip_probs, using fallback_weight", RuntimeWarning, stacklevel=2)
        restore_state(backbone, state0)
        del state0
        W, b = finetune_backbone(backbone, pil, y_local, K, mode=self.finetune, **self._ft_kwargs(progress))
        D = W.shape[1]
        return self._learned(classes, np.zeros(D), np.ones(D), W.astype(np.float64), b.astype(np.float64),
                             C=None, weight=w_best, cv=cv, backbone=backbone)

    def _ft_kwargs(self, progress):
        return dict(epochs=self.finetune_epochs, lr=self.finetune_lr, weight_decay=self.finetune_weight_decay,
                    batch_size=self.finetune_batch_size, label_smoothing=self.label_smoothing, preset=self.preset,
                    seed=self.random_state, progress=progress)
