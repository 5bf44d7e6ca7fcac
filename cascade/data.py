"""The dataset: its layout on disk, the class list, few-shot sampling and robust image decoding.

Layout (the 4th Jittor AI Challenge's, see data/README.md), all paths relative to a data root::

    classes.txt        <Domain>_<Class> <index>          one line per seen class, indices 0..C-1
    classes_b.txt      the same lines, then extra unseen classes (optional "all classes" file)
    train.txt          <path> <index>                    every training image, e.g. TrainSet/Animal/Bear/7.jpg 0
    TrainSet/<Domain>/<Class>/<image>
    TestSetA/<image>   a flat folder of test images

A class's domain is the prefix of its name up to the first underscore (``Thu-dog_chinese_rural_dog`` ->
domain ``Thu-dog``, class ``chinese rural dog`` in prompts). Every input is validated and problems are
reported together, each naming the file and the line.

Nothing here imports Jittor: this module is cheap to import and safe to use from worker threads.
"""
from __future__ import annotations

import os
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .io import atomic_write_json, atomic_write_text, one_line, raise_many, read_lines

__all__ = [
    "DataError", "ImageError", "ClassList", "Example", "Split", "IMAGE_EXTENSIONS", "split_class_name",
    "read_class_file", "load_classes", "read_image_list", "sample_split", "split_from_list", "write_split",
    "write_image_list", "list_test_images", "load_image", "to_rgb",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})


class DataError(ValueError):
    """The dataset's files are inconsistent. The message names the file(s), line(s) and problem(s)."""


class ImageError(Exception):
    """An image could not be decoded. ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ------------------------------------------------------------------------------------------------ classes
def split_class_name(full: str) -> tuple[str, str]:
    """``"Thu-dog_chinese_rural_dog"`` -> ``("Thu-dog", "chinese rural dog")``. A name without an underscore
    has no domain (``""``)."""
    if "_" in full:
        domain, name = full.split("_", 1)
        if domain and name:
            return domain, name.replace("_", " ").strip()
    return "", full.replace("_", " ").strip()


def parse_indexed(text: str, form: str = "<name> <index>", spaces: bool = True) -> tuple[str, int]:
    """Split a ``<text> <index>`` line into (text, non-negative int index). ``spaces``: the text may contain
    spaces (the index is the last field); otherwise the line must have exactly two fields. Raises ValueError
    with a message for the caller to prefix with the file and line."""
    parts = text.rsplit(None, 1) if spaces else text.split()
    if len(parts) != 2:
        raise ValueError(f"expected '{form}', got {text!r}")
    try:
        idx = int(parts[1])
    except ValueError:
        raise ValueError(f"index {parts[1]!r} is not an integer") from None
    if idx < 0:
        raise ValueError(f"index {idx} is negative")
    return parts[0], idx


def read_class_file(path) -> list[str]:
    """Read ``<name> <index>`` lines; return the names in index order. Indices must be exactly 0..C-1, each
    once; names must be unique."""
    path = Path(path)
    entries = read_lines(path, "class list", DataError)
    if not entries:
        raise DataError(f"{path}: class list is empty")
    problems: list[str] = []
    by_index: dict[int, tuple[str, int]] = {}
    by_name: dict[str, int] = {}
    for line_no, text in entries:
        try:
            name, idx = parse_indexed(text, "<Domain>_<Class> <index>", spaces=False)
        except ValueError as exc:
            problems.append(f"line {line_no}: {exc}")
            continue
        if name in by_name:
            problems.append(f"line {line_no}: duplicate class name {name!r} (also on line {by_name[name]})")
            continue
        if idx in by_index:
            problems.append(f"line {line_no}: duplicate index {idx} ({name!r}; also {by_index[idx][0]!r} on "
                            f"line {by_index[idx][1]})")
            continue
        by_name[name] = line_no
        by_index[idx] = (name, line_no)
    raise_many(problems, f"{path}: invalid class list:", DataError)
    n = len(by_index)
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        too_big = sorted(i for i in by_index if i >= n)
        raise DataError(f"{path}: class indices must be 0..{n - 1} with none missing; missing {missing[:10]}"
                        f"{' ...' if len(missing) > 10 else ''}, out of range "
                        f"{[f'{by_index[i][0]} {i} (line {by_index[i][1]})' for i in too_big[:5]]}")
    return [by_index[i][0] for i in range(n)]


@dataclass
class ClassList:
    """All classes in index order: the seen ones (with training images) first, then unseen ones (names only)."""

    names: list[str]                 # full names as in classes.txt, e.g. "Thu-dog_chinese_rural_dog"
    n_seen: int
    source: str = ""

    def __post_init__(self):
        self.domains = [split_class_name(n)[0] for n in self.names]
        self.labels = [split_class_name(n)[1] for n in self.names]
        self._index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def n_unseen(self) -> int:
        return len(self.names) - self.n_seen

    @property
    def domain_names(self) -> list[str]:
        """Domains in order of first appearance."""
        return list(dict.fromkeys(self.domains))

    def index(self, name: str) -> int | None:
        return self._index.get(name)

    def domain_classes(self, domain: str) -> np.ndarray:
        return np.array([i for i, d in enumerate(self.domains) if d == domain], dtype=np.int64)

    def prompts(self, templates_for: Callable[[str], Sequence[str]]) -> list[list[str]]:
        """One list of prompts per class: each of its domain's templates filled with the readable name."""
        return [[t.format(label) if "{}" in t else t for t in templates_for(domain)]
                for domain, label in zip(self.domains, self.labels)]

    def to_lines(self) -> str:
        return "".join(f"{n} {i}\n" for i, n in enumerate(self.names))


