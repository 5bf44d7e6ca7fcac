"""Nothing lost, nothing silently wrong (issue 20): every fault below is injected into a small generated dataset
with tiny random CLIPs (converted through the real path, as in tests/test_end_to_end.py), then `train`, `test`
or `eval` is run through the command line's entry point. Each test checks the exit status, that the one-line
message names the file (or setting) and the problem, and that the outputs of the previous successful run are
byte-identical afterwards (or, where the run recovers, that the new result equals the old one).

Filesystem faults are real where the machine allows it: a read-only bind mount and a full tmpfs (needs the right
to mount, e.g. root in a container). Elsewhere the same tests simulate them by making ``os.open`` refuse writes
under the folder (EROFS) or ``os.fsync`` fail with ENOSPC, and say so in their output.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cascade.__main__ import main  # noqa: E402

NAMES = ["Animal_Bear", "Animal_Bee", "Animal_Cat", "Caltech-101_chair", "Caltech-101_lamp", "Caltech-101_piano"]


def _args(world, out=None, *extra):
    return ["--data", str(world["data"]), "--out", str(out or world["out"]), "--quiet", "--set",
            "specialist.enabled=false", *extra]


TRAIN = ["--shots", "2", "--set", "sampling.val_per_class=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained model and a result in ``out`` (never modified by the tests: each works on a copy)."""
    torch = pytest.importorskip("torch")
    from _reference import build_reference
    from test_data import make_dataset

    from cascade.convert import convert

    root = tmp_path_factory.mktemp("failures")
    data = root / "data"
    info = make_dataset(data, NAMES, per_class=4, test_per_class=2, size=(40, 30))
    out = root / "out"
    (out / "weights").mkdir(parents=True)
    for ref_name, file in (("tiny-vit", "ViT-B-32"), ("tiny-rn", "RN101")):
        torch.save(build_reference(ref_name, seed=11).state_dict(), root / f"{file}.pt")
        convert(root / f"{file}.pt", out / "weights" / f"{file}.npz", quiet=True)
    w = {"root": root, "data": data, "out": out, "labels": info["test"]}
    assert main(["train", *_args(w), *TRAIN]) == 0
    assert main(["test", *_args(w)]) == 0
    return w


@pytest.fixture
def out(world, tmp_path):
    """A copy of the trained out folder (model, split, reports, result, weights and a warm feature cache)."""
    dst = tmp_path / "out"
    shutil.copytree(world["out"], dst)
    return dst


