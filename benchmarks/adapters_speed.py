"""Speed of fitting + scoring Tip-Adapter, Tip-Adapter-F and CLIP-Adapter on a synthetic production-size task.

    .venv/bin/python benchmarks/adapters_speed.py [--queries 5000] [--classes 400] [--shots 4] [--dim 512]
                                                  [--val-per-class 1] [--repeat 1]

One backbone; the synthetic features of benchmarks/stages_speed.py (seeded). Each stage is fitted on the support
rows (beta/alpha searched on the validation rows) and scores every query; prints wall and CPU seconds per stage
(the best of ``--repeat`` runs) after the BLAS line and the CPU's model and vector flags.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.stages_speed import blas_info, cpu_info, make_task  # noqa: E402
from cascade.stages import CLIPAdapter, TipAdapter, TipAdapterF  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--val-per-class", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    support, ys, query, _, text, (val, yv) = make_task(args.queries, args.classes, args.shots, args.dim, 1,
                                                      val_per_class=args.val_per_class)
    X, Q, T, V = support["bb0"], query["bb0"], text["bb0"], val["bb0"]
    print(f"BLAS: {blas_info()}")
    print(f"CPU: {cpu_info()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} (other processes share this machine)")
    print(f"task: {args.queries} queries x {args.classes} classes x {args.dim} dims, {X.shape[0]} support rows, "
          f"{V.shape[0]} val rows")
    for name, make in (("tip-adapter", TipAdapter), ("tip-adapter-f", TipAdapterF), ("clip-adapter", CLIPAdapter)):
        best = None
        for _ in range(max(1, args.repeat)):
            t0, c0 = time.perf_counter(), time.process_time()
            make().fit(X, ys, text=T, val=(V, yv)).decision_function(Q)
            run = (time.perf_counter() - t0, time.process_time() - c0)
            best = run if best is None or run[0] < best[0] else best
        print(f"  {name:<16}fit + predict {best[0]:7.2f} s  (cpu {best[1]:6.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