def load_classes(classes_path, all_classes_path=None) -> ClassList:
    """Seen classes from ``classes_path``; with ``all_classes_path`` (like classes_b.txt), which must start with
    exactly the same classes at the same indices, the extra classes are added as unseen."""
    seen = read_class_file(classes_path)
    if not all_classes_path:
        return ClassList(seen, len(seen), str(classes_path))
    every = read_class_file(all_classes_path)
    if len(every) < len(seen):
        raise DataError(f"{all_classes_path}: has {len(every)} classes, fewer than the {len(seen)} seen classes "
                        f"of {classes_path}; it must list them all first, then the unseen ones")
    mismatch = [f"index {i}: {every[i]!r} here but {seen[i]!r} in {classes_path}"
                for i in range(len(seen)) if every[i] != seen[i]]
    raise_many(mismatch, f"{all_classes_path}: the first {len(seen)} classes must be those of {classes_path}, "
                          "at the same indices:", DataError)
    return ClassList(every, len(seen), str(all_classes_path))


# ------------------------------------------------------------------------------------------ labelled lists
@dataclass(frozen=True, order=True)
class Example:
    path: str        # as written in the list, relative to the data root
    label: int
    line: int = 0    # line in the list it came from (0: not from a file)


def read_image_list(path, classes: ClassList, root, check_files: bool = True) -> list[Example]:
    """Read ``<path> <index>`` lines (paths relative to ``root``; a path may contain spaces). Checks: each line's
    form, the index is an integer of a seen class, no path twice (one spelling per path: ``./a/b`` and ``a//b`` are
    ``a/b``), the file exists, and, for the official layout
    ``.../<Domain>/<Class>/<image>``, that the folder's class is the labelled class (and, under a folder of a
    known domain, a class of the list). All problems are reported
    in one error naming the file and lines."""
    path, root = Path(path), Path(root)
    entries = read_lines(path, "image list", DataError)
    if not entries:
        raise DataError(f"{path}: image list is empty")
    problems: list[str] = []
    missing: list[str] = []
    seen_paths: dict[str, int] = {}
    out: list[Example] = []
    n = classes.n_seen
    domains = {d for d in classes.domain_names if d}
    for line_no, text in entries:
        try:
            rel, idx = parse_indexed(text, "<path> <index>")
        except ValueError as exc:
            problems.append(f"line {line_no}: {exc}")
            continue
        if not idx < n:
            problems.append(f"line {line_no}: index {idx} is out of range: {classes.source or 'the class list'} "
                            f"has {n} classes with training images (0..{n - 1})")
            continue
        rel = _one_spelling(rel)
        if rel in seen_paths:
            problems.append(f"line {line_no}: {rel} is listed twice (also line {seen_paths[rel]})")
            continue
        seen_paths[rel] = line_no
        folders = rel.split("/")
        if len(folders) >= 3:
            folder_class = classes.index(f"{folders[-3]}_{folders[-2]}")
            if folder_class is not None and folder_class != idx:
                problems.append(f"line {line_no}: {rel} is in the folder of class {classes.names[folder_class]} "
                                f"({folder_class}) but labelled {idx} ({classes.names[idx]})")
                continue
            if folder_class is None and folders[-3] in domains:     # <Domain>/<Class>/ of a class not in the list
                problems.append(f"line {line_no}: {rel} is in the folder of class {folders[-3]}_{folders[-2]}, "
                                f"which {classes.source or 'the class list'} does not hold, but labelled {idx} "
                                f"({classes.names[idx]})")
                continue
        if check_files and not (root / rel).is_file():
            missing.append(f"line {line_no}: {rel} ({'a directory' if (root / rel).is_dir() else 'no such file'})")
            continue
        out.append(Example(rel, idx, line_no))
    raise_many(problems, f"{path}: invalid lines:", DataError)
    raise_many(missing, f"{path}: {len(missing)} listed image(s) missing under {root}:", DataError)
    return out


