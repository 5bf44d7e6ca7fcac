"""Safe reading and writing of model weights.

Formats read by :func:`read_checkpoint` (recognised from the file's bytes, not its name):

* **ours** (written by :func:`save_weights`): a zip of ``.npy`` arrays (an ``.npz``) plus a ``__meta__.json``
  member. Read with ``allow_pickle=False``; never needs torch.
* **PyTorch**: ``torch.save`` files (zip or legacy) holding a state dict in fp16/fp32/bf16, bare or under a
  ``model`` / ``state_dict`` key. Read with ``torch.load(weights_only=True)`` (torch's own allow-list
  unpickler), so the file cannot run code.
* **TorchScript** archives such as OpenAI's ``ViT-B-32.pt`` / ``RN101.pt``: ``torch.jit.load(...).state_dict()``.
  TorchScript archives carry code that torch interprets only when the model runs; we only read the parameters.
* **Jittor pickles** (``jt.save`` of a dict of arrays, e.g. the challenge baseline's ``ViT-B-32.pkl``): read by a
  restricted unpickler whose allow-list admits only numpy array reconstruction (without object arrays),
  ``collections.OrderedDict``, latin-1 byte strings (old pickle protocols) and ``jittor.Var`` (rebuilt as a
  numpy array, without importing jittor). ``jt.save`` of a dict of *torch* tensors (how the baseline's file was
  made) is read too: the stand-ins for torch's tensor rebuild read each storage with
  ``torch.load(weights_only=True)``. Anything else is refused.
* **safetensors** files (header + raw little-endian buffers), parsed directly without the library.

torch is imported lazily, only when a PyTorch or TorchScript file is read. All failures raise
:class:`CheckpointError`, whose message names the file and the problem.

Converted weights are also checked before use (:func:`check_weights`): every member is read once to verify the
zip's CRC-32 and the SHA-256 the converter recorded (a truncated, damaged or edited file is called damaged), and
the architecture the meta names must be the one the arrays' shapes describe and the one the caller expects
(the CLIP backbone a file is configured for, the ConvNeXt-V2 size a specialist is named after).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..io import atomic_open

__all__ = [
    "CheckpointError", "read_checkpoint", "save_weights", "load_weights", "detect_format", "sha256_file",
    "state_sha256", "read_header", "verify_weights", "check_weights", "WeightsInfo", "OPENAI_CLIP_MODELS",
    "clip_model_name", "convnext_size", "expected_convnext_size",
]

FORMAT_NAME = "cascade-weights"
FORMAT_VERSION = 1
META_MEMBER = "__meta__.json"
NESTED_KEYS = ("state_dict", "model")  # where trainers nest the state dict inside a checkpoint

_JITTOR_MAGIC = b"HCAJSLHD"  # jt.save appends sha1(pickle) + this marker
# torch's legacy (non-zip) serialisation starts with a pickled magic number (protocol 2, LONG1 of 10 bytes)
_TORCH_LEGACY_PREFIX = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class CheckpointError(ValueError):
    """A weights file could not be read or does not fit the model. ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(problem if path is None else f"{path}: {problem}")


