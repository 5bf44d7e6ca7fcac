"""Time and peak memory of the cascade (fit on the support rows, predict on N queries) as N grows.

    .venv/bin/python benchmarks/scale.py [--sizes 1000,10000,100000,1000000] [--classes 400] [--backbones 2]
                                         [--inmap-steps 50] [--mem-limit-gib 20]

Features are synthetic, drawn around REAL class means: the class means (and text embeddings) of the shared
real CLIP ViT-B/32 feature tasks (benchmarks/realbench: caltech101, food101, imagenet_dev; 185 classes), and
beyond those, classes whose mean and text are the normalised average of two real classes' (seeded). Every row
(support, validation, query) is ``normalise(mean_k + r)`` with ``r`` a real row's offset from its own class mean,
drawn at random; backbone b > 0 sees the same images through a fixed random rotation and its own offsets.
4 support and 1 validation row per class; queries uniform over the classes.

Each size runs in its own process (``--one N``), so ``ru_maxrss`` is that size's peak resident memory; the
child caps its address space (``--mem-limit-gib``) so that a size that does not fit stops with MemoryError
instead of pushing other processes out of memory. The cascade is the configured one (cascade/configs/default.toml,
``stages.inmap.n_iter`` set by ``--inmap-steps``). Prints one line per size, then the growth exponents between
consecutive sizes (time ~ N^a, peak memory above the smallest run ~ N^b).

``--profile N`` runs one size under ``tracemalloc`` and prints, for every line of ``Cascade.predict`` that ran
(in order), the memory its arrays hold after the line and the peak during it, both above what was held when
``predict`` started (the query features), and its seconds: where the per-query memory and time go. Tracing makes it slower, so its
times are not the benchmark's. ``--chunk-rows R`` sets ``calibration.CHUNK_ROWS`` and ``calibration.FLOAT64_ROWS``
to R in the measured process, so that a small query set is computed as a large one is (blocks of R rows,
float32 distributions beyond R queries).

``--agreement R`` checks that computation on the real tasks themselves (benchmarks/realbench, with and without
their validation rows): per task, the largest difference between the cascade's scores computed as today (one
block, float64) and with blocks of R rows and float32 distributions, and the share of queries whose top-1 agrees.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cascade.config import build_cascade, load_config  # noqa: E402
from cascade.stages import calibration  # noqa: E402
from cascade.router import Cascade  # noqa: E402

TASKS = ("caltech101", "food101", "imagenet_dev")
SHOTS, VAL = 4, 1


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def real_classes(folder: Path):
    """(class means [K, 512], text [K, 512], offsets [M, 512]) of the real tasks: every row's offset from its
    class mean is a realistic within-class deviation."""
    means, texts, offsets = [], [], []
    for name in TASKS:
        t = np.load(folder / f"{name}.npz", allow_pickle=False)
        x = np.concatenate([t["support_x"], t["val_x"], t["query_x"]])
        y = np.concatenate([t["support_y"], t["val_y"], t["query_y"]])
        for k in range(t["text_x"].shape[0]):
            rows = x[y == k]
            if len(rows) < 2:
                continue
            m = rows.mean(axis=0)
            means.append(m)
            texts.append(t["text_x"][k])
            offsets.append(rows - m)
    return np.array(means), _unit(np.array(texts)), np.concatenate(offsets).astype(np.float32)


def make_task(n_query: int, n_classes: int, n_backbones: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means, text, offsets = real_classes(REPO / "benchmarks" / "realbench")
    if n_classes > len(means):                 # more classes: averages of two real classes (mean and text)
        pairs = rng.choice(len(means), size=(n_classes - len(means), 2))
        means = np.concatenate([means, means[pairs].mean(axis=1)])
        text = np.concatenate([text, _unit(text[pairs].mean(axis=1))])
    means, text = means[:n_classes].astype(np.float32), text[:n_classes]
    dim = means.shape[1]
    rots = [np.eye(dim, dtype=np.float32)] + [np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
                                              for _ in range(n_backbones - 1)]
    keys = [f"b{i}" for i in range(n_backbones)]

    def rows(labels):
        out = {}
        for key, rot in zip(keys, rots):
            x = np.empty((len(labels), dim), np.float32)
            for s in range(0, len(labels), 65536):          # generated in blocks: no [N, D] float64 copies
                lab = labels[s: s + 65536]
                off = offsets[rng.integers(0, len(offsets), len(lab))]
                x[s: s + len(lab)] = _unit(means[lab] + off) @ rot
            out[key] = x
        return out

    ys = np.repeat(np.arange(n_classes), SHOTS)
    yv = np.repeat(np.arange(n_classes), VAL)
    yq = rng.integers(0, n_classes, n_query)
    return (rows(ys), ys, rows(yv), yv, rows(yq), yq,
            {key: np.ascontiguousarray(text @ rot) for key, rot in zip(keys, rots)})


def run_one(n: int, args) -> dict:
    limit = int(args.mem_limit_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    support, ys, val, yv, query, yq, text = make_task(n, args.classes, args.backbones)
    cfg = load_config(overrides=[f"stages.inmap.n_iter={args.inmap_steps}"])
    cascade = build_cascade(cfg)
    t0 = time.perf_counter()
    cascade.fit(support, ys, text, n_seen=args.classes, val=(val, yv))
    t1 = time.perf_counter()
    pred = cascade.predict(query)
    t2 = time.perf_counter()
    top1 = float((np.asarray(pred.top5)[:, 0] == yq).mean() * 100)
    return {"n": n, "fit_s": t1 - t0, "predict_s": t2 - t1, "peak_mib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "top1": top1}


def profile_one(n: int, args) -> None:
    """Fit, then predict under tracemalloc with a line tracer on ``Cascade.predict``: per line, the MiB held after
    it and the peak MiB during it (calls made on that line included), above the start of ``predict``."""
    support, ys, val, yv, query, yq, text = make_task(n, args.classes, args.backbones)
    cfg = load_config(overrides=[f"stages.inmap.n_iter={args.inmap_steps}"])
    cascade = build_cascade(cfg)
    cascade.fit(support, ys, text, n_seen=args.classes, val=(val, yv))
    code = Cascade.predict.__code__
    lines, _ = inspect.getsourcelines(Cascade.predict)
    rows, state = [], {}

    def close(lineno):
        cur, peak = tracemalloc.get_traced_memory()
        rows.append((lineno, (cur - state["base"]) / 2 ** 20, (peak - state["base"]) / 2 ** 20,
                     time.perf_counter() - state["t"]))

    def local(frame, event, arg):
        if event in ("line", "return"):
            if "line" in state:
                close(state["line"])
            tracemalloc.reset_peak()
            state["t"] = time.perf_counter()
            state["line"] = frame.f_lineno if event == "line" else None
            if event == "return":
                state.pop("line")
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code and event == "call":
            state["base"] = tracemalloc.get_traced_memory()[0]
            return local
        return None

    tracemalloc.start()
    sys.settrace(tracer)
    t0 = time.perf_counter()
    try:
        cascade.predict(query)
    finally:
        sys.settrace(None)
    took = time.perf_counter() - t0
    tracemalloc.stop()
    first = code.co_firstlineno
    print(f"# Cascade.predict on {n} queries x {args.classes} classes (traced, {took:.1f} s): per line, MiB held "
          f"after it / peak MiB during it, above the {n} queries' features, and seconds; [N, C] float64 = "
          f"{n * args.classes * 8 / 2 ** 20:.1f} MiB; blocks of {calibration.CHUNK_ROWS} rows, float32 beyond "
          f"{calibration.FLOAT64_ROWS} queries")
    for lineno, held, peak, secs in rows:
        text = lines[lineno - first].strip() if 0 <= lineno - first < len(lines) else "?"
        print(f"{lineno:>5} {held:>9.1f} {peak:>9.1f} {secs:>7.2f}  {text[:80]}")


def agreement(chunk_rows: int) -> None:
    """Print, per real task, max |scores (one block, float64) - scores (blocks of ``chunk_rows``, float32)| and the
    share of queries with the same top-1."""
    cfg = load_config()
    keep = calibration.CHUNK_ROWS, calibration.FLOAT64_ROWS
    print(f"# the cascade on the real tasks: one block in float64 against blocks of {chunk_rows} rows in float32")
    print(f"{'task':>18} {'val':>5} {'queries':>8} {'max_abs_diff':>13} {'same_top1_%':>12}")
    for path in sorted((REPO / "benchmarks" / "realbench").glob("*.npz")):
        t = np.load(path, allow_pickle=False)
        n_seen = int(t["n_seen"]) if "n_seen" in t.files else t["text_x"].shape[0]
        for with_val in (True, False):
            cascade = build_cascade(cfg).fit({"b": t["support_x"]}, t["support_y"], {"b": t["text_x"]}, n_seen,
                                             val=({"b": t["val_x"]}, t["val_y"]) if with_val else None)
            calibration.CHUNK_ROWS, calibration.FLOAT64_ROWS = keep
            whole = cascade.predict({"b": t["query_x"]})
            calibration.CHUNK_ROWS = calibration.FLOAT64_ROWS = int(chunk_rows)
            blocks = cascade.predict({"b": t["query_x"]})
            calibration.CHUNK_ROWS, calibration.FLOAT64_ROWS = keep
            diff = float(np.abs(whole.scores - blocks.scores).max())
            same = float((whole.top5[:, 0] == blocks.top5[:, 0]).mean() * 100)
            print(f"{path.stem:>18} {str(with_val):>5} {len(t['query_y']):>8} {diff:>13.2e} {same:>12.2f}",
                  flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="query counts, comma-separated")
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--backbones", type=int, default=2)
    p.add_argument("--inmap-steps", type=int, default=50, help="stages.inmap.n_iter (the configured default: 50)")
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="address-space cap of each size's process")
    p.add_argument("--profile", type=int, metavar="N", help="trace the memory of Cascade.predict line by line "
                                                             "on N queries (one size, no table)")
    p.add_argument("--chunk-rows", type=int, metavar="R", help="calibration.CHUNK_ROWS and FLOAT64_ROWS in the "
                                                                "measured process (default: the package's)")
    p.add_argument("--agreement", type=int, metavar="R", help="on the real tasks: scores in one float64 block "
                                                               "against blocks of R rows in float32 (no table)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.agreement is not None:
        agreement(args.agreement)
        return 0
    if args.chunk_rows is not None:
        calibration.CHUNK_ROWS = calibration.FLOAT64_ROWS = int(args.chunk_rows)
    if args.profile is not None:
        profile_one(args.profile, args)
        return 0
    if args.one is not None:
        print(json.dumps(run_one(args.one, args)))
        return 0
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f"}) if os.path.exists(
        "/proc/cpuinfo") else []
    print(f"# {args.classes} classes x {args.backbones} backbones x 512-D, InMaP {args.inmap_steps} steps; "
          f"{os.cpu_count()} cores ({', '.join(flags) or 'no avx2/avx512f'}), load average "
          f"{os.getloadavg()[0]:.1f} at start; blocks of {calibration.CHUNK_ROWS} rows, float32 distributions "
          f"beyond {calibration.FLOAT64_ROWS} queries")
    print(f"{'queries':>10} {'predict_s':>10} {'fit_s':>8} {'peak_MiB':>10} {'top1_%':>7}")
    done = []
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--classes", str(args.classes), "--backbones",
               str(args.backbones), "--inmap-steps", str(args.inmap_steps), "--mem-limit-gib", str(args.mem_limit_gib)]
        if args.chunk_rows is not None:
            cmd += ["--chunk-rows", str(args.chunk_rows)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{n:>10} did not complete: {last}")
            break
        res = json.loads(r.stdout.strip().splitlines()[-1])
        done.append(res)
        print(f"{n:>10} {res['predict_s']:>10.2f} {res['fit_s']:>8.2f} {res['peak_mib']:>10.0f} {res['top1']:>7.2f}",
              flush=True)
    base = done[0]["peak_mib"] if done else 0.0
    for a, b in zip(done, done[1:]):
        ratio = math.log(b["n"] / a["n"])
        t_exp = math.log(b["predict_s"] / a["predict_s"]) / ratio
        grow_a, grow_b = a["peak_mib"] - base, b["peak_mib"] - base
        m_exp = (f"{math.log(grow_b / grow_a) / ratio:.2f}" if grow_a > 0 and grow_b > 0 else "n/a")
        per_k = (b["peak_mib"] - a["peak_mib"]) / ((b["n"] - a["n"]) / 1000)
        print(f"growth {a['n']} -> {b['n']}: predict time ~ N^{t_exp:.2f}; peak memory above the smallest run ~ "
              f"N^{m_exp}; {per_k:.2f} MiB per 1000 more queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
