"""ConvNeXt-V2-Base speed on this machine: Jittor (cascade.models.convnextv2) vs the PyTorch reference (timm's
convnextv2_base) in one run, and the wall time to train the default specialist on 520 support images.

    .venv/bin/python benchmarks/convnext_speed.py                 # both parts
    .venv/bin/python benchmarks/convnext_speed.py --skip-train    # throughput only
    .venv/bin/python benchmarks/convnext_speed.py --skip-speed --features out/bench_views.npz
        # specialist only; encodes the views once and saves them; rerun it to time only the head fitting
    .venv/bin/python benchmarks/convnext_speed.py --skip-speed --skip-train --finetune last_stage,all
        # seconds per fine-tuning step (finetune="last_stage" / "all") and what the default recipe would take

Both models get the same random weights (timm's init, converted with cascade's timm mapping) and the same
inputs; the first call of each is a warm-up (Jittor compiles its kernels then) and is not timed; timed
rounds alternate between the two frameworks so that load from other processes hits both alike. Needs torch
and timm (test dependencies). Images for the specialist are generated (no real data on this machine).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascade.runtime import jittor, status  # noqa: E402

jt = jittor()


def throughput(args) -> None:
    import torch
    import timm

    from cascade.models import convnextv2 as cnx

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    ref = timm.create_model("convnextv2_base", pretrained=False).eval()
    state, _ = cnx.convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    ours = cnx.model_from_state(state)
    x = np.random.default_rng(0).standard_normal((args.batch_size, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x)
    ref_cl = timm.create_model("convnextv2_base", pretrained=False).eval().to(memory_format=torch.channels_last)
    ref_cl.load_state_dict(ref.state_dict())
    xt_cl = xt.contiguous(memory_format=torch.channels_last)

    def run_jittor():
        with jt.no_grad():
            return ours.forward_features(x).numpy()

    def run_torch():
        with torch.inference_mode():
            return ref.forward_head(ref.forward_features(xt), pre_logits=True).numpy()

    def run_torch_cl():
        with torch.inference_mode():
            return ref_cl.forward_head(ref_cl.forward_features(xt_cl), pre_logits=True).numpy()

    runs = {"jittor": run_jittor, "torch": run_torch, "torch channels_last": run_torch_cl}
    outs = {k: f() for k, f in runs.items()}  # warm-up (Jittor compiles here)
    diff = max(float(np.abs(outs["jittor"] - outs[k]).max()) for k in ("torch", "torch channels_last"))
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ips = {k: args.batch_size / float(np.median(v)) for k, v in times.items()}
    print(f"ConvNeXt-V2-Base forward_features, batch {args.batch_size} x 3x224x224 fp32, {os.cpu_count()} CPU cores "
          f"(torch threads {torch.get_num_threads()}, Jittor oneDNN: {status.get('onednn')}), median of "
          f"{args.rounds} rounds:")
    for k, v in ips.items():
        print(f"  {k:20s} {v:7.2f} images/s")
    print(f"  ratio jittor / torch (timm default) = {ips['jittor'] / ips['torch']:.2f}x; "
          f"jittor / torch channels_last = {ips['jittor'] / ips['torch channels_last']:.2f}x "
          f"(max |diff| of features {diff:.1e})", flush=True)


def _support_set(args):
    """Generated support images (coloured noise, random sizes), labels and stand-in out-of-fold CLIP probs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    n_cls, shots = args.classes, args.shots
    images, labels = [], []
    for c in range(n_cls):
        base = rng.integers(0, 256, 3)
        for _ in range(shots):
            w, h = int(rng.integers(240, 500)), int(rng.integers(240, 500))
            a = np.clip(base + rng.normal(0, 40, (h // 8, w // 8, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(a).resize((w, h), Image.BILINEAR))
            labels.append(244 + c)  # global indices of a domain placed after other classes
    labels = np.asarray(labels)
    n_all = 244 + n_cls
    clip = rng.dirichlet(np.ones(n_all) * 0.2, size=len(labels))  # stands in for the router's OOF CLIP probs
    return images, labels, clip


def train_time(args) -> None:
    """Time the default specialist on the support set in its two parts: encoding the views through the
    real-size ConvNeXt-V2-Base (support_view_features, what fit_images does first) and fitting the head with
    the cross-validation of C and w (SpecialistStage.fit). With --features FILE the encoded views are saved
    there, or, when FILE exists, loaded from it so that only the head is timed (the encoding time printed is
    then the one stored in the file, from the run that made it)."""
    from cascade.stages.specialist import SpecialistStage, support_view_features

    images, labels, clip = _support_set(args)
    stage = SpecialistStage(**({"max_iter": args.max_iter} if args.max_iter else {}))
    src = Path(args.features) if args.features else None
    if src is not None and src.exists():
        with np.load(src, allow_pickle=False) as z:
            X, groups, t_enc = z["X"], z["groups"], float(z["seconds"])
        how = f"loaded from {src}, encoded in an earlier run"
    else:
        from cascade.models import convnextv2 as cnx

        model = cnx.convnextv2("base")
        model.eval()
        t = time.perf_counter()
        X, groups = support_view_features(model, images, stage.n_views, stage.preset, stage.random_state,
                                          progress=not args.quiet)
        t_enc = time.perf_counter() - t
        how = "encoded in this run"
        if src is not None:
            src.parent.mkdir(parents=True, exist_ok=True)
            tmp = src.with_name(src.name + ".tmp.npz")
            np.savez(tmp, X=X, groups=groups, seconds=np.float64(t_enc))
            os.replace(tmp, src)
    t = time.perf_counter()
    stage.fit(X, labels[groups], clip_probs=clip, groups=groups)
    t_fit = time.perf_counter() - t
    print(f"default specialist (n_views={stage.n_views}, {stage.finetune=}, C grid {stage.C_grid}, "
          f"{stage.n_folds}-fold CV of C and w, max_iter={stage.max_iter}) on {len(labels)} generated support images "
          f"({args.classes} classes x {args.shots}), ConvNeXt-V2-Base (real size, random weights):\n"
          f"  encoding {len(groups)} views: {t_enc:.1f} s wall ({how})\n"
          f"  head + CV of C and w on the {X.shape[0]}x{X.shape[1]} features: {t_fit:.2f} s wall "
          f"(chosen C={stage.C_}, w={stage.weight_}, CV top-1 of the specialist {stage.cv_specialist_accuracy_:.3f})\n"
          f"  total {t_enc + t_fit:.1f} s", flush=True)


def finetune_speed(args) -> None:
    """Seconds per fine-tuning step of a real-size ConvNeXt-V2-Base (random weights) in each mode, from which the
    time of a full fine-tune follows (steps = epochs x ceil(images / batch), x (folds + 1) with the CV of w)."""
    from cascade.models.convnextv2 import ConvNeXtV2
    from cascade.stages.specialist import SpecialistStage, finetune_backbone

    images, labels, _ = _support_set(args)
    bs = SpecialistStage().finetune_batch_size if not args.ft_batch_size else args.ft_batch_size
    sub = images[: bs * (args.ft_steps + 1)]
    y = (labels[: len(sub)] - labels.min()) % args.classes
    defaults = SpecialistStage()
    n_img = args.classes * args.shots
    per_run = defaults.finetune_epochs * -(-n_img // bs)
    cv_steps = defaults.finetune_epochs * -(-(n_img - n_img // defaults.n_folds) // bs) * defaults.n_folds
    print(f"fine-tuning ConvNeXt-V2-Base (real size, random weights), batch {bs} at 224 px, {os.cpu_count()} CPU "
          f"cores, device {'cuda' if jt.flags.use_cuda else 'cpu'}:")
    for mode in args.finetune.split(","):
        jt.set_global_seed(0)
        model = ConvNeXtV2()  # base
        # one warm-up step (Jittor compiles its kernels), then args.ft_steps timed steps
        finetune_backbone(model, sub[:bs], y[:bs], args.classes, mode=mode, epochs=1, batch_size=bs, progress=False)
        t0 = time.perf_counter()
        finetune_backbone(model, sub[bs:], y[bs:], args.classes, mode=mode, epochs=1, batch_size=bs, progress=False)
        step = (time.perf_counter() - t0) / args.ft_steps
        print(f"  {mode:<10} {step:6.2f} s/step ({bs / step:5.2f} img/s); the default recipe ({defaults.finetune_epochs} "
              f"epochs on {n_img} images, {per_run} steps; {cv_steps} more for the {defaults.n_folds}-fold CV of w) "
              f"would take {per_run * step / 3600:.1f} h + {cv_steps * step / 3600:.1f} h here", flush=True)
        del model
        jt.gc()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per framework (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--classes", type=int, default=130, help="specialist classes (default 130)")
    p.add_argument("--shots", type=int, default=4, help="support images per class (default 4)")
    p.add_argument("--skip-train", action="store_true", help="only measure throughput")
    p.add_argument("--skip-speed", action="store_true", help="only measure specialist training")
    p.add_argument("--features", default="", metavar="FILE",
                   help="save the encoded support views to FILE (.npz), or load them from it when it exists and "
                        "time only the head fitting")
    p.add_argument("--max-iter", type=int, default=0,
                   help="L-BFGS iterations of the specialist's head (default: SpecialistStage's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--finetune", default="", metavar="MODES",
                   help="also time fine-tuning steps, e.g. 'last_stage,all' (alone with --skip-speed --skip-train)")
    p.add_argument("--ft-steps", type=int, default=3, help="timed fine-tuning steps per mode (default 3)")
    p.add_argument("--ft-batch-size", type=int, default=0, help="fine-tuning batch (default: the stage's, 32)")
    args = p.parse_args(argv)
    if not args.skip_speed:
        throughput(args)
    if not args.skip_train:
        train_time(args)
    if args.finetune:
        finetune_speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
