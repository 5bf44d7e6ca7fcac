"""Jittor set-up, imported before jittor anywhere in cascade.

Jittor's first import tries to download oneDNN ("mkl") from the internet and compiles its CPU kernels against
it; offline that fails and, with oneDNN off, convolutions are two orders of magnitude slower. Debian's
``libdnnl-dev`` (oneDNN 2.6) is API-compatible with the 2.2 release Jittor expects, so we lay out the directory
Jittor looks for (``~/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp``) as links to the system copy. Jittor then
finds it and never downloads. ``scripts/setup.sh`` installs the package; this module only wires it.

Also handled here:
* ``nvcc`` present without a CUDA runtime (``libcudart``): Jittor would try to build CUDA kernels and fail, so we
  set ``nvcc_path=""`` unless a GPU is really usable.
* Jittor's compile logs are kept out of the user's way (``log_silent``) unless ``CASCADE_VERBOSE=1``. (Its
  one-line "Compiling Operators(i/n)" progress, printed on stderr by Jittor's C++ core when a first compile
  takes over 2 s, cannot be switched off; it appears only on a machine's first runs.)
* Ctrl-C: Jittor's import installs a C-level SIGINT handler that exits at once ("Caught SIGINT, quick exit"),
  skipping every clean-up (cache flushes, temporary files); Python's handler is put back, so Ctrl-C raises
  KeyboardInterrupt and the callers clean up.
* No download is ever attempted: if the wiring is impossible, oneDNN is switched off with one warning.

Use :func:`jittor` to get the configured module.
"""
from __future__ import annotations

import ctypes.util
import glob
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

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


def _python_sigint() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except (ValueError, OSError):
            pass


def jittor():
    """Import and configure Jittor once; return the module."""
    global _jt
    if _jt is not None:
        return _jt
    if "jittor" in sys.modules:
        _jt = sys.modules["jittor"]
        return _jt
    verbose = os.environ.get("CASCADE_VERBOSE") == "1"
    status["onednn"] = wire_onednn()
    use_gpu = cuda_usable()
    if not use_gpu:
        os.environ["nvcc_path"] = ""  # nvcc without libcudart: never try to build CUDA kernels
    if not verbose:
        os.environ.setdefault("log_silent", "1")
    import jittor as jt  # noqa: E402  (configured above)

    _python_sigint()

    jt.flags.use_cuda = 1 if (use_gpu and jt.has_cuda) else 0
    status["device"] = "cuda" if jt.flags.use_cuda else "cpu"
    _jt = jt
    return jt
