"""Batched feature extraction and the on-disk feature cache (preprocessing: :mod:`cascade.preprocess`).

Each image is decoded and encoded once per backbone: features are cached on disk under a key made of the
model weights' identity (their SHA-256), the preprocessing and the image file (absolute path, size, mtime), so
``train``, ``test`` and every stage reuse them, and an interrupted run resumes where it stopped (features are
written every ``chunk`` images and when the run is interrupted).

Pipeline: worker processes decode and resize/crop images a few batches ahead of the model, which encodes batch
after batch in the calling process (processes, not threads: Jittor holds the GIL while it computes, so decoding
threads would stall; small jobs use threads). Decoded crops travel through a shared memory-mapped buffer, only
small messages through pipes. Unreadable images are returned as failures with their reason, never dropped
silently: their rows are zero and ``ok`` is False.

An *encoder* is any object with ``cache_key`` (a string identifying the weights) and
``encode_image(x: float32 [N,3,H,W]) -> [N,D]``; optionally ``preprocess`` (a :class:`Preprocess`).
:class:`ModelEncoder` wraps a model loaded lazily, so a fully cached run never loads the weights.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from . import runtime
from .data import ImageError
from .io import atomic_open, atomic_write_json, atomic_write_text
from .models import load_clip, load_convnextv2, tokenize
from .models.weights import CheckpointError, check_weights, detect_format, read_header, sha256_file
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .runtime import jittor, mpi_local

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "FeatureCache", "CacheError", "Failure",
    "FeatureResult", "extract_features", "ModelEncoder", "clip_encoder", "convnext_encoder", "weights_identity",
    "text_features", "l2_normalize",
]

CACHE_FORMAT = "cascade-features-v1"


def l2_normalize(x: np.ndarray, axis: int = -1, dtype=np.float32) -> np.ndarray:
    """Rows (``axis``) scaled to unit L2 norm, as ``dtype``; the norm is computed in float64."""
    x = np.asarray(x, dtype=dtype)
    n = np.linalg.norm(x.astype(np.float64), axis=axis, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(dtype)


# ---------------------------------------------------------------------------------------------- the cache
def file_key(path) -> str:
    """The cache key of an image file: its absolute path, size and modification time (ns)."""
    p = os.path.abspath(path)
    st = os.stat(p)
    return hashlib.sha1(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogatepass")).hexdigest()


class CacheError(ValueError):
    """A feature cache folder that cannot be used as it is; the message names the folder to delete."""


class FeatureCache:
    """Features of one (model weights, preprocessing) pair: append-only shards of ``<id>.feats.npy`` (float32
    [n, D]), ``<id>.keys.npy`` (file keys) and ``<id>.sum.json`` (the SHA-256 of both files' bytes, the row
    count and width). All three are written atomically, the checksum last: a shard counts once its checksum
    file exists, so an interrupted write leaves at most an ignored temporary file or an unfinished shard.
    Several processes may write the same cache; duplicate rows are harmless.

    Every shard is verified against its checksum when it is first used: a damaged or edited shard is reported
    by path, removed and its images are encoded again (if it cannot be removed, the warning says which folder
    to delete). Shards without a checksum (an older cache format, or a write interrupted before the checksum)
    are ignored and, once a minute old, removed."""

    SUM_SUFFIX = ".sum.json"

    def __init__(self, root, key: str):
        self.key = key
        self.dir = Path(root) / hashlib.sha256(key.encode()).hexdigest()[:24]
        self.index: dict[str, tuple[str, int]] = {}
        self.dim: int | None = None
        self._pending_keys: list[str] = []
        self._pending_feats: list[np.ndarray] = []
        self._loaded = False
        self._shards: dict[str, dict] = {}       # shard id -> its checksum record (+ "keys": list of keys)
        self._verified: set[str] = set()         # shards whose features file matched its checksum

    # ------------------------------------------------------------------------------------------ reading
    def _warn_bad(self, sid: str, path: Path, problem: str, n: int | None = None) -> None:
        """Report a bad shard by path and remove its files (or say which folder to delete)."""
        removed = self._remove_shard(sid)
        what = f"its {n} image(s) are encoded again" if n is not None else "its images are encoded again"
        tail = "" if removed is None else (f"; it could not be removed ({removed}): delete the folder {self.dir} "
                                           "if this warning repeats")
        print(f"warning: ignoring damaged feature cache shard {path} ({problem}); {what}{tail}", file=sys.stderr)

    def _remove_shard(self, sid: str) -> str | None:
        problem = None
        for suffix in (self.SUM_SUFFIX, ".keys.npy", ".feats.npy"):
            try:
                (self.dir / f"{sid}{suffix}").unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problem = exc.strerror or str(exc)
        return problem

    def _check_folder(self) -> None:
        info = self.dir / "key.json"
        if not info.is_file():
            return
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
            ok = isinstance(data, dict) and data.get("key") == self.key
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise CacheError(f"{info}: the feature cache folder {self.dir} does not belong to these weights and "
                             f"preprocessing (its key.json is damaged or another's); delete the folder {self.dir} "
                             "and rerun (its features are encoded again)")

    def _load_index(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.dir.is_dir():
            return
        self._check_folder()
        summed = set()
        for sf in sorted(self.dir.glob(f"*{self.SUM_SUFFIX}")):
            sid = sf.name[: -len(self.SUM_SUFFIX)]
            summed.add(sid)
            kf = self.dir / f"{sid}.keys.npy"
            try:
                rec = json.loads(sf.read_text(encoding="utf-8"))
                if not isinstance(rec, dict) or not {"feats_sha256", "keys_sha256", "rows", "dim"} <= set(rec):
                    raise ValueError("incomplete checksum record")
            except (OSError, ValueError) as exc:
                self._warn_bad(sid, sf, f"unreadable checksum: {exc}")
                continue
            try:
                raw = kf.read_bytes()
                if hashlib.sha256(raw).hexdigest() != rec["keys_sha256"]:
                    self._warn_bad(sid, kf, "checksum mismatch", rec.get("rows"))
                    continue
                keys = np.load(io.BytesIO(raw), allow_pickle=False)
            except FileNotFoundError:
                self._warn_bad(sid, kf, "file missing")
                continue
            except (OSError, ValueError) as exc:
                self._warn_bad(sid, kf, f"unreadable: {exc}")
                continue
            if keys.ndim != 1 or len(keys) != int(rec["rows"]):
                self._warn_bad(sid, kf, f"{len(keys)} keys for {rec['rows']} rows")
                continue
            if self.dim is None:
                self.dim = int(rec["dim"])
            elif int(rec["dim"]) != self.dim:
                self._warn_bad(sid, self.dir / f"{sid}.feats.npy", f"width {rec['dim']} != {self.dim}")
                continue
            rec["keys"] = [k.decode() if isinstance(k, bytes) else str(k) for k in keys.tolist()]
            self._shards[sid] = rec
            for row, k in enumerate(rec["keys"]):
                self.index[k] = (sid, row)
        self._drop_unsummed(summed)

    def _drop_unsummed(self, summed: set) -> None:
        """Shards without a checksum: ignored; removed once old enough not to be another process's write in
        progress."""
        stale = []
        for kf in self.dir.glob("*.keys.npy"):
            sid = kf.name[: -len(".keys.npy")]
            if sid in summed:
                continue
            try:
                old = time.time() - kf.stat().st_mtime > 60
            except OSError:
                continue
            if old:
                stale.append(sid)
        if stale:
            problems = [p for p in (self._remove_shard(sid) for sid in stale) if p]
            tail = (f"; some could not be removed ({problems[0]}): delete the folder {self.dir}" if problems else "")
            print(f"warning: {self.dir}: ignored {len(stale)} feature cache shard(s) without a checksum (an older "
                  f"cache format or an interrupted write); their images are encoded again{tail}", file=sys.stderr)

    def _verify(self, sid: str) -> bool:
        """Check a shard's features file against its checksum (once); a bad shard is reported, removed and its
        keys dropped from the index."""
        if sid in self._verified:
            return True
        rec = self._shards[sid]
        ff = self.dir / f"{sid}.feats.npy"
        problem = None
        try:
            raw = ff.read_bytes()
            if hashlib.sha256(raw).hexdigest() != rec["feats_sha256"]:
                problem = "checksum mismatch: the file was changed or damaged after it was written"
            else:
                f = io.BytesIO(raw)
                version = np.lib.format.read_magic(f)
                shape = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)(f)[0]
                if tuple(shape) != (int(rec["rows"]), int(rec["dim"])):
                    problem = f"shape {tuple(shape)}, expected {(rec['rows'], rec['dim'])}"
        except FileNotFoundError:
            problem = "file missing"
        except (OSError, ValueError) as exc:
            problem = f"unreadable: {exc}"
        if problem is None:
            self._verified.add(sid)
            return True
        self._warn_bad(sid, ff, problem, int(rec["rows"]))
        del self._shards[sid]
        self.index = {}
        for other, r in self._shards.items():
            for row, k in enumerate(r["keys"]):
                self.index[k] = (other, row)
        return False

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Boolean mask: which keys are cached (in shards that match their checksums)."""
        self._load_index()
        while True:
            needed = {self.index[k][0] for k in keys if k in self.index} - self._verified
            if all(self._verify(sid) for sid in sorted(needed)):
                break
        return np.array([k in self.index for k in keys], dtype=bool)

    def gather(self, keys: Sequence[str], out: np.ndarray, rows: Sequence[int]) -> None:
        """Copy the cached features of ``keys`` (found by :meth:`lookup`) into ``out[rows]``."""
        self._load_index()
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for k, r in zip(keys, rows):
            sid, srow = self.index[k]
            by_shard.setdefault(sid, []).append((r, srow))
        for sid, pairs in by_shard.items():
            ff = self.dir / f"{sid}.feats.npy"
            try:
                feats = np.load(ff, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CacheError(f"{ff}: feature cache shard became unreadable during the run ({exc}); delete the "
                                 f"folder {self.dir} and rerun") from None
            dst = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
            src = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
            order = np.argsort(src)
            out[dst[order]] = feats[src[order]]

    # ------------------------------------------------------------------------------------------ writing
    def add(self, keys: Sequence[str], feats: np.ndarray) -> None:
        self._pending_keys.extend(keys)
        self._pending_feats.append(np.asarray(feats, dtype=np.float32))

    @property
    def pending(self) -> int:
        return len(self._pending_keys)

    @staticmethod
    def _npy_bytes(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()

    def flush(self) -> None:
        """Write the pending rows as one shard (features, keys, then their checksum). A failed write (e.g. a
        full disk) raises OSError naming the file."""
        if not self._pending_keys:
            return
        feats = np.concatenate(self._pending_feats, axis=0)
        keys = np.array(self._pending_keys, dtype="S40")
        feats_raw, keys_raw = self._npy_bytes(feats), self._npy_bytes(keys)
        sid = f"{uuid.uuid4().hex[:16]}"
        target = self.dir
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            info = self.dir / "key.json"
            if not info.exists():
                target = info
                atomic_write_json(info, {"format": CACHE_FORMAT, "key": self.key, "dim": int(feats.shape[1])})
            for suffix, raw in ((".feats.npy", feats_raw), (".keys.npy", keys_raw)):
                target = self.dir / f"{sid}{suffix}"
                with atomic_open(target, "wb") as f:
                    f.write(raw)
            target = self.dir / f"{sid}{self.SUM_SUFFIX}"
            atomic_write_json(target, {"format": CACHE_FORMAT, "rows": int(len(keys)), "dim": int(feats.shape[1]),
                                       "feats_sha256": hashlib.sha256(feats_raw).hexdigest(),
                                       "keys_sha256": hashlib.sha256(keys_raw).hexdigest()})
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(target)
            raise
        rec = {"rows": int(len(keys)), "dim": int(feats.shape[1]), "keys": list(self._pending_keys)}
        self._shards[sid] = rec
        self._verified.add(sid)
        for row, k in enumerate(self._pending_keys):
            self.index[k] = (sid, row)
        if self.dim is None:
            self.dim = int(feats.shape[1])
        self._pending_keys, self._pending_feats = [], []

    # ---------------------------------------------------------------------------- single checked arrays
    @staticmethod
    def save_array(path, arr: np.ndarray) -> None:
        """Write one array (``path``, .npy) with its checksum beside it (``path`` + ``.sha256``), atomically."""
        raw = FeatureCache._npy_bytes(np.asarray(arr))
        path = Path(path)
        target = path
        try:
            with atomic_open(path, "wb") as f:
                f.write(raw)
            target = path.with_name(path.name + ".sha256")
            atomic_write_text(target, hashlib.sha256(raw).hexdigest() + "\n")
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(target)
            raise

    @staticmethod
    def load_array(path) -> np.ndarray | None:
        """An array written by :meth:`save_array`, or None when it is absent or fails its checksum (reported by
        path and removed, so that it is computed again)."""
        path = Path(path)
        sf = path.with_name(path.name + ".sha256")
        if not path.is_file():
            return None
        problem = None
        try:
            raw = path.read_bytes()
            want = sf.read_text(encoding="utf-8").strip() if sf.is_file() else None
            if want is None:
                problem = "no checksum (an older cache format)"
            elif hashlib.sha256(raw).hexdigest() != want:
                problem = "checksum mismatch: the file was changed or damaged after it was written"
            else:
                return np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError) as exc:
            problem = f"unreadable: {exc}"
        for f in (path, sf):
            try:
                f.unlink()
            except OSError:
                pass
        print(f"warning: ignoring cached features {path} ({problem}); they are computed again", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------ extraction
class Failure(NamedTuple):
    index: int      # position in the list of paths given
    path: str
    reason: str


class FeatureResult(NamedTuple):
    features: np.ndarray        # float32 [N, D], L2-normalised; rows of failed images are zero
    failures: list              # list[Failure]

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.features), dtype=bool)
        for f in self.failures:
            mask[f.index] = False
        return mask


