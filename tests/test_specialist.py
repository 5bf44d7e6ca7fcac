"""Specialist stage: re-ranking rule, cross-validated weight, folds, preprocessing, save/load, and the image
paths (frozen features and fine-tuning) on a tiny ConvNeXt-V2."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cascade.stages.base import NotFittedError
from cascade.stages.specialist import (PRESETS, SpecialistStage, make_views, random_resized_crop_flip,
                                       stratified_group_folds, eval_view, to_array)

N_ALL = 40                      # all classes of the problem
DOMAIN = np.arange(12, 32)      # the specialist's domain (20 classes, global indices)
SHOTS, VIEWS, DIM = 4, 3, 24


def synthetic(seed: int, spec_informative: bool, clip_informative: bool):
    """Support views (features, labels, groups) and out-of-fold CLIP probabilities per support image."""
    rng = np.random.default_rng(seed)
    K = len(DOMAIN)
    means = rng.standard_normal((K, DIM)) * 3.0
    y_img = np.repeat(DOMAIN, SHOTS)
    n_img = len(y_img)
    groups = np.repeat(np.arange(n_img), VIEWS)
    y = y_img[groups]
    local = np.searchsorted(DOMAIN, y)
    centre = means[local] if spec_informative else rng.standard_normal((len(y), DIM)) * 3.0
    X = centre + rng.standard_normal((len(y), DIM))
    logits = rng.standard_normal((n_img, N_ALL))
    if clip_informative:
        logits[np.arange(n_img), y_img] += 2.5  # right most of the time, not always
    clip = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return X, y, groups, clip, means


def queries(means, n, rng, n_all=N_ALL):
    local = rng.integers(0, len(DOMAIN), n)
    X = means[local] + rng.standard_normal((n, DIM))
    probs = rng.dirichlet(np.ones(n_all) * 0.3, size=n)
    return X, probs, DOMAIN[local]


@pytest.fixture(scope="module")
def fitted():
    X, y, groups, clip, means = synthetic(0, spec_informative=True, clip_informative=False)
    return SpecialistStage(C=1.0).fit(X, y, clip_probs=clip, groups=groups), means


def test_estimator_contract():
    st = SpecialistStage(C=0.5, weight=0.3)
    assert st.C == 0.5 and st.weight == 0.3 and st.feature_key == "convnextv2_base"
    with pytest.raises(NotFittedError, match="not fitted"):
        st.rerank(np.ones((1, N_ALL)) / N_ALL, np.zeros((1, DIM)))
    X, y, groups, clip, _ = synthetic(1, True, True)
    assert st.fit(X, y, clip, groups) is st
    np.testing.assert_array_equal(st.classes_, DOMAIN)
    assert st.weight_ == 0.3 and st.C_ == 0.5  # fixed values are used as given
    with pytest.raises(ValueError, match="combine"):
        SpecialistStage(combine="max").fit(X, y)


def test_rerank_only_reorders_inside_the_domain(fitted):
    st, means = fitted
    rng = np.random.default_rng(5)
    X, probs, _ = queries(means, 200, rng)
    out = st.rerank(probs, X)
    outside = np.setdiff1d(np.arange(N_ALL), DOMAIN)
    np.testing.assert_array_equal(out[:, outside], probs[:, outside])              # mass outside untouched
    np.testing.assert_allclose(out.sum(1), probs.sum(1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.sort(out[:, DOMAIN], 1), np.sort(probs[:, DOMAIN], 1))  # a permutation
    top5_before = np.argsort(-probs, 1, kind="stable")[:, :5]
    top5 = np.argsort(-out, 1, kind="stable")[:, :5]
    for a, b in zip(top5_before, top5):
        assert len(set(b)) == 5 and b.min() >= 0 and b.max() < N_ALL              # a valid top-5
        np.testing.assert_array_equal(np.isin(a, DOMAIN), np.isin(b, DOMAIN))     # same slots for the domain
        np.testing.assert_array_equal(a[~np.isin(a, DOMAIN)], b[~np.isin(b, DOMAIN)])
    routed = np.isin(top5_before[:, 0], DOMAIN)
    assert routed.any() and np.isin(top5[routed, 0], DOMAIN).all()                 # never leaves the domain
    assert (top5[:, 0] != top5_before[:, 0]).any()                                 # it does re-rank


def test_weight_zero_gives_the_clip_ranking(fitted):
    st, means = fitted
    X0, y0, g0, clip0, _ = synthetic(0, True, False)
    zero = SpecialistStage(C=1.0, weight=0.0).fit(X0, y0, clip0, g0)
    X, probs, _ = queries(means, 100, np.random.default_rng(7))
    np.testing.assert_array_equal(zero.rerank(probs, X), probs)
    np.testing.assert_array_equal(SpecialistStage(C=1.0, weight=0.0, combine="log").fit(X0, y0).rerank(probs, X),
                                  probs)


def test_specialist_wins_when_it_is_better(fitted):
    st, means = fitted
    assert st.weight_ >= 0.7, st.cv_scores_
    assert st.cv_specialist_accuracy_ > 0.9 and st.cv_clip_accuracy_ < 0.3
    X, probs, truth = queries(means, 300, np.random.default_rng(9))
    probs[:, DOMAIN] += 0.5  # queries routed to the domain (their top-1 is inside it)
    probs /= probs.sum(1, keepdims=True)
    top1 = st.rerank(probs, X).argmax(1)
    assert np.mean(top1 == truth) > 0.9 > np.mean(probs.argmax(1) == truth)


def test_clip_wins_when_the_specialist_is_noise():
    X, y, groups, clip, _ = synthetic(2, spec_informative=False, clip_informative=True)
    st = SpecialistStage().fit(X, y, clip_probs=clip, groups=groups)
    assert st.weight_ <= 0.3, st.cv_scores_
    assert st.cv_clip_accuracy_ > st.cv_specialist_accuracy_
    assert st.C_ in (0.01, 0.1, 1.0)


def test_clip_probs_per_image_or_per_row_and_domain_columns():
    X, y, groups, clip, _ = synthetic(3, True, True)
    a = SpecialistStage(C=1.0).fit(X, y, clip_probs=clip, groups=groups)                # one row per image
    b = SpecialistStage(C=1.0).fit(X, y, clip_probs=clip[groups], groups=groups)        # one row per view
    c = SpecialistStage(C=1.0).fit(X, y, clip_probs=clip[groups][:, DOMAIN], groups=groups)  # domain columns
    assert a.weight_ == b.weight_ == c.weight_ and a.cv_scores_ == b.cv_scores_ == c.cv_scores_
    with pytest.warns(RuntimeWarning, match="fallback_weight"):
        d = SpecialistStage(C=1.0).fit(X, y, groups=groups)
    assert d.weight_ == 0.5


def test_folds_keep_views_together_and_spread_classes():
    y = np.repeat(np.arange(10), SHOTS * VIEWS)
    groups = np.repeat(np.arange(10 * SHOTS), VIEWS)
    folds = stratified_group_folds(y, groups, 4, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    for c in range(10):
        assert sorted(set(folds[y == c])) == [0, 1, 2, 3]


def test_save_and_load_arrays(fitted):
    st, means = fitted
    arrays, meta = st.state_dict()
    import json

    meta = json.loads(json.dumps(meta))
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert not any(k.startswith("backbone_state_/") for k in arrays)          # a frozen backbone is not saved
    back = SpecialistStage.from_state(arrays, meta)
    X, probs, _ = queries(means, 50, np.random.default_rng(11))
    np.testing.assert_array_equal(back.rerank(probs, X), st.rerank(probs, X))
    assert back.get_params() == st.get_params()


def test_a_real_stage_saved_through_npz_and_json(fitted, tmp_path):
    """SpecialistStage is a Stage: NotFittedError before fit, the domain a hyperparameter, and the whole state
    (a fine-tuned backbone's weights included) saved by Stage.save and read back by Stage.load, without pickle."""
    from cascade.preprocess import Preprocess
    from cascade.io import load_npz_json
    from cascade.stages.base import Stage

    with pytest.raises(NotFittedError):
        SpecialistStage().predict(np.zeros((1, DIM)))
    with pytest.raises(NotFittedError):
        SpecialistStage().state_dict()
    X, y, groups, clip, means = synthetic(6, True, True)
    pre = Preprocess(size=32, resize=36)
    st = SpecialistStage(domain="dogs", preset=pre, C=1.0).fit(X, y, clip, groups)
    assert st.name == "dogs" and st.get_params()["domain"] == "dogs"
    st.backbone_state_ = {"stages.3.0.norm.weight": np.arange(4, dtype=np.float32)}  # as fit_images leaves it
    st.backbone_sha256_ = "0" * 64
    path = st.save(tmp_path / "spec.npz")
    arrays, meta = load_npz_json(path)
    assert "backbone_state_/stages.3.0.norm.weight" in arrays and meta["params"]["domain"] == "dogs"
    back = Stage.load(path)
    assert isinstance(back, SpecialistStage) and back.get_params() == st.get_params() and back.preset == pre
    np.testing.assert_array_equal(back.backbone_state_["stages.3.0.norm.weight"], np.arange(4))
    Xq, probs, _ = queries(means, 30, np.random.default_rng(12))
    np.testing.assert_array_equal(back.rerank(probs, Xq), st.rerank(probs, Xq))
    assert back.cv_scores_ == st.cv_scores_ and back.weight_ == st.weight_


def test_one_preprocessing_type_for_clip_and_convnext():
    """The specialist's presets are the feature pipeline's Preprocess: the default preset's test view is the
    ImageNet evaluation transform, its train view is seeded and sized, and both normalise alike."""
    from cascade.features import Preprocess as FeaturesPreprocess
    from cascade.preprocess import Preprocess

    assert FeaturesPreprocess is Preprocess
    p = PRESETS["convnextv2_1k_224"]
    assert p.cache_key == Preprocess.imagenet().cache_key and (p.size, p.resize) == (224, 256)
    img = _image(300, 180)
    np.testing.assert_array_equal(p.to_array(eval_view(img)), p(img))
    a, b = p.train_view(img, np.random.default_rng(1)), p.train_view(img, np.random.default_rng(1))
    assert a.size == (224, 224) and np.array_equal(np.asarray(a), np.asarray(b))
    assert Preprocess.from_dict(p.as_dict()) == p


# ------------------------------------------------------------------------------------------ preprocessing
def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_train_views_are_seeded_and_sized():
    img = _image(300, 180)
    a = random_resized_crop_flip(img, np.random.default_rng(3))
    b = random_resized_crop_flip(img, np.random.default_rng(3))
    c = random_resized_crop_flip(img, np.random.default_rng(4))
    assert a.size == (224, 224)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    big = random_resized_crop_flip(img, np.random.default_rng(3), PRESETS["convnextv2_22k_384"])
    assert big.size == (384, 384)


def test_test_view_keeps_the_aspect_ratio():
    # a wide image with a centred square: an aspect-preserving resize + centre crop keeps it square
    a = np.zeros((200, 400, 3), np.uint8)
    a[50:150, 150:250] = 255
    v = np.asarray(eval_view(Image.fromarray(a)))
    assert v.shape == (224, 224, 3)
    rows = np.flatnonzero(v[:, 112, 0] > 128)
    cols = np.flatnonzero(v[112, :, 0] > 128)
    assert abs(len(rows) - len(cols)) <= 2 and abs(len(rows) - 128) <= 3  # 100 px * 256/200
    x = to_array(Image.fromarray(v))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    views = make_views(_image(250, 320), np.random.default_rng(0), 4)
    assert len(views) == 4 and all(v.size == (224, 224) for v in views)


# ------------------------------------------------------------------------------------- with a real network
@pytest.fixture(scope="module")
def tiny_net():
    from cascade.runtime import jittor

    jittor()
    from cascade.models.convnextv2 import ConvNeXtV2

    net = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=3)
    net.eval()
    return net


