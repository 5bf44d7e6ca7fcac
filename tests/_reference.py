"""OpenAI's reference CLIP code (the clip-anytorch wheel), loaded by file path for parity tests.

``import clip`` fails without pkg_resources, so the two modules we compare against are loaded directly from
the installed package's folder. Tests that need them skip when the wheel (or torch) is not installed.
"""
from __future__ import annotations

import importlib.util
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import pytest


def clip_package_dir() -> Path | None:
    candidates = [Path(p) / "clip" for p in sys.path if p] + [Path(sysconfig.get_paths()["purelib"]) / "clip"]
    for folder in candidates:
        if (folder / "model.py").is_file() and (folder / "simple_tokenizer.py").is_file():
            return folder
    return None


def _load(name: str, filename: str):
    folder = clip_package_dir()
    if folder is None:
        pytest.skip("OpenAI's reference code (clip-anytorch) is not installed")
    spec = importlib.util.spec_from_file_location(name, folder / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def openai_model_module():
    """OpenAI's clip/model.py (needs torch)."""
    pytest.importorskip("torch")
    return _load("_openai_clip_model", "model.py")


@lru_cache(maxsize=None)
def openai_tokenizer():
    """An instance of OpenAI's SimpleTokenizer, reading the wheel's own vocabulary file."""
    pytest.importorskip("ftfy")
    module = _load("_openai_simple_tokenizer", "simple_tokenizer.py")
    return module.SimpleTokenizer(str(clip_package_dir() / "bpe_simple_vocab_16e6.txt.gz"))


def openai_tokenize(texts, context_length=77):
    """OpenAI's clip.tokenize(texts, truncate=True), as int64 numpy (re-implemented around their tokenizer, since
    clip/clip.py itself cannot be imported here)."""
    import numpy as np

    tok = openai_tokenizer()
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = [sot] + tok.encode(text) + [eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[i, :len(ids)] = ids
    return out


# ---------------------------------------------------------------------------------------------- reference models
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
CONFIGS = {  # OpenAI's released sizes (from their checkpoints' shapes)
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, **TEXT),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64,
                  vision_patch_size=None, **TEXT),
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, **TEXT),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, **TEXT),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
                     transformer_heads=12, transformer_layers=12),
    # small models for quick tests (same code paths, other sizes)
    "tiny-vit": dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=2),
    "tiny-rn": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=8,
                    vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                    transformer_heads=1, transformer_layers=1),
}


def synthetic_images(n: int, size: int = 224, seed: int = 0):
    """Normalised-looking images: smooth colour gradients and blobs plus noise, float32 [n, 3, size, size]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            a, b, f = rng.normal(size=3)
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.01, 0.1))
            out[i, c] = a * xx + b * yy + f * blob + 0.3 * rng.normal(size=(size, size))
    return out - out.mean(axis=(2, 3), keepdims=True)


def build_reference(name: str, seed: int = 0):
    """OpenAI's CLIP (their code) at a given size with seeded, realistic random weights, fp32, eval mode.

    OpenAI's own initialisation (normal std 0.02 token embeddings, scaled normal attention/MLP weights) is kept;
    what it leaves constant is randomised as trained weights are not: LayerNorm gains/offsets and all biases.
    For the ResNet, BatchNorm statistics are calibrated on synthetic images (one pass in training mode, so
    activations stay in a realistic range through 33 blocks) and the gains/offsets randomised (the residual
    branch's last gain small, as in trained ResNets, instead of OpenAI's zero init)."""
    import numpy as np
    import torch

    M = openai_model_module()
    torch.manual_seed(seed)
    cfg = dict(CONFIGS[name])
    model = M.CLIP(**cfg)
    g = torch.Generator().manual_seed(seed + 1)

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    with torch.no_grad():
        for key, p in model.named_parameters():
            if "bn" in key or "downsample.1" in key:
                continue
            if key.endswith("bias"):
                p.copy_(randn(p.shape, 0.02))
            elif (".ln_" in key or key.startswith("ln_")) and key.endswith("weight"):
                p.copy_(randn(p.shape, 0.1, 1.0))
        resnet = isinstance(model.visual, M.ModifiedResNet)
        if resnet:
            for key, m in model.named_modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    last = key.endswith("bn3") and ".layer" in f".{key}"
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * (0.3 if last else 0.8) +
                                   (0.1 if last else 0.6))
                    m.bias.copy_(randn(m.bias.shape, 0.1))
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the calibration pass
            model.visual.train()
            model.visual(torch.from_numpy(synthetic_images(8, cfg["image_resolution"], seed + 2)))
    model.eval()
    if resnet:  # give the statistics some spread beyond one batch (trained nets are not exactly calibrated)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
    return model


def reference_embeddings(model, images, tokens):
    """OpenAI's encode_image / encode_text as float64 numpy (fp32 compute)."""
    import numpy as np
    import torch

    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images)).double().numpy()
        txt = model.encode_text(torch.from_numpy(np.asarray(tokens, dtype=np.int64))).double().numpy()
    return img, txt
