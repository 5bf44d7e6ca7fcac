"""Specialist stage: a classifier for one domain's classes that re-ranks the queries the cascade routes there.

Default recipe (fast on a 2-core CPU): a multinomial logistic-regression head on frozen, cached ConvNeXt-V2
features of a few views of each support image (view 0 = the test-time preprocessing, the others random
resized crops + flips). At test time, for the queries routed to the domain, the specialist's class
probabilities are mixed with the CLIP stages' probabilities over the domain's classes::

    score = (1 - w) * p_clip(domain) + w * p_specialist          (combine="linear")
    score = (1 - w) * log p_clip(domain) + w * log p_specialist  (combine="log")

and the domain's classes are re-ordered by ``score``: the probability values the domain's classes held are
handed out again in the new order. So the specialist only reorders classes inside its domain: the mass and
ranks of every class outside the domain are untouched, the positions the domain's classes occupy in the
top-5 stay the same (a query whose top-1 was in the domain keeps a domain class at top-1), and w = 0 gives
back the CLIP ranking exactly. The weight w (and the head's regularisation C) are chosen by cross-validation
on the support set only: folds hold out whole support images (all views of an image stay in one fold), the
CLIP side uses the router's out-of-fold CLIP probabilities of the support images.

Optional (meant for a GPU, works anywhere): ``finetune="last_stage"`` or ``"all"`` fine-tunes the ConvNeXt
(AdamW, warm-up then cosine decay to zero) with a head for the domain's classes, via :meth:`fit_images`;
CV then fine-tunes once per fold so the chosen w is still honest.

Preprocessing (:data:`PRESETS`, plain data the feature pipeline can consume): train views are
RandomResizedCrop(scale=(0.25, 1), ratio=(3/4, 4/3)) + horizontal flip at ``train_resolution``; test images
are resized (bicubic) so the SHORTER side is ``test_resize`` and centre-cropped to ``test_resolution``,
preserving the aspect ratio (never a square resize). ``convnextv2_1k_224`` (the default, for the ImageNet-1k
224px checkpoints): 224 train / 256->224 test (crop_pct 0.875, as in the official evaluation);
``convnextv2_22k_384``: 384 train / 384->384 test.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np

from .base import BOOL, Interval, Options, TypeOf, validate_params  # noqa: F401  (BOOL: for extensions)

__all__ = [
    "Preset", "PRESETS", "DEFAULT_PRESET", "random_resized_crop_flip", "eval_view", "to_array", "make_views",
    "support_view_features", "stratified_group_folds", "fit_logistic", "SpecialistStage", "finetune_backbone",
]


# ------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preset:
    """Preprocessing of one checkpoint family, as plain data (see the module docstring)."""
    train_resolution: int = 224
    test_resolution: int = 224
    test_resize: int = 256                      # shorter side before the centre crop
    crop_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics (the checkpoints' training)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    def as_dict(self) -> dict:
        return asdict(self)

    def test_preprocess(self):
        """The test transform as the feature pipeline's :class:`cascade.features.Preprocess`."""
        from cascade.features import Preprocess

        return Preprocess(size=self.test_resolution, resize=self.test_resize, mean=tuple(self.mean),
                          std=tuple(self.std), interpolation=self.interpolation)


PRESETS: dict[str, Preset] = {
    "convnextv2_1k_224": Preset(),
    "convnextv2_22k_224": Preset(),
    "convnextv2_22k_384": Preset(train_resolution=384, test_resolution=384, test_resize=384),
}
DEFAULT_PRESET = "convnextv2_1k_224"


def _preset(p) -> Preset:
    if isinstance(p, Preset):
        return p
    if isinstance(p, dict):
        return Preset(**p)
    if p not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {p!r}; known: {', '.join(PRESETS)}")
    return PRESETS[p]


def _resample(name: str):
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[name]


