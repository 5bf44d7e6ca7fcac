"""Runs under ``mpirun`` (docs/scale.md): `mpirun -np 2 bash train.sh` / `bash test.sh` on a small generated dataset
with small seeded CLIPs give the same result.txt, byte for byte, and the same cached features as one process; a
rank killed mid-extraction ends the run (no hang) and a rerun resumes from the shards to the same result; a rank
that fails ends the whole run with its error.

Skipped only when ``mpirun`` is absent (``bash scripts/setup.sh --test`` installs Open MPI, so CI runs it).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from cascade import runtime

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

MPIRUN = shutil.which("mpirun")
NAMES = ["Animal_Bird", "Animal_Cat", "Caltech-101_airplane", "Caltech-101_chair", "Food-101_sushi",
         "Food-101_waffles", "Stanford-Cars_Audi_R8", "Stanford-Cars_Volvo_240"]
# small batches and cache shards: several shards per rank, so a killed rank leaves a partial cache
SETTINGS = ["--quiet", "--set", "features.batch_size=8", "--set", "features.chunk=8", "--set", "sampling.val_per_class=1"]
TAG = f"cascade-test-mpi-{uuid.uuid4().hex[:8]}"
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found: Open MPI is not installed "
                               "(`bash scripts/setup.sh --test` installs openmpi-bin)")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CASCADE_TEST_TAG"] = TAG           # marks this test's rank processes (to find the one to kill)
    return env


def _mpirun(np_: int, cmd: list, extra=()):
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np_), *cmd, *extra]


def _run(cmd, cwd, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _cache_rows(cache: Path) -> dict:
    """{(cache key folder, file key): feature row} over every shard of a feature cache."""
    rows = {}
    for kf in sorted(cache.rglob("*.keys.npy")):
        feats = np.load(kf.with_name(kf.name.replace(".keys.npy", ".feats.npy")))
        for k, f in zip(np.load(kf).tolist(), feats):
            rows[(kf.parent.name, k)] = f
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from _reference import build_reference
    from test_data import make_dataset

    root = tmp_path_factory.mktemp("mpi")
    make_dataset(root / "data", NAMES, per_class=6, test_per_class=12, size=(40, 30))
    (root / "data/TestSetA/zero.jpg").write_bytes(b"")            # unreadable: reported alike on every rank
    weights = root / "weights"
    weights.mkdir()
    for ref_name, file in (("tiny-vit", "ViT-B-32"), ("tiny-rn", "RN101")):
        torch.save(build_reference(ref_name, seed=11).state_dict(), root / f"{file}.pt")
        r = _run([sys.executable, "-m", "cascade.convert", str(root / f"{file}.pt"), str(weights / f"{file}.npz")],
                 REPO)
        assert r.returncode == 0, r.stderr
    for out in ("out1", "out2", "out3"):
        shutil.copytree(weights, root / out / "weights")
    return root


def _train_test(root: Path, out: str, ranks: int):
    for cmd in ("train.sh", "test.sh"):
        line = ["bash", str(REPO / cmd), "--out", out, *SETTINGS]
        r = _run(_mpirun(ranks, line) if ranks > 1 else line, root)
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def single(workspace):
    return _train_test(workspace, "out1", 1)


@needs_mpi
def test_two_ranks_give_the_one_process_result(workspace, single):
    r = _train_test(workspace, "out2", 2)
    one, two = workspace / "out1", workspace / "out2"
    assert (two / "result.txt").read_bytes() == (one / "result.txt").read_bytes()
    assert (two / "split/support.txt").read_bytes() == (one / "split/support.txt").read_bytes()
    assert "zero.jpg" in (two / "result_unreadable.txt").read_text()
    # the same rows in both caches, features equal within 1e-6, written by both ranks (shards of each)
    a, b = _cache_rows(one / "cache"), _cache_rows(two / "cache")
    assert sorted(a) == sorted(b) and len(a) == 2 * (8 * 5 + 8 * 12)     # 2 backbones x (support + val + test)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    assert r.stderr.count("wrote ") == 1          # rank 0 alone writes and speaks for the run


@needs_mpi
def test_a_killed_rank_ends_the_run_and_a_rerun_resumes(workspace, single):
    root, out = workspace, workspace / "out3"
    shutil.copytree(root / "out1/model", out / "model")        # test only: the extraction is what is killed
    line = ["bash", str(REPO / "test.sh"), "--out", "out3", *SETTINGS]
    proc = subprocess.Popen(_mpirun(2, line), cwd=root, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        victim, t0 = None, time.time()
        while victim is None and proc.poll() is None and time.time() - t0 < 600:
            if list((out / "cache").rglob("*.keys.npy")):            # extraction under way: shards appear
                victim = _rank_process(1)
            time.sleep(0.05)
        assert victim is not None, "rank 1 was not found while extracting"
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)                # the run ends: no rank waits forever
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output
    assert not (out / "result.txt").exists()
    partial = len(_cache_rows(out / "cache"))
    assert 0 < partial < 2 * 8 * 12
    r = _run(_mpirun(2, line), root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "result.txt").read_bytes() == (root / "out1/result.txt").read_bytes()


@needs_mpi
def test_a_failing_rank_ends_the_whole_run_with_its_error(workspace, single):
    root = workspace
    before = (root / "out1/result.txt").read_bytes()
    good = ["bash", str(REPO / "test.sh"), "--out", "out1", *SETTINGS]
    bad = good + ["--set", "models.clip.RN101=out1/weights/none.npz"]     # rank 1 only: missing weights
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "1", *good, ":", "-np", "1", *bad]
    t0 = time.time()
    r = _run(cmd, root, timeout=600)
    assert r.returncode != 0
    assert "cascade test (rank 1 of 2): error: " in r.stderr and "none.npz" in r.stderr, r.stderr
    assert time.time() - t0 < 600
    assert (root / "out1/result.txt").read_bytes() == before


def _rank_process(rank: int):
    """PID of this test's `python -m cascade` process of the given MPI rank, or None."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"CASCADE_TEST_TAG={TAG}".encode() in env and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env
                and b"-m" in cmd and b"cascade" in cmd):
            return int(d.name)
    return None


# ------------------------------------------------------------------------------------ without mpirun
def test_rank_settings_share_cores_and_pick_gpu_r_mod_n(monkeypatch):
    for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "OMPI_MCA_mpi_yield_when_idle"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    monkeypatch.setattr(runtime, "cuda_usable", lambda: True)
    monkeypatch.setattr(runtime, "gpu_count", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert runtime.mpi_world() == (5, 8) and runtime.mpi_local() == (5, 8) and not runtime.is_main()
    runtime._configure_rank()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"             # rank 5 of a node with 4 GPUs: GPU 5 mod 4
    assert os.environ["OMP_NUM_THREADS"] == "2"                  # 16 cores shared by 8 ranks
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")              # the user's choice wins
    runtime._configure_rank()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_outside_mpirun_nothing_changes(monkeypatch):
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    assert runtime.mpi_world() == (0, 1) and runtime.mpi_local() == (0, 1) and runtime.is_main()
    runtime.barrier()                                            # no MPI: returns at once
    assert runtime.run_ranked("x", lambda: 3) == 3
