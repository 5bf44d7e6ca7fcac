"""The specialist's support views: a few views of each support image, encoded once and cached.

View 0 of an image is its test view (what the queries go through); the others are training views
(:meth:`cascade.preprocess.Preprocess.train_view`). Each image's views come from its own generator, seeded by
the stage's seed and the image's file path, so they do not depend on the other images and can be cached per
file in the feature cache.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
from tqdm import tqdm

from ...data import load_image
from ...features import FeatureCache, file_key
from ...preprocess import DEFAULT_PRESET, preprocess_for

__all__ = ["random_resized_crop_flip", "eval_view", "to_array", "make_views", "support_view_features"]


def random_resized_crop_flip(img, rng: np.random.Generator, preset=DEFAULT_PRESET):
    """A training view of ``img`` under ``preset`` (a name, a dict or a :class:`Preprocess`)."""
    return preprocess_for(preset).train_view(img, rng)


def eval_view(img, preset=DEFAULT_PRESET):
    """The test view of ``img`` under ``preset``: the one the feature pipeline encodes the queries with."""
    return preprocess_for(preset).image(img.convert("RGB"))


def to_array(img, preset=DEFAULT_PRESET) -> np.ndarray:
    """A PIL view -> float32 [3, H, W] normalised with the preset's mean and std."""
    return preprocess_for(preset).to_array(img)


def make_views(img, rng: np.random.Generator, n_views: int, preset=DEFAULT_PRESET) -> list:
    """``n_views`` PIL views of one image: the test view first, then ``n_views - 1`` training views.
    (When the train and test sizes differ the two kinds differ in size; encode them separately.)"""
    p = preprocess_for(preset)
    return [p.image(img.convert("RGB"))] + [p.train_view(img, rng) for _ in range(n_views - 1)]


def _image_seed(seed: int, image, index: int) -> list:
    """Seed of one support image's random views: the stage's seed and the image's file name when it has one
    (so a cached view stays valid whatever the image's position in the list), else its position."""
    if isinstance(image, (str, os.PathLike)):
        digest = hashlib.sha1(os.path.abspath(os.fspath(image)).encode("utf-8", "surrogatepass")).hexdigest()
        return [int(seed), int(digest[:15], 16)]
    return [int(seed), int(index)]


def _view_keys(image, n_views: int, seed: int):
    """Cache keys of an image file's views (None for an in-memory image, which is not cached)."""
    if not isinstance(image, (str, os.PathLike)):
        return None
    try:
        fk = file_key(image)
    except OSError:
        return None  # unreadable: load_image reports it
    return [hashlib.sha1(f"{fk}|seed{int(seed)}|view{v}".encode()).hexdigest() for v in range(n_views)]


def support_view_features(encoder, images, n_views: int, preset=DEFAULT_PRESET, seed: int = 0,
                          batch_size: int = 16, progress: bool = True, cache_dir=None):
    """Encode ``n_views`` views of each support image (PIL images or paths, decoded by
    :func:`cascade.data.load_image`) with ``encoder.encode_image``.

    Returns (X [n*n_views, D] float32, groups [n*n_views] = index of the source image). With ``cache_dir``
    (and an encoder with a ``cache_key``, e.g. :class:`cascade.features.ModelEncoder`), the views of image
    files are cached like query features, keyed by the weights, the preprocessing, the seed, the view index
    and the file (path, size, mtime): a second run with the same support images encodes nothing."""
    p = preprocess_for(preset)
    cache = None
    if cache_dir is not None and getattr(encoder, "cache_key", None):
        cache = FeatureCache(cache_dir, f"{encoder.cache_key}|views|{p.views_key}")
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
            pending.append((g * n_views + v, p.to_array(view)))
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
