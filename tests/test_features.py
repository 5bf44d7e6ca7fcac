"""Feature extraction (cascade.features): CLIP's preprocessing exactly as OpenAI/torchvision do it, the on-disk
cache (reuse, keys, shards), and real CLIP image/text features of a small seeded random model converted through
`python -m cascade.convert`, compared with OpenAI's own model code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.features import (CLIP_MEAN, CLIP_STD, FeatureCache, Preprocess, clip_encoder, extract_features,
                              l2_normalize, text_features, weights_identity)

REPO = Path(__file__).resolve().parents[1]


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([np.sin(xx / 7.0 + c) * 90 + np.cos(yy / 5.0 * (c + 1)) * 60 + 128 for c in range(3)], -1)
    return Image.fromarray(np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8))


def _torchvision(resize, crop, mean, std):
    T = pytest.importorskip("torchvision.transforms")
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (97, 61), (641, 223), (1000, 999)])
def test_clip_preprocess_matches_openai_transform(size):
    # OpenAI's clip._transform: Resize(n, BICUBIC), CenterCrop(n), RGB, ToTensor, Normalize(CLIP mean/std)
    img = _photo(*size)
    ref = _torchvision(224, 224, CLIP_MEAN, CLIP_STD)(img).numpy()
    ours = Preprocess.clip()(img)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5


def test_imagenet_preprocess_matches_torchvision():
    img = _photo(333, 500, seed=1)
    ref = _torchvision(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(img).numpy()
    assert np.abs(Preprocess.imagenet()(img) - ref).max() < 1e-5


def test_preprocess_cache_keys_are_data():
    assert Preprocess.clip().cache_key == Preprocess.clip().cache_key
    keys = {Preprocess.clip().cache_key, Preprocess.clip(336).cache_key, Preprocess.imagenet().cache_key}
    assert len(keys) == 3
    p = Preprocess.from_dict({"size": 224, "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert p.resize == 256 and "mean=0.5,0.5,0.5" in p.cache_key
    with pytest.raises(ValueError, match="unknown key"):
        Preprocess.from_dict({"crop": 3})
    with pytest.raises(ValueError, match="resize .* must be >= size"):
        Preprocess(size=224, resize=200)


class MeanEncoder:
    def __init__(self, key="mean"):
        self.cache_key = key
        self.calls = []

    def encode_image(self, x):
        self.calls.append(len(x))
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1) + 0.1


def _files(folder: Path, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img_{i:03d}.jpg"
        _photo(60 + i, 50, seed=i).save(p, quality=92)
        out.append(p)
    return out


def test_extraction_is_batched_normalised_and_cached(tmp_path):
    paths = _files(tmp_path / "imgs", 23)
    enc = MeanEncoder()
    res = extract_features(enc, paths, tmp_path / "cache", batch_size=8, workers=3, chunk=10, progress=False)
    assert res.features.shape == (23, 6) and res.failures == []
    assert np.allclose(np.linalg.norm(res.features, axis=1), 1.0, atol=1e-6)
    assert enc.calls == [8, 8, 8]                                # the last batch is padded to one input shape
    # same values as encoding each image alone (padding and batch composition do not matter)
    one = np.stack([l2_normalize(MeanEncoder().encode_image(Preprocess.clip().load(p)[None]))[0] for p in paths])
    assert np.abs(res.features - one).max() < 1e-6
    cache = FeatureCache(tmp_path / "cache", f"mean|{Preprocess.clip().cache_key}")
    assert len(list(cache.dir.glob("*.keys.npy"))) == 2         # flushed once >= `chunk` (16 rows), then the rest
    # reuse: a second run, in another order and with a new image, encodes only the new one
    more = _files(tmp_path / "more", 1)
    enc2 = MeanEncoder()
    res2 = extract_features(enc2, list(reversed(paths)) + more, tmp_path / "cache", batch_size=8, progress=False)
    assert enc2.calls == [8]
    assert np.array_equal(res2.features[:23], res.features[::-1])


def test_cache_is_keyed_by_weights_and_preprocessing(tmp_path):
    paths = _files(tmp_path / "imgs", 3)
    a = MeanEncoder("weights-a")
    extract_features(a, paths, tmp_path / "cache", batch_size=4, progress=False)
    b = MeanEncoder("weights-b")
    extract_features(b, paths, tmp_path / "cache", batch_size=4, progress=False)
    c = MeanEncoder("weights-a")
    extract_features(c, paths, tmp_path / "cache", Preprocess.imagenet(), batch_size=4, progress=False)
    d = MeanEncoder("weights-a")
    extract_features(d, paths, tmp_path / "cache", batch_size=4, progress=False)
    assert (a.calls, b.calls, c.calls, d.calls) == ([4], [4], [4], [])


def test_damaged_cache_shard_is_ignored_and_recomputed(tmp_path, capsys):
    paths = _files(tmp_path / "imgs", 4)
    extract_features(MeanEncoder(), paths, tmp_path / "cache", batch_size=4, progress=False)
    shard = next((tmp_path / "cache").rglob("*.feats.npy"))
    shard.write_bytes(b"\x93NUMPY garbage")
    enc = MeanEncoder()
    res = extract_features(enc, paths, tmp_path / "cache", batch_size=4, progress=False)
    assert enc.calls == [4] and res.failures == []
    assert "ignoring damaged feature cache shard" in capsys.readouterr().err


# ------------------------------------------------------------------------- real (small) CLIP, converted
@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A seeded random ViT CLIP (OpenAI's code, small size, 64 px input) saved as a PyTorch state dict and
    converted with `python -m cascade.convert`."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from _reference import build_reference

    model = build_reference("tiny-vit", seed=3)
    d = tmp_path_factory.mktemp("tiny_vit")
    torch.save(model.state_dict(), d / "tiny.pt")
    out = d / "tiny.npz"
    r = subprocess.run([sys.executable, "-m", "cascade.convert", str(d / "tiny.pt"), str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return model, out


def test_clip_features_match_openai(tmp_path, tiny_vit):
    import torch

    model, weights = tiny_vit
    paths = _files(tmp_path / "imgs", 5)
    enc = clip_encoder("tiny", weights)
    assert enc.preprocess == Preprocess.clip(64)                # resolution read from the weights
    assert not enc.loaded                                        # lazily loaded
    res = extract_features(enc, paths, tmp_path / "cache", batch_size=4, progress=False)
    tv = _torchvision(64, 64, CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([tv(Image.open(p).convert("RGB")) for p in paths])).double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(res.features - ref).max() < 1e-4
    # a second run is served by the cache without loading the model
    enc2 = clip_encoder("tiny", weights)
    again = extract_features(enc2, paths, tmp_path / "cache", batch_size=4, progress=False)
    assert not enc2.loaded and np.array_equal(again.features, res.features)
    assert weights_identity(weights).startswith("sha256:")


def test_text_features_are_normalised_prompt_ensembles(tmp_path, tiny_vit):
    import torch
    from _reference import openai_tokenize

    model, weights = tiny_vit
    prompts = [["a photo of a teddy, a type of dog.", "a photo of a teddy, a type of pet."], ["a photo of a bee."]]
    enc = clip_encoder("tiny", weights)
    emb = text_features(enc, prompts, tmp_path / "cache", progress=False)
    with torch.no_grad():
        ref = model.encode_text(torch.from_numpy(openai_tokenize([t for p in prompts for t in p]))).double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    expected = np.stack([ref[:2].mean(0), ref[2]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert emb.shape == (2, ref.shape[1]) and np.abs(emb - expected).max() < 1e-4
    enc2 = clip_encoder("tiny", weights)
    assert np.array_equal(text_features(enc2, prompts, tmp_path / "cache", progress=False), emb)
    assert not enc2.loaded                                       # served by the text cache