def _default_workers() -> int:
    """One decoding process per core, at most 8; under mpirun the node's cores are shared by its ranks."""
    return max(1, min(8, (os.cpu_count() or 1) // mpi_local()[1]))


def _decode(preprocess: Preprocess, path: str):
    """(uint8 crop or None, failure reason or None) for one file; never raises for a bad image."""
    try:
        return preprocess.load_crop(path), None
    except ImageError as exc:
        return None, exc.reason
    except Exception as exc:  # noqa: BLE001  (anything Pillow throws for a hostile file: reported, not fatal)
        return None, f"cannot decode ({type(exc).__name__}: {exc})"


def extract_features(encoder, paths: Sequence, cache_dir, preprocess: Preprocess | None = None,
                     batch_size: int = 32, workers: int = 0, chunk: int = 1024, progress: bool = True,
                     desc: str | None = None, distributed: bool = False) -> FeatureResult:
    """Features of ``paths`` (L2-normalised float32 [N, D]) and the files that could not be read.

    Cached features are reused. The others are decoded by ``workers`` processes (0: one per core, at most 8;
    threads for small jobs) while ``encoder`` encodes batches of ``batch_size`` in this process, and written
    to the cache every ``chunk`` images and on interruption. Decoding runs in separate processes because
    Jittor holds the GIL while it computes, which would stall decoding threads. The last batch is padded to
    ``batch_size`` so the model always sees one input shape.

    ``distributed=True`` under ``mpirun`` (every rank makes the same call): the images not yet cached are split
    among the ranks in contiguous blocks balanced by count, each rank encodes its block into its own cache
    shards, and after all ranks are done every rank reads the complete cache. Only rank 0 gets the features;
    the other ranks get zero-width rows, and every rank gets the same failures. Outside MPI it changes
    nothing."""
    rank, size = runtime.mpi_world() if distributed else (0, 1)
    args = dict(preprocess=preprocess, batch_size=batch_size, workers=workers, chunk=chunk)
    if size <= 1:
        return _extract(encoder, paths, cache_dir, progress=progress, desc=desc, **args)
    paths = [str(p) for p in paths]
    preprocess = preprocess or getattr(encoder, "preprocess", None) or Preprocess.clip()
    args["preprocess"] = preprocess
    # 1. every rank lists the same uncached rows: nothing is written to the cache between two barriers' ends
    runtime.barrier()
    cache = FeatureCache(cache_dir, f"{encoder.cache_key}|{preprocess.cache_key}")
    todo = []
    for i, p in enumerate(paths):
        try:
            k = file_key(p)
        except OSError:
            continue                         # reported by the final pass below
        todo.append((i, k))
    hit = cache.lookup([k for _, k in todo])
    todo = np.array([i for (i, _), h in zip(todo, hit) if not h], dtype=np.int64)
    # 2. this rank's block: a contiguous share of the uncached rows, written to this rank's own shards
    mine = np.array_split(todo, size)[rank]
    label = desc or str(getattr(encoder, "name", "features"))
    if mine.size:
        _extract(encoder, [paths[i] for i in mine], cache_dir, progress=progress and rank == 0,
                 desc=f"{label} (rank {rank} of {size}: {mine.size} of {todo.size} images)", **args)
    # 3. once every rank is done, the cache holds every readable image: the ordinary pass only gathers (rank 0)
    # and decodes the unreadable ones again to report them alike on every rank
    runtime.barrier()
    return _extract(encoder, paths, cache_dir, progress=False, desc=desc, gather=rank == 0, **args)


def _extract(encoder, paths: Sequence, cache_dir, preprocess: Preprocess | None = None, batch_size: int = 32,
             workers: int = 0, chunk: int = 1024, progress: bool = True, desc: str | None = None,
             gather: bool = True) -> FeatureResult:
    """:func:`extract_features` in this process alone. ``gather=False``: the cached rows are not read (the
    features returned have zero width), only missing rows are encoded and cached."""
    preprocess = preprocess or getattr(encoder, "preprocess", None) or Preprocess.clip()
    paths = [str(p) for p in paths]
    n = len(paths)
    failures: list[Failure] = []
    keys: list[str | None] = []
    for i, p in enumerate(paths):
        try:
            keys.append(file_key(p))
        except FileNotFoundError:
            keys.append(None)
            failures.append(Failure(i, p, "file not found"))
        except OSError as exc:
            keys.append(None)
            failures.append(Failure(i, p, f"cannot access file ({exc.strerror or exc})"))
    if n == 0:
        return FeatureResult(np.zeros((0, 0), np.float32), [])
    cache = FeatureCache(cache_dir, f"{encoder.cache_key}|{preprocess.cache_key}")
    valid = [i for i in range(n) if keys[i] is not None]
    hit = cache.lookup([keys[i] for i in valid])
    cached_rows = [i for i, h in zip(valid, hit) if h]
    todo = [i for i, h in zip(valid, hit) if not h]

    label = desc or str(getattr(encoder, "name", "features"))
    bar = tqdm(total=n, desc=label, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               mininterval=0.5)
    bar.update(n - len(todo))
    out: list[np.ndarray] = []      # the [N, D] result, allocated once D is known (new rows go straight in)
    batch_x: list[np.ndarray] = []
    batch_i: list[int] = []

    def run_batch():
        x = preprocess.normalize(np.stack(batch_x))
        m = len(x)
        if m < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], np.float32)])
        y = _to_numpy(encoder.encode_image(x))
        if y.ndim != 2 or len(y) < m:
            raise RuntimeError(f"encoder {getattr(encoder, 'name', encoder)!r} returned shape {y.shape} "
                               f"for a batch of {len(x)}")
        y = l2_normalize(y[:m])
        cache.add([keys[i] for i in batch_i], y)
        if not out:
            out.append(np.zeros((n, y.shape[1]), dtype=np.float32))
        out[0][np.asarray(batch_i)] = y
        bar.update(m)
        batch_x.clear()
        batch_i.clear()
        if cache.pending >= chunk:
            cache.flush()

    def consume(i, crop, reason):
        if crop is None:
            failures.append(Failure(i, paths[i], reason))
            bar.update(1)
            return
        batch_x.append(crop)
        batch_i.append(i)
        if len(batch_x) == batch_size:
            run_batch()

    try:
        if todo:
            workers = workers or _default_workers()
            lookahead = max(3 * batch_size, 4 * workers)
            decoded = None
            if len(todo) > 2 * batch_size and workers > 1:
                decoded = _decode_in_processes(preprocess, paths, todo, workers, lookahead)
            if decoded is None:
                decoded = _decode_in_threads(preprocess, paths, todo, workers, lookahead)
            try:
                for i, crop, reason in decoded:
                    consume(i, crop, reason)
            finally:
                decoded.close()  # stop the decoders now, also when encoding failed or was interrupted
            if batch_x:
                run_batch()
    finally:
        cache.flush()  # also on Ctrl-C: what was computed is kept for the next run
        bar.close()
    if not gather:
        return FeatureResult(np.zeros((n, 0), np.float32), sorted(failures, key=lambda f: f.index))
    if not out:
        out.append(np.zeros((n, cache.dim or 0), dtype=np.float32))
    if cached_rows:
        cache.gather([keys[i] for i in cached_rows], out[0], cached_rows)
    failures.sort(key=lambda f: f.index)
    return FeatureResult(out[0], failures)


