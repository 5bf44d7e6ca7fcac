"""`python -m cascade bench` on the shared real-feature tasks: reproduction and "beat them" margins.

Authors' numbers (top-1 %, benchmarks/realbench/README.md): a reproduction must land within 0.3 points.
"""
import json
import re
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


@pytest.mark.parametrize("name", NAMES)
def test_cascade_beats_every_single_stage(bench, name):
    res = bench[name]["results"]
    best = max(res[r]["top1"] for r in ("zero-shot", "inmap", "inmap-nosinkhorn", "lpp"))
    assert res["cascade"]["top1"] > best, (name, res)


@pytest.mark.parametrize("name", NAMES)
def test_cascade_top5_never_below_zero_shot(bench, name):
    """Routing, pooling and refinement must not cost top-5 against plain CLIP."""
    res = bench[name]["results"]
    assert res["cascade"]["top5"] >= res["zero-shot"]["top5"], (name, res)


@pytest.mark.parametrize("name", ["caltech101-open", "food101-open"])
def test_cascade_beats_readme_bars_on_open_tasks(bench, name):
    res = bench[name]["results"]
    assert res["cascade"]["top1"] > SEED_CASCADE[name]            # the seeds' cascade (README)
    assert res["cascade"]["top1"] > AUTHORS[name]["zero-shot"]    # and zero-shot CLIP
    assert res["cascade"]["top1"] > res["seed-cascade"]["top1"]   # and our run of the seed rule


IMAGENET = ["imagenet_dev", "imagenet_dev-open"]