def random_resized_crop_flip(img, rng: np.random.Generator, preset=DEFAULT_PRESET):
    """A training view (PIL image, train_resolution square): a random crop covering ``crop_scale`` of the
    area with aspect ratio in ``crop_ratio`` (log-uniform), resized, then flipped with probability ``hflip``.
    Pure: depends only on the image and the generator's state."""
    from PIL import Image

    p = _preset(preset)
    img = img.convert("RGB")
    w, h = img.size
    area = w * h
    box = None
    log_r = np.log(p.crop_ratio)
    for _ in range(10):
        target = area * rng.uniform(*p.crop_scale)
        ratio = float(np.exp(rng.uniform(*log_r)))
        cw = int(round(np.sqrt(target * ratio)))
        ch = int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # fall back to the largest centred crop inside the ratio range
        r = w / h
        if r < p.crop_ratio[0]:
            cw, ch = w, int(round(w / p.crop_ratio[0]))
        elif r > p.crop_ratio[1]:
            ch, cw = h, int(round(h * p.crop_ratio[1]))
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        box = (x0, y0, x0 + cw, y0 + ch)
    s = p.train_resolution
    out = img.resize((s, s), _resample(p.interpolation), box=box)
    if rng.uniform() < p.hflip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def eval_view(img, preset=DEFAULT_PRESET):
    """The test-time view: resize so the shorter side is ``test_resize`` (aspect kept), centre crop
    ``test_resolution`` -- exactly :class:`cascade.features.Preprocess` (which encodes the queries)."""
    return _preset(preset).test_preprocess().image(img.convert("RGB"))


def to_array(img, preset=DEFAULT_PRESET) -> np.ndarray:
    """PIL RGB image -> float32 [3, H, W] normalised with the preset's mean/std."""
    p = _preset(preset)
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    a = (a - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def make_views(img, rng: np.random.Generator, n_views: int, preset=DEFAULT_PRESET) -> list:
    """``n_views`` PIL views of one image: the test view first, then ``n_views - 1`` training views.
    (With train_resolution != test_resolution the two kinds differ in size; encode them separately.)"""
    views = [eval_view(img, preset)]
    views += [random_resized_crop_flip(img, rng, preset) for _ in range(n_views - 1)]
    return views


def _image_seed(seed: int, image, index: int) -> list:
    """Seed of one support image's random views: the stage's seed and the image's file name when it has one
    (so a cached view stays valid whatever the image's position in the list), else its position."""
    import hashlib
    import os

    if isinstance(image, (str, os.PathLike)):
        digest = hashlib.sha1(os.path.abspath(os.fspath(image)).encode("utf-8", "surrogatepass")).hexdigest()
        return [int(seed), int(digest[:15], 16)]
    return [int(seed), int(index)]


def support_view_features(encoder, images, n_views: int, preset=DEFAULT_PRESET, seed: int = 0,
                          batch_size: int = 16, progress: bool = True, cache_dir=None):
    """Encode ``n_views`` views of each support image (PIL images or paths, decoded by
    :func:`cascade.data.load_image`) with ``encoder.encode_image``.

    Returns (X [n*n_views, D] float32, groups [n*n_views] = index of the source image). Each image's views come
    from its own generator (:func:`_image_seed`: the seed and the file's path), so the result is reproducible
    and does not depend on the other images. With ``cache_dir`` (and an encoder with a ``cache_key``, e.g.
    :class:`cascade.features.ModelEncoder`), the views of image files are cached like query features, keyed by
    the weights, the preset, the seed, the view index and the file (path, size, mtime): a second run with the
    same support images encodes nothing."""
    from tqdm import tqdm

    from cascade.data import load_image

    p = _preset(preset)
    cache = None
    if cache_dir is not None and getattr(encoder, "cache_key", None):
        import json

        from cascade.features import FeatureCache

        cache = FeatureCache(cache_dir, f"{encoder.cache_key}|views|{json.dumps(p.as_dict(), sort_keys=True)}")
    keys: list[str | None] = []
    groups: list[int] = []
    for g, im in enumerate(images):
        vk = _view_keys(im, n_views, seed) if cache is not None else None
        keys += vk if vk is not None else [None] * n_views
        groups += [g] * n_views
    hit = np.array([k is not None for k in keys], dtype=bool)
    if cache is not None:
        hit &= cache.lookup([k or "" for k in keys])
    feats: dict[int, np.ndarray] = {}
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        for shape in {a.shape for _, a in pending}:  # test and train views may differ in size
            part = [(i, a) for i, a in pending if a.shape == shape]
            out = encoder.encode_image(np.stack([a for _, a in part]))
            out = np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)
            feats.update({i: f for (i, _), f in zip(part, out)})
            if cache is not None:
                rows = [j for j, (i, _) in enumerate(part) if keys[i] is not None]
                cache.add([keys[part[j][0]] for j in rows], out[rows])
        pending.clear()
        if cache is not None and cache.pending:
            cache.flush()

    todo = [g for g in range(len(images)) if not hit[g * n_views:(g + 1) * n_views].all()]
    for g in tqdm(todo, desc="specialist views", unit="img", disable=not progress or not todo):
        im = images[g]
        if not hasattr(im, "convert"):
            im = load_image(im)  # EXIF orientation, CMYK/16-bit/palette to RGB; ImageError names a bad file
        rng = np.random.default_rng(_image_seed(seed, images[g], g))
        for v, view in enumerate(make_views(im, rng, n_views, p)):
            pending.append((g * n_views + v, to_array(view, p)))
        if len(pending) >= batch_size:
            flush()
    flush()
    n = len(groups)
    if cache is not None and hit.any():
        rows = [i for i in range(n) if i not in feats]
        dim = next(iter(feats.values())).shape[0] if feats else cache.dim
        cached = np.empty((len(rows), dim), dtype=np.float32)
        cache.gather([keys[i] for i in rows], cached, range(len(rows)))
        feats.update(zip(rows, cached))
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    X = np.stack([feats[i] for i in range(n)]).astype(np.float32)
    return X, np.asarray(groups, dtype=np.int64)