# --------------------------------------------------------------------------------------------------- helpers
def _c_contiguous(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """Hex SHA-256 over a state dict's names, dtypes, shapes and bytes (sorted by name): the weights' identity."""
    h = hashlib.sha256()
    for key in sorted(state):
        a = _c_contiguous(state[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _describe(head: bytes) -> str:
    printable = "".join(chr(b) if 32 <= b < 127 else "." for b in head[:16])
    return f"first bytes {head[:16].hex()} ({printable!r})"


def detect_format(path: str | os.PathLike) -> str:
    """Return one of 'cascade', 'npz', 'torch-zip', 'torchscript', 'torch-legacy', 'jittor-pickle', 'pickle',
    'safetensors'. Raises CheckpointError for a missing, empty, truncated or unrecognised file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("file not found", p)
    if p.is_dir():
        raise CheckpointError("is a directory, not a checkpoint file", p)
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError("empty file (0 bytes), not a checkpoint", p)
    with open(p, "rb") as f:
        head = f.read(64)
        f.seek(max(0, size - len(_JITTOR_MAGIC)))
        tail = f.read()
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        if not zipfile.is_zipfile(p):
            raise CheckpointError("truncated or corrupt zip archive (no central directory)", p)
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"truncated or corrupt zip archive ({exc})", p) from None
        if META_MEMBER in names:
            return "cascade"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch-zip"
        raise CheckpointError("zip archive that is neither a PyTorch checkpoint nor our weights format", p)
    if head.startswith(_TORCH_LEGACY_PREFIX):
        return "torch-legacy"
    if tail == _JITTOR_MAGIC:
        return "jittor-pickle"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 10:
        (hlen,) = struct.unpack("<Q", head[:8])
        if 2 <= hlen <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    raise CheckpointError(f"not a checkpoint: unrecognised file format ({_describe(head)})", p)


def _validate_state(obj: Any, path: Path, what: str) -> dict[str, np.ndarray]:
    """Unwrap a nested state dict and check that it maps str -> numeric numpy arrays."""
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"not a checkpoint: the {what} holds a {type(obj).__name__}, not a dict of arrays",
                              path)
    out: dict[str, np.ndarray] = {}
    bad = []
    for key, value in obj.items():
        if isinstance(value, (np.ndarray, np.generic, int, float)) and not isinstance(value, bool):
            arr = np.asarray(value)
            if arr.dtype.kind in "biufc":
                out[str(key)] = arr
                continue
        bad.append(f"{key!s} ({type(value).__name__})")
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise CheckpointError(f"not a state dict: entries that are not numeric arrays: {shown}", path)
    if not out:
        raise CheckpointError(f"not a checkpoint: the {what} holds no arrays", path)
    return out


# ------------------------------------------------------------------------------------- restricted unpickler
def _jittor_var(data):  # stands in for jittor.Var when unpickling: Var.__reduce__ is (Var, (ndarray,))
    if not isinstance(data, np.ndarray):
        raise pickle.UnpicklingError("jittor.Var must be rebuilt from a numpy array")
    return data


def _safe_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("only numpy.ndarray may be reconstructed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_dtype(spec, align=False, copy=False):
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:
        raise pickle.UnpicklingError("arrays of Python objects are not allowed")
    return dt


def _safe_scalar(dtype, data=None):
    if dtype.hasobject:
        raise pickle.UnpicklingError("Python object scalars are not allowed")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _safe_frombuffer(buf, dtype, shape, order):
    if np.dtype(dtype).hasobject:
        raise pickle.UnpicklingError("arrays of Python objects are not allowed")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _safe_latin1(text, encoding="latin1"):
    """Pickle protocols 0-2 store byte strings as latin-1 text re-encoded with _codecs.encode."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 byte strings")
    return text.encode("latin1")


class _NeedsTorch(pickle.UnpicklingError):
    pass


def _torch_storage_from_bytes(data):
    """Stands in for torch.storage._load_from_bytes: a pickled torch tensor carries its storage as bytes in
    torch's own format, which we read with torch.load(weights_only=True) (no code can run)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch storage must be given as bytes")
    try:
        import torch
    except ImportError:
        raise _NeedsTorch("holds pickled PyTorch tensors; reading it needs torch (pip install torch)") from None
    storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("expected a torch storage")
    return storage


def _torch_rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2 (a view of a storage; nothing else is done)."""
    import torch

    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("a torch tensor must be rebuilt from a torch storage")
    return torch._utils._rebuild_tensor_v2(storage, int(offset), tuple(size), tuple(stride), False, {})


def _torch_rebuild_parameter(data, requires_grad=False, hooks=None):
    import torch

    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a torch parameter must wrap a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _safe_latin1,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("collections", "OrderedDict"): dict,
    ("jittor", "Var"): _jittor_var,
    ("jittor_core", "Var"): _jittor_var,
    # dicts of torch tensors pickled by jt.save (how the Jittor challenge baseline's ViT-B-32.pkl was made)
    ("torch.storage", "_load_from_bytes"): _torch_storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _torch_rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _torch_rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts, lists, numbers, strings and numpy arrays."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load '{module}.{name}': only numpy arrays and dicts are allowed in a weights pickle "
                "(a pickle can run arbitrary code)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids (torch storages) are not allowed in a plain weights pickle")


def _safe_unpickle(data: bytes, path: Path):
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except _NeedsTorch as exc:
        raise CheckpointError(str(exc), path) from None
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise CheckpointError("truncated or corrupt pickle (ends early)", path) from None
        if msg.startswith("refusing") or "allowed" in msg or "only numpy" in msg or "must be rebuilt" in msg:
            raise CheckpointError(f"unsafe pickle refused: {msg}", path) from None
        raise CheckpointError(f"corrupt pickle ({msg})", path) from None
    except (EOFError, struct.error):
        raise CheckpointError("truncated or corrupt pickle (ends early)", path) from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, RuntimeError) as exc:
        raise CheckpointError(f"corrupt pickle ({type(exc).__name__}: {exc})", path) from None
    if "torch" in sys.modules:  # tensors rebuilt by the torch stand-ins above become numpy arrays
        obj = _torch_to_numpy(obj)
    return obj