def snapshot(folder: Path, cache: bool = True) -> dict[str, bytes]:
    """Every file under ``folder`` (the feature cache too unless ``cache`` is False) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (cache or p.relative_to(folder).parts[0] != "cache")}


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"cascade {command}: error: "), err
    assert "Traceback" not in err
    return lines[-1]


def _no_temporaries(folder: Path):
    assert not [p for p in folder.rglob(".*") if "cache" not in p.relative_to(folder).parts], \
        sorted(folder.rglob(".*"))


# ----------------------------------------------------------------------------------- 2: wrong weights
def test_weights_of_another_backbone_are_refused(world, out, capsys):
    before = snapshot(out)
    rn = out / "weights" / "RN101.npz"
    code = main(["train", *_args(world, out), *TRAIN, "--set", f"models.clip.ViT-B/32={rn}"])
    line = _error_line(capsys, "train")
    assert code == 2
    assert str(rn) in line and "holds CLIP RN[1, 2, 1, 1]" in line and "expected CLIP ViT-B/32" in line
    assert "models.clip.ViT-B/32" in line
    assert snapshot(out) == before


def _rewrite_meta(path: Path, **changes):
    """Rewrite converted weights with their metadata edited (the arrays untouched)."""
    tmp = path.with_suffix(".edited")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "__meta__.json":
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            dst.writestr(info.filename, data)
    os.replace(tmp, path)


def test_edited_weights_meta_is_caught_on_train_with_a_warm_cache(world, out, capsys, monkeypatch):
    import cascade.features as features

    # the cache is warm: a train run with these weights never loads them (loading would fail the test)
    def no_load(self):
        raise AssertionError("the model was loaded although every feature is cached")

    monkeypatch.setattr(features.ModelEncoder, "model", property(no_load))
    before = snapshot(out)
    rn = out / "weights" / "RN101.npz"
    _rewrite_meta(rn, model="ViT-B/32")                     # claims to be another model
    assert main(["train", *_args(world, out), *TRAIN]) == 2
    line = _error_line(capsys, "train")
    assert str(rn) in line and "damaged weights file" in line
    assert "metadata says CLIP ViT-B/32 but its arrays are CLIP RN[1, 2, 1, 1]" in line

    shutil.copy(world["out"] / "weights" / "RN101.npz", rn)
    _rewrite_meta(rn, sha256="0" * 64)                      # claims other arrays: the cache would be keyed wrongly
    assert main(["train", *_args(world, out), *TRAIN]) == 2
    line = _error_line(capsys, "train")
    assert str(rn) in line and "do not match the SHA-256 recorded in its metadata" in line
    shutil.copy(world["out"] / "weights" / "RN101.npz", rn)
    assert snapshot(out) == before
    assert main(["train", *_args(world, out), *TRAIN]) == 0    # intact: checked, and served by the cache


def test_specialist_weights_of_another_size_or_model_are_refused(world, out, capsys, tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from cascade.convert import convert

    torch.manual_seed(0)
    torch.save({"model": timm.create_model("convnextv2_atto", pretrained=False).state_dict()}, tmp_path / "atto.pth")
    atto = out / "weights" / "convnextv2_atto.npz"
    convert(tmp_path / "atto.pth", atto, quiet=True)
    before = snapshot(out)
    sp = ["--set", "specialist.enabled=true", "--set", 'specialist.domains=["Animal"]']
    code = main(["train", *_args(world, out), *TRAIN, *sp, "--set", f"specialist.weights={atto}"])
    line = _error_line(capsys, "train")
    assert code == 2 and str(atto) in line
    assert "holds ConvNeXt-V2-atto, expected ConvNeXt-V2-base for 'convnextv2_base'" in line
    assert "specialist.feature_key=convnextv2_atto" in line
    clip = out / "weights" / "ViT-B-32.npz"
    assert main(["train", *_args(world, out), *TRAIN, *sp, "--set", f"specialist.weights={clip}"]) == 2
    line = _error_line(capsys, "train")
    assert str(clip) in line and "holds a CLIP model, expected ConvNeXt-V2" in line
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------ 3: feature cache
def _shards(out: Path, suffix=".feats.npy"):
    return sorted((out / "cache").rglob(f"*{suffix}"))


def _test_shard(out: Path) -> Path:
    """The shard of the first backbone's cache that holds the test images (written by the test run)."""
    with_test = [p for p in _shards(out) if len(np.load(p)) == 2 * len(NAMES)]
    assert with_test
    return with_test[0]


@pytest.mark.parametrize("fault", ["flipped signs", "random bytes", "truncated"])
def test_damaged_cache_shard_is_reported_by_path_and_recomputed(world, out, capsys, fault):
    before = snapshot(out, cache=False)
    shard = _test_shard(out)
    raw = shard.read_bytes()
    header = len(raw) - 2 * len(NAMES) * np.load(shard).shape[1] * 4
    if fault == "flipped signs":       # still finite and unit-norm: only the checksum can tell
        a = np.load(shard)
        a[:3] *= -1
        buf = io.BytesIO()
        np.save(buf, a)
        shard.write_bytes(buf.getvalue())
    elif fault == "random bytes":
        shard.write_bytes(raw[:header] + os.urandom(len(raw) - header))
    else:
        shard.write_bytes(raw[: header + 100])
    assert main(["test", *_args(world, out)]) == 0
    err = capsys.readouterr().err
    assert f"ignoring damaged feature cache shard {shard}" in err and "encoded again" in err
    assert not shard.exists()                                  # removed; its images were encoded again
    assert snapshot(out, cache=False) == before                # the same result as with the intact cache


def test_damaged_text_features_are_recomputed(world, out, capsys):
    model = snapshot(out / "model")
    text = sorted((out / "cache" / "text").glob("*.npy"))
    assert text
    a = np.load(text[0])
    np.save(text[0], -a)                                       # still unit-norm: only the checksum can tell
    assert main(["train", *_args(world, out), *TRAIN]) == 0
    assert f"ignoring cached features {text[0]} (checksum mismatch" in capsys.readouterr().err
    assert snapshot(out / "model") == model                    # the same model as with the intact cache


