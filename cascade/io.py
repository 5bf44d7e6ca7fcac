"""File helpers shared by the whole package: atomic writes, text-line readers, error aggregation and the
npz + JSON state format.

This module is a leaf: it imports nothing from ``cascade``, so any module may use it without an import circle.

Atomic writes go to a temporary file in the target's folder, which is flushed, fsynced and then renamed onto the
target with ``os.replace``. A crash or Ctrl-C therefore never leaves a half-written file; an old file stays
intact until the new one is complete.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MAX_LISTED", "STDOUT", "os_problem", "one_line", "writing", "atomic_open", "atomic_write_text",
           "atomic_write_json", "replace_dir", "raise_many", "read_lines", "read_npz", "save_npz_json",
           "load_npz_json"]

MAX_LISTED = 20  # problems listed in one error message before "... and N more"
STDOUT = "standard output"  # the name writing() gives a fault of sys.stdout
META_KEY = "__meta__"  # the npz entry that holds the JSON document of save_npz_json


# ---------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def writing(path):
    """An OSError raised inside names ``path`` (a failed write() or fsync() carries no file name). For
    :data:`STDOUT` the block's output is flushed inside it, so that a fault of a redirected or piped standard
    output (buffered until then) is met, and named, here."""
    try:
        yield
        if path == STDOUT:
            sys.stdout.flush()
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            exc.filename = str(path)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """``with atomic_open(p) as f: f.write(...)``: the file appears at ``p`` only if the block succeeds (written
    to a temporary file in the same folder, synced, then renamed over ``p``), with the permissions a plain
    ``open`` would give it (0666 minus the umask). The one atomic writer of the project: result files, reports,
    feature-cache shards, fitted stages and converted weights all go through it."""
    path = Path(path)
    if path.is_dir():           # "." would otherwise fail its rename with EBUSY
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path.parent, *path.parent.parents)
                        if (p.exists() or p.is_symlink()) and not p.is_dir()), path.parent)
        what = "a broken symbolic link" if blocker.is_symlink() and not blocker.exists() else "a file"
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is {what}, not a folder", str(path)) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _about(exc, path) from None
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, **({} if binary else {"encoding": encoding, "newline": newline})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp:
            raise _about(exc, path) from None
        raise


def _about(exc: OSError, path: Path) -> OSError:
    """``exc`` naming the file being written, ``path``, not the temporary file beside it."""
    exc.filename, exc.filename2 = str(path), None
    return exc


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    with atomic_open(path, "w", newline="\n") as f:
        f.write(text)


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON atomically; NumPy scalars, arrays and paths are converted."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def replace_dir(tmp_dir, final_dir) -> None:
    """Move a fully written folder onto ``final_dir``. The old folder is renamed aside first and removed only
    after the new one is in place, so at every moment either the old or the new folder is complete."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading
def raise_many(problems: list[str], header: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` listing every problem (the first MAX_LISTED of them) under ``header``; no-op if none.
    Input files are checked as a whole so that a user fixes every problem in one pass."""
    if not problems:
        return
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    text = header + "\n  " + "\n  ".join(shown)
    if more:
        text += f"\n  ... and {more} more"
    raise error(text)


def read_lines(path, what: str, error: type[Exception] = ValueError,
               comments: bool = True) -> list[tuple[int, str]]:
    """Non-blank lines (1-based line number, stripped text) of a UTF-8 text file; BOM and CRLF tolerated, lines
    starting with ``#`` skipped when ``comments``. Problems raise ``error`` naming the file and ``what`` it is."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} not found")
    if path.is_dir():
        raise error(f"{path}: {what} is a directory, expected a text file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)]
    return [(i, t) for i, t in lines if t and not (comments and t.startswith("#"))]


# ------------------------------------------------------------------------------------------ npz + JSON
def save_npz_json(path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write ``arrays`` plus a JSON ``meta`` document into one .npz file. Object arrays are refused:
    they would need pickle, which loading never allows."""
    path = Path(path)
    if META_KEY in arrays:
        raise ValueError(f"{META_KEY!r} is reserved")
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in payload.items():
        if v.dtype == object:
            raise ValueError(f"{path}: array {k!r} has dtype object, which cannot be saved without pickle")
    payload[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **payload)
    return path


ZIP_HEADS = (b"PK\x03\x04", b"PK\x05\x06")   # a zip archive's first bytes (with entries, empty)


def read_npz(path, what: str = "file") -> dict[str, np.ndarray]:
    """All arrays of an .npz file, read without pickle; errors name the file and say it is not a readable
    ``what``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable {what} ({os_problem(exc)})") from None
    if head not in ZIP_HEADS:   # np.load would take it for a pickle or a bare .npy and say so
        raise ValueError(f"{path}: not a readable {what} (" + ("an empty file" if not head else
                         "not an .npz archive: no zip header") + ")")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile / format errors, object arrays
        raise ValueError(f"{path}: not a readable {what} ({exc})") from exc


def load_npz_json(path, what: str = "stage file") -> tuple[dict[str, np.ndarray], dict]:
    """The ``(arrays, meta)`` pair written by :func:`save_npz_json`; errors name the file."""
    path = Path(path)
    arrays = read_npz(path, what)
    if META_KEY not in arrays:
        raise ValueError(f"{path}: missing the {META_KEY!r} entry; not a file written by cascade")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt {META_KEY!r} JSON ({exc})") from exc
    return arrays, meta


def one_line(text: str) -> bool:
    """Whether ``text`` can be written as one line of a UTF-8 text file and read back as that line: no character
    at which :func:`read_lines` (``str.splitlines``) breaks a line (``\\n``, ``\\r``, ``\\v``, ``\\f``, ``\\x1c``-
    ``\\x1e``, ``\\x85``, U+2028, U+2029), no leading whitespace (read_lines strips each line), and no undecodable
    byte (a file name that is not UTF-8 holds surrogates, which UTF-8 cannot write)."""
    if text.splitlines() != [text] or text[:1].isspace():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def os_problem(exc: OSError) -> str:
    """An OSError's problem without its path, ``'Read-only file system (errno 30 EROFS)'``; an error raised with a
    message of its own (no errno) keeps it."""
    if exc.errno is None or not exc.strerror:
        return str(exc)
    name = errno.errorcode.get(exc.errno, "")
    return f"{exc.strerror} (errno {exc.errno}{' ' + name if name else ''})"