def _read_jittor_pickle(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    body, checksum = data[:-28], data[-28:-8]
    if hashlib.sha1(body).digest() != checksum:
        raise CheckpointError("Jittor pickle checksum mismatch: the file is truncated or corrupt", path)
    return _validate_state(_safe_unpickle(body, path), path, "pickle")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    return _validate_state(_safe_unpickle(path.read_bytes(), path), path, "pickle")


# ------------------------------------------------------------------------------------------- our own format
def _walk_archive(z: zipfile.ZipFile, path, read) -> tuple[dict, dict]:
    """(metadata, {array name: read(member file)}) of a converted-weights zip: the JSON metadata member and one
    entry per ``.npy`` member; any other member is refused. The one walk over the archive, whether the arrays are
    loaded or only their headers are read."""
    meta: dict = {}
    out: dict = {}
    for info in z.infolist():
        if info.filename == META_MEMBER:
            meta = json.loads(z.read(info).decode("utf-8"))
            continue
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"unexpected member {info.filename!r} in weights archive", path)
        with z.open(info) as f:
            out[info.filename[:-4]] = read(f)
    return meta, out


def _read_ours(path: Path, with_meta: bool):
    try:
        with zipfile.ZipFile(path) as z:
            meta, state = _walk_archive(z, path, lambda f: np.lib.format.read_array(f, allow_pickle=False))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"truncated or corrupt weights archive ({exc})", path) from None
    except ValueError as exc:  # includes object arrays refused by allow_pickle=False, bad .npy headers
        raise CheckpointError(f"corrupt weights archive ({exc})", path) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt metadata in weights archive ({exc})", path) from None
    if not isinstance(meta, dict):
        raise CheckpointError("corrupt metadata in weights archive (not a JSON object)", path)
    state = _validate_state(state, path, "archive")
    return (state, meta) if with_meta else state


# -------------------------------------------------------------------------------------------------- torch
def _torch_to_numpy(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy().copy()
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_torch_to_numpy(v) for v in obj]
    return obj


def _import_torch(path: Path):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CheckpointError("is a PyTorch file; reading it needs torch (pip install torch), converted weights "
                              "do not", path) from None
    return torch


