"""How does each method do when the query set is tiny? Score random query subsets of a few sizes.

    .venv/bin/python benchmarks/few_queries.py [TASK.npz ...] [--sizes 1,3,10,30,100] [--draws 10]
                                               [--methods zero-shot,inmap-nosinkhorn,lpp,cascade] [--no-val]
                                               [--set KEY=VALUE ...] [--json]

Default tasks: benchmarks/realbench/*.npz. For every task and every size n, ``--draws`` random subsets of n queries
(seeded: draw d of size n uses seed d, so every method and every ``--set`` sees the same subsets) are each scored as
the whole query set on their own, as when a user classifies one image, or a handful, at a time. The transductive
stages (InMaP, the cascade's marginal estimate and its GDA refinement) then have almost nothing to learn from; this
shows whether the cascade degrades gracefully towards the inductive methods (zero-shot CLIP, LP++) or below them.
Support and validation rows are the task's own. Prints per task and size the mean top-1 (%) of each method over the
draws, then per size the mean over tasks. ``--set`` changes the cascade row as in ``benchmarks/generalisation.py``
(e.g. ``--set stages.gda.mean_prior=0``). ``--json``: one JSON object per task and size, then a summary object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cascade.bench import ROWS, evaluate_task, load_task  # noqa: E402
from cascade.metrics import top1_top5  # noqa: E402
from generalisation import cascade_kwargs  # noqa: E402

DEFAULT_METHODS = ("zero-shot", "inmap-nosinkhorn", "lpp", "cascade")


def subsets(n_query: int, size: int, draws: int) -> list[np.ndarray]:
    """``draws`` sorted random subsets of ``size`` query indices (draw d seeded with d); all of them once when
    ``size >= n_query``."""
    if size >= n_query:
        return [np.arange(n_query)]
    return [np.sort(np.random.default_rng(d).choice(n_query, size, replace=False)) for d in range(draws)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("tasks", nargs="*", help="task files (default: benchmarks/realbench/*.npz)")
    p.add_argument("--sizes", default="1,3,10,30,100", help="query-set sizes, comma-separated (default 1,3,10,30,100)")
    p.add_argument("--draws", type=int, default=10, help="random query subsets per task and size (default 10)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated rows of `cascade bench` (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--no-val", action="store_true", help="drop the validation rows of every task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the cascade row (repeatable), as in benchmarks/generalisation.py")
    p.add_argument("--json", action="store_true", help="one JSON object per task and size, then a summary")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        p.error("--sizes: every size must be at least 1")
    if args.draws < 1:
        p.error("--draws must be at least 1")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in ROWS]
    if unknown or not methods:
        p.error(f"--methods: unknown {unknown} (choose from {', '.join(ROWS)})")
    kwargs = cascade_kwargs(args.set)
    paths = args.tasks or sorted(str(x) for x in (ROOT / "benchmarks" / "realbench").glob("*.npz"))
    try:                                       # every file checked before any work starts
        tasks = [(Path(path).stem, load_task(path)) for path in paths]
    except (OSError, ValueError) as exc:
        p.error(str(exc))

    t0 = time.perf_counter()
    if not args.json:
        print(f"top-1 % on random query subsets scored on their own, mean over {args.draws} draws "
              f"({os.cpu_count()} CPUs)" + ("; no validation rows" if args.no_val else "")
              + (f"; cascade row with {' '.join(args.set)}" if args.set else ""))
        print(f"{'task':<18}{'queries':>8}" + "".join(f"{m:>18}" for m in methods))
    per_size = {n: {m: [] for m in methods} for n in sizes}
    for name, task in tasks:
        if args.no_val:
            task.pop("val_x", None), task.pop("val_y", None)
        for n in sizes:
            acc = {m: [] for m in methods}
            for idx in subsets(len(task["query_y"]), n, args.draws):
                sub = dict(task, query_x=task["query_x"][idx])
                labels = sub.pop("query_y")[idx]
                scores = evaluate_task(sub, methods, kwargs)
                for m in methods:
                    acc[m].append(top1_top5(scores[m], labels)["top1"])
            mean = {m: float(np.mean(v)) for m, v in acc.items()}
            for m in methods:
                per_size[n][m].append(mean[m])
            if args.json:
                print(json.dumps({"task": name, "queries": n, "draws": len(acc[methods[0]]),
                                  "top1": {m: round(v, 2) for m, v in mean.items()}}), flush=True)
            else:
                print(f"{name:<18}{n:>8}" + "".join(f"{mean[m]:>18.2f}" for m in methods), flush=True)
    summary = {str(n): {m: round(float(np.mean(v)), 2) for m, v in per_size[n].items()} for n in sizes}
    if args.json:
        print(json.dumps({"summary": summary, "seconds": round(time.perf_counter() - t0, 1)}))
        return 0
    print(f"\nmean over the {len(paths)} tasks ({time.perf_counter() - t0:.0f} s)")
    print(f"{'':<18}{'queries':>8}" + "".join(f"{m:>18}" for m in methods))
    for n in sizes:
        print(f"{'':<18}{n:>8}" + "".join(f"{summary[str(n)][m]:>18.2f}" for m in methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
