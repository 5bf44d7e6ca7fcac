"""Jittor set-up, imported before jittor anywhere in cascade.

Jittor's first import tries to download oneDNN ("mkl") from the internet and compiles its CPU kernels against
it; offline that fails and, with oneDNN off, convolutions are two orders of magnitude slower. Debian's
``libdnnl-dev`` (oneDNN 2.6) is API-compatible with the 2.2 release Jittor expects, so we lay out the directory
Jittor looks for (``~/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp``) as links to the system copy. Jittor then
finds it and never downloads. ``scripts/setup.sh`` installs the package; this module only wires it.

Also handled here:
* ``nvcc`` present without a CUDA runtime (``libcudart``): Jittor would try to build CUDA kernels and fail, so we
  set ``nvcc_path=""`` unless a GPU is really usable. With a GPU, the optional CUDA libraries Jittor would
  download at its first import (NCCL, cuTT, CUTLASS) are switched off: offline the download fails the import;
  with CUDA 13's compiler, five small edits to Jittor's sources let it build (:data:`CUDA13_EDITS`); a GPU run
  without cuDNN (Jittor drops it silently) is named in one warning, and oneDNN's warning is left out there.
* Jittor's compile logs are kept out of the user's way (``log_silent``) unless ``CASCADE_VERBOSE=1``. (Its
  one-line "Compiling Operators(i/n)" progress, printed on stderr by Jittor's C++ core when a first compile
  takes over 2 s, cannot be switched off; it appears only on a machine's first runs.)
* Ctrl-C: Jittor's import installs C-level SIGINT and SIGCHLD handlers that exit at once ("Caught SIGINT, quick
  exit"; "Caught SIGCHLD. Maybe out of memory" where a child process dies of a signal), skipping every clean-up
  (cache flushes, temporary files). Its SIGINT handler is not installed (as under Jupyter) and SIGCHLD's default
  is put back, so Ctrl-C raises KeyboardInterrupt, even while Jittor loads, and the callers clean up.
* No download is ever attempted: if the wiring is impossible, oneDNN is switched off with one warning.
* Under ``mpirun`` (Open MPI; Jittor's own MPI runtime: ``jittor.in_mpi``, ``jittor.rank``,
  ``jittor.world_size`` and its ``mpi_all_reduce`` op): each rank gets its share of the node's cores
  (``OMP_NUM_THREADS``, unless set), waiting ranks yield their core (``mpi_yield_when_idle``), and with GPUs
  rank r uses GPU ``r mod n`` (its node-local rank; ``CUDA_VISIBLE_DEVICES``, unless set). :func:`barrier` waits
  for every rank; :func:`run_ranked` runs a command so that a failure on any rank ends the whole run with one
  error instead of leaving the other ranks waiting.

Use :func:`jittor` to get the configured module.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import glob
import importlib.util
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path

import numpy as np

from .io import atomic_write_text

DNNL_DIRNAME = "dnnl_lnx_2.2.0_cpu_gomp"  # the folder name Jittor's compile_extern.install_mkl checks for
_SYSTEM_DNNL_INCLUDE = Path("/usr/include")
_SYSTEM_DNNL_LIB_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libdnnl.so.2",
    "/usr/lib/aarch64-linux-gnu/libdnnl.so.2",
    "/usr/lib/*/libdnnl.so.2",
    "/usr/lib/libdnnl.so.2",
    "/usr/local/lib/libdnnl.so.2",
)

_jt = None
status: dict = {}


def _find_system_dnnl() -> Path | None:
    if not (_SYSTEM_DNNL_INCLUDE / "dnnl.hpp").is_file():
        return None
    for pattern in _SYSTEM_DNNL_LIB_GLOBS:
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    return None


def _symlink(target: Path, link: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    tmp = link.with_name(link.name + f".tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic: concurrent processes never see a half-made link


def wire_onednn(home: Path | None = None) -> str:
    """Make Jittor find the system oneDNN. Returns 'system', 'bundled' (Jittor's own copy already there) or
    'off' (oneDNN unavailable: slow convolutions, a warning is issued)."""
    if os.environ.get("use_mkl") == "0":
        return "off"
    home = Path(home) if home is not None else Path.home()
    mkl_dir = home / ".cache" / "jittor" / "mkl" / DNNL_DIRNAME
    lib = mkl_dir / "lib" / "libmkldnn.so"
    if lib.exists() and not lib.is_symlink() and (mkl_dir / "include").is_dir():
        return "bundled"  # a real download from an online machine: leave it alone
    system_lib = _find_system_dnnl()
    if system_lib is None or platform.system() != "Linux":
        os.environ["use_mkl"] = "0"
        warnings.warn(
            "oneDNN not found (install Debian's libdnnl-dev, e.g. `bash scripts/setup.sh`): Jittor runs without it "
            "and convolutions will be much slower.", RuntimeWarning, stacklevel=2)
        return "off"
    try:
        (mkl_dir / "lib").mkdir(parents=True, exist_ok=True)
        _symlink(_SYSTEM_DNNL_INCLUDE, mkl_dir / "include")
        _symlink(system_lib, lib)
    except OSError as exc:
        os.environ["use_mkl"] = "0"
        warnings.warn(f"cannot wire oneDNN into {mkl_dir} ({exc}); Jittor runs without it (slow convolutions).",
                      RuntimeWarning, stacklevel=2)
        return "off"
    return "system"


def cuda_usable() -> bool:
    """True when a CUDA runtime and a driver are present (nvcc alone is not enough)."""
    if os.environ.get("CASCADE_CPU") == "1":
        return False
    if ctypes.util.find_library("cuda") is None:
        return False
    return bool(ctypes.util.find_library("cudart") or glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))


# Jittor's optional CUDA libraries that it downloads from GitHub and builds at its first CUDA import. Offline
# the download fails and the import with it; cascade needs none of them (NCCL: multi-GPU reductions, where
# cascade reduces one number over MPI; cuTT and CUTLASS: faster transposes and kernels Jittor has fallbacks for).
CUDA_DOWNLOADS = ("use_nccl", "use_cutt", "use_cutlass")


def no_cuda_downloads() -> None:
    """Switch off Jittor's downloaded CUDA libraries (:data:`CUDA_DOWNLOADS`); a user's own setting wins."""
    for name in CUDA_DOWNLOADS:
        os.environ.setdefault(name, "0")


# Jittor 1.3.11 predates CUDA 13, whose headers it no longer compiles against. Each edit below is
# (file under the jittor package, old text, new text); found on an H200 with CUDA 13.0 (docs/gpu.md).
CUDA13_EDITS = (
    # cudaDeviceProp lost computeMode and clockRate; Jittor reads them only to rank devices
    ("extern/cuda/inc/helper_cuda.h", "deviceProp.computeMode", "cudaComputeModeDefault"),
    ("extern/cuda/inc/helper_cuda.h", "deviceProp.clockRate", "1"),
    # CUB, Thrust and libcu++ 3 refuse C++14: Jittor's flags for g++ and for nvcc
    ("compiler.py", "-std=c++14 -fPIC", "-std=c++17 -fPIC"),
    ("compiler.py", '"-std=c++14 -Xcompiler -std:c++14"', '"-std=c++17"'),
    # CUB 3 removed cub::Max; its softmax kernel uses it
    ("other/code_softmax.py", "cub::Max()", "cuda::maximum<>()"),
)


def nvcc_major(nvcc: str | None = None) -> int:
    """CUDA compiler's major version (0 when there is no nvcc or it does not answer)."""
    nvcc = nvcc or os.environ.get("nvcc_path") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else 0


def patch_jittor_for_cuda13(jittor_dir: Path) -> list[str]:
    """Apply :data:`CUDA13_EDITS` to the Jittor package in ``jittor_dir``; return the edits made ('file: old').
    Idempotent: an edit whose old text is gone is skipped. Raises RuntimeError naming the file and the fix
    when the package cannot be written."""
    done = []
    for rel, old, new in CUDA13_EDITS:
        path = Path(jittor_dir) / rel
        try:
            text = path.read_text()
        except OSError:
            continue  # another Jittor version: nothing of this edit to do
        if old not in text:
            continue
        try:
            atomic_write_text(path, text.replace(old, new))
        except OSError as exc:
            raise RuntimeError(
                f"{path}: Jittor needs an edit to build with CUDA 13 ({old} -> {new}) and this file cannot be "
                f"written ({exc}); install Jittor in a writable environment (`bash scripts/setup.sh`), use CUDA 12, "
                f"or run on the CPU with CASCADE_CPU=1") from exc
        done.append(f"{rel}: {old}")
    return done


def _cuda13_compat() -> None:
    """Before Jittor's first CUDA import: apply the CUDA 13 edits where nvcc is version 13 or later."""
    if nvcc_major() < 13:
        return
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.submodule_search_locations:
        return
    done = patch_jittor_for_cuda13(Path(list(spec.submodule_search_locations)[0]))
    if done:
        warnings.warn(f"Jittor edited to build with CUDA 13 ({len(done)} edits; docs/gpu.md)", RuntimeWarning,
                      stacklevel=3)


@contextlib.contextmanager
def _python_signals():
    """The process's handling of Ctrl-C and of child processes, kept across Jittor's import.

    Jittor's library installs C handlers when it loads: SIGINT exits at once, skipping every clean-up, and so
    does SIGCHLD where a child process dies of a signal (a decoding worker or compiler hit by the same Ctrl-C),
    printing "Maybe out of memory". Jittor leaves SIGINT alone where ``JPY_PARENT_PID`` is set (for Jupyter), so
    it is set while Jittor loads, and both handlers are put back after. A Ctrl-C during the import is kept and
    raised once the import is complete, never from inside Jittor's own import code (which may catch it or be
    left half imported). Ctrl-C then raises KeyboardInterrupt at any time (unless it was ignored from the start,
    as in a background job), and the callers clean up."""
    main = threading.current_thread() is threading.main_thread()
    caught = []
    if main:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGCHLD)
        if before[0] is signal.default_int_handler:
            signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    jupyter = os.environ.get("JPY_PARENT_PID")
    if jupyter is None:
        os.environ["JPY_PARENT_PID"] = str(os.getpid())
    try:
        yield
    finally:
        if jupyter is None:
            os.environ.pop("JPY_PARENT_PID", None)
        if main:
            for signum, handler in zip((signal.SIGINT, signal.SIGCHLD), before):
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if caught:
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------------ MPI
def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def mpi_world() -> tuple[int, int]:
    """(rank, number of ranks) of this process under Open MPI's ``mpirun``; (0, 1) otherwise. Read from the
    environment mpirun sets (the variable Jittor itself checks), so it is known before Jittor is imported."""
    size = _env_int("OMPI_COMM_WORLD_SIZE", 1)
    if size <= 1:
        return 0, 1
    return _env_int("OMPI_COMM_WORLD_RANK", 0), size


