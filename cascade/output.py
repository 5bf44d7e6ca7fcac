"""What the tool writes for people: the result file, the routes CSV and report tables, each written atomically
through :mod:`cascade.io`.

Result file format (the challenge's): one line per test image, ``<file name> <top1> <top2> <top3> <top4> <top5>``
(class indices), sorted by file name.
"""
from __future__ import annotations

import csv
import io
from typing import Iterable, Sequence

import numpy as np

from .io import atomic_open, atomic_write_text, one_line, raise_many, read_lines

__all__ = ["ResultError", "write_result", "read_result", "write_routes_csv", "format_table", "write_table_csv"]


# -------------------------------------------------------------------------------------------- result file
class ResultError(ValueError):
    """A result file is malformed; the message names the file and line."""


def _name_order(names: Sequence[str]) -> np.ndarray:
    """Row indices sorted by name (Python's string order), as one int64 array: 8 bytes a row."""
    arr = np.empty(len(names), dtype=object)
    arr[:] = list(names) if not isinstance(names, list) else names
    return np.argsort(arr, kind="stable")


def _result_lines(names: Sequence[str], top5: np.ndarray):
    """Check ``names``/``top5`` (shape, duplicate names) up front, then yield the result file's lines one by one,
    sorted by name (a name that cannot be one line is an error when its line comes)."""
    top5 = np.asarray(top5)
    if top5.ndim != 2 or top5.shape[0] != len(names) or top5.shape[1] < 1:
        raise ValueError(f"top5 has shape {top5.shape}, expected [{len(names)}, 5]")
    order = _name_order(names)
    if len(order) > 1:                                  # sorted, a repeated name sits next to itself
        ranked = np.empty(len(order), dtype=object)
        ranked[:] = [names[i] for i in order]
        if np.any(ranked[1:] == ranked[:-1]):
            raise ValueError("duplicate image names in the result")
        del ranked

    def lines():
        for i in order:
            if not one_line(names[i]):
                raise ValueError(f"image name {names[i]!r} holds a line break or bytes that are not UTF-8: it "
                                 "cannot be one line of the result file")
            yield names[i] + " " + " ".join(str(int(c)) for c in top5[i]) + "\n"

    return lines()


def write_result(path, names: Sequence[str], top5: np.ndarray) -> None:
    """The submission file: one line per image, sorted by name, streamed line by line into the atomic temporary
    file (memory does not grow with the text), so it appears complete or not at all."""
    lines = _result_lines(names, top5)          # shape and duplicates are checked before anything is written
    with atomic_open(path, "w", newline="\n") as f:
        f.writelines(lines)


def read_result(path, k: int = 5, n_classes: int | None = None, bound: str | None = None) -> dict[str, list[int]]:
    """Parse a result file into {file name: [k class indices]}. Every malformed line is an error naming the
    file and line (wrong number of fields, non-integers, negative or out-of-range indices, repeated indices,
    duplicate names). ``bound`` says where ``n_classes`` came from, for the message (default: the range)."""
    out: dict[str, list[int]] = {}
    problems = []
    for line_no, line in read_lines(path, "result file", ResultError, comments=False):
        parts = line.rsplit(None, k)
        if len(parts) != k + 1:
            problems.append(f"line {line_no}: expected '<file name> {' '.join(f'<top{i + 1}>' for i in range(k))}', "
                            f"got {line!r}")
            continue
        name, *idx_text = parts
        try:
            idx = [int(t) for t in idx_text]
        except ValueError:
            problems.append(f"line {line_no}: class indices must be integers, got {' '.join(idx_text)!r}")
            continue
        bad = [i for i in idx if i < 0 or (n_classes is not None and i >= n_classes)]
        if bad:
            if bad[0] >= 0 and bound:
                problems.append(f"line {line_no}: class index {bad[0]} is {bound}")
            else:
                rng = f" (0..{n_classes - 1})" if n_classes is not None else ""
                problems.append(f"line {line_no}: class index {bad[0]} out of range{rng}")
            continue
        if len(set(idx)) != len(idx):
            problems.append(f"line {line_no}: a class index is repeated in {idx}")
            continue
        if name in out:
            problems.append(f"line {line_no}: {name} appears twice")
            continue
        out[name] = idx
    raise_many(problems, f"{path}: malformed result file:", ResultError)
    if not out:
        raise ResultError(f"{path}: result file has no lines")
    return out


def write_routes_csv(path, names: Sequence[str], routes: Sequence[str], top5: np.ndarray, top5_scores: np.ndarray,
                     status: Sequence[str] | None = None) -> None:
    """Per image: its route through the cascade, top-5 classes and their scores, and a status ('ok' or why it
    could not be read). Sorted by name like the result file; written row by row, atomically."""
    k = top5.shape[1]
    header = ["image", "route", "status"] + [f"top{i + 1}" for i in range(k)] + [f"score{i + 1}" for i in range(k)]
    with atomic_open(path, "w", newline="") as f:     # streamed row by row into the atomic temporary file
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i in _name_order(names):
            w.writerow([names[i], routes[i], status[i] if status is not None else "ok"]
                       + [int(c) for c in top5[i]] + [f"{float(s):.6g}" for s in top5_scores[i]])


# ------------------------------------------------------------------------------------------------- tables
def format_table(rows: Sequence[dict], columns: Sequence[str], floats: str = "{:.2f}") -> str:
    """A plain-text table (for stderr)."""
    def cell(v):
        return floats.format(v) if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([fmt(list(columns)), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def write_table_csv(path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())
