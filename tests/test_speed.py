"""Work the cascade does not repeat (docs/accuracy.md, "Speed"): a query set of one block of rows computes each
inductive expert's log-probabilities once per ``predict``; a larger set recomputes them per block where they are
used (the memory-lean path of docs/scale.md); both give the same scores. Independent fits run side by side, each on
one BLAS thread. benchmarks/stages_speed.py reports wall and CPU seconds per step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from cascade.config import default_cascade
from cascade.router import Cascade
from cascade.router.cascade import QueryExperts
from cascade.router.pool import fit_seen_stages
from cascade.router.threads import run_parallel
from cascade.stages import calibration
from cascade.stages.inmap import InMaP
from cascade.stages.lpp import LinearProbePP

REPO = Path(__file__).resolve().parents[1]


def _cascade(n_query=240, c=12, d=24, seed=0):
    """A fitted two-backbone cascade (the last two classes unseen) and its query dict."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d))

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def draw(y):
        return unit(means[y] + 0.9 * rng.normal(size=(len(y), d)))

    rot = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    two = lambda x: {"a": x, "b": np.ascontiguousarray(x @ rot)}  # noqa: E731
    sy, vy = np.repeat(np.arange(c - 2), 4), np.repeat(np.arange(c - 2), 2)
    text = unit(means + 0.5 * rng.normal(size=(c, d)))
    cascade = default_cascade().set_params(transductive=InMaP(n_iter=20))
    cascade.fit(two(draw(sy)), sy, two(text), n_seen=c - 2, val=(two(draw(vy)), vy))
    return cascade, two(draw(rng.integers(0, c, n_query)))


def _count_query_calls(monkeypatch):
    """{method: number of calls on query rows} of the inductive experts during one predict."""
    calls = {"_zero_shot_log_proba": 0, "_seen_log_proba": 0}
    for name in calls:
        original = getattr(Cascade, name)

        def counted(self, feats, *args, _original=original, _name=name, **kwargs):
            if feats is not None and feats is not getattr(self, "val_", None):
                calls[_name] += 1
            return _original(self, feats, *args, **kwargs)

        monkeypatch.setattr(Cascade, name, counted)
    return calls


def test_one_block_computes_each_inductive_expert_once(monkeypatch):
    cascade, query = _cascade()
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 10 ** 9)
    whole_before = cascade.predict(query)                  # the reference, before counting
    calls = _count_query_calls(monkeypatch)
    whole = cascade.predict(query)
    # used by the marginal estimate (twice), the rebalancing biases and the pool: made once
    assert calls == {"_zero_shot_log_proba": 1, "_seen_log_proba": 1}
    assert np.array_equal(whole.scores, whole_before.scores)
    # blocks of 41 rows: recomputed for every block where they are used, never kept for all rows
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 41)
    for k in calls:
        calls[k] = 0
    blocks = cascade.predict(query)
    n_blocks = -(-240 // 41)
    assert calls["_zero_shot_log_proba"] == 4 * n_blocks and calls["_seen_log_proba"] == 2 * n_blocks
    assert np.abs(blocks.scores - whole.scores).max() <= 1e-6 and np.array_equal(blocks.top5, whole.top5)


def test_kept_experts_are_read_only_and_released():
    cascade, query = _cascade(n_query=50)
    feats = query
    xq = cascade._joint(feats)
    experts = QueryExperts(cascade, feats, xq)
    everything = slice(0, 50)
    lp0 = experts.zero_shot(everything)
    assert experts.zero_shot(slice(None)) is lp0                  # the same rows: the kept array
    assert np.array_equal(lp0, cascade._zero_shot_log_proba(xq))
    with pytest.raises(ValueError, match="read-only"):
        lp0[0, 0] = 0.0
    seen = experts.seen(everything)
    assert [a is b for a, b in zip(experts.seen(everything), seen)] == [True] * len(seen)
    part = experts.zero_shot(slice(0, 20))                         # part of the rows: computed, not kept
    assert part is not lp0 and part.flags.writeable and np.array_equal(part, lp0[:20])
    experts.release()
    again = experts.zero_shot(everything)
    assert again is not lp0 and np.array_equal(again, lp0)


def test_stages_speed_prints_wall_and_cpu_per_step_and_a_profile():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/stages_speed.py"), "--queries", "150", "--classes", "10",
                        "--dim", "16", "--val-per-class", "2", "--profile", "4", "--repeat", "1", "--domains", "1"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.strip().startswith("CPU: ") for line in lines)              # the flags the figures ran on
    products = next(line for line in lines if line.strip().startswith("float32 products: "))
    assert products.count("GFLOPS") == 2 and "5000x1024x400" in products     # the BLAS floor, InMaP's shape
    exp = next(line for line in lines if line.strip().startswith("float32 exp: "))
    assert "5000x400, " in exp and float(exp.split(",")[1].split()[0]) > 0 and "(median)" in exp   # ns per element
    timed = {line.split("  ")[1].strip(): line for line in lines if line.rstrip().endswith("s)") and "(cpu" in line}
    fit, predict, total = (timed["Cascade.fit (zero-shot + LP++ x backbones, calibration)"],
                           timed["Cascade.predict (prior, InMaP joint, pools, GDA, routing)"],
                           timed["TOTAL default cascade (fit + predict, all stages)"])
    wall = [float(line.split("(cpu")[0].split()[-2]) for line in (fit, predict, total)]
    cpu = [float(line.split("(cpu")[1].split()[0]) for line in (fit, predict, total)]
    assert abs(wall[0] + wall[1] - wall[2]) <= 0.011 and abs(cpu[0] + cpu[1] - cpu[2]) <= 0.011
    assert "Cascade.predict again (1 of 1)" in timed
    assert "most CPU seconds" in r.stdout and "cascade.py" in r.stdout and "(predict)" in r.stdout


