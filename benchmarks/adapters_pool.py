"""Does pooling an adapter expert with LP++ help the cascade? The generalisation suite's paired comparison.

    .venv/bin/python benchmarks/adapters_pool.py --add tip-adapter-f [--redraws 5] [--noise 0.5,1.0,1.5]
                                                 [--no-merge] [--no-val] [--by-task] [--json] [TASK.npz ...]

Builds the suite of benchmarks/generalisation.py (same options, same tasks) and compares, task by task, the
default cascade with the default cascade whose seen stages are LP++ (its default settings) plus the named
experts (``--add``, comma-separated registered names: tip-adapter, tip-adapter-f, clip-adapter). Prints
generalisation.py's paired summary per group (changed minus default). Changes no default.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import generalisation as gen  # noqa: E402
from cascade.stages import STAGES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="*")
    p.add_argument("--add", required=True, help="experts pooled with LP++, e.g. tip-adapter-f,clip-adapter")
    p.add_argument("--redraws", type=int, default=5)
    p.add_argument("--noise", default="0.5,1.0,1.5")
    p.add_argument("--query-frac", type=float, default=0.8)
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--no-val", action="store_true")
    p.add_argument("--by-task", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.add.split(",") if n.strip()]
    bad = [n for n in names if n not in STAGES or n in ("zero-shot", "inmap", "gda")]
    if bad or not names:
        p.error(f"--add: unknown or unsuitable expert(s) {bad or names}; choose from tip-adapter, tip-adapter-f, "
                f"clip-adapter")
    paths = args.tasks or sorted(str(x) for x in (Path(gen.ROOT) / "benchmarks" / "realbench").glob("*.npz"))
    noise = [float(s) for s in args.noise.split(",") if s.strip()]
    suite = gen.build_suite(paths, args.redraws, noise, args.query_frac, not args.no_merge)
    if args.no_val:
        for _, _, task in suite:
            task.pop("val_x"), task.pop("val_y")
    kwargs = gen.cascade_kwargs([])
    kwargs["seen_stages"] = list(kwargs["seen_stages"]) + [STAGES[n]() for n in names]
    args.set = [f"seen=lpp+{'+'.join(names)}"]         # the label generalisation.compare prints
    return gen.compare(suite, kwargs, args)


if __name__ == "__main__":
    sys.exit(main())
