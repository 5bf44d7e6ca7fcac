"""Jittor's set-up for a GPU machine (cascade/runtime.py): no downloads offline, CUDA 13's edits, the GPU check."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cascade import runtime

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    """benchmarks/gpu_check.py as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def _installed_jittor() -> Path:
    spec = importlib.util.find_spec("jittor")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


def _copy_edited_files(dst: Path) -> Path:
    src = _installed_jittor()
    for rel in {rel for rel, _, _ in runtime.CUDA13_EDITS}:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    return dst


def test_cuda13_edits_match_the_installed_jittor_and_apply_once(tmp_path):
    tree = _copy_edited_files(tmp_path / "jittor")
    before = {rel: (tree / rel).read_text() for rel, _, _ in runtime.CUDA13_EDITS}
    if all(new in before[rel] and old not in before[rel] for rel, old, new in runtime.CUDA13_EDITS):
        # a CUDA 13 machine where cascade already edited the installed Jittor (the GPU run of docs/gpu.md):
        # the original text is gone, so check the edited state and that a second pass changes nothing
        assert runtime.patch_jittor_for_cuda13(tree) == []
        assert {rel: (tree / rel).read_text() for rel in before} == before
        return
    done = runtime.patch_jittor_for_cuda13(tree)
    assert len(done) == len(runtime.CUDA13_EDITS)      # every edit still finds its text in this Jittor version
    expected = dict(before)
    for rel, old, new in runtime.CUDA13_EDITS:
        expected[rel] = expected[rel].replace(old, new)
    for rel, old, new in runtime.CUDA13_EDITS:
        text = (tree / rel).read_text()
        assert old not in text and new in text and text == expected[rel]   # exactly these edits, nothing else
    assert "-std=c++14" not in (tree / "compiler.py").read_text().split("cc_flags +=", 1)[1].split("\n", 1)[0]
    assert runtime.patch_jittor_for_cuda13(tree) == []   # idempotent
    assert not list(tree.rglob("*.tmp*"))                # written atomically, nothing left behind
    assert runtime.patch_jittor_for_cuda13(tmp_path / "elsewhere") == []   # no such files: nothing to do


def test_cuda13_edit_that_cannot_be_written_names_the_file_and_the_fix(tmp_path, monkeypatch):
    # a file holding the text of the first edit, as an unedited Jittor has it (the installed one may be edited)
    rel, old, _ = runtime.CUDA13_EDITS[0]
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text(f"if ({old} != cudaComputeModeProhibited) {{}}\n")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runtime.os, "replace", refuse)
    with pytest.raises(RuntimeError, match=r"helper_cuda\.h: Jittor needs an edit to build with CUDA 13.*CASCADE_CPU=1"):
        runtime.patch_jittor_for_cuda13(tmp_path)
    assert (tmp_path / rel).read_text().startswith(f"if ({old}")   # left as it was
    assert not list(tmp_path.rglob("*.tmp*"))                       # no half-written copy beside it