def _one_spelling(rel: str) -> str:
    """A listed path with ``\\`` as ``/`` and without empty or ``.`` parts (``./a``, ``a//b``, ``a/./b`` are ``a``,
    ``a/b``), so that one file is one path. ``..`` is kept: through a symbolic link it may name another file."""
    rel = rel.replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    return ("/" if rel.startswith("/") else "") + "/".join(parts)


def write_image_list(path, examples: Iterable[Example]) -> None:

    atomic_write_text(path, "".join(f"{e.path} {e.label}\n" for e in examples))


# ------------------------------------------------------------------------------------------------ sampling
@dataclass
class Split:
    """Support (few-shot training) and validation examples, plus each class's ordered candidates so that an
    unreadable support image can be replaced deterministically by the next candidate."""

    order: dict[int, list[Example]]          # per seen class, in selection order: support first, then the rest
    shots: dict[int, int]                    # per class, how many support images it gets
    val_per_class: int
    val_max: int
    fixed_support: bool = False              # a given list: support images are not replaced
    allow_fewer: bool = False                # a class may train on fewer readable images than its shots
    excluded: dict[str, str] = field(default_factory=dict)   # path -> why it was left out (unreadable)
    meta: dict = field(default_factory=dict)

    def exclude(self, path: str, reason: str) -> None:
        self.excluded[path] = reason

    @property
    def support(self) -> list[Example]:
        out = []
        for c in sorted(self.order):
            ok = [e for e in self.order[c] if e.path not in self.excluded]
            out.extend(ok[: self.shots[c]])
        return out

    @property
    def val(self) -> list[Example]:
        if self.val_per_class <= 0:
            return []
        per_class = []
        for c in sorted(self.order):
            ok = [e for e in self.order[c] if e.path not in self.excluded]
            per_class.append(ok[self.shots[c]: self.shots[c] + self.val_per_class])
        # interleave by rank (every class's first, then every class's second, ...) so a cap stays balanced
        out = [lst[r] for r in range(self.val_per_class) for lst in per_class if r < len(lst)]
        if self.val_max:
            out = out[: self.val_max]
        return sorted(out, key=lambda e: (e.label, e.path))

    def check(self, classes: ClassList) -> None:
        """Every seen class must keep its shots in readable support images (with ``allow_fewer``, at least one)."""
        counts = defaultdict(int)
        for e in self.support:
            counts[e.label] += 1
        need = {c: 1 if self.allow_fewer else self.shots[c] for c in self.order}
        short = [f"{classes.names[c]} ({c}): {counts[c]} readable of {need[c]} needed"
                 for c in sorted(self.order) if counts[c] < need[c]]
        if short:
            # a sampled class with some readable images could train on them
            fixable = not (self.allow_fewer or self.fixed_support) and any(0 < counts[c] < need[c] for c in need)
            hint = (" (`--set sampling.allow_fewer=true` trains a class on the readable images it has)"
                    if fixable else "")
            source = self.meta.get("list") or self.meta.get("source") or "the training list"
            raise_many(short, f"{source}: not enough readable training images{hint}:", DataError)