def _decode_in_threads(preprocess, paths, todo, workers, lookahead):
    """Yield (index, crop, reason) in order, decoded by a thread pool a few batches ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        it = iter(todo)
        try:
            for i in it:
                pending.append((i, pool.submit(_decode, preprocess, paths[i])))
                if len(pending) >= lookahead:
                    break
            while pending:
                i, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_decode, preprocess, paths[nxt])))
                crop, reason = fut.result()
                yield i, crop, reason
        finally:
            for _, fut in pending:
                fut.cancel()


def _decode_in_processes(preprocess, paths, todo, workers, slots):
    """Decode in ``workers`` spawned processes. Each decoded crop is written into one of ``slots`` slots of a
    shared memory-mapped file; only small messages (slot, index, reason) travel through the pipes, so workers
    keep decoding while this process is busy in Jittor (which holds the GIL). Yields (index, crop, reason) as
    images finish (any order). Returns None when worker processes cannot be started."""
    shape = (preprocess.size, preprocess.size, 3)
    slot_bytes = int(np.prod(shape))
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, buf_path = tempfile.mkstemp(prefix="cascade-decode-", suffix=".u8", dir=tmpdir)
    try:
        os.ftruncate(fd, slots * slot_bytes)
    finally:
        os.close(fd)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.SimpleQueue(), ctx.SimpleQueue()
    procs = []
    try:
        for _ in range(workers):
            p = ctx.Process(target=_decode_worker, args=(tasks, results, buf_path, slots, shape, preprocess),
                            daemon=True)
            p.start()
            procs.append(p)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: cannot start decoding processes ({exc}); decoding in threads", file=sys.stderr)
        for p in procs:
            p.terminate()
        os.unlink(buf_path)
        return None
    return _process_results(tasks, results, procs, buf_path, slots, shape, paths, todo)


def _process_results(tasks, results, procs, buf_path, slots, shape, paths, todo):
    buf = np.memmap(buf_path, dtype=np.uint8, mode="r+", shape=(slots,) + shape)
    try:
        for _ in procs:  # every worker has mapped the buffer: its name can go (nothing left behind, even on kill)
            if _get_result(results, procs) != "ready":
                raise RuntimeError("image decoding process sent an unexpected message")
    finally:
        try:
            os.unlink(buf_path)
        except OSError:
            pass
    free = list(range(slots))
    it = iter(todo)
    outstanding = 0
    try:
        def feed():
            nonlocal outstanding
            while free:
                i = next(it, None)
                if i is None:
                    return
                tasks.put((free.pop(), i, paths[i]))
                outstanding += 1

        feed()
        while outstanding:
            msg = _get_result(results, procs)
            slot, i, reason = msg
            outstanding -= 1
            crop = None if reason is not None else np.array(buf[slot])
            free.append(slot)
            feed()
            yield i, crop, reason
    finally:
        for _ in procs:
            try:
                tasks.put(None)
            except (OSError, ValueError):
                pass
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
        del buf


def _get_result(results, procs):
    """Next worker message; raises if every worker died (rather than waiting forever)."""
    while True:
        if results._reader.poll(1.0):
            return results.get()
        if not any(p.is_alive() for p in procs):
            raise RuntimeError("image decoding processes exited unexpectedly")


def _decode_worker(tasks, results, buf_path, slots, shape, preprocess):  # runs in a spawned process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    buf = np.memmap(buf_path, dtype=np.uint8, mode="r+", shape=(slots,) + tuple(shape))
    results.put("ready")
    parent = mp.parent_process()
    while True:
        if not tasks._reader.poll(1.0):
            if parent is not None and not parent.is_alive():
                break       # the main process died without stopping us (killed, out of memory): do not linger
            continue
        task = tasks.get()
        if task is None:
            break
        slot, i, path = task
        crop, reason = _decode(preprocess, path)
        if crop is not None:
            if crop.shape != tuple(shape):
                crop, reason = None, f"unexpected crop shape {crop.shape}"
            else:
                buf[slot] = crop
        results.put((slot, i, reason))


def _to_numpy(y) -> np.ndarray:
    if hasattr(y, "numpy") and not isinstance(y, np.ndarray):
        y = y.numpy()
    return np.asarray(y, dtype=np.float32)


# --------------------------------------------------------------------------------------------- encoders
def weights_identity(path) -> str:
    """A string that changes whenever the weights change: the SHA-256 stored in our converted format's
    metadata, else the SHA-256 of the file's bytes. Converted weights that cannot be read (truncated, damaged)
    raise :class:`~cascade.models.weights.CheckpointError` saying so, never a different identity."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: weights file not found (convert the checkpoint first: "
                                f"python -m cascade.convert SRC {p})")
    if _is_converted(p):
        meta = read_header(p).meta
        if meta.get("sha256"):
            return f"sha256:{meta['sha256']}"
    return f"file-sha256:{sha256_file(p)}"