def mpi_local() -> tuple[int, int]:
    """(rank on this machine, ranks on this machine) under mpirun; (0, 1) otherwise."""
    if mpi_world()[1] <= 1:
        return 0, 1
    return _env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0), max(1, _env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1))


def is_main() -> bool:
    """True on the one process that fits the stages and writes outputs (rank 0, or the only process)."""
    return mpi_world()[0] == 0


def gpu_count() -> int:
    """Number of NVIDIA GPUs of this machine (0 when there is no driver)."""
    gpus = glob.glob("/proc/driver/nvidia/gpus/*")
    if gpus:
        return len(gpus)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def _configure_rank() -> None:
    """Per-rank settings made before Jittor (and with it MPI) starts; the user's own settings win."""
    rank, size = mpi_world()
    if size <= 1:
        return
    local, local_size = mpi_local()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_size)))
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if "CUDA_VISIBLE_DEVICES" not in os.environ and cuda_usable():
        n = gpu_count()
        if n:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(local % n)
    status["rank"], status["world_size"] = rank, size


def barrier() -> None:
    """Wait until every rank gets here (an all-reduce of one number with Jittor's MPI op); nothing outside
    mpirun. A rank that fails instead ends the run (see :func:`run_ranked`), so no rank waits forever."""
    if mpi_world()[1] <= 1:
        return
    jt = jittor()
    if not getattr(jt, "in_mpi", False):
        raise RuntimeError("running under mpirun but Jittor has no MPI support: install Open MPI's mpicc "
                           "(`bash scripts/setup.sh`) so Jittor builds its MPI ops")
    jt.array(np.ones(1, np.float32)).mpi_all_reduce("add").sync()