def _group(pool: Iterable[Example]) -> dict[int, list[Example]]:
    by_class: dict[int, list[Example]] = defaultdict(list)
    for e in pool:
        by_class[e.label].append(e)
    return {c: sorted(v, key=lambda e: e.path) for c, v in by_class.items()}


def _check_counts(by_class: dict[int, list[Example]], classes: ClassList, shots: int, allow_fewer: bool,
                  source: str) -> dict[int, int]:
    none = [f"{classes.names[c]} ({c})" for c in range(classes.n_seen) if not by_class.get(c)]
    raise_many(none, f"{source}: {len(none)} class(es) have no training images:", DataError)
    few = [f"{classes.names[c]} ({c}): {len(by_class[c])} image(s)" for c in range(classes.n_seen)
           if len(by_class[c]) < shots]
    if few and not allow_fewer:
        raise_many(few, f"{source}: {len(few)} class(es) have fewer than {shots} images (sampling.shots); use "
                         "`--set sampling.allow_fewer=true` to train them on what they have:", DataError)
    if few:
        warnings.warn(f"{len(few)} class(es) have fewer than {shots} training images and use what they have: "
                      + ", ".join(few[:5]) + (" ..." if len(few) > 5 else ""), stacklevel=3)
    return {c: min(shots, len(by_class[c])) for c in range(classes.n_seen)}


def sample_split(pool: Sequence[Example], classes: ClassList, shots: int = 4, seed: int = 0,
                 val_per_class: int = 10, val_max: int = 0, allow_fewer: bool = False,
                 source: str = "train.txt") -> Split:
    """K images per seen class drawn with ``seed`` (each class has its own stream seeded by (seed, class), so
    a class's choice does not depend on the others); the rest of the pool, in the same random order, serves as
    validation (up to ``val_per_class`` per class, ``val_max`` in all)."""
    by_class = _group(pool)
    per_class = _check_counts(by_class, classes, shots, allow_fewer, source)
    order = {}
    for c in range(classes.n_seen):
        items = by_class[c]
        perm = np.random.default_rng([seed, c]).permutation(len(items))
        order[c] = [items[i] for i in perm]
    meta = {"method": "sampled", "seed": seed, "shots": shots, "source": source}
    return Split(order, per_class, val_per_class, val_max, allow_fewer=allow_fewer, meta=meta)


def split_from_list(selection: Sequence[Example], pool: Sequence[Example], classes: ClassList, seed: int = 0,
                    val_per_class: int = 10, val_max: int = 0, source: str = "selection") -> Split:
    """Support = a given selection (like train_label.txt); validation from the rest of ``pool``."""
    chosen = _group(selection)
    none = [f"{classes.names[c]} ({c})" for c in range(classes.n_seen) if not chosen.get(c)]
    raise_many(none, f"{source}: {len(none)} class(es) have no selected training image:", DataError)
    picked = {e.path for e in selection}
    by_class = _group(pool)
    order = {}
    for c in range(classes.n_seen):
        # the pool in the same random order sample_split uses, so a split written by a sampled run and given
        # back as a list reproduces its validation images too
        items = by_class.get(c, [])
        perm = np.random.default_rng([seed, c]).permutation(len(items))
        order[c] = list(chosen[c]) + [items[i] for i in perm if items[i].path not in picked]
    meta = {"method": "given list", "list": source, "seed": seed}
    return Split(order, {c: len(chosen[c]) for c in chosen}, val_per_class, val_max, fixed_support=True, meta=meta)


def write_split(split: Split, folder) -> dict:
    """Write support.txt and val.txt (``<path> <index>``, reusable as ``sampling.list``) and split.json."""

    folder = Path(folder)
    support, val = split.support, split.val
    write_image_list(folder / "support.txt", support)
    write_image_list(folder / "val.txt", val)
    info = dict(split.meta, n_support=len(support), n_val=len(val),
                excluded=[{"path": p, "reason": r} for p, r in sorted(split.excluded.items())])
    atomic_write_json(folder / "split.json", info)
    return info


