"""Compare two outputs of ``python -m cascade bench --json``: the same top-1 and top-5 for every task and method?

    python benchmarks/compare_bench.py BEFORE.jsonl AFTER.jsonl [--methods cascade,seed-cascade]

Prints one line per difference and a summary; exits 1 when any task or method differs or is missing. Use it to
check that a change meant to preserve behaviour (a refactoring) changed no score.
"""
from __future__ import annotations

import argparse
import json
import sys


def read(path: str) -> dict:
    """{task: record} of a ``bench --json`` output file."""
    with open(path, encoding="utf-8") as f:
        return {r["task"]: r for r in (json.loads(line) for line in f if line.strip())}


def differences(before: dict, after: dict, methods=None) -> list[str]:
    """One line per task or method whose counts or top-1/top-5 differ (or that one side lacks)."""
    out = []
    for task in sorted(set(before) | set(after)):
        if task not in before or task not in after:
            out.append(f"{task}: only in {'after' if task in after else 'before'}")
            continue
        a, b = before[task], after[task]
        if a["n_query"] != b["n_query"]:
            out.append(f"{task}: n_query {a['n_query']} -> {b['n_query']}")
        names = methods or sorted(set(a["results"]) | set(b["results"]))
        for m in names:
            ra, rb = a["results"].get(m), b["results"].get(m)
            if ra != rb:
                out.append(f"{task} {m}: {ra} -> {rb}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--methods", help="comma-separated methods to compare (default: all in either file)")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m] if a.methods else None
    before, after = read(a.before), read(a.after)
    diff = differences(before, after, methods)
    for line in diff:
        print(line)
    print(f"{len(after)} tasks: " + (f"{len(diff)} difference(s)" if diff else "identical top-1/top-5"))
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
