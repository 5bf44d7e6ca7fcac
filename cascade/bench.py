"""``python -m cascade bench TASK.npz [...] [--json]``: score the stages on real-feature task files.

A task file (format: benchmarks/realbench/README.md) holds support/val/query CLIP features, class text
embeddings and optionally ``n_seen``. For each task this prints top-1/top-5 (%) on the queries of:

  zero-shot          CLIP text classifier over all classes
  inmap              InMaP, authors' defaults (Sinkhorn with a uniform class marginal)
  inmap-nosinkhorn   InMaP without Sinkhorn
  lpp                LP++ over the seen classes, authors' protocol (300 epochs, epoch chosen on val rows)
  tip-adapter        Tip-Adapter over the seen classes, authors' imagenet.yaml grid, beta/alpha searched on val rows
  tip-adapter-f      Tip-Adapter-F over the seen classes (keys fine-tuned 20 epochs, read after the last), as above
  clip-adapter       CLIP-Adapter over the seen classes (residual ratio 0.2, CoOp's SGD recipe, 200 epochs, lr 0.002)
  seed-cascade       the seeds' routing: InMaP (Sinkhorn) over all classes, predicted-unseen queries keep
                     its ranking, the rest LP++ (as above)
  cascade            the default cascade (cascade/configs/default.toml: zero-shot + LP++ + InMaP pooled, refined by a
                     transductive GDA, routed by the joint posterior); val rows used only for calibration
                     and for the pooling exponents (held-out log-likelihood)

``query_y`` is read only by the scoring code, after every method has produced its scores.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import default_cascade
from .io import STDOUT, read_npz, writing
from .metrics import top1_top5
from .router import Cascade
from .stages import InMaP, LinearProbePP, ZeroShot, check_features, get_stage

ROWS = ("zero-shot", "inmap", "inmap-nosinkhorn", "lpp", "seed-cascade", "cascade")
ADAPTER_ROWS = ("tip-adapter", "tip-adapter-f", "clip-adapter")   # printed by the bench; not in ROWS, which the
                                                                   # benchmarks/ suites run on every task
ALL_ROWS = ROWS[:4] + ADAPTER_ROWS + ROWS[4:]
SEEN_ROWS = ("lpp",) + ADAPTER_ROWS       # rows that are a registered seen stage alone, with its own defaults
BACKBONE = "ViT-B/32"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="+", metavar="TASK.npz", help="task files (e.g. benchmarks/realbench/*.npz)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per task per line: {"task", "n_query", "results": '
                        '{method: {"top1", "top5"}}}')
    p.add_argument("--methods", default=",".join(ALL_ROWS),
                   help=f"comma-separated subset of: {', '.join(ALL_ROWS)} (default: all)")
    p.set_defaults(func=run)


def load_task(path) -> dict:
    """Read and check a task file; returns a dict of arrays (query_y included, for scoring only). Shapes, labels,
    ``n_seen`` and the features' values (finite, L2-normalised) are checked here, so that an error names the file
    and its key rather than a stage's argument."""
    path = Path(path)
    task = read_npz(path, ".npz task file")
    need = ("support_x", "support_y", "query_x", "query_y", "text_x")
    missing = [k for k in need if k not in task]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing} (see benchmarks/realbench/README.md)")
    if ("val_x" in task) != ("val_y" in task):
        raise ValueError(f"{path}: {'val_x' if 'val_x' in task else 'val_y'} without "
                         f"{'val_y' if 'val_x' in task else 'val_x'}; give both or neither")
    T = task["text_x"]
    if T.ndim != 2 or T.shape[0] < 1:
        raise ValueError(f"{path}: text_x must be [classes, width], got shape {T.shape}")
    check_features(T, f"{path}: text_x")
    C = T.shape[0]
    n_seen = task.get("n_seen", np.asarray(C))
    if n_seen.shape != () or not np.issubdtype(n_seen.dtype, np.integer) or not 1 <= int(n_seen) <= C:
        raise ValueError(f"{path}: n_seen must be one integer in 1..{C}, got {n_seen.tolist()!r} ({n_seen.dtype})")
    task["n_seen"] = int(n_seen)
    for x, y, n_classes in (("support_x", "support_y", task["n_seen"]), ("val_x", "val_y", task["n_seen"]),
                            ("query_x", "query_y", C)):
        if x not in task:
            continue
        X, Y = task[x], task[y]
        if X.ndim != 2 or X.shape[1] != T.shape[1]:
            raise ValueError(f"{path}: {x} must be [rows, {T.shape[1]}] (text_x's width), got shape {X.shape}")
        check_features(X, f"{path}: {x}", min_rows=0 if x == "val_x" else 1)
        if Y.shape != (X.shape[0],):
            raise ValueError(f"{path}: {y} must hold one label per row of {x} ({X.shape[0]}), got shape {Y.shape}")
        if Y.size and not np.issubdtype(Y.dtype, np.integer):
            raise ValueError(f"{path}: {y} must hold integer class indices, got dtype {Y.dtype}")
        if Y.size and (Y.min() < 0 or Y.max() >= n_classes):
            raise ValueError(f"{path}: {y} must lie in 0..{n_classes - 1}"
                             + (" (the seen classes)" if n_classes < C else "") + f", got {Y.min()}..{Y.max()}")
    return task