def test_cache_folder_that_cannot_be_repaired_names_the_folder_to_delete(world, out, capsys):
    key = next((out / "cache").glob("*/key.json"))
    key.write_text("{ not json")
    before = snapshot(out)
    assert main(["test", *_args(world, out)]) == 2
    line = _error_line(capsys, "test")
    assert f"delete the folder {key.parent}" in line
    assert snapshot(out) == before


def test_train_reads_each_backbones_features_once(world, out, monkeypatch):
    """The first backbone's features, made while the split is checked for unreadable images, are kept for the
    fit (not read back from the cache), and the model is the same."""
    import cascade.pipeline as pipeline

    model = snapshot(out / "model")
    calls = []

    def counted(encoder, paths, *args, **kwargs):
        calls.append(kwargs.get("desc"))
        return extract(encoder, paths, *args, **kwargs)

    extract = pipeline.extract_features
    monkeypatch.setattr(pipeline, "extract_features", counted)
    assert main(["train", *_args(world, out), *TRAIN]) == 0
    assert calls == ["ViT-B/32 train", "RN101 train"]
    assert snapshot(out / "model") == model


# ------------------------------------------------------------------------------------ 4: filesystem faults
def _can_mount() -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"cascade-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        probe.rmdir()


CAN_MOUNT = _can_mount()


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` made read-only: a read-only bind mount where permitted (chmod does not stop root), else
    ``os.open`` and ``os.mkdir`` refusing to write under it with EROFS."""
    if CAN_MOUNT:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
            print("read-only folder: a read-only bind mount", file=sys.stderr)
            yield "mount"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    real_open, real_mkdir = os.open, os.mkdir
    root = str(folder.resolve())

    def under(path):
        return os.path.abspath(os.fspath(path)).startswith(root)

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    print("read-only folder: simulated (os.open/os.mkdir raise EROFS)", file=sys.stderr)
    yield "simulated"


def _no_long_work(monkeypatch):
    """Fail the test if feature extraction starts (the fault must be found before any long work)."""
    import cascade.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("feature extraction started before the output folder was checked")

    monkeypatch.setattr(pipeline, "extract_features", refuse)


@pytest.mark.parametrize("command", ["train", "test"])
def test_read_only_output_folder_fails_at_once(world, out, capsys, monkeypatch, command):
    before = snapshot(out)
    _no_long_work(monkeypatch)
    with read_only(out, monkeypatch):
        code = main([command, *_args(world, out), *(TRAIN if command == "train" else [])])
    line = _error_line(capsys, command)
    assert code == 2
    assert f"error: {out}: cannot write to this folder: Read-only file system (errno 30 EROFS)" in line
    assert "--out (paths.out)" in line
    assert snapshot(out) == before


def test_out_naming_a_file_fails_before_any_work(world, tmp_path, capsys, monkeypatch):
    _no_long_work(monkeypatch)
    not_a_dir = tmp_path / "out.txt"
    not_a_dir.write_text("my notes\n")
    for command in ("train", "test"):
        assert main([command, *_args(world, not_a_dir)]) == 2
        line = _error_line(capsys, command)
        assert f"error: {not_a_dir}: is a file, not a folder; --out (paths.out) must name a folder" in line
    assert not_a_dir.read_text() == "my notes\n"


@contextlib.contextmanager
def full_disk(folder: Path, monkeypatch, names=("result",)):
    """Writes under ``folder`` fail with ENOSPC: ``folder`` becomes a full tmpfs (its files copied in) where
    permitted, else ``os.fsync`` raises ENOSPC for files whose name contains one of ``names``."""
    if CAN_MOUNT:
        keep = folder.with_name(folder.name + ".orig")
        shutil.copytree(folder, keep)
        size = sum(p.stat().st_size for p in keep.rglob("*") if p.is_file()) + (4 << 20)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        try:
            shutil.copytree(keep, folder, dirs_exist_ok=True)
            with open(folder / ".filler", "wb", buffering=0) as f:     # take every free byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 4096)
            print("full disk: a full tmpfs", file=sys.stderr)
            yield "tmpfs"
            (folder / ".filler").unlink()
            shutil.rmtree(keep)
            shutil.copytree(folder, keep)                  # what the run left there, back on the real disk
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        shutil.rmtree(folder)
        os.replace(keep, folder)
        return
    real_fsync = os.fsync

    def fake_fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if str(folder.resolve()) in name and any(n in Path(name).name for n in names):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fake_fsync)
    print("full disk: simulated (os.fsync raises ENOSPC)", file=sys.stderr)
    yield "simulated"


def test_full_disk_while_writing_the_result(world, out, capsys, monkeypatch):
    before = snapshot(out)
    with full_disk(out, monkeypatch):
        code = main(["test", *_args(world, out)])
    line = _error_line(capsys, "test")
    assert code == 2
    assert "No space left on device (errno 28 ENOSPC); free some space and rerun" in line
    assert f"error: {out}" in line                       # the path: the file being written, under out/
    assert snapshot(out) == before                      # result, routes and unreadable list all as they were
    _no_temporaries(out)


def test_full_disk_while_caching_features_names_the_cache_file(world, out, capsys, monkeypatch, tmp_path):
    before = snapshot(out)
    new_tests = world["data"] / "TestFull"
    if not new_tests.exists():
        shutil.copytree(world["data"] / "TestSetA", new_tests)     # other paths: nothing cached for them
    with full_disk(out, monkeypatch, names=(".feats.npy",)):
        code = main(["test", *_args(world, out), "--test-dir", "TestFull", "--result", "other.txt"])
    line = _error_line(capsys, "test")
    assert code == 2 and "No space left on device (errno 28 ENOSPC)" in line
    assert f"error: {out / 'cache'}" in line and ".feats.npy: No space left" in line
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------ 6: every test image
def test_every_image_name_gets_one_result_line(world, out, capsys):
    folder = world["data"] / "TestLinks"
    if not folder.exists():
        shutil.copytree(world["data"] / "TestSetA", folder)
        os.symlink(folder / "gone.jpg", folder / "broken.jpg")      # a broken symbolic link
        (folder / "empty.jpg").write_bytes(b"")
        for i in range(8):                                          # more non-image names than fit a summary
            (folder / f"notes{i}.txt").write_text("x")
        (folder / "sub.jpg").mkdir()                                # a folder, whatever its name
    assert main(["test", *_args(world, out), "--test-dir", "TestLinks", "--result", "links.txt"]) == 0
    err = capsys.readouterr().err
    lines = (out / "links.txt").read_text().splitlines()
    names = [line.rsplit(" ", 5)[0] for line in lines]
    images = sorted(list(world["labels"]) + ["broken.jpg", "empty.jpg"])
    assert names == images
    unreadable = dict(line.split("\t") for line in (out / "links_unreadable.txt").read_text().splitlines())
    assert sorted(unreadable) == ["broken.jpg", "empty.jpg"] and "not found" in unreadable["broken.jpg"]
    skipped = [f"'notes{i}.txt'" for i in range(8)] + ["'sub.jpg'"]
    assert "skipped 9 non-image entries" in err and all(s in err for s in skipped)


# ---------------------------------------------------------------------------------- 7: eval bounds
@pytest.mark.parametrize("edit, where, expected", [
    ("result 9", "result", "line 1: class index 9 is larger than every label in"),
    ("label 42", "labels", "line 1: label 42 of image_1001.jpg is larger than every class index in"),
    ("label -1", "labels", "line 1: index -1 is negative"),
    ("result -1", "result", "line 1: class index -1 out of range"),
])
def test_eval_without_classes_refuses_indices_outside_the_files_range(world, tmp_path, capsys, edit, where,
                                                                      expected):
    result = tmp_path / "result.txt"
    lines = (world["out"] / "result.txt").read_text().splitlines()
    labels = tmp_path / "labels.txt"
    truth = [f"{n} {c}" for n, c in sorted(world["labels"].items())]
    kind, value = edit.split()
    if kind == "result":
        name, *idx = lines[0].split()
        idx[-1] = value
        lines[0] = " ".join([name, *idx])
    else:
        truth[0] = f"{truth[0].split()[0]} {value}"
    result.write_text("\n".join(lines) + "\n")
    labels.write_text("\n".join(truth) + "\n")
    before = snapshot(tmp_path)
    assert main(["eval", str(result), str(labels)]) == 2
    line = capsys.readouterr().err
    path = result if where == "result" else labels
    assert line.startswith(f"cascade eval: error: {path}: ") and expected in line, line
    assert snapshot(tmp_path) == before
    # the unedited files evaluate
    result.write_text((world["out"] / "result.txt").read_text())
    labels.write_text("".join(f"{n} {c}\n" for n, c in sorted(world["labels"].items())))
    assert main(["eval", str(result), str(labels)]) == 0


# ------------------------------------------------------------------------------------ 8: damaged weights
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_weights_at_test_time_are_called_damaged(world, out, capsys, damage):
    before = snapshot(out)
    vit = out / "weights" / "ViT-B-32.npz"
    raw = vit.read_bytes()
    if damage == "truncated":
        vit.write_bytes(raw[: len(raw) // 2])
    else:
        mid = len(raw) // 2
        vit.write_bytes(raw[:mid] + bytes(255 - b for b in raw[mid: mid + 64]) + raw[mid + 64:])
    assert main(["test", *_args(world, out)]) == 2
    line = _error_line(capsys, "test")
    assert f"error: {vit}: damaged weights file: " in line and "convert the checkpoint again" in line
    assert "retrain" not in line
    vit.write_bytes(raw)
    assert snapshot(out) == before


# ------------------------------------------------------------------ the rules of the weights check, unit by unit
def _header_only(path: Path, shapes: dict, meta: dict) -> Path:
    """A converted-weights file whose arrays have headers but no data: enough for the shape checks (verify=False)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("__meta__.json", json.dumps(dict(meta, format="cascade-weights", version=1)))
        for key, shape in shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_2_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
            z.writestr(key + ".npy", buf.getvalue())
    return path


def test_released_clip_models_must_be_the_backbone_they_are_used_for(tmp_path):
    from _reference import CONFIGS

    from cascade.models.clip import CLIP, arch_name
    from cascade.models.weights import OPENAI_CLIP_MODELS, CheckpointError, check_weights, clip_model_name

    files = {}
    for name in ("RN101", "ViT-B/32", "RN50"):
        shapes = CLIP.from_config(CONFIGS[name]).parameter_shapes()
        assert arch_name(CONFIGS[name]) == name == clip_model_name(shapes) and name in OPENAI_CLIP_MODELS
        files[name] = _header_only(tmp_path / f"{name.replace('/', '-')}.npz", shapes,
                                   {"arch": "clip", "model": name, "config": dict(CONFIGS[name])})
    for name, path in files.items():
        assert check_weights(path, "clip", name, verify=False).meta["model"] == name
    with pytest.raises(CheckpointError, match=r"RN101.npz: holds CLIP RN101, expected CLIP ViT-B/32 \(models.clip"):
        check_weights(files["RN101"], "clip", "ViT-B/32", where="models.clip.ViT-B/32", verify=False)
    with pytest.raises(CheckpointError, match=r"holds CLIP RN50, expected CLIP RN101"):
        check_weights(files["RN50"], "clip", "RN101", verify=False)             # same family, another size
    with pytest.raises(CheckpointError, match=r"holds a CLIP model, expected ConvNeXt-V2"):
        check_weights(files["RN50"], "convnextv2", "convnextv2_base", verify=False)


def test_size_tables_agree_with_the_models(world):
    from cascade.models import clip, convnextv2
    from cascade.models.weights import CONVNEXT_CONFIGS, clip_model_name, convnext_size, read_header

    assert CONVNEXT_CONFIGS is convnextv2.CONFIGS
    for name, (depths, dims) in convnextv2.CONFIGS.items():
        shapes = convnextv2.expected_shapes({"depths": depths, "dims": dims, "num_classes": 1000, "in_chans": 3})
        assert convnext_size(shapes) == (name, list(depths), list(dims))
    for file in ("ViT-B-32", "RN101"):                       # the small test models: sizes OpenAI never released
        info = read_header(world["out"] / "weights" / f"{file}.npz")
        assert clip_model_name(info.shapes) == clip.arch_name(info.meta["config"]) == info.meta["model"]
