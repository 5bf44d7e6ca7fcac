"""Large query sets (docs/scale.md): the stages that see every query at once work in blocks of rows
(``cascade.stages.calibration.CHUNK_ROWS``) and give the unchunked results; beyond ``FLOAT64_ROWS`` queries the
distributions the cascade keeps are float32 and agree with float64, and ``predict`` keeps only the joint features
and a few of them; the GDA fits on parts of rows as on their concatenation; the result file and routes CSV are
streamed (memory does not grow with their text) and stay atomic; benchmarks/scale.py runs."""
from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cascade.output import read_result, write_result, write_routes_csv
from cascade.config import default_cascade
from cascade.stages import calibration
from cascade.stages.gda import GDA
from cascade.stages.inmap import InMaP

REPO = Path(__file__).resolve().parents[1]


def _task(n_query=300, c=12, d=24, seed=0, noise=0.9):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d))

    def draw(n, labels=None):
        y = rng.integers(0, c, n) if labels is None else labels
        x = means[y] + noise * rng.normal(size=(n, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    text = means + 0.5 * rng.normal(size=(c, d))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    sx, sy = draw(4 * c, np.repeat(np.arange(c), 4))
    vx, vy = draw(2 * c, np.repeat(np.arange(c), 2))
    qx, _ = draw(n_query)
    return sx, sy, vx, vy, qx, text


def _both(fn, monkeypatch, block=37):
    """fn() with one block of rows (today's computation) and with blocks of ``block`` rows."""
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 10 ** 9)
    whole = fn()
    monkeypatch.setattr(calibration, "CHUNK_ROWS", block)
    return whole, fn()


def test_inmap_and_gda_in_blocks_agree_with_whole(monkeypatch):
    sx, sy, _, _, qx, text = _task()
    fit_inmap = lambda: InMaP(n_iter=30, prior="auto").fit(sx, sy, text=text, query=qx)  # noqa: E731
    a, b = _both(fit_inmap, monkeypatch)
    # the proxies' float32 descent sums its gradient over blocks of rows: rounding, carried through 30 steps
    assert np.abs(a.proxies_ - b.proxies_).max() <= 2e-5 and np.allclose(a.prior_, b.prior_, atol=1e-9)
    soft = np.random.default_rng(1).dirichlet(np.ones(text.shape[0]), size=len(qx))
    fit_gda = lambda: GDA(shrinkage=0.3).fit(qx, soft)  # noqa: E731
    a, b = _both(fit_gda, monkeypatch)
    assert np.abs(a.coef_ - b.coef_).max() <= 1e-5 * np.abs(a.coef_).max()
    assert np.abs(a.intercept_ - b.intercept_).max() <= 1e-5 * np.abs(a.intercept_).max()
    za, zb = _both(lambda: a.decision_function(qx), monkeypatch)
    assert np.abs(za - zb).max() <= 1e-6                             # rows are scored independently
    ta, tb = _both(lambda: calibration.fit_temperature(za, soft), monkeypatch)
    assert abs(ta - tb) <= 1e-6 * ta


def test_cascade_predict_in_blocks_agrees_with_whole(monkeypatch):
    # the scores differ only by the rounding of float32 sums made a block of rows at a time (InMaP's gradient):
    # up to 1.02e-6 with OpenBLAS's AVX-512 kernel, less with its AVX2 ones; the rankings and routes are equal
    tol = 1e-5
    cascade, query = _two_backbone_cascade(250)
    a, b = _both(lambda: cascade.predict(query), monkeypatch, block=41)
    assert np.abs(a.scores - b.scores).max() <= tol
    assert np.array_equal(a.top5, b.top5) and a.route == b.route
    # the seeds' routing (stage 1 decides, a block of rows at a time) and no refinement
    cascade.routing, cascade.refine = "stage1", None
    a, b = _both(lambda: cascade.predict(query), monkeypatch, block=41)
    assert np.abs(a.scores - b.scores).max() <= tol
    assert np.array_equal(a.top5, b.top5) and a.route == b.route and "unseen" in a.route


def test_result_and_routes_are_streamed_and_atomic(tmp_path):
    n = 100_000
    names = [f"some_folder_of_a_crawl_image_{i:07d}.jpg" for i in range(n)][::-1]
    top5 = np.tile(np.arange(5), (n, 1))
    out = tmp_path / "result.txt"
    tracemalloc.start()
    write_result(out, names, top5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    text_size = out.stat().st_size
    assert peak < text_size / 2, (peak, text_size)             # never the whole text in memory
    back = read_result(out)
    assert len(back) == n and next(iter(back)) == "some_folder_of_a_crawl_image_0000000.jpg"
    # a failure half-way through the stream leaves the previous file as it was, and no temporary file
    before = out.read_bytes()
    bad = names[:10] + ["broken\nname.jpg"]
    with pytest.raises(ValueError, match="line break"):
        write_result(out, bad, np.zeros((len(bad), 5), int))
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["result.txt"]
    routes = tmp_path / "routes.csv"
    write_routes_csv(routes, names[:3], ["seen"] * 3, top5[:3], np.ones((3, 5)) / 5)
    assert routes.read_text().splitlines()[1].startswith("some_folder_of_a_crawl_image_0099997.jpg,seen,ok,0,1")


def test_scale_benchmark_runs_and_reports_time_and_memory():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/scale.py"), "--sizes", "300,1000", "--classes", "20",
                        "--inmap-steps", "5"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["300", "1000"]
    assert all(float(row[1]) > 0 and float(row[3]) > 0 for row in rows)      # seconds, peak MiB
    assert "growth" in r.stdout


def test_gda_fit_parts_is_fit_on_the_concatenation(monkeypatch):
    sx, sy, vx, _, qx, text = _task()
    soft = np.random.default_rng(2).dirichlet(np.ones(text.shape[0]), size=len(qx))
    onehot = np.eye(text.shape[0])[sy]
    X, Y = np.concatenate([qx, sx, vx]), np.concatenate([soft, onehot, soft[:len(vx)]])
    whole = GDA(shrinkage=0.3).fit(X, Y)
    parts = [(qx, soft), (sx, onehot), (vx, soft[:len(vx)])]
    exact = GDA(shrinkage=0.3).fit_parts(parts)                      # small: the same computation
    assert np.array_equal(exact.coef_, whole.coef_) and np.array_equal(exact.intercept_, whole.intercept_)
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 29)               # blocks of every part, no concatenation
    blocks = GDA(shrinkage=0.3).fit_parts(parts)
    assert np.abs(blocks.coef_ - whole.coef_).max() <= 1e-5 * np.abs(whole.coef_).max()
    assert np.abs(blocks.intercept_ - whole.intercept_).max() <= 1e-5 * np.abs(whole.intercept_).max()
    assert blocks.n_rows_ == len(X)
    with pytest.raises(ValueError, match="different feature dimensions"):
        GDA().fit_parts([(qx, soft), (sx[:, :5], onehot)])


def _two_backbone_cascade(n_query, c=12, noise=0.9):
    sx, sy, vx, vy, qx, text = _task(n_query=n_query, c=c, noise=noise)
    rot = np.linalg.qr(np.random.default_rng(3).normal(size=(sx.shape[1], sx.shape[1])))[0].astype(np.float32)
    two = lambda x: {"a": x, "b": np.ascontiguousarray(x @ rot)}  # noqa: E731
    s, v = sy < c - 2, vy < c - 2                                    # the last two classes are unseen
    cascade = default_cascade().set_params(transductive=InMaP(n_iter=20))
    cascade.fit(two(sx[s]), sy[s], two(text), n_seen=c - 2, val=(two(vx[v]), vy[v]))
    return cascade, two(qx)


@pytest.mark.parametrize("balance", ["check", "always"])
def test_float32_distributions_beyond_the_threshold_agree_with_float64(monkeypatch, balance):
    """Blocks of rows and float32 storage give the float64 result; "always" takes the balanced refit and its
    check through their blocked paths too. The rows are noisy enough that no fit degenerates: where every
    validation row is ranked right a temperature sits at its bound (10,000) and the posteriors it makes are one-hot,
    so that float rounding decides near-ties and the two results may differ by whole queries."""
    cascade, query = _two_backbone_cascade(400, noise=1.3)
    cascade.set_params(balance=balance)
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 10 ** 9)
    whole = cascade.predict(query)
    assert whole.scores.dtype == np.float64
    assert max(cascade.seen_temperatures_) < 1e4 and (whole.details["refine_temperature"] or 0.0) < 1e4
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 53)
    monkeypatch.setattr(calibration, "FLOAT64_ROWS", 100)            # 400 queries: float32 distributions
    small = cascade.predict(query)
    assert small.scores.dtype == np.float32
    assert np.abs(small.scores - whole.scores).max() <= 1e-4
    assert np.array_equal(small.top5[:, 0], whole.top5[:, 0]) and small.route == whole.route
    for key in ("refit_gain", "refit_gain_se"):
        assert (key in small.details) == (balance == "always")
        if key in small.details:
            assert small.details[key] == pytest.approx(whole.details[key], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("balance, balance_refit, kept", [("check", False, 3), ("check", True, 4),
                                                           ("always", True, 4)])
def test_predict_keeps_a_few_float32_distributions_beyond_the_threshold(monkeypatch, balance, balance_refit, kept):
    """Memory of predict above the query features: their joint copy and a few [N, C] float32 arrays, not a dozen
    float64 ones (tracemalloc sees every numpy array). The balanced refit keeps the pool through the refinement:
    one array more; "always" makes that refit, and its check (``refit_check``), happen."""
    n, c, block = 6000, 60, 500
    cascade, query = _two_backbone_cascade(n, c)
    cascade.set_params(balance=balance, balance_refit=balance_refit)
    monkeypatch.setattr(calibration, "CHUNK_ROWS", block)
    monkeypatch.setattr(calibration, "FLOAT64_ROWS", block)
    dim = sum(v.shape[1] for v in query.values())
    joint = n * dim * 4
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = cascade.predict(query)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert result.scores.dtype == np.float32
    assert ("refit_gain" in result.details) == (balance == "always"), result.details
    per_nc = n * c * 4                                                 # one [N, C] float32 array
    blocks = 8 * block * (c + dim) * 8                                 # a few float64 temporaries of one block
    assert peak < joint + kept * per_nc + blocks, (peak, joint, per_nc, blocks)