def test_nvcc_major_reads_the_release(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    fake.chmod(0o755)
    assert runtime.nvcc_major(str(fake)) == 13
    assert runtime.nvcc_major(str(tmp_path / "missing")) == 0


def test_gpu_tests_stop_without_a_gpu_and_keep_every_checks_log(tmp_path):
    """benchmarks/gpu_tests.sh: exit 2 on a CPU machine; with a stand-in Python (a GPU found, each check quick
    but the end-to-end one, which outlasts its limit) every check runs in order and keeps its whole log."""
    script = ROOT / "benchmarks" / "gpu_tests.sh"
    r = subprocess.run(["bash", str(script), str(tmp_path / "cpu")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "CASCADE_CPU": "1"}, timeout=300)
    assert r.returncode == 2 and "no usable GPU" in r.stdout, r.stdout + r.stderr
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ran: $*"\ncase "$*" in *test_end_to_end*) exec sleep 30;; esac\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(script), str(tmp_path / "logs")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(fake), "GPU_LIMIT_E2E": "1"}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("==")] == \
        ["== jittor", "== end_to_end", "== models", "== towers"]
    assert "== end_to_end: exit 124" in r.stdout
    e2e = (tmp_path / "logs" / "end_to_end.log").read_text()
    assert "tests/test_end_to_end.py" in e2e and "stopped at the 1 s limit" in e2e
    assert "tests/test_specialist.py" in (tmp_path / "logs" / "models.log").read_text()
    assert "benchmarks/gpu_check.py" in (tmp_path / "logs" / "towers.log").read_text()


def test_no_cuda_downloads_keeps_the_users_setting(monkeypatch):
    for name in runtime.CUDA_DOWNLOADS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("use_nccl", "1")
    runtime.no_cuda_downloads()
    assert os.environ["use_nccl"] == "1" and os.environ["use_cutt"] == "0" and os.environ["use_cutlass"] == "0"


def test_gpu_check_says_so_without_a_gpu(capsys):
    pytest.importorskip("torch")
    jt = runtime.jittor()
    if jt.flags.use_cuda:
        pytest.skip("a GPU is in use: benchmarks/gpu_check.py measures instead")
    gpu_check = _gpu_check()
    assert gpu_check.main(["--models", "ViT-B/32"]) == 2
    assert "no usable GPU" in capsys.readouterr().err


def test_missing_cudnn_on_a_gpu_is_said_once(monkeypatch):
    import types

    monkeypatch.setattr(runtime, "status", {})
    with pytest.warns(RuntimeWarning, match="without cuDNN.*docs/gpu.md"):
        runtime._check_cudnn(types.SimpleNamespace(compile_extern=types.SimpleNamespace(cudnn=None)))
    assert runtime.status["cudnn"] is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime._check_cudnn(types.SimpleNamespace(compile_extern=types.SimpleNamespace(cudnn=object())))
    assert runtime.status["cudnn"] is True


def test_gpu_check_measures_each_model_against_float64(capsys, monkeypatch):
    """The check's measuring part, run on the CPU with the small models (CI has no GPU)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    args = type("Args", (), {"batch": 2, "warmup": 1, "iters": 1})
    jt = runtime.jittor()
    for name in ("tiny-vit", "tiny-rn", "convnextv2_atto"):
        gpu_check.check_model(name, args, jt, torch)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["tiny-vit", "image"], ["tiny-vit", "text"], ["tiny-rn", "image"],
                                                     ["tiny-rn", "text"], ["convnextv2_atto", "image"]]
    for line in lines:
        ours = float(line.split("max |x - float64|: cascade ")[1].split()[0])
        assert ours < 1e-4                     # float32 against float64: exact to float32 precision


def _python(code: str, **kwargs):
    import subprocess
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, **kwargs)


def test_jittor_leaves_ctrl_c_and_child_processes_to_python():
    """After Jittor's import, a child process that dies of a signal does not end this one (Jittor's handler would
    exit at once, "Maybe out of memory"), and Ctrl-C raises KeyboardInterrupt (its handler would exit at once)."""
    r = _python("import os, signal, subprocess\n"
                "from cascade import runtime\n"
                "runtime.jittor()\n"
                "subprocess.run(['sh', '-c', 'kill -9 $$'])\n"
                "print('alive after a killed child', flush=True)\n"
                "try:\n"
                "    os.kill(os.getpid(), signal.SIGINT)\n"
                "    import time; time.sleep(5)\n"
                "except KeyboardInterrupt:\n"
                "    print('KeyboardInterrupt')\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["alive", "after", "a", "killed", "child", "KeyboardInterrupt"]
    assert "quick exit" not in r.stderr


def test_ctrl_c_while_jittor_loads_is_raised_after_and_an_ignored_one_stays_ignored():
    import signal
    with pytest.raises(KeyboardInterrupt):
        with runtime._python_signals():
            assert os.environ["JPY_PARENT_PID"]         # Jittor installs no SIGINT handler of its own
            os.kill(os.getpid(), signal.SIGINT)      # held until the import is complete
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a process started with Ctrl-C ignored (a background job) keeps ignoring it after Jittor's import
    r = _python("import signal\nfrom cascade import runtime\nruntime.jittor()\n"
                "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)",
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