def _tiny_preset():
    from cascade.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    return Preprocess(size=32, resize=36, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _coloured_images(n_per_class, classes, seed=0):
    rng = np.random.default_rng(seed)
    imgs, ys = [], []
    for i, c in enumerate(classes):
        for _ in range(n_per_class):
            a = rng.integers(0, 60, (40, 48, 3)).astype(np.uint8)
            a[..., i % 3] += 150  # classes differ by colour
            imgs.append(Image.fromarray(a))
            ys.append(c)
    return imgs, np.array(ys)


def test_fit_images_with_frozen_features(tiny_net):
    imgs, y = _coloured_images(4, [5, 6, 7])
    clip = np.full((len(y), 10), 0.1)
    st = SpecialistStage(feature_key="tiny", n_views=2, preset=_tiny_preset(), C=1.0)
    st.fit_images(imgs, y, tiny_net, clip_probs=clip, progress=False)
    np.testing.assert_array_equal(st.classes_, [5, 6, 7])
    assert st.n_features_in_ == 64 and 0.0 <= st.weight_ <= 1.0
    q = np.stack([to_array(eval_view(im, _tiny_preset()), _tiny_preset()) for im in imgs])
    feats = tiny_net.encode_image(q).numpy()
    assert np.mean(st.predict(feats) == y) >= 0.9


def test_finetune_last_stage_trains_only_the_last_stage(tiny_net):
    from cascade.stages.specialist import finetune_backbone

    imgs, y = _coloured_images(3, [0, 1])
    before = {k: v.numpy().copy() for k, v in tiny_net.state_dict().items()}
    W, b = finetune_backbone(tiny_net, imgs, y, 2, mode="last_stage", epochs=2, lr=1e-3, batch_size=4,
                             preset=_tiny_preset(), progress=False)
    after = {k: v.numpy() for k, v in tiny_net.state_dict().items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert W.shape == (2, 64) and b.shape == (2,)
    assert any(k.startswith("stages.3.") for k in changed) and "norm.weight" in changed
    assert not any(k.startswith(("stages.0.", "stages.1.", "stages.2.", "downsample_layers.0.")) for k in changed)


def test_fit_images_with_finetuning_reranks_with_its_own_encoder(tiny_net):
    imgs, y = _coloured_images(4, [2, 4])
    clip = np.random.default_rng(0).dirichlet(np.ones(6), size=len(y))
    st = SpecialistStage(feature_key="tiny", preset=_tiny_preset(), finetune="last_stage", n_folds=2,
                         finetune_epochs=1, finetune_batch_size=4, finetune_lr=1e-3)
    st.fit_images(imgs, y, tiny_net, clip_probs=clip, progress=False)
    assert st.encoder_ is tiny_net and st.feature_key_.startswith("tiny@ft-")
    assert set(st.cv_scores_) == {f"w={w:g}" for w in st.weight_grid} and 0.0 <= st.weight_ <= 1.0
    q = np.stack([to_array(eval_view(im, _tiny_preset()), _tiny_preset()) for im in imgs])
    feats = st.encoder_.encode_image(q).numpy()
    out = st.rerank(clip, feats)
    np.testing.assert_array_equal(np.sort(out, 1), np.sort(clip, 1))  # values only move among classes
    # the tuned weights are learned state: saved with the stage, they rebuild the same network
    from cascade.models.convnextv2 import model_from_state
    from cascade.stages.base import Stage

    back = Stage.from_state(*st.state_dict())
    assert back.backbone_sha256_ == st.backbone_sha256_ and back.query_key == st.query_key
    rebuilt = model_from_state(back.backbone_state_)
    rebuilt.eval()
    np.testing.assert_allclose(rebuilt.encode_image(q).numpy(), feats, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the head
def test_logistic_head_matches_scikit_learn():
    """fit_logistic minimises the objective of sklearn's LogisticRegression(C) (same minimiser), so at
    convergence the coefficients agree and held-out accuracy on data with real signal is the same."""
    from sklearn.linear_model import LogisticRegression

    from cascade.stages.specialist import fit_logistic

    rng = np.random.default_rng(0)
    K, D = 15, 40
    means = rng.standard_normal((K, D)) * 0.7
    y = np.repeat(np.arange(K), 12)
    X = means[y] + rng.standard_normal((len(y), D))
    yq = np.repeat(np.arange(K), 30)
    Xq = means[yq] + rng.standard_normal((len(yq), D))
    for C in (0.01, 1.0):
        W, b = fit_logistic(X, y, C, max_iter=1000, tol=1e-8)
        ref = LogisticRegression(C=C, max_iter=1000, tol=1e-10).fit(X, y)
        np.testing.assert_allclose(W, ref.coef_, atol=2e-4 * np.abs(ref.coef_).max())
        np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3)
        ours = np.mean((Xq @ W.T + b).argmax(1) == yq)
        assert ours >= ref.score(Xq, yq) - 0.01 and ours > 0.6  # real signal, learned
        W30, b30 = fit_logistic(X, y, C, max_iter=30)  # the default budget: as accurate on held-out data
        assert np.mean((Xq @ W30.T + b30).argmax(1) == yq) >= ref.score(Xq, yq) - 0.02
    W2, b2 = fit_logistic(X, y, 1.0, max_iter=1000, tol=1e-8, W0=W, b0=b)  # warm start: same optimum
    np.testing.assert_allclose(W2, W, atol=1e-3 * np.abs(W).max())


def test_head_absent_classes_are_never_predicted():
    X, y, groups, clip, means = synthetic(4, True, True)
    keep = y != DOMAIN[3]
    st = SpecialistStage(C=1.0, weight=1.0).fit(X[keep], y[keep], groups=groups[keep])
    assert DOMAIN[3] not in st.classes_ and st.predict_proba(X).shape == (len(X), len(DOMAIN) - 1)
    y2 = np.where(np.isin(y, DOMAIN[:2]), y, DOMAIN[0])  # two classes only
    two = SpecialistStage(C=1.0, weight=1.0).fit(X, y2, groups=groups)
    assert np.mean(two.predict(X) == y2) > 0.7


# ---------------------------------------------------------------------------------------- image decoding
class _MeanEncoder:
    """Stands in for the backbone: per-channel means and stds of each view."""

    def encode_image(self, x):
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)


def test_support_views_decode_files_robustly(tmp_path):
    from cascade.data import ImageError
    from cascade.stages.specialist import support_view_features

    rgb = _image(120, 80, seed=1)
    rgb.save(tmp_path / "a.png")
    rgb.convert("CMYK").save(tmp_path / "b.jpg")           # CMYK JPEG
    (rgb.convert("I;16")).save(tmp_path / "c.png")          # 16-bit grayscale
    paths = [tmp_path / n for n in ("a.png", "b.jpg", "c.png")]
    X, groups = support_view_features(_MeanEncoder(), paths, 2, _tiny_preset(), progress=False)
    assert X.shape == (6, 6) and np.isfinite(X).all()
    np.testing.assert_array_equal(groups, [0, 0, 1, 1, 2, 2])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        support_view_features(_MeanEncoder(), [paths[0], tmp_path / "bad.jpg"], 2, _tiny_preset(), progress=False)


class _CountingEncoder(_MeanEncoder):
    cache_key = "mean-encoder|v1"

    def __init__(self):
        self.rows = 0

    def encode_image(self, x):
        self.rows += len(x)
        return super().encode_image(x)


def test_support_views_are_cached_per_file_and_independent_of_order(tmp_path):
    """Each image's random views depend on the seed and its file only, so they are cached: a second run (in
    another order, with one new image) encodes only the new image's views and returns the same rows."""
    from cascade.stages.specialist import support_view_features

    paths = []
    for i in range(4):
        _image(90, 70, seed=10 + i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    cache = tmp_path / "cache"
    enc = _CountingEncoder()
    X1, g1 = support_view_features(enc, paths[:3], 3, _tiny_preset(), seed=5, progress=False, cache_dir=cache)
    assert enc.rows == 9
    assert not np.allclose(X1[1], X1[2])                      # random views differ from each other
    enc2 = _CountingEncoder()
    order = [paths[2], paths[3], paths[0], paths[1]]
    X2, g2 = support_view_features(enc2, order, 3, _tiny_preset(), seed=5, progress=False, cache_dir=cache)
    assert enc2.rows == 3                                     # only the new image was encoded
    np.testing.assert_array_equal(g2, np.repeat(np.arange(4), 3))
    for new_pos, old_pos in ((0, 2), (2, 0), (3, 1)):
        np.testing.assert_allclose(X2[3 * new_pos:3 * new_pos + 3], X1[3 * old_pos:3 * old_pos + 3], rtol=1e-6)
    X3, _ = support_view_features(_MeanEncoder(), order, 3, _tiny_preset(), seed=5, progress=False)
    np.testing.assert_allclose(X3, X2, rtol=1e-5, atol=1e-6)  # uncached: the same views
    X4, _ = support_view_features(_MeanEncoder(), order, 3, _tiny_preset(), seed=6, progress=False)
    assert not np.allclose(X4[1:3], X2[1:3])                 # another seed, other views (view 0 is the test view)
    np.testing.assert_allclose(X4[0], X2[0], rtol=1e-5)