@pytest.mark.parametrize("check, shown", [("1e9", True), ("false", False)])
def test_stages_speed_times_the_balanced_refit_with_and_without_its_check(check, shown):
    """``--balance always`` makes the refit; ``--refit-check`` sets its check (a large threshold keeps the refit
    and still times the check, ``false`` skips it), and the last line says which ran."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/stages_speed.py"), "--queries", "150", "--classes", "10",
                        "--dim", "16", "--val-per-class", "2", "--balance", "always", "--refit-check", check,
                        "--domains", "1"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    last = next(line for line in r.stdout.splitlines() if "final distribution balanced: True" in line)
    assert "refitted on the balanced pool: True" in last and ("(its check: gain " in last) == shown, last


def _blas_threads() -> int:
    return max(lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas")


def test_run_parallel_keeps_order_shares_blas_threads_and_raises():
    with threadpool_limits(limits=2, user_api="blas"):
        seen = []
        out = run_parallel([lambda i=i: (seen.append(_blas_threads()), i * i)[1] for i in range(5)])
        assert out == [0, 1, 4, 9, 16]
        assert seen == [1] * 5                          # two workers, one BLAS thread each
        assert _blas_threads() == 2                      # restored afterwards
        assert run_parallel([_blas_threads], parallel=True) == [2]       # one job: all the threads, no pool
        assert run_parallel([_blas_threads, _blas_threads], parallel=False) == [2, 2]
    with threadpool_limits(limits=4, user_api="blas"):            # more threads than jobs: still one each
        assert run_parallel([_blas_threads, _blas_threads]) == [1, 1]
        assert _blas_threads() == 4

        def boom():
            raise ValueError("stage failed")
        with pytest.raises(ValueError, match="stage failed"):
            run_parallel([lambda: 1, boom])


def test_seen_stages_fitted_side_by_side_equal_one_at_a_time():
    """Each fit runs on one BLAS thread whether the fits run side by side (two threads) or alone (one): the fitted
    weights are the same, bit for bit."""
    rng = np.random.default_rng(3)
    c, d = 8, 16
    means = rng.normal(size=(c, d))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    y = np.repeat(np.arange(c), 4)
    support = {k: unit(means[y] + rng.normal(size=(len(y), d))) for k in ("a", "b")}
    text = {k: unit(means + 0.5 * rng.normal(size=(c, d))) for k in ("a", "b")}
    protos = [LinearProbePP(epochs=30)]
    with threadpool_limits(limits=2, user_api="blas"):
        side_by_side = fit_seen_stages(protos, support, y, text, c)
    with threadpool_limits(limits=1, user_api="blas"):
        alone = fit_seen_stages(protos, support, y, text, c)
    for k in ("a", "b"):
        assert np.array_equal(side_by_side[0][k].coef_, alone[0][k].coef_)
        assert np.array_equal(side_by_side[0][k].alpha_, alone[0][k].alpha_)


def test_stages_speed_times_the_per_domain_cascades():
    """``--domains K`` splits the classes into K domains, whose own cascades the timed predict includes; the
    last line says how many queries each scored again. ``--domains 1``: one cascade, no such line."""
    base = [sys.executable, str(REPO / "benchmarks/stages_speed.py"), "--queries", "150", "--classes", "12",
            "--dim", "16", "--val-per-class", "2"]
    r = subprocess.run(base + ["--domains", "3"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 domain(s)" in r.stdout
    line = next(x for x in r.stdout.splitlines() if "queries scored again per domain" in x)
    counts = [int(part.split()[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert line.count("balanced") == 3, line
    assert len(counts) == 3 and sum(counts) == 150, line
    one = subprocess.run(base + ["--domains", "1"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert one.returncode == 0 and "queries scored again" not in one.stdout, one.stdout + one.stderr
    bad = subprocess.run(base + ["--domains", "13"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert bad.returncode == 2 and "--domains must lie in 1..12" in bad.stderr