def _view_keys(image, n_views: int, seed: int):
    """Cache keys of an image file's views (None for an in-memory image, which is not cached)."""
    import hashlib
    import os

    if not isinstance(image, (str, os.PathLike)):
        return None
    from cascade.features import file_key

    try:
        fk = file_key(image)
    except OSError:
        return None  # unreadable: load_image reports it
    return [hashlib.sha1(f"{fk}|seed{int(seed)}|view{v}".encode()).hexdigest() for v in range(n_views)]


# ------------------------------------------------------------------------------------------------ CV folds
def stratified_group_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per row: whole groups (source images) go to one fold, and each class's groups are spread
    round-robin over the folds (so with 4 shots and 4 folds every fold holds one image of every class)."""
    y, groups = np.asarray(y), np.asarray(groups)
    rng = np.random.default_rng(seed)
    fold_of_group: dict = {}
    offset = 0
    for c in np.unique(y):
        gs = np.unique(groups[y == c])
        gs = gs[rng.permutation(len(gs))]
        for i, g in enumerate(gs):
            if g in fold_of_group:
                continue  # a group with several labels keeps its first fold
            fold_of_group[g] = (offset + i) % n_folds
        offset += len(gs)  # rotate so small classes do not all land in fold 0
    return np.array([fold_of_group[g] for g in groups], dtype=np.int64)


def _l2(X) -> np.ndarray:
    """Row-wise L2 normalisation (the feature cache stores normalised features; doing it here too makes
    features from any path agree)."""
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _combine(p_clip: np.ndarray, p_spec: np.ndarray, w: float, mode: str) -> np.ndarray:
    if mode == "linear":
        return (1.0 - w) * p_clip + w * p_spec
    if mode == "log":
        return (1.0 - w) * np.log(p_clip + 1e-12) + w * np.log(p_spec + 1e-12)
    raise ValueError(f"combine must be 'linear' or 'log', not {mode!r}")


def _cv_score(score: np.ndarray, y_local: np.ndarray) -> tuple[float, float]:
    """(top-1 accuracy, mean reciprocal rank of the true class) of scores [M, K]; both depend only on the
    ranking, so a flat (uninformative) specialist cannot win by merely smoothing over-confident CLIP
    probabilities."""
    true = score[np.arange(len(y_local)), y_local]
    rank = (score > true[:, None]).sum(axis=1)  # 0 = top-1
    return float(np.mean(rank == 0)), float(np.mean(1.0 / (rank + 1)))


# ---------------------------------------------------------------------------------------------- the head
def fit_logistic(X, y, C: float, max_iter: int = 100, W0=None, b0=None, tol: float = 1e-4):
    """Multinomial logistic regression, full batch: minimises mean cross-entropy + ||W||^2 / (2 C n) (the
    intercept is not penalised), which has the same minimiser as scikit-learn's ``LogisticRegression(C=C)``
    (C * summed loss + ||W||^2 / 2). L-BFGS (:func:`_lbfgs`) with the analytic gradient, at most
    ``max_iter`` iterations, stopping like scikit-learn's lbfgs (max |gradient| <= ``tol``); the matrix
    products run in float32, the objective and the optimiser in float64. X [n, D], y [n] in 0..K-1 (every
    class present); (W0 [K, D], b0 [K]) warm-start it. Returns (W [K, D], b [K]) float64."""
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y)
    n, D = X32.shape
    K = int(y.max()) + 1
    if K == 1:  # one class: nothing to separate
        return np.zeros((1, D)), np.zeros(1)
    Y = np.zeros((n, K), dtype=np.float32)
    Y[np.arange(n), y] = 1.0
    lam = 1.0 / (float(C) * n)

    def loss_grad(theta):
        W = theta[:K * D].reshape(K, D)
        Z = X32 @ W.T.astype(np.float32) + theta[K * D:].astype(np.float32)
        Z -= Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        S = E.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(S[:, 0].astype(np.float64)) - Z[np.arange(n), y]))
        G = (E / S - Y) / n
        gW = (G.T @ X32).astype(np.float64) + lam * W
        return loss + 0.5 * lam * float(np.dot(theta[:K * D], theta[:K * D])), \
            np.concatenate([gW.ravel(), G.sum(axis=0, dtype=np.float64)])

    theta0 = np.zeros(K * D + K)
    if W0 is not None:
        theta0[:K * D], theta0[K * D:] = np.asarray(W0, np.float64).ravel(), np.asarray(b0, np.float64)
    theta = _lbfgs(loss_grad, theta0, int(max_iter), tol)
    return theta[:K * D].reshape(K, D).copy(), theta[K * D:].copy()


def _lbfgs(fun, x, max_iter: int, gtol: float, m: int = 10, ftol: float = 64 * np.finfo(float).eps):
    """Plain L-BFGS (two-loop recursion, memory ``m``) with a backtracking Armijo line search, in numpy:
    with 10^5 parameters scipy's L-BFGS-B bookkeeping costs more than the loss itself. Stops after
    ``max_iter`` iterations, when max |gradient| <= ``gtol``, or when the relative decrease of the
    objective is <= ``ftol`` (scikit-learn's lbfgs criteria)."""
    f, g = fun(x)
    S, Y = [], []
    for _ in range(max_iter):
        if np.abs(g).max() <= gtol:
            break
        q = g.copy()
        alphas = []
        for s_, y_ in zip(reversed(S), reversed(Y)):
            a = np.dot(s_, q) / np.dot(y_, s_)
            alphas.append(a)
            q -= a * y_
        if S:
            q *= np.dot(S[-1], Y[-1]) / np.dot(Y[-1], Y[-1])
        else:
            q /= max(np.linalg.norm(g), 1e-12)  # first step: unit length along -g
        for (s_, y_), a in zip(zip(S, Y), reversed(alphas)):
            q += (a - np.dot(y_, q) / np.dot(y_, s_)) * s_
        d = -q
        slope = np.dot(g, d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            S.clear(), Y.clear()
            d, slope = -g / max(np.linalg.norm(g), 1e-12), -np.linalg.norm(g)
        step = 1.0
        for _ in range(30):
            f_new, g_new = fun(x + step * d)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease found
        s_, y_ = step * d, g_new - g
        if np.dot(s_, y_) > 1e-10 * np.dot(y_, y_):
            S.append(s_), Y.append(y_)
            if len(S) > m:
                S.pop(0), Y.pop(0)
        x = x + s_
        done = (f - f_new) <= ftol * max(abs(f), abs(f_new), 1.0)
        f, g = f_new, g_new
        if done:
            break
    return x


# --------------------------------------------------------------------------------------------------- stage
class SpecialistStage:
    """Re-ranks one domain's classes with a classifier trained on its own backbone's features.

    Parameters
    ----------
    feature_key : key of the query feature dict this specialist reads (e.g. "convnextv2_base").
    n_views : views per support image (1 test view + n_views-1 augmented) for :meth:`fit_images` and
        :func:`support_view_features`.
    preset : preprocessing preset name (:data:`PRESETS`).
    C : inverse L2 strength of the logistic head on standardised features, or "auto" (CV over ``C_grid``).
    weight : specialist weight w in [0, 1], or "auto" (CV over ``weight_grid``; needs ``clip_probs`` in fit,
        otherwise ``fallback_weight`` is used with a warning).
    combine : "linear" (mix probabilities) or "log" (mix log-probabilities).
    n_folds : CV folds over support images.
    max_iter : L-BFGS iterations of the logistic head (:func:`fit_logistic`). 30 by default: a fixed small
        budget that keeps the 13 fits of the default CV sweep (3 C values x 4 folds + the final head) to a
        few seconds on 2 cores; not converging fully acts as extra regularisation (each fold's head starts
        from its solution at the previous, smaller C). On ConvNeXt features of 520 x 4 support views, 30
        iterations gave the same CV accuracy as 100 (docs/specialist.md).
    finetune : "none" (frozen backbone, default), "last_stage" or "all" (see :meth:`fit_images`).
    finetune_epochs, finetune_lr, finetune_weight_decay, finetune_batch_size, label_smoothing : fine-tuning.
    random_state : seed of folds, views and fine-tuning.
    """

    _parameter_constraints = {
        "feature_key": [TypeOf(str, "a string")],
        "n_views": [Interval(Integral, 1, None)],
        "preset": [TypeOf((str, dict, Preset), "a preset name or table")],
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

    def __init__(self, feature_key: str = "convnextv2_base", n_views: int = 4, preset: str = DEFAULT_PRESET,
                 C="auto", C_grid=(0.01, 0.1, 1.0), weight="auto",
                 weight_grid=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), fallback_weight: float = 0.5,
                 combine: str = "linear", n_folds: int = 4, max_iter: int = 30, finetune: str = "none",
                 finetune_epochs: int = 15, finetune_lr: float = 1e-4, finetune_weight_decay: float = 0.05,
                 finetune_batch_size: int = 32, label_smoothing: float = 0.1, random_state: int = 0):
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
    def get_params(self) -> dict:
        import inspect

        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("SpecialistStage is not fitted yet: call fit(X, y, ...) (or fit_images) first")

    def _validate(self):
        validate_params(self._parameter_constraints, self.get_params())
        if self.combine not in ("linear", "log"):
            raise ValueError(f"combine must be 'linear' or 'log', not {self.combine!r}")
        if self.finetune not in ("none", "last_stage", "all"):
            raise ValueError(f"finetune must be 'none', 'last_stage' or 'all', not {self.finetune!r}")
        if self.weight != "auto" and not 0.0 <= float(self.weight) <= 1.0:
            raise ValueError(f"weight must be 'auto' or in [0, 1], got {self.weight!r}")
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")

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
        return _softmax(((np.asarray(X, np.float64) - mean) / scale) @ coef.T + intercept)

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
    def fit(self, X, y, clip_probs=None, groups=None):
        """Fit on features of support views.

        X [M, D] features (the views of the support images); y [M] GLOBAL class indices of the domain;
        clip_probs: out-of-fold CLIP probabilities of the support images, [M, C_all] row-aligned with X, or
        [G, C_all] indexed by group id (columns: all classes, or just the domain's in ``classes_`` order);
        groups [M]: the source image of each view (default: every row its own image)."""
        self._validate()
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be [M, D] with one label per row; got X {X.shape}, y {y.shape}")
        X = _l2(X)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} entries for {len(y)} rows")
        self.classes_ = np.unique(y).astype(np.int64)
        K = len(self.classes_)
        y_local = np.searchsorted(self.classes_, y)
        p_clip = self._clip_rows(clip_probs, len(y), groups)

        C_values = [float(c) for c in self.C_grid] if self.C == "auto" else [float(self.C)]
        need_cv = len(C_values) > 1 or self.weight == "auto"
        if need_cv:
            folds = stratified_group_folds(y_local, groups, self.n_folds, self.random_state)
            p_spec_by_C = {C: np.zeros((len(y), K)) for C in C_values}
            for f in np.unique(folds):
                tr, te = folds != f, folds == f
                head = None
                for C in sorted(C_values):  # ascending C, each solve starting from the previous one
                    head = self._fit_head(X[tr], y_local[tr], C, K, warm=head)
                    p_spec_by_C[C][te] = self._head_proba(X[te], *head)
            C_best, w_best, table = self._select(p_spec_by_C, p_clip, y_local)
            self.cv_scores_ = {f"C={C:g},w={w:g}": acc for (C, w), (acc, _) in table.items()}
            self.cv_specialist_accuracy_ = _cv_score(p_spec_by_C[C_best], y_local)[0]
            self.cv_clip_accuracy_ = None if p_clip is None else _cv_score(p_clip, y_local)[0]
            self.cv_accuracy_ = table[(C_best, w_best)][0]
        else:
            C_best = C_values[0]
            w_best = float(self.weight)
            self.cv_scores_ = {}
            self.cv_specialist_accuracy_ = self.cv_clip_accuracy_ = self.cv_accuracy_ = None
        self.C_ = C_best
        self.weight_ = w_best
        self.mean_, self.scale_, self.coef_, self.intercept_ = self._fit_head(X, y_local, C_best, K)
        self.n_features_in_ = X.shape[1]
        self.feature_key_ = self.feature_key
        return self

    @property
    def query_key(self) -> str:
        """Key of the query features :meth:`rerank` expects: ``feature_key`` for a frozen backbone, the
        fine-tuned backbone's own key (``feature_key_``, with its weights' hash) after fine-tuning."""
        return getattr(self, "feature_key_", self.feature_key)

    # ------------------------------------------------------------------------------------------ predict
    def predict_proba(self, X) -> np.ndarray:
        """Specialist probabilities [M, K] over ``classes_``."""
        self._check_fitted()
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be [M, {self.n_features_in_}] ({self.feature_key} features), got {X.shape}")
        return self._head_proba(_l2(X), self.mean_, self.scale_, self.coef_, self.intercept_)

    def predict(self, X) -> np.ndarray:
        """Global class index of the specialist's top-1 for each row."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

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
    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """Learned state as numpy arrays + JSON-able meta (no pickle), for Cascade.save."""
        self._check_fitted()
        arrays = {"classes": self.classes_, "mean": self.mean_, "scale": self.scale_, "coef": self.coef_,
                  "intercept": self.intercept_}
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        meta = {"params": params, "C_": self.C_, "weight_": self.weight_, "n_features_in_": self.n_features_in_,
                "feature_key_": self.query_key,
                "cv_accuracy_": self.cv_accuracy_, "cv_specialist_accuracy_": self.cv_specialist_accuracy_,
                "cv_clip_accuracy_": self.cv_clip_accuracy_, "cv_scores_": self.cv_scores_}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "SpecialistStage":
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["params"].items()}
        self = cls(**params)
        self.classes_ = np.asarray(arrays["classes"], dtype=np.int64)
        self.mean_, self.scale_ = np.asarray(arrays["mean"]), np.asarray(arrays["scale"])
        self.coef_, self.intercept_ = np.asarray(arrays["coef"]), np.asarray(arrays["intercept"])
        for k in ("C_", "weight_", "n_features_in_", "cv_accuracy_", "cv_specialist_accuracy_", "cv_clip_accuracy_",
                  "cv_scores_"):
            setattr(self, k, meta[k])
        self.feature_key_ = meta.get("feature_key_", self.feature_key)
        return self

    # ---------------------------------------------------------------------------------- from images
    def fit_images(self, images, y, backbone, clip_probs=None, progress: bool = True, cache_dir=None):
        """Fit from support images (PIL images or paths; one label each, global class indices).

        ``backbone``: a ConvNeXt-V2 model, or an encoder wrapping one (:class:`cascade.features.ModelEncoder`,
        whose ``cache_key`` lets ``cache_dir`` cache the support views).
        finetune="none": encode ``n_views`` views per image with the frozen ``backbone`` (cached in ``cache_dir``
        when given, see :func:`support_view_features`) and call :meth:`fit`.
        finetune="last_stage"/"all": for each CV fold, fine-tune the backbone (reset to its original weights
        each time) on the other folds' images and score the held-out images (their test views) with its
        head, so the weight w is chosen on images the network never saw; then fine-tune on all images.
        ``backbone`` is fine-tuned IN PLACE and kept as ``encoder_``: encode the queries with it (their
        features go under ``feature_key_``); save its weights separately (``to_arrays`` holds the head).
        ``clip_probs``: out-of-fold CLIP probabilities, one row per image."""
        self._validate()
        y = np.asarray(y)
        if self.finetune == "none":
            X, groups = support_view_features(backbone, images, self.n_views, self.preset, self.random_state,
                                              progress=progress, cache_dir=cache_dir)
            return self.fit(X, y[groups], None if clip_probs is None else np.asarray(clip_probs)[groups], groups)
        if getattr(backbone, "cache_key", None) is not None and hasattr(backbone, "model"):
            backbone = backbone.model  # an encoder: fine-tune the model it holds
        self.classes_ = np.unique(y).astype(np.int64)
        K = len(self.classes_)
        y_local = np.searchsorted(self.classes_, y)
        pil = _load_images(images)
        state0 = {k: v.numpy().copy() for k, v in backbone.state_dict().items()}
        p_clip = self._clip_rows(clip_probs, len(y), np.arange(len(y)))
        if self.weight == "auto" and p_clip is not None:
            folds = stratified_group_folds(y_local, np.arange(len(y)), self.n_folds, self.random_state)
            p_spec = np.zeros((len(y), K))
            for f in np.unique(folds):
                tr = np.flatnonzero(folds != f)
                te = np.flatnonzero(folds == f)
                _restore(backbone, state0)
                head = finetune_backbone(backbone, [pil[i] for i in tr], y_local[tr], K, mode=self.finetune,
                                         **self._ft_kwargs(progress))
                feats = _encode(backbone, [eval_view(pil[i], self.preset) for i in te], self.preset)
                p_spec[te] = _softmax(_l2(feats) @ head[0].T + head[1])
            _, w_best, table = self._select({0.0: p_spec}, p_clip, y_local)
            self.cv_scores_ = {f"w={w:g}": acc for (_, w), (acc, _) in table.items()}
            self.cv_specialist_accuracy_ = _cv_score(p_spec, y_local)[0]
            self.cv_clip_accuracy_ = _cv_score(p_clip, y_local)[0]
            self.cv_accuracy_ = table[(0.0, w_best)][0]
        else:
            w_best = float(self.fallback_weight if self.weight == "auto" else self.weight)
            if self.weight == "auto":
                warnings.warn("SpecialistStage: no clip_probs, using fallback_weight", RuntimeWarning, stacklevel=2)
            self.cv_scores_, self.cv_specialist_accuracy_, self.cv_clip_accuracy_, self.cv_accuracy_ = \
                {}, None, None, None
        _restore(backbone, state0)
        W, b = finetune_backbone(backbone, pil, y_local, K, mode=self.finetune, **self._ft_kwargs(progress))
        D = W.shape[1]
        self.weight_, self.C_ = w_best, None
        self.mean_, self.scale_ = np.zeros(D), np.ones(D)
        self.coef_, self.intercept_ = W.astype(np.float64), b.astype(np.float64)
        self.n_features_in_ = D
        self.encoder_ = backbone
        from cascade.models.weights import state_sha256

        self.backbone_sha256_ = state_sha256({k: v.numpy() for k, v in backbone.state_dict().items()})
        self.feature_key_ = f"{self.feature_key}@ft-{self.backbone_sha256_[:12]}"
        return self

    def _ft_kwargs(self, progress):
        return dict(epochs=self.finetune_epochs, lr=self.finetune_lr, weight_decay=self.finetune_weight_decay,
                    batch_size=self.finetune_batch_size, label_smoothing=self.label_smoothing, preset=self.preset,
                    seed=self.random_state, progress=progress)


# ------------------------------------------------------------------------------------------- fine-tuning
def _load_images(images):
    from cascade.data import load_image

    return [im.convert("RGB") if hasattr(im, "convert") else load_image(im) for im in images]


def _restore(model, state):
    import jittor as jt

    for k, p in model.state_dict().items():
        p.assign(jt.array(state[k]))


def _encode(model, pil_views, preset, batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(pil_views), batch_size):
        x = np.stack([to_array(v, preset) for v in pil_views[i:i + batch_size]])
        out.append(np.asarray(model.encode_image(x).numpy(), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, model.num_features))


def finetune_backbone(model, images, y_local, n_classes: int, mode: str = "last_stage", epochs: int = 15,
                      lr: float = 1e-4, weight_decay: float = 0.05, batch_size: int = 32,
                      label_smoothing: float = 0.1, preset=DEFAULT_PRESET, seed: int = 0,
                      progress: bool = True):
    """Fine-tune a ConvNeXt-V2 in place on (PIL images, local labels 0..n_classes-1) with a new linear head.

    mode "last_stage": the last stage, the final norm and the head train; earlier stages run without
    gradients. mode "all": everything trains. AdamW, linear warm-up over the first epoch then cosine decay
    to zero (the learning rate only goes down after warm-up), cross-entropy with label smoothing, training
    views from :func:`random_resized_crop_flip`. The head reads the L2-normalised feature times sqrt(D) (so
    it applies to the feature cache's normalised features); returns it as (W [K, D] with that scale folded
    in, b [K]) numpy arrays: logits = l2(feature) @ W.T + b."""
    from tqdm import tqdm

    from cascade.runtime import jittor as _jittor

    jt = _jittor()
    from jittor import nn

    rng = np.random.default_rng(seed)
    jt.set_global_seed(seed)
    p = _preset(preset)
    D = model.num_features
    feat_scale = float(np.sqrt(D))
    head = nn.Linear(D, n_classes)
    head.weight.assign(jt.init.trunc_normal_(jt.zeros((n_classes, D)), std=0.02))
    head.bias.assign(jt.zeros((n_classes,)))
    last = len(model.stages) - 1
    if mode == "all":
        params = list(model.parameters())
    elif mode == "last_stage":
        params = list(model.stages[last].parameters()) + list(model.downsample_layers[last].parameters()) + \
            list(model.norm.parameters())
    else:
        raise ValueError(f"mode must be 'last_stage' or 'all', not {mode!r}")
    params += list(head.parameters())
    opt = jt.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    y_local = np.asarray(y_local)
    n = len(images)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    warm = steps_per_epoch
    step = 0
    bar = tqdm(total=total, desc=f"fine-tune ({mode})", unit="step", disable=not progress)
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            if len(idx) == 0:
                continue
            x = jt.array(np.stack([to_array(random_resized_crop_flip(images[i], rng, p), p) for i in idx]))
            t = y_local[idx]
            opt.lr = lr * (step + 1) / warm if step < warm else \
                0.5 * lr * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))
            model.train()
            if mode == "last_stage":
                with jt.no_grad():
                    h = model.forward_stages(x, 0, last).stop_grad()
                h = model.forward_stages(h, last, last + 1)
                feat = model.norm.normalize_last(h.mean(dims=(1, 2)))
            else:
                feat = model.forward_features(x)
            feat = feat / jt.sqrt((feat * feat).sum(dim=1, keepdims=True) + 1e-12) * feat_scale
            logits = head(feat)
            logp = logits - logits.max(dim=1, keepdims=True).stop_grad()
            logp = logp - jt.log(jt.exp(logp).sum(dim=1, keepdims=True))
            onehot = np.full((len(idx), n_classes), label_smoothing / n_classes, dtype=np.float32)
            onehot[np.arange(len(idx)), t] += 1.0 - label_smoothing
            loss = -(logp * jt.array(onehot)).sum(dim=1).mean()
            opt.step(loss)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.item()):.3f}")
    bar.close()
    model.eval()
    return head.weight.numpy() * feat_scale, head.bias.numpy().copy()