def _is_converted(path: Path) -> bool:
    """Whether ``path`` is in our converted format (an .npz), broken zips included: :func:`read_header` then says
    it is damaged. Other files are read as they are when the model is loaded (and refused then, by name)."""
    try:
        return detect_format(path) in ("cascade", "npz")
    except CheckpointError as exc:
        return "truncated" in exc.problem or "corrupt" in exc.problem


def _check_converted(path: Path, arch: str, expected: str, where: str | None) -> None:
    """Converted weights are verified (every array read once) and must hold the expected model
    (:func:`cascade.models.weights.check_weights`); other files are read as they are when the model is loaded
    (a file that is no checkpoint at all is refused then, by name)."""
    if _is_converted(path):
        check_weights(path, arch, expected, where or "")


class ModelEncoder:
    """An encoder over a model loaded on first use. ``loader()`` returns the model; ``method`` names its
    image method (``encode_image``); ``identity`` is the weights' identity (see :func:`weights_identity`)."""

    def __init__(self, name: str, loader: Callable[[], Any], identity: str, preprocess: Preprocess,
                 method: str = "encode_image"):
        self.name = name
        self._loader = loader
        self._model = None
        self._lock = threading.Lock()
        self.identity = identity
        self.preprocess = preprocess
        self.method = method

    @property
    def cache_key(self) -> str:
        return f"{self.name}|{self.identity}"

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                self._model = self._loader()
            return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def release(self) -> None:
        """Drop the model (it is loaded again if needed), returning its memory."""
        with self._lock:
            if self._model is None:
                return
            self._model = None
        gc.collect()
        if "jittor" in sys.modules:
            sys.modules["jittor"].gc()

    def encode_image(self, x: np.ndarray) -> np.ndarray:
        jt = jittor()
        model = self.model
        with jt.no_grad():
            y = getattr(model, self.method)(jt.array(np.ascontiguousarray(x, dtype=np.float32)))
            out = y.numpy()
        return out


