"""Time and peak memory of `python -m cascade train` and `python -m cascade test` on a generated dataset with
real-size models (seeded random weights), as a user would run them.

    .venv/bin/python benchmarks/pipeline_bench.py                      # 3,000 test images (the README's figures)
    .venv/bin/python benchmarks/pipeline_bench.py --test-images 300 --no-specialist      # a quick look

The dataset uses the challenge's real 374 class names (tests/data/jittor4/classes.txt) in the official layout:
`--shots` training images per class plus `--val-per-class` more for the validation report (500x375 generated
JPEGs), and a flat TestSetA of `--test-images` images. Models: CLIP ViT-B/32 and RN101 at their released sizes
(and ConvNeXt-V2-Base for the Thu-dog specialist unless --no-specialist), random weights written in the
project's converted format. Each command runs in its own process; its wall time and peak resident memory
(ru_maxrss of that process) are printed. `cold` = empty feature cache; `warm` = the same command again, served by
the cache (the cache is emptied before each cold step). Jittor's compiled kernels (~/.cache/jittor) are warm: a first run on a new machine adds the
one-time compilation.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def random_convnext_weights(path, size: str = "base", seed: int = 0) -> Path:
    """ConvNeXt-V2 of a released size with seeded random weights, through the model's own converter."""
    from cascade.models.convnextv2 import convert_state_dict, convnextv2
    from cascade.models.weights import save_weights
    from cascade.runtime import jittor

    jt = jittor()
    jt.set_global_seed(seed)
    model = convnextv2(size)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state, meta = convert_state_dict(state)
    save_weights(path, state, dict(meta, source=f"random seed {seed}"))
    return Path(path)


def make_dataset(root: Path, shots: int, val_per_class: int, test_images: int, seed: int = 0):
    """The dataset (kept when a previous run in the same --workdir made the same one)."""
    from features_speed import make_jpegs

    lines = (REPO / "tests/data/jittor4/classes.txt").read_text().split("\n")
    names = [line.split()[0] for line in lines if line.strip()]
    per = shots + val_per_class
    listing = "".join(f"TrainSet/{n.split('_', 1)[0]}/{n.split('_', 1)[1]}/{j}.jpg {c}\n"
                      for c, n in enumerate(names) for j in range(per))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "train.txt").is_file() or (root / "train.txt").read_text() != listing:
        (root / "classes.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
        for c, name in enumerate(names):
            domain, cls = name.split("_", 1)
            make_jpegs(root / "TrainSet" / domain / cls, per, seed=seed * 100003 + c, name="{}.jpg")
        (root / "train.txt").write_text(listing)
    test_dir = root / "TestSetA"
    if not test_dir.is_dir() or len(list(test_dir.iterdir())) != test_images:
        shutil.rmtree(test_dir, ignore_errors=True)
        make_jpegs(test_dir, test_images, seed=seed + 1, name="image_{:05d}.jpg")


def run_measured(cmd, cwd) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MiB, exit code, last lines of stderr) of one child process."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        err.seek(0)
        tail = err.read().decode("utf-8", "replace").strip().splitlines()[-12:]
    return wall, usage.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status), "\n".join(tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-images", type=int, default=3000)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--val-per-class", type=int, default=1)
    ap.add_argument("--no-specialist", action="store_true", help="leave out the ConvNeXt-V2 Thu-dog specialist")
    ap.add_argument("--steps", default="train-cold,train-warm,test-cold,test-warm",
                    help="measurements to make, in order (default: all four; test needs a trained model)")
    ap.add_argument("--workdir", help="keep the dataset, weights and outputs here (default: a temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="passed on to train and test (e.g. --set features.batch_size=64)")
    args = ap.parse_args(argv)

    # This process stays small (no Jittor, no models): a child's peak-memory figure (ru_maxrss) would otherwise
    # include this process's memory at the fork. Models are made by a separate process.
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cascade-pipebench-"))
    try:
        t = time.perf_counter()
        make_dataset(work / "data", args.shots, args.val_per_class, args.test_images)
        wdir = work / "out" / "weights"
        wdir.mkdir(parents=True, exist_ok=True)
        make = ("import sys; sys.path[:0] = [{repo!r}, {bench!r}]\n"
                "from features_speed import random_clip_weights\n"
                "from pipeline_bench import random_convnext_weights\n"
                "from cascade.runtime import jittor, status; jittor()\n"
                "random_clip_weights('ViT-B/32', {w!r} + '/ViT-B-32.npz', seed=1)\n"
                "random_clip_weights('RN101', {w!r} + '/RN101.npz', seed=2)\n"
                "if {cnx}: random_convnext_weights({w!r} + '/convnextv2_base.npz', 'base', seed=3)\n"
                "print(status.get('device'), status.get('onednn'))\n").format(
            repo=str(REPO), bench=str(REPO / "benchmarks"), w=str(wdir), cnx=not args.no_specialist)
        made = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True)
        if made.returncode != 0:
            print(made.stderr, file=sys.stderr)
            return 1
        device, onednn = (made.stdout.split() + ["?", "?"])[:2]
        print(f"dataset: 374 classes x ({args.shots} shots + {args.val_per_class} validation) training images, "
              f"{args.test_images} test images (500x375 JPEG); models ViT-B/32 + RN101"
              f"{'' if args.no_specialist else ' + ConvNeXt-V2-Base (Thu-dog specialist)'}; prepared in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"machine: {os.cpu_count()} CPU cores, device {device}, oneDNN {onednn}, load average {load:.1f} "
              f"at the start", flush=True)
        common = ["--quiet", "--set", f"sampling.val_per_class={args.val_per_class}"]
        if args.no_specialist:
            common += ["--set", "specialist.enabled=false"]
        for o in args.overrides:
            common += ["--set", o]
        py = [sys.executable, "-m", "cascade"]
        env_ok = True
        rows = []
        steps = {"train-cold": ("train (cold cache)", "train"), "train-warm": ("train (warm cache)", "train"),
                 "test-cold": ("test  (cold cache)", "test"), "test-warm": ("test  (warm cache)", "test")}
        for step in args.steps.split(","):
            if step not in steps:
                ap.error(f"--steps: unknown step {step!r} (known: {', '.join(steps)})")
            label, command = steps[step]
            if step.endswith("cold"):  # an empty feature cache (test reads the model, not the train features)
                shutil.rmtree(work / "out" / "cache", ignore_errors=True)
            cmd = py + [command] + common
            wall, rss, rc, tail = run_measured(cmd, work)
            rows.append((label, wall, rss, rc))
            print(f"{label}: {wall:8.1f} s   peak memory {rss:8.0f} MiB   exit {rc}", flush=True)
            if rc != 0:
                print(tail, file=sys.stderr)
                env_ok = False
                break
        if env_ok:
            n = sum(1 for _ in open(work / "out" / "result.txt", encoding="utf-8"))
            print(f"result: {n} lines in out/result.txt", flush=True)
        return 0 if env_ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