def _check_zip_members(path: Path) -> None:
    """Every member of a zip archive against its CRC-32 (torch's own reader checks none, so a damaged download
    would otherwise convert to wrong weights without a word); one read of the file. A member stored with a CRC of
    0 is not checked: torch writes 0 when saving without checksums (``set_crc32_options(False)``)."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with z.open(info) as member:           # zipfile compares the CRC-32 at the member's end
                        while member.read(1 << 22):
                            pass
                except zipfile.BadZipFile:
                    raise CheckpointError(f"damaged file: member {info.filename} fails its CRC-32 check; download "
                                          "the checkpoint again", path) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"truncated or corrupt zip archive ({exc})", path) from None


def _read_torch(path: Path, fmt: str) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    if fmt in ("torchscript", "torch-zip"):
        _check_zip_members(path)
    if fmt == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of export
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError subclasses with long messages
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"truncated or corrupt TorchScript archive ({first})", path) from None
        return _validate_state(_torch_to_numpy(dict(module.state_dict())), path, "TorchScript archive")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "truncated" in text or "ran out of input" in text.lower():
            raise CheckpointError("truncated or corrupt PyTorch checkpoint", path) from None
        detail = next((ln.strip() for ln in text.splitlines() if "global" in ln.lower() and len(ln) < 300), "")
        raise CheckpointError("unsafe PyTorch checkpoint refused: it holds Python objects other than tensors, "
                              "which torch.load(weights_only=True) will not unpickle" +
                              (f" ({detail})" if detail else ""), path) from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"truncated or corrupt PyTorch checkpoint ({first})", path) from None
    return _validate_state(_torch_to_numpy(obj), path, "PyTorch checkpoint")


# ------------------------------------------------------------------------------------------------ safetensors
_ST_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "U8": "u1", "I16": "<i2", "I32": "<i4",
              "I64": "<i8", "BOOL": "?"}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    try:
        (hlen,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt safetensors header ({exc})", path) from None
    base = 8 + hlen
    state = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = (base + int(o) for o in info["data_offsets"])
        if end > len(data):
            raise CheckpointError("truncated safetensors file", path)
        raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start)
        if info["dtype"] == "BF16":
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = raw.view(_ST_DTYPES[info["dtype"]])
        else:
            raise CheckpointError(f"unsupported safetensors dtype {info['dtype']} for {key}", path)
        state[key] = arr.reshape(info["shape"]).copy()
    return _validate_state(state, path, "safetensors file")


# ---------------------------------------------------------------------------------------------- public API
def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read any supported weights file into ``{name: numpy array}`` with the file's own names and dtypes
    (fp16 stays fp16; bf16 becomes fp32). Raises :class:`CheckpointError` naming the file and the problem."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt in ("cascade", "npz"):
        return _read_ours(p, with_meta=False)
    if fmt in ("torchscript", "torch-zip", "torch-legacy"):
        return _read_torch(p, fmt)
    if fmt == "jittor-pickle":
        return _read_jittor_pickle(p)
    if fmt == "pickle":
        return _read_pickle(p)
    if fmt == "safetensors":
        return _read_safetensors(p)
    raise CheckpointError(f"unsupported format {fmt}", p)  # pragma: no cover


def load_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Load weights written by :func:`save_weights`: ``(state, meta)``. Never imports torch, never unpickles."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt not in ("cascade", "npz"):
        raise CheckpointError(f"is a {fmt} file, not converted weights: convert it first with "
                              f"`python -m cascade.convert {p} OUT.npz`", p)
    state, meta = _read_ours(p, with_meta=True)
    if meta and meta.get("format") not in (None, FORMAT_NAME):
        raise CheckpointError(f"unknown weights format {meta.get('format')!r}", p)
    return state, meta


def save_weights(path: str | os.PathLike, state: dict[str, np.ndarray], meta: dict) -> dict:
    """Write ``state`` (name -> array) and ``meta`` (JSON-serialisable: arch, config, source, ...) atomically
    to ``path`` as an uncompressed npz with a ``__meta__.json`` member. Adds ``format``, ``version`` and
    ``sha256`` (:func:`state_sha256` of the arrays) to the stored meta and returns it. On any failure nothing
    is left at ``path`` (a previous file there is kept unchanged)."""
    p = Path(path)
    if not isinstance(state, dict) or not state:
        raise CheckpointError("refusing to write: no arrays to save", p)
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "/" in key or key == META_MEMBER[:-4]:
            raise CheckpointError(f"refusing to write: invalid array name {key!r}", p)
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            raise CheckpointError(f"refusing to write: {key} has dtype {arr.dtype}, not numeric", p)
        arrays[key] = _c_contiguous(arr)
    full_meta = dict(meta or {})
    full_meta.update(format=FORMAT_NAME, version=FORMAT_VERSION, sha256=state_sha256(arrays))
    try:
        meta_bytes = json.dumps(full_meta, indent=1, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"refusing to write: metadata is not JSON-serialisable ({exc})", p) from None
    if p.is_dir():
        raise CheckpointError("destination is a directory", p)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"destination folder {parent} does not exist", p)

    with atomic_open(p, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            z.writestr(META_MEMBER, meta_bytes)
            for key, arr in arrays.items():
                with z.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
    return full_meta


# ------------------------------------------------------------------------------------------ checking files
# the CLIP models OpenAI released, by the names cascade.models.clip.arch_name gives them
OPENAI_CLIP_MODELS = frozenset({"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
                                "ViT-L/14", "ViT-L/14@336px"})


class WeightsInfo(NamedTuple):
    """What a converted weights file holds, read without loading its arrays."""

    meta: dict                           # the stored metadata (arch, model, config, sha256, ...)
    shapes: dict[str, tuple[int, ...]]   # array name -> shape
    dtypes: dict[str, np.dtype]          # array name -> dtype


def _damaged(path, detail: str) -> CheckpointError:
    return CheckpointError(f"damaged weights file: {detail}; convert the checkpoint again "
                           f"(python -m cascade.convert SRC {path})", path)


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)  # (shape, fortran_order, dtype)


def read_header(path: str | os.PathLike) -> WeightsInfo:
    """The metadata and array shapes of converted weights (:func:`save_weights`), read from the zip's directory
    and each array's header only. A file that is not converted weights, or whose structure is broken, raises
    :class:`CheckpointError` (a damaged file is called damaged)."""
    p = Path(path)
    try:
        fmt = detect_format(p)
    except CheckpointError as exc:
        if "truncated" in exc.problem or "corrupt" in exc.problem:
            raise _damaged(p, exc.problem) from None
        raise
    if fmt not in ("cascade", "npz"):
        raise CheckpointError(f"is a {fmt} file, not converted weights: convert it first with "
                              f"`python -m cascade.convert {p} OUT.npz`", p)
    try:
        with zipfile.ZipFile(p) as z:
            meta, headers = _walk_archive(z, p, _npy_header)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise _damaged(p, f"unreadable archive member ({exc})") from None
    if not isinstance(meta, dict):
        raise _damaged(p, "its metadata is not a JSON object")
    shapes = {k: tuple(int(n) for n in shape) for k, (shape, _, _) in headers.items()}
    dtypes = {k: dtype for k, (_, _, dtype) in headers.items()}
    if meta.get("format") not in (None, FORMAT_NAME):
        raise CheckpointError(f"unknown weights format {meta.get('format')!r}", p)
    if not shapes:
        raise CheckpointError("not a checkpoint: the archive holds no arrays", p)
    return WeightsInfo(meta, shapes, dtypes)


def verify_weights(path: str | os.PathLike, chunk: int = 1 << 22) -> WeightsInfo:
    """Read every array of converted weights once, streamed (memory stays bounded): the zip checks each
    member's CRC-32, and the SHA-256 of the arrays (:func:`state_sha256`, computed from the file's bytes) must
    be the one recorded in the metadata. A truncated, damaged or edited file raises :class:`CheckpointError`
    calling it damaged; returns the file's :class:`WeightsInfo`."""
    p = Path(path)
    info = read_header(p)
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(p) as z:
            for key in sorted(info.shapes):
                with z.open(key + ".npy") as f:
                    shape, fortran, dtype = _npy_header(f)
                    if fortran:  # bytes in Fortran order: hash the C-ordered array instead
                        f.seek(0)
                        arr = _c_contiguous(np.lib.format.read_array(f, allow_pickle=False))
                        h.update(f"{key}|{arr.dtype.str}|{arr.shape}\n".encode())
                        h.update(memoryview(arr).cast("B"))
                        continue
                    h.update(f"{key}|{dtype.str}|{tuple(shape)}\n".encode())
                    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    got = 0
                    for block in iter(lambda: f.read(chunk), b""):
                        h.update(block)
                        got += len(block)
                    if got != want:
                        raise _damaged(p, f"array {key} holds {got} bytes, its header says {want}")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _damaged(p, f"{exc}") from None
    recorded = info.meta.get("sha256")
    if recorded and recorded != h.hexdigest():
        raise _damaged(p, "its arrays do not match the SHA-256 recorded in its metadata (the file was edited or "
                          "corrupted after conversion)")
    return info