def clip_encoder(name: str, weights_path) -> ModelEncoder:
    """A lazily loaded CLIP image tower (``cascade.models.load_clip``) with CLIP's preprocessing at the model's
    input resolution (read from the converted weights' metadata or shapes without building the model).
    Converted weights are checked first: undamaged, and holding the CLIP model ``name`` says (a released
    model by that name, else the same family); an error names the setting ``models.clip.<name>``."""
    path = Path(weights_path)
    identity = weights_identity(path)
    _check_converted(path, "clip", name, f"models.clip.{name}")
    res = _peek_resolution(path) or 224

    def loader():
        model = load_clip(path)
        got = int(getattr(model, "input_resolution", res))
        if got != res:
            raise ValueError(f"{path}: model input resolution {got} differs from the expected {res}")
        return model

    return ModelEncoder(name, loader, identity, Preprocess.clip(res))


def convnext_encoder(name: str, weights_path, preprocess: Preprocess | None = None,
                     where: str | None = None) -> ModelEncoder:
    """A lazily loaded ConvNeXt-V2 (``cascade.models.load_convnextv2``); ImageNet preprocessing by default.
    The weights are checked first: undamaged, ConvNeXt-V2, and of the size ``name`` mentions (``convnextv2_base``
    -> base) if it mentions one; ``where`` names the setting for the message."""
    path = Path(weights_path)
    identity = weights_identity(path)
    _check_converted(path, "convnextv2", name, where)

    def loader():
        return load_convnextv2(path)

    return ModelEncoder(name, loader, identity, preprocess or Preprocess.imagenet(), method="encode_image")