def evaluate_task(task: dict, methods=ROWS, cascade: dict | None = None) -> dict[str, np.ndarray]:
    """Scores [Nq, C] of each method. Never reads ``task['query_y']``. ``cascade``: keyword arguments of the
    ``cascade`` row's :class:`~cascade.router.Cascade`, set over the default cascade (the one of
    cascade/configs/default.toml, :func:`~cascade.config.default_cascade`)."""

    X, T = task["query_x"], task["text_x"]
    C, S = T.shape[0], task["n_seen"]
    sx, sy = task["support_x"], task["support_y"]
    val = (task["val_x"], task["val_y"]) if "val_x" in task and "val_y" in task else None
    out = {}
    for name in methods:
        if name == "zero-shot":
            out[name] = ZeroShot().fit(text=T).decision_function(X)
        elif name == "inmap":
            out[name] = InMaP().fit(X, text=T).decision_function(X)
        elif name == "inmap-nosinkhorn":
            out[name] = InMaP(sinkhorn=False).fit(X, text=T).decision_function(X)
        elif name in SEEN_ROWS:                     # the registered stage, fitted on the seen classes only
            m = get_stage(name)().fit(sx, sy, text=T[:S], val=val)
            z = np.full((X.shape[0], C), -np.inf, dtype=np.float64)
            z[:, :S] = m.decision_function(X)
            out[name] = z
        elif name in ("seed-cascade", "cascade"):
            if name == "seed-cascade":
                model = Cascade(InMaP(), [LinearProbePP()], refine=None, prior="stage", routing="stage1",
                                combine="replace", calibrate=False)
            else:
                model = default_cascade().set_params(**(cascade or {}))
            v = ({BACKBONE: val[0]}, val[1]) if val is not None else None
            model.fit({BACKBONE: sx}, sy, {BACKBONE: T}, S, val=v,
                      domains=task.get("class_domain") if name == "cascade" else None)
            out[name] = model.predict({BACKBONE: X}).scores
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_ROWS)}")
    return out


def run(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_ROWS]
    if bad or not methods:
        raise ValueError((f"--methods: unknown method(s) {bad}" if bad else "--methods: no method named")
                         + f"; choose from {', '.join(ALL_ROWS)}")
    stems = {}
    for path in args.tasks:               # a task is named by its file's stem: each once
        stems.setdefault(Path(path).stem, []).append(path)
    twice = {s: p for s, p in stems.items() if len(p) > 1}
    if twice:
        raise ValueError("tasks named twice (a task is named by its file name): "
                         + "; ".join(f"{s}: {', '.join(p)}" for s, p in twice.items()))
    for path in args.tasks:               # every file checked before the first is run (then read again: one in memory)
        load_task(path)
    for path in args.tasks:
        t0 = time.perf_counter()
        task = load_task(path)
        labels = task.pop("query_y")          # kept away from every method
        try:
            scores = evaluate_task(task, methods)
        except ValueError as exc:             # a stage's own check, under its argument names
            raise ValueError(f"{path}: {exc}") from None
        results = {m: {k: round(v, 2) for k, v in top1_top5(s, labels).items()} for m, s in scores.items()}
        record = {"task": Path(path).stem, "n_query": int(labels.shape[0]), "results": results}
        with writing(STDOUT):                 # each task's lines as soon as it is done
            if args.json:
                print(json.dumps(record))
            else:
                C, S = task["text_x"].shape[0], task["n_seen"]
                print(f"{record['task']}: {labels.shape[0]} queries, {C} classes ({S} seen), "
                      f"{task['support_x'].shape[0]} support rows  [{time.perf_counter() - t0:.1f} s]")
                print(f"  {'method':<18}{'top-1':>8}{'top-5':>8}")
                for m, r in results.items():
                    print(f"  {m:<18}{r['top1']:>8.2f}{r['top5']:>8.2f}")
                print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main
    sys.exit(main(["bench", *sys.argv[1:]]))
