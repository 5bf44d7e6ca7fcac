"""`python -m cascade bench` on the shared real-feature tasks: reproduction and "beat them" margins.

Authors' numbers (top-1 %, benchmarks/realbench/README.md): a reproduction must land within 0.3 points.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "benchmarks" / "realbench"
NAMES = ["caltech101", "food101", "caltech101-open", "food101-open"]

AUTHORS = {  # task: {row: top-1}
    "caltech101": {"zero-shot": 95.8, "inmap-nosinkhorn": 96.1, "inmap": 76.9, "lpp": 97.6},
    "food101": {"zero-shot": 94.1, "inmap-nosinkhorn": 94.1, "inmap": 95.5, "lpp": 92.7},
    "caltech101-open": {"zero-shot": 95.8},
    "food101-open": {"zero-shot": 94.1},
}
SEED_CASCADE = {"caltech101-open": 88.9, "food101-open": 93.2}


@pytest.fixture(scope="module")
def bench():
    cmd = [sys.executable, "-m", "cascade", "bench", "--json", *[str(TASKS / f"{n}.npz") for n in NAMES]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(lines) == len(NAMES)                        # exactly one JSON object per task per line
    return {rec["task"]: rec for rec in lines}


def test_json_format(bench):
    for name in NAMES:
        rec = bench[name]
        assert set(rec) == {"task", "n_query", "results"}
        assert {"zero-shot", "inmap", "lpp", "cascade"} <= set(rec["results"])
        for r in rec["results"].values():
            assert set(r) == {"top1", "top5"} and 0 <= r["top1"] <= r["top5"] <= 100
    assert bench["caltech101"]["n_query"] == 1006 and bench["food101"]["n_query"] == 220


@pytest.mark.parametrize("name", NAMES)
def test_reproduces_authors(bench, name):
    res = bench[name]["results"]
    for row, ref in AUTHORS[name].items():
        assert abs(res[row]["top1"] - ref) <= 0.3, (name, row, res[row]["top1"], ref)


GAP = pytest.mark.xfail(strict=True, reason="known gap: on Food-101 the cascade (95.00; 95.45 on the open "
                                             "variant) does not beat InMaP-Sinkhorn (95.45); see docs/stages.md, "
                                             "'Known gap'")


@pytest.mark.parametrize("name", ["caltech101", "caltech101-open",
                                  pytest.param("food101", marks=GAP), pytest.param("food101-open", marks=GAP)])
def test_cascade_beats_every_single_stage(bench, name):
    res = bench[name]["results"]
    best = max(res[r]["top1"] for r in ("zero-shot", "inmap", "inmap-nosinkhorn", "lpp"))
    assert res["cascade"]["top1"] > best, (name, res)


@pytest.mark.parametrize("name", NAMES)
def test_cascade_top5_never_below_zero_shot(bench, name):
    """Routing and the product of experts must not cost top-5 against plain CLIP (on open tasks this needs the
    product's own temperature: without it caltech101-open fell to 99.20 against zero-shot's 99.80)."""
    res = bench[name]["results"]
    assert res["cascade"]["top5"] >= res["zero-shot"]["top5"], (name, res)


@pytest.mark.parametrize("name", ["caltech101-open", "food101-open"])
def test_cascade_beats_readme_bars_on_open_tasks(bench, name):
    res = bench[name]["results"]
    assert res["cascade"]["top1"] > SEED_CASCADE[name]            # the seeds' cascade (README)
    assert res["cascade"]["top1"] > AUTHORS[name]["zero-shot"]    # and zero-shot CLIP
    assert res["cascade"]["top1"] > res["seed-cascade"]["top1"]   # and our run of the seed rule


def test_table_output_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cascade", "bench", "--methods", "zero-shot,lpp",
                          str(TASKS / "food101.npz")], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "food101" in out.stdout and "zero-shot" in out.stdout and "94.09" in out.stdout
    bad = tmp_path / "bad.npz"
    np.savez(bad, support_x=np.zeros((2, 3), np.float32))
    r = subprocess.run([sys.executable, "-m", "cascade", "bench", str(bad)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "missing arrays" in r.stderr


def test_methods_never_see_query_labels():
    from cascade.bench import evaluate_task, load_task
    task = load_task(TASKS / "food101-open.npz")
    task.pop("query_y")                                     # evaluation works without labels at all
    scores = evaluate_task(task, ["zero-shot", "lpp"])
    assert scores["lpp"].shape == (220, 14)