# Names of the models' sizes, read from array shapes alone (cascade.models.clip and .convnextv2 import Jittor,
# which a fully cached run never needs). CONVNEXT_CONFIGS is the ConvNeXt-V2 sizes' one table (convnextv2.CONFIGS);
# tests/test_failures.py checks the names against the models' shapes.
_CLIP_RESNETS = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101", (4, 6, 10, 6): "RN50x4", (6, 8, 18, 8): "RN50x16",
                 (3, 15, 36, 10): "RN50x64"}
_CLIP_VIT_WIDTHS = {768: "B", 1024: "L"}
CONVNEXT_CONFIGS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)), "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)), "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)), "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)), "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def _count(shapes, pattern: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return 1 + max(found) if found else 0


def clip_model_name(shapes: dict[str, tuple[int, ...]]) -> str:
    """OpenAI's name of the CLIP image tower that arrays of these shapes (OpenAI's names) make ('ViT-B/32',
    'RN101', ...), or a description of a size they never released (as ``cascade.models.clip.arch_name``)."""
    try:
        if "visual.proj" in shapes:
            conv = shapes["visual.conv1.weight"]
            width, patch = conv[0], conv[-1]
            grid = round((shapes["visual.positional_embedding"][0] - 1) ** 0.5)
            name = f"ViT-{_CLIP_VIT_WIDTHS.get(width, f'w{width}')}/{patch}"
            return name if patch * grid == 224 else f"{name}@{patch * grid}px"
        layers = tuple(_count(shapes, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
        if not all(layers) or "visual.attnpool.positional_embedding" not in shapes:
            raise KeyError("visual.proj or visual.attnpool")
        return _CLIP_RESNETS.get(layers, f"RN{list(layers)}")
    except (KeyError, IndexError) as exc:
        raise ValueError(f"not a CLIP image tower (missing or malformed {exc})") from None


def convnext_stage_width(shapes: dict[str, tuple[int, ...]], i: int) -> int:
    """Stage ``i``'s channels: from any of its blocks' depthwise convolutions, else from the convolution that
    leads into it (0 if neither is there), so that one missing array is named alone, not as a wrong width."""
    for key in sorted(k for k in shapes if re.fullmatch(rf"stages\.{i}\.\d+\.dwconv\.weight", k)):
        return int(shapes[key][0])
    lead = "downsample_layers.0.0.weight" if i == 0 else f"downsample_layers.{i}.1.weight"
    return int(shapes.get(lead, (0,))[0])


def convnext_size(shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, list[int], list[int]]:
    """(size name or None, depths, dims) of ConvNeXt-V2 arrays (official names)."""
    n_stages = _count(shapes, r"stages\.(\d+)\.")
    if not n_stages or "downsample_layers.0.0.weight" not in shapes:
        raise ValueError("not ConvNeXt-V2 weights (no stages.* or downsample_layers.0.0.weight arrays)")
    depths = [_count(shapes, rf"stages\.{i}\.(\d+)\.") for i in range(n_stages)]
    dims = [convnext_stage_width(shapes, i) for i in range(n_stages)]
    name = next((n for n, (d, w) in CONVNEXT_CONFIGS.items() if list(d) == depths and list(w) == dims), None)
    return name, depths, dims


def _clip_model(info: WeightsInfo, path: Path) -> str:
    """The CLIP model the arrays describe (e.g. 'RN101'), checked against the model the metadata names."""
    try:
        held = clip_model_name(info.shapes)
    except ValueError as exc:
        raise CheckpointError(str(exc), path) from None
    claimed = info.meta.get("model")
    if claimed and claimed != held:
        raise _damaged(path, f"its metadata says CLIP {claimed} but its arrays are CLIP {held} (the metadata was "
                             "edited)")
    return held


def _convnext_size(info: WeightsInfo, path: Path) -> str:
    """The ConvNeXt-V2 size the arrays describe ('base', ... or 'depths [..] dims [..]'), checked against the
    metadata."""
    try:
        name, depths, dims = convnext_size(info.shapes)
    except ValueError as exc:
        raise CheckpointError(str(exc), path) from None
    held = name or f"depths {depths} dims {dims}"
    claimed = info.meta.get("config")
    if isinstance(claimed, dict) and (list(claimed.get("depths") or []) != depths
                                      or list(claimed.get("dims") or []) != dims
                                      or claimed.get("name", name) != name):
        said = claimed.get("name") or f"depths {claimed.get('depths')} dims {claimed.get('dims')}"
        raise _damaged(path, f"its metadata says ConvNeXt-V2 {said} but its arrays are ConvNeXt-V2 {held} (the "
                             "metadata was edited)")
    return held


def _family(name: str) -> str | None:
    n = name.upper()
    return "ViT" if n.startswith("VIT") else "ResNet" if n.startswith("RN") else None


def expected_convnext_size(name: str) -> str | None:
    """The ConvNeXt-V2 size a feature key or model name mentions (``convnextv2_base`` -> ``base``), else None."""
    m = re.search(r"convnext(?:[-_]?v2)?[-_]?(" + "|".join(CONVNEXT_CONFIGS) + r")(?![a-z])", name.lower())
    return m.group(1) if m else None


def check_weights(path: str | os.PathLike, arch: str, expected: str | None = None, where: str = "",
                  verify: bool = True) -> WeightsInfo:
    """Check converted weights before use and return their :class:`WeightsInfo`.

    ``arch`` is 'clip' or 'convnextv2'. ``expected`` is the model the caller will use them as: a CLIP backbone
    name ('ViT-B/32', 'RN101') or a name mentioning a ConvNeXt-V2 size ('convnextv2_base'); ``where`` is the
    setting that chose the file, for the message. The meta's architecture must be ``arch`` and agree with the
    arrays' shapes. CLIP: a released model must be the one named (a size OpenAI never released, such as a small
    test model, only needs the same family, ViT or ResNet). ConvNeXt-V2: a released size must be the one named.
    With ``verify`` every array is read once (:func:`verify_weights`), so a damaged file is found before use."""
    p = Path(path)
    info = verify_weights(p) if verify else read_header(p)
    held_arch = info.meta.get("arch")
    want = {"clip": "CLIP", "convnextv2": "ConvNeXt-V2"}[arch]
    for_what = f" for {expected!r}" if expected else ""
    setting = f" ({where})" if where else ""
    if held_arch not in (None, arch):
        what = {"clip": "CLIP", "convnextv2": "ConvNeXt-V2"}.get(held_arch, repr(held_arch))
        raise CheckpointError(f"holds a {what} model, expected {want}{for_what}{setting}", p)
    if arch == "clip":
        held = _clip_model(info, p)
        if expected:
            both_released = held in OPENAI_CLIP_MODELS and expected in OPENAI_CLIP_MODELS
            fam_held, fam_want = _family(held), _family(expected)
            if (both_released and held != expected) or (fam_held and fam_want and fam_held != fam_want):
                raise CheckpointError(f"holds CLIP {held}, expected CLIP {expected}{setting}: point the setting at "
                                      f"the {expected} weights", p)
    else:
        held = _convnext_size(info, p)
        size = expected_convnext_size(expected or "")
        if size and held in CONVNEXT_CONFIGS and held != size:
            raise CheckpointError(f"holds ConvNeXt-V2-{held}, expected ConvNeXt-V2-{size} for {expected!r}"
                                  f"{setting}: use the {size} weights, or name the specialist after what the file "
                                  f"holds (--set specialist.feature_key=convnextv2_{held})", p)
    return info