# -------------------------------------------------------------------------------------------- test folders
def list_test_images(folder) -> tuple[list[str], list[str]]:
    """File names of the images in a flat folder, sorted by name; and the names of the other entries, which
    are skipped (sub-folders, hidden files, names without an image extension, names with a line break, a tab,
    leading whitespace or bytes that are not UTF-8, which cannot be one line of the result file read back).
    Every entry whose name has an image extension and is not a folder counts as an image, whatever it is (a
    broken symbolic link, an empty or unreadable file): it gets its line in the result and is reported as
    unreadable there, never dropped. Raises DataError when the folder is missing or holds no image."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: test image folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    images, skipped = [], []
    for entry in os.scandir(folder):
        name = entry.name
        try:
            is_dir = entry.is_dir()  # follows symbolic links: a broken one is not a folder
        except OSError:
            is_dir = False
        if name.startswith(".") or is_dir or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(name)
        elif "\t" in name or not one_line(name):
            skipped.append(name)  # cannot be written on one result line and read back
        else:
            images.append(name)
    if not images:
        raise DataError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(images), sorted(skipped)


# -------------------------------------------------------------------------------------------------- images
def to_rgb(im):
    """Any PIL image -> 8-bit RGB: 16-bit and 32-bit integer images are scaled (not clipped), float images
    mapped from [0, 1] (or clipped to [0, 255]), transparency composited over white."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        a = a.astype(np.int64) if a.dtype != np.int64 else a
        a = np.clip(a, 0, 65535)
        if mode == "I" and a.max(initial=0) <= 255:
            a8 = a.astype(np.uint8)           # an 8-bit image stored as 32-bit
        else:
            a8 = (a >> 8).astype(np.uint8)    # 16-bit: keep the most significant byte
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


_bomb_warning_filtered = False


def _open(p: Path, draft_size: int | None, draft_above: int):
    """``p`` opened, and set to decode at reduced scale where :func:`load_image` says. A JPEG beyond Pillow's
    decompression-bomb limit is opened by the same JPEG reader without that check, since it is decoded at reduced
    scale (DCT scaling, up to 8x smaller per side); it is refused only if still beyond the limit at that scale."""
    try:
        im, beyond = Image.open(p), False
    except Image.DecompressionBombError:
        with open(p, "rb") as f:
            if not draft_size or f.read(3) != b"\xff\xd8\xff":        # not a JPEG
                raise
        im, beyond = JpegImagePlugin.JpegImageFile(p), True
    w, h = im.size
    if w < 1 or h < 1:
        im.close()
        raise ImageError(p, f"image has no pixels ({w}x{h})")
    if draft_size and im.format == "JPEG" and (w * h > draft_above or beyond):
        im.draft("RGB", (draft_size, draft_size))
    limit = Image.MAX_IMAGE_PIXELS
    if beyond and limit and im.size[0] * im.size[1] > 2 * limit:
        im.close()
        raise Image.DecompressionBombError(f"{w}x{h} pixels, {im.size[0]}x{im.size[1]} at the smallest scale, "
                                           f"beyond the limit of {2 * limit} pixels")
    return im


def load_image(path, draft_size: int | None = 448, draft_above: int = 4096 * 4096):
    """Decode an image file into an 8-bit RGB PIL image, robustly: EXIF orientation applied; grayscale, CMYK,
    palette, 16-bit and alpha images converted (see :func:`to_rgb`); JPEGs with more than ``draft_above`` pixels
    decoded at a reduced scale (DCT scaling, keeping both sides >= ``draft_size``) so memory stays bounded, also
    those beyond Pillow's decompression-bomb limit (which other formats stay refused by);
    anything unreadable raises :class:`ImageError` naming the file and the reason."""
    global _bomb_warning_filtered
    if not _bomb_warning_filtered:  # we report sizes ourselves; PIL's warning would only be noise
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _bomb_warning_filtered = True
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ImageError(p, "file not found") from None
    except OSError as exc:
        raise ImageError(p, f"cannot access file ({exc.strerror or exc})") from None
    if p.is_dir():
        raise ImageError(p, "is a directory, not an image")
    if size == 0:
        raise ImageError(p, "empty file (0 bytes)")
    try:
        with _open(p, draft_size, draft_above) as im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            out = to_rgb(im)
            out.load()
            return out
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(p, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(p, f"image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise ImageError(p, f"truncated image data ({msg})") from None
        raise ImageError(p, f"corrupt or unsupported image ({msg})") from None