def run_ranked(command: str, fn, expected=(ValueError, FileNotFoundError)) -> int:
    """Run ``fn()`` (a command's body) as this rank's part of an MPI run; outside mpirun, just ``fn()``.

    On success every rank waits for the others (rank 0 fits and writes while the others wait) and 0 is
    returned. On a failure the rank prints one error line naming itself (a traceback for unexpected errors)
    and leaves at once without MPI's collective shutdown: ``mpirun`` sees the non-zero status and stops the
    other ranks, so a failure anywhere ends the run instead of leaving ranks waiting for it."""
    rank, size = mpi_world()
    if size <= 1:
        return int(fn() or 0)
    try:
        rc = int(fn() or 0)
    except BaseException as exc:  # noqa: BLE001  (every failure must end this rank without MPI's shutdown)
        if isinstance(exc, KeyboardInterrupt):
            msg, rc = "interrupted", 130
        elif isinstance(exc, SystemExit):
            msg, rc = f"exit status {exc.code}", exc.code if isinstance(exc.code, int) and exc.code else 1
        elif isinstance(exc, expected):
            msg, rc = f"error: {exc}", 2
        else:
            traceback.print_exc()
            msg, rc = f"error: {type(exc).__name__}: {exc}", 1
        print(f"cascade {command} (rank {rank} of {size}): {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(rc)
    barrier()
    return rc


def jittor():
    """Import and configure Jittor once; return the module."""
    global _jt
    if _jt is not None:
        return _jt
    if "jittor" in sys.modules:
        _jt = sys.modules["jittor"]
        return _jt
    verbose = os.environ.get("CASCADE_VERBOSE") == "1"
    _configure_rank()
    use_gpu = cuda_usable()
    with warnings.catch_warnings():
        if use_gpu:      # oneDNN speeds up CPU convolutions only: no warning where the GPU runs them
            warnings.simplefilter("ignore", RuntimeWarning)
        status["onednn"] = wire_onednn()
    if not use_gpu:
        os.environ["nvcc_path"] = ""  # nvcc without libcudart: never try to build CUDA kernels
    else:
        no_cuda_downloads()
        _cuda13_compat()
    if not verbose:
        os.environ.setdefault("log_silent", "1")
    with _python_signals():
        import jittor as jt  # noqa: E402  (configured above)

    jt.flags.use_cuda = 1 if (use_gpu and jt.has_cuda) else 0
    status["device"] = "cuda" if jt.flags.use_cuda else "cpu"
    if jt.flags.use_cuda:
        _check_cudnn(jt)
    _jt = jt
    return jt


def _check_cudnn(jt) -> None:
    """Record whether Jittor's cuDNN bindings loaded (``status["cudnn"]``), with one warning where they did not:
    Jittor drops them silently, and its own convolution kernels are many times slower."""
    compile_extern = getattr(jt, "compile_extern", None)
    status["cudnn"] = getattr(compile_extern, "cudnn", None) is not None
    if not status["cudnn"]:
        warnings.warn("Jittor runs without cuDNN on this GPU (its bindings need cuDNN 7 or 8 and do not build against "
                      "cuDNN 9): convolutions use Jittor's own kernels, many times slower (measured in docs/gpu.md)",
                      RuntimeWarning, stacklevel=3)
