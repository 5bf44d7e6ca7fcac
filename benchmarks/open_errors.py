"""Where the errors are on open tasks: seen-class and unseen-class queries, errors across the seen/unseen boundary.

For every open task (some classes without support rows) the script scores the queries with InMaP alone (the bench's
``inmap`` row) and with the cascade stopped after each of its steps, each a setting of its own parameters:

  pool       the pooled experts (``refine=None, balance="none"``)
  refined    the pool refined by the GDA (``balance="none"``)
  balanced   the refinement balanced when the check says so (``balance_refit=False``)
  cascade    the default (the balanced refit, anchored by the balanced pool)

and prints, per method, top-1 on all queries, on the queries of seen and of unseen classes, and how many queries
crossed the boundary (a seen-class query predicted as an unseen class, and the reverse). ``--families N`` adds the
"classes open" draws of benchmarks/generalisation.py (N per size) built from the closed tasks given. Query labels
only score. Usage::

    .venv/bin/python benchmarks/open_errors.py benchmarks/realbench/imagenet_dev-open.npz \\
        benchmarks/realbench/imagenet_dev.npz --families 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cascade.bench import evaluate_task, load_task
from generalisation import class_families

STEPS = {"pool": {"refine": None, "balance": "none"}, "refined": {"balance": "none"},
         "balanced": {"balance_refit": False}, "cascade": {}}


def breakdown(scores: np.ndarray, y: np.ndarray, n_seen: int) -> np.ndarray:
    """[top-1, top-1 of seen-class queries, top-1 of unseen-class queries (%), seen->unseen, unseen->seen]."""
    pred = scores.argmax(axis=1)
    ok, seen = pred == y, y < n_seen
    cross = (pred >= n_seen) != (y >= n_seen)
    return np.array([100 * ok.mean(), 100 * ok[seen].mean(), 100 * ok[~seen].mean(),
                     np.sum(cross & seen), np.sum(cross & ~seen)], dtype=float)


def task_rows(task: dict) -> dict:
    """Each method's breakdown on one open task (its labels popped, never passed to a method)."""
    task = dict(task)
    y = task.pop("query_y")
    S = task["n_seen"]
    out = {"inmap": breakdown(evaluate_task(task, ("inmap",))["inmap"], y, S)}
    for name, kwargs in STEPS.items():
        out[name] = breakdown(evaluate_task(task, ("cascade",), kwargs)["cascade"], y, S)
    return out


def print_rows(title: str, rows: dict) -> None:
    print(title)
    for m, v in rows.items():
        print(f"  {m:<10}{v[0]:9.2f}{v[1]:9.2f}{v[2]:9.2f}{v[3]:9.1f}{v[4]:9.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tasks", nargs="+", help="task files: the open ones are scored, the closed ones feed --families")
    p.add_argument("--families", type=int, default=0, help="'classes open' draws per size from the closed tasks")
    p.add_argument("--family-sizes", default="40,80,131", help="class counts of the family draws")
    args = p.parse_args(argv)
    suite = []
    for path in args.tasks:
        task = load_task(path)
        if task["n_seen"] < task["text_x"].shape[0]:
            suite.append((Path(path).stem, task))
    if args.families > 0:
        sizes = [int(s) for s in args.family_sizes.split(",") if s.strip()]
        suite += [(name, t) for group, name, t in class_families(args.tasks, sizes, args.families)
                  if group == "classes open"]
    if not suite:
        print("no open task (give an open task file, or a closed one with --families)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    header = f"  {'method':<10}{'top-1':>9}{'seen-q':>9}{'unseen-q':>9}{'s->u':>9}{'u->s':>9}"
    print("top-1 % on all queries, on seen-class and unseen-class queries; queries across the boundary "
          "(seen class predicted unseen, and the reverse)")
    print(header)
    family_rows = []
    for name, task in suite:
        rows = task_rows(task)
        print_rows(name, rows)
        if "/" in name:
            family_rows.append(rows)
    if family_rows:
        mean = {m: np.mean([r[m] for r in family_rows], axis=0) for m in family_rows[0]}
        print_rows(f"mean over {len(family_rows)} 'classes open' draws", mean)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