def _peek_resolution(path: Path) -> int | None:
    """CLIP's input resolution from converted weights without loading them all: patch size x grid (ViT) or
    32 x grid of the attention pool (modified ResNet)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            try:
                meta = json.loads(z.read("__meta__.json"))
                for key in ("image_resolution", "input_resolution"):
                    v = (meta.get("config") or {}).get(key) if isinstance(meta.get("config"), dict) else None
                    v = v or meta.get(key)
                    if v:
                        return int(v)
            except (KeyError, ValueError):
                pass

            def shape(member):
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    return read(f)[0]

            if "visual.conv1.weight.npy" in names and "visual.positional_embedding.npy" in names:
                patch = shape("visual.conv1.weight.npy")[-1]
                grid = int(round((shape("visual.positional_embedding.npy")[0] - 1) ** 0.5))
                return int(patch * grid)
            if "visual.attnpool.positional_embedding.npy" in names:
                grid = int(round((shape("visual.attnpool.positional_embedding.npy")[0] - 1) ** 0.5))
                return int(32 * grid)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return None
    return None


# ------------------------------------------------------------------------------------------ text features
def text_features(encoder: ModelEncoder, prompts: Sequence[Sequence[str]], cache_dir, batch_size: int = 256,
                  progress: bool = True) -> np.ndarray:
    """Class text embeddings [C, D], L2-normalised: each class's prompts are encoded, normalised, averaged
    (a prompt ensemble) and normalised again. Cached under the weights' identity and the prompts, with a
    checksum (:meth:`FeatureCache.save_array`): a damaged cached file is reported and computed again."""
    prompts = [list(p) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("text_features: every class needs at least one prompt")
    digest = hashlib.sha256(json.dumps([encoder.cache_key, prompts], ensure_ascii=False).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "text" / f"{digest}.npy"
    arr = FeatureCache.load_array(path)
    if arr is not None and arr.ndim == 2 and arr.shape[0] == len(prompts):
        return arr
    jt = jittor()
    flat = [t for p in prompts for t in p]
    owner = np.repeat(np.arange(len(prompts)), [len(p) for p in prompts])
    model = encoder.model
    chunks = []
    for s in tqdm(range(0, len(flat), batch_size), desc=f"{encoder.name} text", unit="batch", file=sys.stderr,
                  disable=not progress, mininterval=0.5):
        tokens = tokenize(flat[s: s + batch_size])
        with jt.no_grad():
            chunks.append(l2_normalize(_to_numpy(model.encode_text(jt.array(tokens)))))
    emb = np.concatenate(chunks)
    sums = np.zeros((len(prompts), emb.shape[1]), np.float64)
    np.add.at(sums, owner, emb)
    out = l2_normalize(sums.astype(np.float32))
    FeatureCache.save_array(path, out)
    return out
