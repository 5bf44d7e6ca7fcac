"""``python -m cascade eval RESULT LABELS``: top-1/top-5 accuracy of a result file, overall and per domain, and
the classes the predictions get wrong most often.

LABELS holds ``<file name> <index>`` lines (the form of train.txt; a path is matched by its file name when the
result names images without folders). With ``--classes`` (classes.txt or classes_b.txt) the per-domain table
and class names are shown; without it, everything is reported under one domain.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
import pandas as pd

from .data import parse_indexed, read_class_file, split_class_name
from .io import STDOUT, atomic_write_json, raise_many, read_lines, writing
from .output import format_table, read_result

__all__ = ["topk_table", "worst_classes", "evaluate_files", "add_parser", "LabelError"]


class LabelError(ValueError):
    """A labels file is malformed; the message names the file and line."""


def topk_table(top: np.ndarray, labels: np.ndarray, class_domains: Sequence[str] | None = None,
               ks: Sequence[int] = (1, 5)) -> list[dict]:
    """Rows ``{"domain", "n", "top1", "top5"}`` (accuracies in %), one per domain in order of first appearance
    in ``class_domains`` that has examples, then ``"all"``. A pandas group-by over one row per example."""
    top = np.asarray(top)
    labels = np.asarray(labels, dtype=np.int64)
    hits = pd.DataFrame({f"top{k}": (top[:, :k] == labels[:, None]).any(axis=1) for k in ks})
    cols = list(hits.columns)
    rows = []
    if class_domains is not None and len(labels):
        order = list(dict.fromkeys(class_domains[c] or "-" for c in range(len(class_domains))))
        domain = pd.Categorical([class_domains[c] or "-" for c in labels], categories=order)
        per = hits.groupby(domain, observed=True, sort=True)[cols].agg(["size", "mean"])
        for d, r in per.iterrows():
            rows.append({"domain": d, "n": int(r[(cols[0], "size")]),
                         **{c: float(100.0 * r[(c, "mean")]) for c in cols}})
    rows.append({"domain": "all", "n": int(len(labels)),
                 **{c: float(100.0 * hits[c].mean()) if len(labels) else 0.0 for c in cols}})
    return rows


def worst_classes(top1: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
                  n: int = 10) -> list[dict]:
    """The ``n`` classes with the lowest top-1 accuracy (ties: more examples first), each with the class it is
    most often mistaken for (ties: the one seen first). Pandas group-bys over one row per example."""
    df = pd.DataFrame({"label": np.asarray(labels, dtype=np.int64), "pred": np.asarray(top1, dtype=np.int64)})
    name = (lambda c: class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c))
    per = df.assign(hit=df["label"] == df["pred"]).groupby("label", sort=False)["hit"].agg(["size", "sum"])
    confused: dict[int, tuple[int, int]] = {}  # class -> (most frequent wrong prediction, count); ties: first seen
    for (c, p), times in df[df["label"] != df["pred"]].groupby(["label", "pred"], sort=False).size().items():
        if c not in confused or times > confused[c][1]:
            confused[c] = (int(p), int(times))
    rows = []
    for c, r in per.iterrows():
        other, times = confused.get(c, (None, 0))
        rows.append({"class": int(c), "name": name(int(c)), "n": int(r["size"]),
                     "top1": 100.0 * int(r["sum"]) / int(r["size"]),
                     "confused_with": "" if other is None else f"{name(other)} ({other})", "times": times})
    rows.sort(key=lambda r: (r["top1"], -r["n"], r["class"]))
    return rows[:n]


def _read_labels(path) -> dict[str, tuple[int, int]]:
    """{name: (index, line number)} of a labels file; errors name the file and line."""
    out: dict[str, tuple[int, int]] = {}
    problems = []
    for line_no, line in read_lines(path, "labels file", LabelError, comments=False):
        try:
            name, idx = parse_indexed(line, "<file name> <index>")
        except ValueError as exc:
            problems.append(f"line {line_no}: {exc}")
            continue
        if name in out:
            problems.append(f"line {line_no}: {name} appears twice")
            continue
        out[name] = (idx, line_no)
    raise_many(problems, f"{path}: malformed labels file:", LabelError)
    if not out:
        raise LabelError(f"{path}: labels file has no lines")
    return out


def _ends_in_index(name: str) -> bool:
    """Whether a name read from a labels line ends in a class index: the line had several, as a result line has."""
    parts = name.split()
    return len(parts) > 1 and parts[-1].isdigit()


def _labels_alone(path) -> bool:
    """Whether ``path`` reads as a labels file (one class index per line), to say so when it is given as the
    result."""
    try:
        return not any(map(_ends_in_index, _read_labels(path)))
    except (LabelError, OSError):
        return False


def _file_name(path: str) -> str:
    """The last part of a path written with / or \\."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _match(result: dict[str, list[int]], labels: dict[str, int]):
    """Pair result lines with labels, by exact name or else by file name. Returns (label -> result line, labels
    with no line, labels whose file name several result lines share)."""
    if set(labels) <= set(result):
        keys = {k: k for k in labels}
    else:
        by_base: dict[str, str] = {}
        dup = set()
        for k in result:
            b = _file_name(k)
            if b in by_base:
                dup.add(b)
            by_base[b] = k
        keys = {}
        exact = {k for k in labels if k in result}      # a line named exactly by a label is that label's alone
        for k in labels:
            if k in result:
                keys[k] = k
            else:
                b = _file_name(k)
                if b in by_base and b not in dup and by_base[b] not in exact:
                    keys[k] = by_base[b]
    ambiguous = [k for k in labels if k not in keys and _file_name(k) in dup]
    missing = [k for k in labels if k not in keys and k not in ambiguous]
    return keys, missing, ambiguous