@pytest.fixture(scope="module")
def bench_imagenet():
    cmd = [sys.executable, "-m", "cascade", "bench", "--json", "--methods",
           "zero-shot,inmap,inmap-nosinkhorn,lpp,cascade", *[str(TASKS / f"{n}.npz") for n in IMAGENET]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {rec["task"]: rec["results"] for rec in (json.loads(line) for line in out.splitlines() if line.strip())}


def test_imagenet_no_regret(bench_imagenet):
    """131 classes, balanced queries: the balanced final distribution (the refinement refitted on the balanced
    pool) keeps the cascade above zero-shot, LP++ and InMaP without Sinkhorn by a wide margin, at least level with
    InMaP (Sinkhorn) on the open task within one query and more than 2 points above it on the closed one. The
    issue's goal (1.0 above InMaP on both) is reached on the closed task only: docs/accuracy.md. "Within one
    query": InMaP's 2,000 float32 steps land on 85.11 with OpenBLAS's AVX2 kernels and on 85.50 with its AVX-512
    ones, where the cascade (85.11 on both) is one query of 262 below it (docs/limitations.md)."""
    for name in IMAGENET:
        res = bench_imagenet[name]
        casc = res["cascade"]["top1"]
        assert casc > max(res[m]["top1"] for m in ("zero-shot", "inmap-nosinkhorn", "lpp")) + 4.0, (name, res)
        assert casc >= res["inmap"]["top1"] - 100.0 / 262 - 0.01, (name, res)
        assert res["cascade"]["top5"] > res["inmap"]["top5"], (name, res)
    assert bench_imagenet["imagenet_dev"]["cascade"]["top1"] > bench_imagenet["imagenet_dev"]["inmap"]["top1"] + 2.0


def test_balancing_is_kept_where_held_out_rows_gain():
    """The final distribution is balanced to the estimated class marginal on imagenet_dev (balanced queries:
    held-out rows gain > 0.1 nats per row from it, and the queries about 3 points) but not on Food-101 or
    Caltech-101, whose query counts are not those of the marginal."""
    from cascade.bench import load_task
    from cascade.config import default_cascade
    from cascade.router import Cascade

    def run(name, **kw):
        t = load_task(TASKS / f"{name}.npz")
        y = t.pop("query_y")
        m = default_cascade().set_params(**kw).fit({"b": t["support_x"]}, t["support_y"], {"b": t["text_x"]},
                                                   t["n_seen"], val=({"b": t["val_x"]}, t["val_y"]))
        res = m.predict({"b": t["query_x"]})
        return 100 * np.mean(res.scores.argmax(1) == y), res.details

    acc, det = run("imagenet_dev")
    assert det["balanced"] and det["balance_gain"] > 0.1
    acc_none, det_none = run("imagenet_dev", balance="none")
    assert "balanced" not in det_none and acc > acc_none + 2.0
    # the refinement refitted on the balanced pool and anchored by it: 2 points above balancing its output alone
    acc_plain, det_plain = run("imagenet_dev", balance_refit=False)
    assert det["balance_refit"] and not det_plain["balance_refit"] and det_plain["balanced"]
    assert acc > acc_plain + 2.0, (acc, acc_plain)
    # the validation rows join that refit on the closed task (they cover every class), not on the open one
    acc_noval, det_noval = run("imagenet_dev", refit_with_val=False)
    assert det["refit_with_val"] and not det_noval["refit_with_val"] and acc > acc_noval, (acc, acc_noval)
    _, det_open = run("imagenet_dev-open")
    assert det_open["balance_refit"] and det_open["refit_with_val"] is False
    for name in ("food101", "caltech101-open"):
        _, det = run(name)
        assert not det["balanced"] and not det["balance_refit"] and det["balance_gain"] < 0.1, (name, det)
        assert not det["balance_few"]                    # 16 and 25 queries per class: no count fallback
    with pytest.raises(ValueError, match="balance"):
        Cascade(balance="sometimes").fit({"b": np.eye(2, 4, dtype=np.float32)}, [0, 1],
                                         {"b": np.eye(2, 4, dtype=np.float32)}, 2)
    with pytest.raises(ValueError, match="balance_refit"):
        Cascade(balance_refit="yes").fit({"b": np.eye(2, 4, dtype=np.float32)}, [0, 1],
                                         {"b": np.eye(2, 4, dtype=np.float32)}, 2)


def test_few_queries_per_class_a_declined_check_balances_by_the_counts():
    """imagenet_dev and its open variant with 80 % of their queries (1.6 a class, no longer balanced: the
    generalisation suite's redrawn tasks). InMaP's proxies, fitted on so few queries a class, score held-out rows
    more than 10 points worse than the queries they were fitted on, so held-out rows underrate what the queries
    gain from balancing: the check declines (gain < 0.1 nats). With fewer than ``balance_few_per_class`` (5)
    queries a class the count rule then balances part of the way, without the refit: more than 2 points above the
    unbalanced scores (``balance_few_per_class=0``, the previous behaviour) on both tasks."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import redraw

    from cascade.bench import load_task
    from cascade.config import default_cascade
    from cascade.stages import InMaP

    for name in IMAGENET:
        t = redraw(load_task(TASKS / f"{name}.npz"), 1000, 0.8)
        y = t.pop("query_y")
        assert len(y) / t["text_x"].shape[0] < 2.0
        im = InMaP(n_iter=50).fit(t["query_x"], text=t["text_x"])
        on_queries = np.mean(im.decision_function(t["query_x"]).argmax(1) == y)
        on_val = np.mean(im.decision_function(t["val_x"]).argmax(1) == t["val_y"])
        assert on_queries > on_val + 0.10, (name, on_queries, on_val)

        def run(**kw):
            m = default_cascade().set_params(**kw).fit({"b": t["support_x"]}, t["support_y"], {"b": t["text_x"]},
                                                       t["n_seen"], val=({"b": t["val_x"]}, t["val_y"]))
            res = m.predict({"b": t["query_x"]})
            return 100 * np.mean(res.scores.argmax(1) == y), res.details

        acc, det = run()
        assert det["balance_gain"] < 0.1 and det["balance_few"] and det["balanced"], (name, det)
        assert not det["balance_refit"] and "balance_rho" in det
        acc_off, det_off = run(balance_few_per_class=0)
        assert not det_off["balanced"] and not det_off["balance_few"]
        assert acc > acc_off + 2.0, (name, acc, acc_off)
    with pytest.raises(ValueError, match="balance_few_per_class"):
        default_cascade().set_params(balance_few_per_class=-1).fit(
            {"b": np.eye(2, 4, dtype=np.float32)}, [0, 1], {"b": np.eye(2, 4, dtype=np.float32)}, 2)


def test_without_validation_rows_balancing_follows_the_count_noise():
    """Without validation rows (the support rows out of fold calibrate the cascade) the held-out check never
    balances imagenet_dev; the count rule balances it fully (its pool's soft counts deviate from the uniform
    marginal less than their own noise: rho = 0), about 7 points above the check. On Food-101 and Caltech-101,
    whose query counts deviate from the marginal by more than the confident pool's noise, it balances only part of
    the way (rho > 0) and is not below the check there."""
    from cascade.bench import load_task
    from cascade.config import default_cascade

    def run(name, **kw):
        t = load_task(TASKS / f"{name}.npz")
        y = t.pop("query_y")
        m = default_cascade().set_params(**kw).fit({"b": t["support_x"]}, t["support_y"], {"b": t["text_x"]},
                                                   t["n_seen"])
        res = m.predict({"b": t["query_x"]})
        return 100 * np.mean(res.scores.argmax(1) == y), res.details

    acc, det = run("imagenet_dev")
    assert det["balance_rule"] == "counts" and det["balanced"] and det["balance_refit"]
    assert det["balance_rho"] == 0.0 and np.allclose(det["balance_target"], det["prior"])
    acc_check, det_check = run("imagenet_dev", balance_without_val="check")
    assert det_check["balance_rule"] == "check" and not det_check["balanced"]
    assert acc > acc_check + 4.0, (acc, acc_check)
    for name in ("food101", "caltech101"):
        acc, det = run(name)
        assert det["balanced"] and det["balance_rho"] > 0.0, (name, det["balance_rho"])
        acc_check, _ = run(name, balance_without_val="check")
        assert acc >= acc_check, (name, acc, acc_check)
    with pytest.raises(ValueError, match="balance_without_val"):
        default_cascade().set_params(balance_without_val="always").fit(
            {"b": np.eye(2, 4, dtype=np.float32)}, [0, 1], {"b": np.eye(2, 4, dtype=np.float32)}, 2)


def test_table_output_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cascade", "bench", "--methods", "zero-shot,lpp",
                          str(TASKS / "food101.npz")], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "food101" in out.stdout and "zero-shot" in out.stdout and "94.09" in out.stdout
    bad = tmp_path / "bad.npz"
    np.savez(bad, support_x=np.zeros((2, 3), np.float32))
    r = subprocess.run([sys.executable, "-m", "cascade", "bench", str(bad)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "missing arrays" in r.stderr


def test_task_files_are_checked_before_any_method_runs(tmp_path):
    """Each fault of a task file is one line naming the file and its key (query_y included, which only the scoring
    reads: wrong labels would otherwise be scored silently as misses), and every file given is checked before the
    first is run."""
    from cascade.bench import load_task

    ok = load_task(TASKS / "food101.npz")
    base = {k: np.asarray(v) for k, v in ok.items()}
    cases = {
        "query_y": ({"query_y": base["query_y"].astype(str)}, "query_y must hold integer class indices, got dtype <U"),
        "query_y range": ({"query_y": np.r_[base["query_y"][:-1], 99]}, "query_y must lie in 0..13, got 0..99"),
        "query_y rows": ({"query_y": base["query_y"][:-1]}, "query_y must hold one label per row of query_x (220)"),
        "support_y": ({"support_y": base["support_y"].astype(float)}, "support_y must hold integer class indices"),
        "n_seen": ({"n_seen": np.array([3, 4])}, "n_seen must be one integer in 1..14, got [3, 4]"),
        "width": ({"support_x": base["support_x"][:, :256]}, "support_x must be [rows, 512] (text_x's width)"),
        "nan": ({"query_x": np.where(np.arange(512) == 0, np.nan, base["query_x"])}, "query_x: 220 row(s) contain NaN"),
        "val": ({"val_y": None}, "val_x without val_y; give both or neither"),
    }
    np.savez(tmp_path / "no_val_rows.npz", **{**base, "val_x": base["val_x"][:0], "val_y": np.zeros(0)})
    assert load_task(tmp_path / "no_val_rows.npz")["val_y"].size == 0     # empty float labels: as no rows
    for name, (change, expected) in cases.items():
        arrays = {k: v for k, v in {**base, **change}.items() if v is not None}
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=re.escape(f"{path}: {expected}")):
            load_task(path)
    r = subprocess.run([sys.executable, "-m", "cascade", "bench", "--methods", "zero-shot", str(TASKS / "food101.npz"),
                        str(tmp_path / "val.npz")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "val.npz: val_x without val_y" in r.stderr   # nothing run first
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub/food101.npz", **base)
    r = subprocess.run([sys.executable, "-m", "cascade", "bench", "--methods", "zero-shot", str(TASKS / "food101.npz"),
                        str(tmp_path / "sub/food101.npz")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "tasks named twice (a task is named by its file name): food101:" in r.stderr
    # a task file given after an option is read too (positionals intermixed with options)
    r = subprocess.run([sys.executable, "-m", "cascade", "bench", str(TASKS / "food101.npz"), "--json", "--methods",
                        "zero-shot", str(tmp_path / "sub/food101.npz")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "tasks named twice" in r.stderr                  # both files reached the command
    r = subprocess.run([sys.executable, "-m", "cascade", "bench", "--methods", ",", str(TASKS / "food101.npz")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--methods: no method named" in r.stderr


def test_methods_never_see_query_labels():
    from cascade.bench import evaluate_task, load_task
    task = load_task(TASKS / "food101-open.npz")
    task.pop("query_y")                                     # evaluation works without labels at all
    scores = evaluate_task(task, ["zero-shot", "lpp"])
    assert scores["lpp"].shape == (220, 14)


def test_generalisation_benchmark_small_suite():
    """benchmarks/generalisation.py on a small suite (the four tasks and the two merged ones, closed and open, each
    as given, redrawn once and with noisy text): on average the cascade beats the best single method and the seeds' cascade in
    every group, and it beats both on most tasks."""
    out = subprocess.run([sys.executable, "benchmarks/generalisation.py", *[str(TASKS / f"{n}.npz") for n in NAMES],
                          "--redraws", "1", "--noise", "1.0", "--families", "0", "--by-task", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    tasks, summary = records[:-1], records[-1]["summary"]
    by_task = records[-1]["by_task"]             # one task per source task and level here
    assert [(b["group"], b["tasks"]) for b in by_task] == [(t["group"], 1) for t in tasks]
    for b, t in zip(by_task, tasks):
        assert b["mean_top1"]["cascade"] == pytest.approx(t["top1"]["cascade"], abs=0.01)
        best = max(t["top1"][m] for m in ("zero-shot", "inmap", "inmap-nosinkhorn", "lpp"))
        assert b["cascade_minus_best_single"] == pytest.approx(t["top1"]["cascade"] - best, abs=0.01)
    assert len(tasks) == 18 and {t["group"] for t in tasks} == {"given", "redrawn", "noisy text"}
    for t in tasks:
        assert set(t["top1"]) >= {"zero-shot", "inmap", "inmap-nosinkhorn", "lpp", "seed-cascade", "cascade"}
    for group, s in summary.items():
        assert s["cascade_minus_best_single"] > 0 and s["cascade_minus_seed_cascade"] > 0, (group, s)
    assert sum(s["cascade_beats_best_single"] for s in summary.values()) >= 14
    assert sum(s["cascade_beats_seed_cascade"] for s in summary.values()) >= 16
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import family
    assert [family(n) for n in ("food101", "food101@3", "food101~1#0", "food101-open^0.5#2", "merged^0.8")] == [
        "food101", "food101", "food101~1", "food101-open^0.5", "merged^0.8"]


def test_generalisation_compare_pairs_the_default_with_the_change():
    """--compare: per task the default cascade and the --set one on the same task, and per group their paired
    difference; noisy-text tasks are drawn --noise-seeds times. The default row is the bench's cascade row."""
    cmd = [sys.executable, "benchmarks/generalisation.py", str(TASKS / "food101.npz"), str(TASKS / "caltech101.npz"),
           "--redraws", "1", "--noise", "1.0", "--noise-seeds", "2", "--no-merge", "--compare", "--set", 'stages.cascade.refine=""',
           "--by-task"]
    out = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    tasks, last = records[:-1], records[-1]
    assert [t["task"] for t in tasks] == ["food101", "caltech101", "food101@0", "caltech101@0", "food101~1#0",
                                          "food101~1#1", "caltech101~1#0", "caltech101~1#1"]
    assert last["change"] == 'stages.cascade.refine=""'
    from cascade.bench import evaluate_task, load_task
    from cascade.metrics import top1_top5
    task = load_task(TASKS / "food101.npz")
    labels = task.pop("query_y")
    assert tasks[0]["default"] == pytest.approx(top1_top5(evaluate_task(task, ("cascade",))["cascade"], labels)["top1"])
    for group, s in last["summary"].items():
        d = [t["changed"] - t["default"] for t in tasks if t["group"] == group]
        assert s["tasks"] == len(d) and s["diff"] == pytest.approx(np.mean(d), abs=1e-3)
        assert s["wins"] == sum(x > 0 for x in d) and s["losses"] == sum(x < 0 for x in d)
    # --by-task: the same paired summary per source task and level (the two noisy draws of a task together)
    assert [(b["group"], b["task"], b["tasks"]) for b in last["by_task"]] == [
        ("given", "food101", 1), ("given", "caltech101", 1), ("redrawn", "food101", 1), ("redrawn", "caltech101", 1),
        ("noisy text", "food101~1", 2), ("noisy text", "caltech101~1", 2)]
    noisy_food = last["by_task"][4]
    assert noisy_food["default"] == pytest.approx((tasks[4]["default"] + tasks[5]["default"]) / 2, abs=0.01)
    assert noisy_food["diff"] == pytest.approx(np.mean([tasks[i]["changed"] - tasks[i]["default"] for i in (4, 5)]),
                                               abs=1e-3)
    # the two noisy draws of a task differ (other redraw, other noise)
    assert tasks[4]["default"] != tasks[5]["default"] or tasks[6]["default"] != tasks[7]["default"]
    bad = subprocess.run([sys.executable, "benchmarks/generalisation.py", "--compare"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--compare needs a change" in bad.stderr


def test_generalisation_against_pairs_an_earlier_run(tmp_path):
    """--methods cascade --json keeps one row; --against pairs this run's cascade (with any --set) with that file's,
    task by task, as --compare does, and names a task the file lacks."""
    base = [sys.executable, "benchmarks/generalisation.py", str(TASKS / "food101.npz"), "--redraws", "1", "--noise", "",
            "--families", "0", "--no-merge"]
    out = subprocess.run(base + ["--json", "--methods", "cascade"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [set(r["top1"]) for r in records[:-1]] == [{"cascade"}, {"cascade"}]
    assert records[-1]["summary"]["given"]["mean_top1"]["cascade"] == pytest.approx(records[0]["top1"]["cascade"],
                                                                                   abs=0.01)
    before = tmp_path / "before.jsonl"
    before.write_text(out)
    out = subprocess.run(base + ["--against", str(before), "--set", 'stages.cascade.refine=""', "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    paired = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(p["task"], p["default"]) for p in paired[:-1]] == [(r["task"], r["top1"]["cascade"])
                                                                 for r in records[:-1]]
    assert paired[-1]["change"] == 'this run with stages.cascade.refine=""'
    more = subprocess.run(base[:3] + ["--redraws", "2"] + base[5:] + ["--against", str(before)], cwd=ROOT,
                          capture_output=True, text=True)
    assert more.returncode != 0 and "no record of 1 task(s)" in more.stderr and "redrawn/food101@1" in more.stderr
    bad = subprocess.run(base + ["--methods", "cascade,nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--methods" in bad.stderr


def test_few_queries_benchmark_scores_each_subset_on_its_own():
    """benchmarks/few_queries.py: per task and size, the mean over the draws of each method scored on that query
    subset alone (the same subsets for every method); a single image at a time is classified about as well as
    zero-shot CLIP does it, not pulled into the unseen classes (it was 40 % against zero-shot's 90 % before the
    GDA's mean prior)."""
    cmd = [sys.executable, "benchmarks/few_queries.py", str(TASKS / "caltech101-open.npz"), "--sizes", "1,3",
           "--draws", "10", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    rows, last = records[:-1], records[-1]
    assert [(r["task"], r["queries"], r["draws"]) for r in rows] == [("caltech101-open", 1, 10),
                                                                      ("caltech101-open", 3, 10)]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from few_queries import subsets

    from cascade.bench import evaluate_task, load_task
    from cascade.metrics import top1_top5
    task = load_task(TASKS / "caltech101-open.npz")
    acc = []
    for idx in subsets(len(task["query_y"]), 3, 10):
        assert len(set(idx.tolist())) == 3
        sub = dict(task, query_x=task["query_x"][idx])
        labels = sub.pop("query_y")[idx]
        acc.append(top1_top5(evaluate_task(sub, ("cascade",))["cascade"], labels)["top1"])
    assert rows[1]["top1"]["cascade"] == pytest.approx(np.mean(acc), abs=0.01)
    assert last["summary"]["1"] == rows[0]["top1"]
    assert rows[0]["top1"]["cascade"] >= rows[0]["top1"]["zero-shot"] - 10 and rows[0]["top1"]["cascade"] >= 80
    bad = subprocess.run([sys.executable, "benchmarks/few_queries.py", "--sizes", "0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
    missing = subprocess.run([sys.executable, "benchmarks/few_queries.py", "no/such/task.npz"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no/such/task.npz: no such" in missing.stderr


def test_generalisation_task_transforms():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import harder_images, merge, noisy_text, redraw

    from cascade.bench import load_task
    a, b = load_task(TASKS / "food101.npz"), load_task(TASKS / "caltech101.npz")
    m = merge([a, b], ["food", "caltech"])
    assert m["n_seen"] == m["text_x"].shape[0] == 54 and m["query_y"].max() == 53
    np.testing.assert_array_equal(m["query_x"][:220], a["query_x"])
    assert m["class_domain"].tolist() == ["food"] * 14 + ["caltech"] * 40
    # open tasks: every task's seen classes first, then every task's unseen ones, each row relabelled to match
    ao, bo = load_task(TASKS / "food101-open.npz"), load_task(TASKS / "caltech101-open.npz")
    mo = merge([ao, bo], ["food", "caltech"])
    Sa, Sb = ao["n_seen"], bo["n_seen"]
    assert mo["n_seen"] == Sa + Sb and mo["text_x"].shape[0] == 54
    assert mo["class_domain"].tolist() == (["food"] * Sa + ["caltech"] * Sb + ["food"] * (14 - Sa)
                                           + ["caltech"] * (40 - Sb))
    assert mo["support_y"].max() < mo["n_seen"] and mo["val_y"].max() < mo["n_seen"]
    for part in ("support", "val", "query"):
        np.testing.assert_array_equal(np.sum(mo[f"{part}_x"] * mo["text_x"][mo[f"{part}_y"]], 1),
                                      np.concatenate([np.sum(t[f"{part}_x"] * t["text_x"][t[f"{part}_y"]], 1)
                                                      for t in (ao, bo)]))
    r = redraw(a, 1, 0.8)
    assert np.bincount(r["support_y"]).tolist() == np.bincount(a["support_y"]).tolist()
    assert len(r["query_y"]) == 176 and len(r["val_y"]) == len(a["val_y"])
    pool = {x.tobytes() for x in np.concatenate([a["support_x"], a["val_x"]])}
    assert all(x.tobytes() in pool for x in r["support_x"]) and not np.array_equal(r["support_x"], a["support_x"])
    n = noisy_text(a, 1.0, 7)
    np.testing.assert_allclose(np.linalg.norm(n["text_x"], axis=1), 1.0, atol=1e-5)
    assert 0.5 < np.mean(np.sum(n["text_x"] * a["text_x"], 1)) < 0.9
    h = harder_images(a, 0.8)
    for k in ("support", "val", "query"):
        np.testing.assert_allclose(np.linalg.norm(h[f"{k}_x"], axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(h[f"{k}_y"], a[f"{k}_y"])
    np.testing.assert_allclose(harder_images(a, 0.0)["query_x"], a["query_x"], atol=1e-6)
    np.testing.assert_array_equal(h["text_x"], a["text_x"])

    def zero_shot(t):
        return np.mean((t["query_x"] @ t["text_x"].T).argmax(1) == t["query_y"])
    assert zero_shot(h) < zero_shot(a) - 0.3            # the classes overlap: about 94 % -> about 40 %



def test_generalisation_topic_domains():
    """The ``topics`` group: one image source split into domains by clustering its class names. Every class gets one
    of K topic domains, semantically close classes share one, the rows are untouched, a task that has domains
    already is left out, and the same seed gives the same split."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import build_suite, topic_domains

    from cascade.bench import load_task
    a = load_task(TASKS / "caltech101.npz")
    t = topic_domains(a, 3, 11)
    names = t["class_domain"]
    assert names.shape == (40,) and set(names.tolist()) == {"topic0", "topic1", "topic2"}
    for k in ("support", "val", "query"):
        np.testing.assert_array_equal(t[f"{k}_x"], a[f"{k}_x"])
    np.testing.assert_array_equal(topic_domains(a, 3, 11)["class_domain"], names)
    sim = a["text_x"] @ a["text_x"].T
    same = names[:, None] == names[None, :]
    off = ~np.eye(40, dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean()       # a topic holds classes whose names are alike
    with pytest.raises(ValueError, match="2..40"):
        topic_domains(a, 41, 0)
    paths = [str(TASKS / "food101.npz"), str(TASKS / "caltech101.npz")]
    suite = build_suite(paths, 0, [], 0.8, True, 2, topics=(2,))
    topics = [(n, task) for g, n, task in suite if g == "topics"]
    assert [n for n, _ in topics] == ["food101%2#0", "food101%2#1", "caltech101%2#0", "caltech101%2#1"]
    assert len(topics[1][1]["query_y"]) == 176 and "class_domain" in topics[1][1]   # #1: a redraw, split too

def test_generalisation_class_families():
    """The class-subset families drawn from imagenet_dev: every draw takes other classes and deals each class's
    rows (support, validation and query together) again into the source's counts (4 / 1 / 2); the open ones keep
    support and validation rows for their seen classes only; nothing is invented."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import build_suite, class_families, class_family

    from cascade.bench import load_task
    src = load_task(TASKS / "imagenet_dev.npz")
    pool = {x.tobytes(): int(c) for k in ("support", "val", "query") for x, c in zip(src[f"{k}_x"], src[f"{k}_y"])}
    text = {x.tobytes(): c for c, x in enumerate(src["text_x"])}
    a, b = class_family(src, 40, 1), class_family(src, 40, 2)
    assert a["text_x"].shape[0] == a["n_seen"] == 40
    assert {x.tobytes() for x in a["text_x"]} != {x.tobytes() for x in b["text_x"]}
    for k, per_class in (("support", 4), ("val", 1), ("query", 2)):
        assert np.bincount(a[f"{k}_y"], minlength=40).tolist() == [per_class] * 40
        # every row keeps its own class: the class its text embedding came from
        src_class = [text[t.tobytes()] for t in a["text_x"]]
        assert all(pool[x.tobytes()] == src_class[c] for x, c in zip(a[f"{k}_x"], a[f"{k}_y"]))
    rows = [x.tobytes() for k in ("support", "val", "query") for x in a[f"{k}_x"]]
    assert len(set(rows)) == len(rows) == 40 * 7                    # each row dealt once
    full = class_family(src, 131, 5)
    assert not np.array_equal(np.sort(full["support_x"], axis=0), np.sort(src["support_x"], axis=0))
    o = class_family(src, 80, 3, n_seen=53)
    assert o["n_seen"] == 53 and o["text_x"].shape[0] == 80
    assert o["support_y"].max() == 52 and o["val_y"].max() == 52 and o["query_y"].max() == 79
    assert np.bincount(o["query_y"], minlength=80).tolist() == [2] * 80
    with pytest.raises(ValueError, match="closed task"):
        class_family(load_task(TASKS / "imagenet_dev-open.npz"), 40, 0)
    fams = class_families([TASKS / "imagenet_dev.npz", TASKS / "food101.npz"], [40, 131], 2)
    assert [(g, n) for g, n, _ in fams] == [
        ("classes", "imagenet_dev/40@0"), ("classes", "imagenet_dev/40@1"), ("classes", "imagenet_dev/131@0"),
        ("classes", "imagenet_dev/131@1"), ("classes open", "imagenet_dev/40o@0"),
        ("classes open", "imagenet_dev/40o@1"), ("classes open", "imagenet_dev/131o@0"),
        ("classes open", "imagenet_dev/131o@1")]                  # food101 (14 classes) is too small
    assert [t["n_seen"] for _, _, t in fams[4:]] == [27, 27, 87, 87]
    suite = build_suite([TASKS / "imagenet_dev.npz"], 0, [], 1.0, False, family_sizes=[40], family_draws=1)
    assert [g for g, _, _ in suite] == ["given", "classes", "classes open"]


def test_harder_images_the_cascade_stays_above_zero_shot():
    """Food-101 redrawn with its classes pulled 80 % together (`generalisation.py --harder 0.8`): zero-shot gets
    about 40 %. LP++ run for its 100 epochs overfits (22 %) and the GDA refinement, fitted to mostly wrong soft
    labels, made it worse still: the previous default (last epoch, refinement always kept) scored 29.5 %. With
    LP++'s auto selection and the refinement check the cascade is back above zero-shot."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import cascade_kwargs, harder_images, redraw

    from cascade.bench import evaluate_task, load_task
    task = harder_images(redraw(load_task(TASKS / "food101.npz"), 500, 0.8), 0.8)
    y = task.pop("query_y")
    top1 = {m: np.mean(s.argmax(1) == y) for m, s in evaluate_task(task, ("zero-shot", "cascade")).items()}
    before = evaluate_task(task, ("cascade",), cascade_kwargs(["stages.lpp.select=last",
                                                              "stages.cascade.refine_check=false",
                                                              "stages.cascade.rebalance=false",
                                                              "stages.cascade.balance=none"]))
    assert top1["cascade"] > top1["zero-shot"] + 0.03 and top1["zero-shot"] < 0.45
    assert np.mean(before["cascade"].argmax(1) == y) < top1["zero-shot"] - 0.05


def _default_cascade_on(task: dict, val: bool = True, **params):
    """(top-1, details) of the default cascade with ``params`` set, fitted on ``task`` (with its validation rows
    unless ``val`` is False) and scored on its queries."""
    from cascade.bench import BACKBONE
    from cascade.config import default_cascade
    m = default_cascade().set_params(**params)
    m.fit({BACKBONE: task["support_x"]}, task["support_y"], {BACKBONE: task["text_x"]}, task["n_seen"],
          val=({BACKBONE: task["val_x"]}, task["val_y"]) if val else None, domains=task.get("class_domain"))
    res = m.predict({BACKBONE: task["query_x"]})
    return np.mean(res.scores.argmax(1) == task["query_y"]), res.details


def test_refinement_check_drops_a_refinement_one_standard_error_worse():
    """Caltech-101 redrawn with its classes pulled 50 % together: the refinement's held-out gain lies between one
    and two standard errors below zero, and dropping it, as the default check (1 standard error) now does, gains
    over a point of top-1; the previous threshold (2) kept it (docs/accuracy.md, "The refinement check")."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import harder_images, redraw

    from cascade.bench import load_task
    from cascade.config import default_cascade
    task = harder_images(redraw(load_task(TASKS / "caltech101.npz"), 500, 0.8), 0.5)
    top1, details = {}, {}
    for check in (1.0, 2.0):
        top1[check], details[check] = _default_cascade_on(task, refine_check=check)
    d = details[1.0]
    assert -2 * d["refine_gain_se"] < d["refine_gain"] < -d["refine_gain_se"], d
    assert d["refine_dropped"] is True and details[2.0]["refine_dropped"] is False
    assert default_cascade().refine_check == 1.0
    assert top1[1.0] > top1[2.0] + 0.01, top1


def test_refit_check_drops_a_balanced_refit_that_costs_points():
    """imagenet_dev-open redrawn with its classes pulled 30 % together (`generalisation.py --harder 0.3`): the
    final distribution is balanced, and the refinement refitted on the balanced pool costs about 5 points against
    the balanced pool alone. Its check (the validation rows in sample, as the queries) finds it more than 2
    standard errors worse and drops it (docs/accuracy.md). Without validation rows there is no check."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import harder_images, redraw

    from cascade.bench import load_task
    from cascade.config import default_cascade
    task = harder_images(redraw(load_task(TASKS / "imagenet_dev-open.npz"), 500, 0.8), 0.3)
    top1, details = {}, {}
    for check in (2.0, False):
        top1[check], details[check] = _default_cascade_on(task, refit_check=check)
    d = details[2.0]
    assert d["balanced"] and d["refit_gain"] < -2 * d["refit_gain_se"], d
    assert d["refit_dropped"] is True and d["balance_refit"] is False and d["refine_temperature"] is None
    assert details[False]["balance_refit"] is True and "refit_gain" not in details[False]
    assert default_cascade().refit_check == 2.0
    assert top1[2.0] > top1[False] + 0.02, top1
    d = _default_cascade_on(task, val=False)[1]
    assert d["balanced"] and d["balance_refit"] and "refit_gain" not in d, d


def test_refit_check_keeps_the_refit_on_the_given_imagenet_tasks():
    """On the two given ImageNet tasks the balanced refit is what lifts the cascade above InMaP: its check keeps it
    (gains within two standard errors of zero or positive)."""
    from cascade.bench import load_task
    for name in ("imagenet_dev", "imagenet_dev-open"):
        d = _default_cascade_on(load_task(TASKS / f"{name}.npz"))[1]
        assert d["balance_refit"] and not d["refit_dropped"], (name, d)
        assert d["refit_gain"] > -2 * d["refit_gain_se"], (name, d)


def test_harder_balanced_tasks_the_rebalanced_zero_shot_expert_carries_the_balance():
    """Food-101 (balanced) redrawn with its classes pulled 80 % together: InMaP with Sinkhorn gets about 49-52 %
    where zero-shot gets 40 %, but its proxies, fitted on the queries, score the validation rows poorly, so the pool
    gave it no weight and the cascade stayed 5-7 points below it. Zero-shot rebalanced on the queries scores the
    validation rows as it scores the queries; with it in the pool the cascade gains over 3 points on these draws
    and is within 2 of InMaP (docs/stages.md, "Per source task")."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import cascade_kwargs, harder_images, redraw

    from cascade.bench import evaluate_task, load_task
    for seed in (500, 502):
        task = harder_images(redraw(load_task(TASKS / "food101.npz"), seed, 0.8), 0.8)
        y = task.pop("query_y")
        top1 = {m: np.mean(s.argmax(1) == y) for m, s in evaluate_task(task, ("inmap", "cascade")).items()}
        off = np.mean(evaluate_task(task, ("cascade",), cascade_kwargs(["stages.cascade.rebalance=false"]))["cascade"].argmax(1) == y)
        assert top1["cascade"] > off + 0.03 and top1["cascade"] > top1["inmap"] - 0.02, (seed, top1, off)


def test_few_queries_open_task_routing_follows_the_trusted_experts():
    """Caltech-101-open redrawn with 10 % of its queries (101): InMaP over so few queries drifts (about 75 %
    top-1), so it must not decide which queries leave for unseen classes. The cascade routes seen/unseen right
    on at least 96 % of the queries of every redraw and is on average within a point of zero-shot CLIP (with
    InMaP alone deciding the split it routed 89-99 % right and fell 5.7 points below zero-shot on average)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import redraw

    from cascade.bench import evaluate_task, load_task
    base = load_task(TASKS / "caltech101-open.npz")
    S = base["n_seen"]
    top1 = {"zero-shot": [], "cascade": []}
    for r in range(5):
        task = redraw(base, 1000 + r, 0.1)
        y = task.pop("query_y")
        scores = evaluate_task(task, ["zero-shot", "cascade"])
        pred = scores["cascade"].argmax(1)
        assert len(y) == 101 and np.mean((pred >= S) == (y >= S)) >= 0.96, r
        for m in top1:
            top1[m].append(np.mean(scores[m].argmax(1) == y) * 100)
    assert np.mean(top1["cascade"]) > np.mean(top1["zero-shot"]) - 1.0, top1


def test_generalisation_without_validation_rows():
    """--no-val: no method sees validation rows; the cascade, calibrated on its support rows out of fold, stays
    ahead of every single method when the class names are weak (noisy text)."""
    out = subprocess.run([sys.executable, "benchmarks/generalisation.py", str(TASKS / "caltech101.npz"),
                          str(TASKS / "food101.npz"), "--redraws", "0", "--noise", "1.0", "--no-merge", "--no-val",
                          "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    tasks = records[:-1]
    assert [t["group"] for t in tasks] == ["given", "given", "noisy text", "noisy text"]
    for t in tasks[2:]:
        r = t["top1"]
        assert r["cascade"] > max(r["zero-shot"], r["inmap"], r["inmap-nosinkhorn"], r["lpp"]), t


def test_compare_bench_reports_every_changed_score(tmp_path):
    """benchmarks/compare_bench.py: identical files pass (exit 0); a changed top-1, a changed query count and a
    missing task are each reported (exit 1); --methods restricts the comparison."""
    rec = {"task": "a", "n_query": 10, "results": {"cascade": {"top1": 90.0, "top5": 100.0},
                                                   "lpp": {"top1": 50.0, "top5": 60.0}}}
    before = tmp_path / "before.jsonl"
    before.write_text(json.dumps(rec) + "\n" + json.dumps(dict(rec, task="b")) + "\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "compare_bench.py")]
    same = subprocess.run(script + [str(before), str(before)], capture_output=True, text=True)
    assert same.returncode == 0 and "2 tasks: identical top-1/top-5" in same.stdout
    changed = json.loads(json.dumps(rec))
    changed["results"]["lpp"]["top1"] = 40.0
    changed["n_query"] = 11
    after = tmp_path / "after.jsonl"
    after.write_text(json.dumps(changed) + "\n")
    out = subprocess.run(script + [str(before), str(after)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "a lpp:" in out.stdout and "a: n_query 10 -> 11" in out.stdout and "b: only in before" in out.stdout
    only = subprocess.run(script + [str(before), str(after), "--methods", "cascade"], capture_output=True, text=True)
    assert "a lpp:" not in only.stdout and "a cascade" not in only.stdout and only.returncode == 1


def test_open_errors_breaks_the_errors_down_by_seen_and_unseen_queries():
    """benchmarks/open_errors.py: per open task, InMaP and the cascade after each step scored on all queries, on the
    seen-class and unseen-class queries, and the queries that crossed the seen/unseen boundary; its last step is the
    bench's cascade row. A closed task alone (no --families) is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from open_errors import breakdown

    y = np.array([0, 0, 1, 2, 2, 3])                    # classes 0, 1 seen; 2, 3 unseen
    scores = np.eye(4)[[0, 2, 1, 2, 0, 3]]             # wrong: row 1 (seen -> unseen), row 4 (unseen -> seen)
    np.testing.assert_allclose(breakdown(scores, y, 2), [100 * 4 / 6, 100 * 2 / 3, 100 * 2 / 3, 1, 1])
    out = subprocess.run([sys.executable, "benchmarks/open_errors.py", str(TASKS / "food101-open.npz")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = lines.index("food101-open")
    rows = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in lines[start + 1:start + 6]}
    assert list(rows) == ["inmap", "pool", "refined", "balanced", "cascade"]
    from cascade.bench import evaluate_task, load_task
    from cascade.metrics import top1_top5
    task = load_task(TASKS / "food101-open.npz")
    labels = task.pop("query_y")
    scores = evaluate_task(task, ("inmap", "cascade"))
    for name in ("inmap", "cascade"):
        assert rows[name][0] == pytest.approx(top1_top5(scores[name], labels)["top1"], abs=0.01)
        np.testing.assert_allclose(rows[name], breakdown(scores[name], labels, task["n_seen"]), atol=0.01)
    closed = subprocess.run([sys.executable, "benchmarks/open_errors.py", str(TASKS / "food101.npz")], cwd=ROOT,
                            capture_output=True, text=True)
    assert closed.returncode == 2 and "no open task" in closed.stderr


def test_per_domain_cascades_on_tasks_of_several_domains():
    """The given tasks merged into one of three domains (Caltech-101 + Food-101 + imagenet_dev, 185 classes; and
    their open variants), as the challenge's class list joins four: one cascade over all classes is judged by
    checks that mix the domains (imagenet's queries are balanced, Caltech's are not) and falls below LP++ on the
    closed task. Each query scored again by its domain's own cascade gains over half a point on both and beats
    every single method; a classifier of the image sources, telling each query's domain with the class mass, gains
    over a point more on both (docs/accuracy.md, "Several domains in one task")."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generalisation import merge

    from cascade.bench import evaluate_task, load_task
    names = ("caltech101", "food101", "imagenet_dev")
    for suffix in ("", "-open"):
        task = merge([load_task(TASKS / f"{n}{suffix}.npz") for n in names], names)
        on, d_on = _default_cascade_on(task)
        off, d_off = _default_cascade_on(task, per_domain=False)
        mass, _ = _default_cascade_on(task, domain_classifier=False)
        assert on > mass + 0.01 and mass > off + 0.005, (suffix, on, mass, off)
        labels = task.pop("query_y")
        single = evaluate_task(task, ("zero-shot", "inmap", "lpp"))
        best = max(np.mean(s.argmax(1) == labels) for s in single.values())
        assert on > best, (suffix, on, best)
        verdicts = {e["domain"]: e for e in d_on["domains"]}
        assert all(e["rescored"] for e in verdicts.values()) and "domains" not in d_off
        assert verdicts["imagenet_dev"]["balanced"] and not verdicts["caltech101"]["balanced"], verdicts


def test_domain_accuracy_prints_how_often_a_query_is_given_its_own_domain():
    """benchmarks/domain_accuracy.py on the given merged tasks: the domain classifier times the mass's square root
    (the default) gives more queries their own domain than the mass alone (docs/accuracy.md)."""
    r = subprocess.run([sys.executable, "benchmarks/domain_accuracy.py", "--redraws", "0", "--noise", "", "--harder",
                        "", "--c", "10", "--weights", "0.5"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("2 merged tasks") and lines[1].split()[-4:] == ["mass", "clf", "10", "0.5@10"]
    for kind in ("closed", "open"):
        row = next(line.split() for line in lines if line.startswith("given") and line.split()[1] == kind)
        mass, clf, both = map(float, row[-3:])
        assert both > mass + 1.0 and 80 < mass < 100, row
