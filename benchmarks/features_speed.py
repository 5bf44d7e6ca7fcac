"""End-to-end feature extraction speed: JPEG files on disk -> decoded, preprocessed, encoded, cached features.

    .venv/bin/python benchmarks/features_speed.py                       # ViT-B/32 and RN101, 256 images
    .venv/bin/python benchmarks/features_speed.py --images 512 --models RN101 --batch-size 32

Real-size CLIP image towers with seeded random weights, made in-process: random arrays of every parameter's
shape are written in the project's converted-weights format (cascade.models.weights.save_weights) and loaded
back the way train/test load them (cascade.features.clip_encoder -> cascade.models.load_clip). Images are
generated JPEGs (500x375, like typical photos). For each model it prints:

  decode   images/s of decoding + CLIP preprocessing alone (the extractor's worker processes, a no-op model)
  model    images/s of the image tower alone on preprocessed batches (after a warm-up batch)
  cold     images/s end to end with an empty cache (decode in threads overlapped with encoding, cache writes)
  warm     images/s end to end when every feature is already cached (a rerun: train after train, test reuse)

Kernel compilation (Jittor compiles once per machine) and weight loading are excluded by a warm-up and
reported separately as `load`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# OpenAI's released sizes (read from their checkpoints' shapes)
_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
CLIP_CONFIGS = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     **_TEXT),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=[3, 4, 23, 3], vision_width=64,
                  vision_patch_size=None, **_TEXT),
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=[3, 4, 6, 3], vision_width=64,
                 vision_patch_size=None, **_TEXT),
}


def random_clip_weights(name_or_config, path, seed: int = 0) -> Path:
    """Write seeded random CLIP weights of a real size (or any config) in the converted format at ``path``.
    Values: N(0, 0.02) for weights, small biases, unit LayerNorm/BatchNorm gains and variances, OpenAI's
    logit scale; every shape comes from the Jittor model built from the config."""
    from cascade.models.clip import CLIP
    from cascade.models.weights import save_weights

    cfg = dict(CLIP_CONFIGS[name_or_config]) if isinstance(name_or_config, str) else dict(name_or_config)
    shapes = CLIP.from_config(cfg).parameter_shapes()
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key == "logit_scale":
            a = np.array(np.log(1 / 0.07), dtype=np.float32)
        elif key.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("running_mean") or key.endswith("bias"):
            a = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        elif ("ln" in key or "bn" in key or "downsample.1" in key) and key.endswith("weight"):
            a = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            a = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        state[key] = a
    label = name_or_config if isinstance(name_or_config, str) else "custom"
    save_weights(path, state, {"arch": "clip", "model": label, "config": cfg, "source": f"random seed {seed}"})
    return Path(path)


def make_jpegs(folder, n: int, size=(500, 375), seed: int = 0, name: str = "image_{:05d}.jpg") -> list[Path]:
    """``n`` generated photo-like JPEGs (smooth colour fields + noise), quality 90, named ``name.format(i)``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        f = rng.uniform(0.005, 0.05, (3, 2))
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([127 + 100 * np.sin(xx * f[c, 0] + yy * f[c, 1] + ph[c]) for c in range(3)], -1)
        img += rng.normal(0, 10, img.shape)
        p = folder / name.format(i)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        out.append(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="generated JPEGs to encode (default 256)")
    ap.add_argument("--models", default="ViT-B/32,RN101", help="comma-separated: ViT-B/32, RN101, RN50")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="decoding threads (0: one per core, at most 8)")
    ap.add_argument("--workdir", help="keep generated files here instead of a temporary folder")
    args = ap.parse_args(argv)

    from cascade.features import Preprocess, clip_encoder, extract_features
    from cascade.runtime import jittor, status

    jt = jittor()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cascade-featbench-"))
    try:
        t = time.perf_counter()
        paths = make_jpegs(work / "images", args.images)
        print(f"generated {len(paths)} JPEGs 500x375 in {time.perf_counter() - t:.1f} s; device {status.get('device')}"
              f", oneDNN {status.get('onednn')}, {os.cpu_count()} CPU cores, batch {args.batch_size}", flush=True)

        # decoding + preprocessing alone: the extractor's own decoding pipeline with a model that does nothing
        pre = Preprocess.clip()

        class NullEncoder:
            cache_key = "null"

            def encode_image(self, x):
                return np.ones((len(x), 8), np.float32)

        t = time.perf_counter()
        extract_features(NullEncoder(), paths, work / "null-cache", pre, batch_size=args.batch_size,
                         workers=args.workers, progress=False)
        decode_ips = len(paths) / (time.perf_counter() - t)

        rows = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            wpath = random_clip_weights(name, work / f"{name.replace('/', '-')}.npz")
            t = time.perf_counter()
            enc = clip_encoder(name, wpath)
            x = np.stack([pre.load(p) for p in paths[: args.batch_size]])
            enc.encode_image(x)                       # load weights, compile kernels (excluded from the rates)
            load_s = time.perf_counter() - t
            reps = max(1, min(4, len(paths) // args.batch_size))
            t = time.perf_counter()
            for _ in range(reps):
                enc.encode_image(x)
            model_ips = reps * len(x) / (time.perf_counter() - t)
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            t = time.perf_counter()
            cold = extract_features(enc, paths, cache, batch_size=args.batch_size, workers=args.workers,
                                    progress=False)
            cold_s = time.perf_counter() - t
            t = time.perf_counter()
            warm = extract_features(clip_encoder(name, wpath), paths, cache, batch_size=args.batch_size,
                                    progress=False)
            warm_s = time.perf_counter() - t
            assert not cold.failures and np.array_equal(cold.features, warm.features)
            rows.append((name, load_s, decode_ips, model_ips, len(paths) / cold_s, len(paths) / warm_s))
            print(f"{name:9s} load {load_s:6.1f} s | decode {decode_ips:7.1f} img/s | model {model_ips:7.1f} img/s | "
                  f"cold {len(paths) / cold_s:7.1f} img/s | warm {len(paths) / warm_s:9.1f} img/s", flush=True)
            del enc
            jt.gc()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
