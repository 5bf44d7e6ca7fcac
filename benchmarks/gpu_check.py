"""GPU check: cascade's image and text towers on the GPU, against PyTorch's reference models, in one run.

    python benchmarks/gpu_check.py [--models ViT-B/32 RN101 convnextv2_base] [--batch 32] [--iters 5]

For each model at its real size, with seeded random weights (speed and agreement do not depend on trained
values): one batch of images goes through cascade's model (Jittor, on the GPU when runtime picked it) and
through the PyTorch reference on the GPU (OpenAI's CLIP code; timm for ConvNeXt-V2), both in float32 with
TF32 off, and through the reference in float64 on the CPU. Prints each float32 run's largest distance from the
float64 one, and images per second of both on the GPU (median of the timed batches after warm-ups; Jittor
compiles its kernels during the warm-ups). For the CLIP models the text tower is checked the same way on a few
class names. Exits 2 where Jittor finds no usable GPU. Needs torch, timm and clip-anytorch (the test extras).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DEVICE = "cuda"  # PyTorch's device for the float32 reference runs
NAMES = ["a photo of a golden retriever", "a photo of a cello", "a photo of a dishwasher", "a photo of a torch"]


def _median_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "nvidia-smi printed nothing"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed ({exc})"


def _clip_pair(name: str):
    """(reference torch model on the CPU, cascade model, input resolution) for an OpenAI CLIP size."""
    from _reference import CONFIGS, build_reference
    from cascade.models.clip import CLIP, convert_state_dict

    ref = build_reference(name, seed=0)
    state, meta = convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    ours = CLIP.from_config(meta["config"]).load_state(state)
    return ref, ours, CONFIGS[name]["image_resolution"]


def _convnext_pair(name: str):
    import timm
    import torch
    from cascade.models import convnextv2 as cnx

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    state, _ = cnx.convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    return ref, cnx.model_from_state(state), 224


def check_model(name: str, args, jt, torch) -> None:
    import copy

    import numpy as np
    from _reference import openai_model_module, synthetic_images

    is_clip = not name.startswith("convnext")
    ref, ours, size = _clip_pair(name) if is_clip else _convnext_pair(name)
    images = synthetic_images(args.batch, size, seed=1)
    timages = torch.from_numpy(images)

    def ref_image(model, x):
        with torch.no_grad():
            if is_clip:
                return model.encode_image(x)
            return model.forward_head(model.forward_features(x), pre_logits=True)

    # float64 on the CPU: the exact answer both float32 runs are measured against (OpenAI's LayerNorm subclass
    # casts to float32, so plain LayerNorm is used for this run)
    layer_norm = openai_model_module().LayerNorm
    saved = layer_norm.forward
    layer_norm.forward = torch.nn.LayerNorm.forward
    try:
        ref64 = copy.deepcopy(ref).double()
        exact = ref_image(ref64, timages.double()).numpy()
        if is_clip:
            from cascade.models import tokenize
            tokens = tokenize(NAMES)
            with torch.no_grad():
                exact_text = ref64.encode_text(torch.from_numpy(tokens)).numpy()
    finally:
        layer_norm.forward = saved
    del ref64

    gpu = torch.device(DEVICE)
    ref_gpu = ref.to(gpu)
    timages_gpu = timages.to(gpu)

    def run_torch():
        out = ref_image(ref_gpu, timages_gpu)
        torch.cuda.synchronize()
        return out

    def run_ours():
        out = ours.encode_image(images)
        out.sync()
        jt.sync_all(True)
        return out

    t0 = time.perf_counter()
    ours_out = run_ours().numpy().astype(np.float64)
    first = time.perf_counter() - t0
    torch_out = run_torch().double().cpu().numpy()
    t_ours = _median_time(run_ours, args.warmup, args.iters)
    t_torch = _median_time(run_torch, args.warmup, args.iters)
    scale = np.abs(exact).max()
    print(f"{name:16s} image  cascade {args.batch / t_ours:9.1f} img/s  torch {args.batch / t_torch:9.1f} img/s  "
          f"| max |x - float64|: cascade {np.abs(ours_out - exact).max():.2e}  torch "
          f"{np.abs(torch_out - exact).max():.2e}  (largest |value| {scale:.1f}; cascade's first batch "
          f"{first:.1f} s, compiling)", flush=True)
    if is_clip:
        ours_text = ours.encode_text(tokens).numpy().astype(np.float64)
        with torch.no_grad():
            torch_text = ref_gpu.encode_text(torch.from_numpy(tokens).to(gpu)).double().cpu().numpy()
        print(f"{name:16s} text   max |x - float64|: cascade {np.abs(ours_text - exact_text).max():.2e}  torch "
              f"{np.abs(torch_text - exact_text).max():.2e}  (largest |value| {np.abs(exact_text).max():.1f})",
              flush=True)
    del ref, ref_gpu, ours
    torch.cuda.empty_cache()
    jt.gc()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B/32", "RN101", "convnextv2_base"],
                        help="OpenAI CLIP sizes and timm ConvNeXt-V2 names (default: the three the cascade uses)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--iters", type=int, default=5, help="timed batches per model and framework (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    args = parser.parse_args(argv)

    from cascade import runtime
    jt = runtime.jittor()
    import torch

    print(f"# {_gpu_name()}; jittor {jt.__version__} (device: {runtime.status.get('device')}, has_cuda "
          f"{int(jt.has_cuda)}), torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    if not (jt.flags.use_cuda and torch.cuda.is_available()):
        print("gpu_check: no usable GPU (Jittor or PyTorch cannot see one); nothing measured", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"# batch {args.batch}, {args.warmup} warm-up + {args.iters} timed batches each; float32, TF32 off "
          f"in torch; CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    for name in args.models:
        check_model(name, args, jt, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