def evaluate_files(result_path, labels_path, classes_path=None, worst: int = 10, allow_missing: bool = False):
    """Evaluate a result file; returns (table rows, worst-class rows, info)."""
    names = read_class_file(classes_path) if classes_path else None
    try:
        result = read_result(result_path, n_classes=len(names) if names else None)
    except ValueError:
        if _labels_alone(result_path):
            raise LabelError(f"{result_path}: holds one class index per line, as a labels file does; give the result "
                             "file first: cascade eval RESULT LABELS") from None
        raise
    labelled = _read_labels(labels_path)
    labels = {name: idx for name, (idx, _) in labelled.items()}
    if names is not None:
        bad = [f"{k} {v}" for k, v in labels.items() if v >= len(names)]
        if bad:
            raise LabelError(f"{labels_path}: {len(bad)} label(s) out of range for {classes_path} "
                             f"({len(names)} classes), e.g. {bad[0]}")
    else:
        # without a class list, each file bounds the other: an index beyond every index of the other file
        # cannot be a class of this task (negative indices are refused by both readers)
        top_label = max(labels.values())
        top_result = max(i for idx in result.values() for i in idx)
        if top_result > top_label:      # parsed again, bounded, for a message that names the line
            read_result(result_path, n_classes=top_label + 1,
                        bound=f"larger than every label in {labels_path} (at most {top_label}); give the class "
                              "list with --classes if the labels do not cover every class")
        bad = [f"line {line}: label {idx} of {name} is larger than every class index in {result_path} (at most "
               f"{top_result})" for name, (idx, line) in labelled.items() if idx > top_result]
        raise_many(bad, f"{labels_path}: label(s) out of range (give the class list with --classes if the result "
                        "file does not show every class):", LabelError)
    keys, missing, ambiguous = _match(result, labels)
    if ambiguous:
        raise LabelError(f"{labels_path}: {len(ambiguous)} label(s) match several lines of {result_path} by file name, "
                         f"e.g. {ambiguous[0]}; name the images as the result file does")
    lines: dict[str, list[str]] = {}
    for label, line in keys.items():
        lines.setdefault(line, []).append(label)
    shared = [f"{line} (labels {', '.join(ls)})" for line, ls in lines.items() if len(ls) > 1]
    if shared:                          # by file name, two labels would both be scored on one line
        raise LabelError(f"{labels_path}: {len(shared)} line(s) of {result_path} matched by several labels by file "
                         f"name, e.g. {shared[0]}; name the images as the result file does")
    if missing and not allow_missing and all(map(_ends_in_index, labels)):
        raise LabelError(f"{labels_path}: every line holds a name and several class indices, as a result file does; "
                         "the labels file holds one index per line: cascade eval RESULT LABELS")
    if missing and not allow_missing:
        raise LabelError(f"{result_path}: {len(missing)} labelled image(s) have no result line, e.g. "
                         f"{', '.join(missing[:5])} (use --allow-missing to count them as wrong)")
    k = min(len(v) for v in result.values())
    order = list(labels)
    top = np.full((len(order), k), -1, dtype=np.int64)
    for i, name in enumerate(order):
        if name in keys:
            top[i] = result[keys[name]][:k]
    y = np.array([labels[n] for n in order], dtype=np.int64)
    domains = [split_class_name(n)[0] for n in names] if names is not None else None
    ks = (1, 5) if k >= 5 else (1, k)
    rows = topk_table(top, y, domains, ks=ks)
    worst_rows = worst_classes(top[:, 0], y, names, n=worst)
    extra = len(set(result) - set(keys.values()))
    info = {"result": str(result_path), "labels": str(labels_path), "n_labels": len(labels),
            "n_missing": len(missing), "n_unlabelled_results": extra}
    return rows, worst_rows, info


# ------------------------------------------------------------------------------------------------ command
def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        description="Top-1/top-5 accuracy of RESULT (`<file name> <top1> ... <top5>` lines) against LABELS "
                    "(`<file name> <index>` lines), overall and per domain (with --classes), and the classes "
                    "most often wrong with what they are mistaken for.")
    p.add_argument("result", help="result file, e.g. out/result.txt")
    p.add_argument("labels", help="labels file: `<file name> <class index>` per line")
    p.add_argument("--classes", metavar="FILE", help="classes.txt (or classes_b.txt): per-domain table and names")
    p.add_argument("--worst", type=_count, default=10, metavar="N", help="list the N worst classes (default 10)")
    p.add_argument("--allow-missing", action="store_true",
                   help="count labelled images without a result line as wrong instead of failing")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    rows, worst_rows, info = evaluate_files(args.result, args.labels, args.classes, args.worst, args.allow_missing)
    cols = ["domain", "n"] + [c for c in ("top1", "top5") if c in rows[-1]]
    if args.json:           # first: a closed or full standard output below does not lose it
        atomic_write_json(args.json, {"accuracy": rows, "worst_classes": worst_rows, **info})
    if info["n_unlabelled_results"]:
        print(f"{info['n_unlabelled_results']} result line(s) have no label (ignored)", file=sys.stderr)
    with writing(STDOUT):
        print(format_table(rows, cols))
        if info["n_missing"]:
            print(f"\n{info['n_missing']} labelled image(s) had no result line (counted as wrong)")
        if worst_rows:
            print("\nworst classes (top-1):")
            print(format_table(worst_rows, ["name", "class", "n", "top1", "confused_with", "times"],
                               floats="{:.1f}"))
    return 0
