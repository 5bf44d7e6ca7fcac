"""Image-tower speed of CLIP in cascade (Jittor) and in OpenAI's PyTorch code, in the same run.

    .venv/bin/python benchmarks/clip_speed.py [--batch 32] [--iters 5] [--models ViT-B/32 RN101] [--check]

Both models get the same seeded random weights at the real sizes (speed does not depend on the values) and the
same batch of normalised images. After warm-up batches (Jittor compiles its kernels then), timed batches are
taken in turn (torch, cascade, torch, ...) so that both see the same load on a shared machine. Prints the median
images/second of each and the ratio cascade / PyTorch. With --check it also prints the largest difference
between the two models' embeddings on the timed batch, and each one's distance from the same PyTorch model
evaluated in float64. Needs torch and OpenAI's clip-anytorch code (the test extras).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _time_interleaved(fns, warmup: int, iters: int) -> list[list[float]]:
    """Run the functions in turn, batch after batch, so that both see the same (shared) machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, record in zip(fns, times):
            t = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t)
    return times


def _float64_embeddings(ref, images):
    """The torch model's image embeddings computed in float64 (OpenAI's LayerNorm subclass casts to fp32, so its
    plain-LayerNorm behaviour is used for this run)."""
    import torch
    from _reference import openai_model_module

    layer_norm = openai_model_module().LayerNorm
    saved = layer_norm.forward
    layer_norm.forward = torch.nn.LayerNorm.forward
    try:
        with torch.no_grad():
            return copy.deepcopy(ref).double().encode_image(images.double()).numpy()
    finally:
        layer_norm.forward = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B/32", "RN101"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="timed batches per model and framework")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="also print max |difference| of the embeddings")
    args = parser.parse_args(argv)

    from cascade import runtime
    jt = runtime.jittor()
    import numpy as np
    import torch
    from _reference import CONFIGS, build_reference, synthetic_images
    from cascade.models.clip import CLIP, convert_state_dict

    print(f"# CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), jittor {jt.__version__} "
          f"(oneDNN: {runtime.status.get('onednn')}, device: {runtime.status.get('device')})")
    print(f"# batch {args.batch}, {args.warmup} warm-up + {args.iters} timed batches each, interleaved; "
          "median time per batch")
    print(f"{'model':10s} {'torch img/s':>12s} {'cascade img/s':>14s} {'ratio':>7s}")
    for name in args.models:
        ref = build_reference(name, seed=0)
        state, meta = convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
        ours = CLIP.from_config(meta["config"]).load_state(state)
        del state
        images = synthetic_images(args.batch, CONFIGS[name]["image_resolution"], seed=1)
        timages = torch.from_numpy(images)

        def run_torch():
            with torch.no_grad():
                return ref.encode_image(timages)

        def run_ours():
            out = ours.encode_image(images)
            out.sync()
            return out

        times_torch, times_ours = _time_interleaved([run_torch, run_ours], args.warmup, args.iters)
        t_torch, t_ours = statistics.median(times_torch), statistics.median(times_ours)
        ips_t, ips_o = args.batch / t_torch, args.batch / t_ours
        print(f"{name:10s} {ips_t:12.1f} {ips_o:14.1f} {ips_o / ips_t:6.2f}x", flush=True)
        if args.check:  # agreement, and each framework's fp32 distance from a float64 run of the torch model
            ours_out, torch_out = run_ours().numpy().astype(np.float64), run_torch().double().numpy()
            exact = _float64_embeddings(ref, timages)
            print(f"{'':10s} max |cascade - torch| = {np.abs(ours_out - torch_out).max():.2e}; vs float64: "
                  f"cascade {np.abs(ours_out - exact).max():.2e}, torch {np.abs(torch_out - exact).max():.2e} "
                  f"(largest |embedding value| {np.abs(exact).max():.1f})")
        del ref, ours
        jt.gc()
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
