"""One test per bad-input case of issue 5's robustness list: each gets a clear message naming the file and the
problem, odd-but-valid images decode correctly, an interrupted extraction resumes from the cache, and no run
leaves a half-written output. (Unreadable *test* images kept in the result: tests/test_end_to_end.py.)"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.__main__ import PACKAGE, _format_warning, main
from cascade.data import (DataError, ImageError, load_classes, load_image, read_class_file,
                          read_image_list, sample_split)
from cascade.features import Preprocess, extract_features
from cascade.io import atomic_open, atomic_write_text
from cascade.output import write_result
from test_data import make_dataset


def _jpeg_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _gradient(w=80, h=60):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)


# ------------------------------------------------------------------------------------- unreadable images
def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.jpg"
    # a JPEG header followed by garbage (seeded: some garbage makes Pillow give up on the format itself)
    p.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(500))
    with pytest.raises(ImageError) as err:
        load_image(p)
    assert str(p) in str(err.value)
    assert any(w in err.value.reason for w in ("corrupt", "truncated", "not an image")), err.value.reason


def test_truncated_file(tmp_path):
    data = _jpeg_bytes(Image.fromarray(_gradient(400, 300)), quality=95)
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as err:
        load_image(p)
    assert err.value.path == str(p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file \(0 bytes\)"):
        load_image(p)


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is a text file with an image extension\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        load_image(p)


def test_unreadable_images_are_returned_as_failures_not_dropped(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_gradient()).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    paths = [good, tmp_path / "bad.jpg", tmp_path / "missing.jpg", good]

    class Enc:
        cache_key = "mean-colour"

        def encode_image(self, x):
            return x.mean(axis=(2, 3)) + 3.0

    res = extract_features(Enc(), paths, tmp_path / "cache", batch_size=2, progress=False)
    assert res.features.shape == (4, 3)
    assert [(f.index, Path(f.path).name) for f in res.failures] == [(1, "bad.jpg"), (2, "missing.jpg")]
    assert res.failures[1].reason == "file not found"
    assert res.ok.tolist() == [True, False, False, True]
    assert np.allclose(res.features[0], res.features[3]) and not res.features[1].any()
    assert np.allclose(np.linalg.norm(res.features[0]), 1.0)


# ------------------------------------------------------------------------------ odd but valid images
def test_grayscale_image(tmp_path):
    a = _gradient()[..., 0]
    p = tmp_path / "gray.png"
    Image.fromarray(a, "L").save(p)
    im = load_image(p)
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.repeat(a[..., None], 3, -1))


def test_cmyk_jpeg(tmp_path):
    rgb = Image.fromarray(_gradient())
    p = tmp_path / "cmyk.jpg"
    p.write_bytes(_jpeg_bytes(rgb.convert("CMYK"), quality=98))
    im = load_image(p)
    assert im.mode == "RGB" and im.size == rgb.size
    assert np.abs(np.asarray(im, np.float64) - np.asarray(rgb, np.float64)).mean() < 6


def test_palette_png(tmp_path):
    rgb = Image.fromarray(_gradient())
    p = tmp_path / "palette.png"
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and np.abs(np.asarray(im, np.float64) - np.asarray(rgb, np.float64)).mean() < 12


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")           # Pillow reads it as a 16/32-bit integer image
    im = load_image(p)
    assert np.asarray(im)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_alpha_png_is_composited_over_white(tmp_path):
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 0] = 200                                        # red, with alpha 0 on the left half, 255 on the right
    a[:, 5:, 3] = 255
    p = tmp_path / "alpha.png"
    Image.fromarray(a, "RGBA").save(p)
    out = np.asarray(load_image(p))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 9].tolist() == [200, 0, 0]
    la = tmp_path / "la.png"
    Image.fromarray(a[..., [0, 3]], "LA").save(la)
    assert np.asarray(load_image(la))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(_gradient(80, 40))               # landscape pixels...
    exif = Image.Exif()
    exif[0x0112] = 6                                       # ...stored with "rotate 90 CW" orientation
    p = tmp_path / "rotated.jpg"
    img.save(p, exif=exif.tobytes(), quality=95)
    im = load_image(p)
    assert im.size == (40, 80)
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270), np.float64)
    assert np.abs(np.asarray(im, np.float64) - expected).mean() < 4


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    w, h = 6400, 4800                                      # 30.7 Mpx: 92 MB if decoded in full
    img = Image.fromarray(_gradient(640, 480)).resize((w, h), Image.Resampling.BILINEAR)
    p = tmp_path / "huge.jpg"
    img.save(p, quality=85)
    del img
    im = load_image(p, draft_size=448)
    assert min(im.size) >= 448 and im.size[0] * im.size[1] <= (w * h) // 16   # DCT-scaled: >= 4x smaller per side
    pre = Preprocess.clip()
    x = pre.load(p)
    ref = pre(Image.fromarray(_gradient(640, 480)))         # the same picture at a modest size
    assert x.shape == (3, 224, 224) and np.abs(x - ref).mean() < 0.05


def test_jpeg_beyond_pillows_pixel_limit_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    """Pillow refuses to open an image of more than twice its MAX_IMAGE_PIXELS (a decompression bomb); a JPEG is
    decoded at reduced scale instead, where that scale is within the limit. Other formats stay refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)      # so that a 12 Mpx image is beyond it
    img = Image.fromarray(_gradient(640, 480)).resize((4000, 3000), Image.Resampling.BILINEAR)
    img.save(tmp_path / "big.jpg", quality=85)
    img.save(tmp_path / "big.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.jpg")
    im = load_image(tmp_path / "big.jpg", draft_size=448)
    assert im.size == (1000, 750)                                   # 1/4 per side: both sides stay >= 448
    ref = np.asarray(Image.fromarray(_gradient(640, 480)).resize(im.size), np.float64)
    assert np.abs(np.asarray(im, np.float64) - ref).mean() < 4
    with pytest.raises(ImageError, match="image too large to decode safely"):
        load_image(tmp_path / "big.png", draft_size=448)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)         # beyond it even at 1/8 per side (500 x 375)
    with pytest.raises(ImageError, match=r"image too large to decode safely \(4000x3000 pixels, 500x375 at the "):
        load_image(tmp_path / "big.jpg", draft_size=300)


def test_extreme_aspect_ratio_keeps_memory_bounded(tmp_path):
    p = tmp_path / "strip.png"
    Image.fromarray(np.full((2, 20000, 3), 120, np.uint8)).save(p)   # resized naively: 224 x 2.2M px
    x = Preprocess.clip().load(p)
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()


def test_non_ascii_file_names(tmp_path):
    d = tmp_path / "Thu-dog" / "西施犬 Shih-Tzu"
    d.mkdir(parents=True)
    p = d / "ümlaut_狗_🐕.jpg"
    Image.fromarray(_gradient()).save(p)
    assert load_image(p).size == (80, 60)
    out = tmp_path / "result.txt"
    write_result(out, ["ümlaut_狗_🐕.jpg", "b.jpg"], np.array([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]))
    assert out.read_text(encoding="utf-8").splitlines()[1] == "ümlaut_狗_🐕.jpg 1 2 3 4 5"


# ------------------------------------------------------------------------------------- bad dataset files
NAMES = ["Animal_Bear", "Animal_Bee", "Thu-dog_teddy"]


def _data(tmp_path, per_class=5):
    root = tmp_path / "data"
    make_dataset(root, NAMES, per_class=per_class, test_per_class=0, size=(16, 12))
    return root, load_classes(root / "classes.txt")


def test_file_listed_in_train_txt_but_missing(tmp_path):
    root, classes = _data(tmp_path)
    (root / "TrainSet/Animal/Bee/3.jpg").unlink()
    with pytest.raises(DataError) as err:
        read_image_list(root / "train.txt", classes, root)
    msg = str(err.value)
    assert "train.txt: 1 listed image(s) missing" in msg and "line 9: TrainSet/Animal/Bee/3.jpg (no such file)" in msg


def test_class_with_fewer_than_k_images(tmp_path):
    root, classes = _data(tmp_path, per_class={0: 5, 1: 2, 2: 5})
    pool = read_image_list(root / "train.txt", classes, root)
    with pytest.raises(DataError, match=r"(?s)1 class\(es\) have fewer than 4 images.*Animal_Bee \(1\): 2 image"):
        sample_split(pool, classes, shots=4, source="train.txt")
    with pytest.warns(UserWarning, match="fewer than 4 training images"):
        s = sample_split(pool, classes, shots=4, allow_fewer=True)
    assert np.bincount([e.label for e in s.support]).tolist() == [4, 2, 4]


def test_the_packages_warnings_read_as_one_line_and_other_warnings_keep_pythons_form(capsys):
    """Under `python -m cascade`, a warning of the package (e.g. allow_fewer's above) is one `[cascade] warning:`
    line like the other messages, not Python's source file, line number and repeated source line."""
    msg = UserWarning("1 class(es) have fewer than 4 training images and use what they have")
    assert _format_warning(msg, UserWarning, os.path.join(PACKAGE, "pipeline.py"), 418, "split = sample_split(") == \
        "[cascade] warning: 1 class(es) have fewer than 4 training images and use what they have\n"
    other = _format_warning(UserWarning("x"), UserWarning, "/usr/lib/python3/dist-packages/sk/a.py", 3, "code")
    assert other.startswith("/usr/lib/python3/dist-packages/sk/a.py:3: UserWarning: x")
    # numpy's warning raised under a line of the package keeps its category and place
    ufunc = _format_warning(RuntimeWarning("divide by zero encountered in log"), RuntimeWarning,
                            os.path.join(PACKAGE, "stages", "gda.py"), 120, "np.log(w)")
    assert "gda.py:120: RuntimeWarning: divide by zero" in ufunc and "[cascade]" not in ufunc
    before = warnings.formatwarning
    assert main(["eval", "no-result.txt", "no-labels.txt"]) == 2   # a run puts Python's form back after it
    assert warnings.formatwarning is before


def test_class_with_no_images(tmp_path):
    root, classes = _data(tmp_path, per_class={0: 5, 1: 0, 2: 5})
    pool = read_image_list(root / "train.txt", classes, root)
    with pytest.raises(DataError, match=r"(?s)train.txt: 1 class\(es\) have no training images.*Animal_Bee \(1\)"):
        sample_split(pool, classes, shots=4, source="train.txt", allow_fewer=True)


def test_duplicate_class_names(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("Animal_Bear 0\nAnimal_Bee 1\nAnimal_Bear 2\n")
    with pytest.raises(DataError, match=r"(?s)classes.txt: invalid class list:.*line 3: duplicate class name "
                                        r"'Animal_Bear' \(also on line 1\)"):
        read_class_file(f)


@pytest.mark.parametrize("text, expected", [
    ("Animal_Bear 0\nAnimal_Bee 0\n", r"line 2: duplicate index 0"),
    ("Animal_Bear 0\nAnimal_Bee 2\n", r"indices must be 0..1 with none missing; missing \[1\]"),
    ("Animal_Bear 0\nAnimal_Bee x\n", r"line 2: index 'x' is not an integer"),
    ("Animal_Bear 0\nAnimal Bee 1\n", r"line 2: expected '<Domain>_<Class> <index>'"),
    ("", r"class list is empty"),
])
def test_malformed_class_lists(tmp_path, text, expected):
    f = tmp_path / "classes.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=expected) as err:
        read_class_file(f)
    assert str(f) in str(err.value)


def test_missing_class_list(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: class list not found"):
        read_class_file(tmp_path / "nope.txt")


def test_train_index_out_of_range(tmp_path):
    root, classes = _data(tmp_path)
    lines = (root / "train.txt").read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 3"
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.txt: invalid lines:\n  line 1: index 3 is out of range: .* has 3 "
                                        r"classes with training images \(0..2\)"):
        read_image_list(root / "train.txt", classes, root)


def test_train_index_not_matching_the_class_folder(tmp_path):
    root, classes = _data(tmp_path)
    lines = (root / "train.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 2"
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 2: TrainSet/Animal/Bear/1.jpg is in the folder of class Animal_Bear "
                                        r"\(0\) but labelled 2 \(Thu-dog_teddy\)"):
        read_image_list(root / "train.txt", classes, root)
    # under a known domain's folder, a class the list does not hold (another class list, or a stray folder)
    lines[1] = "TrainSet/Animal/Cat/1.jpg 0"
    (root / "TrainSet/Animal/Cat").mkdir()
    (root / "TrainSet/Animal/Cat/1.jpg").write_bytes((root / "TrainSet/Animal/Bear/1.jpg").read_bytes())
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 2: TrainSet/Animal/Cat/1.jpg is in the folder of class Animal_Cat, "
                                        r"which .*classes.txt does not hold, but labelled 0 \(Animal_Bear\)"):
        read_image_list(root / "train.txt", classes, root)
    lines[1] = "Other/Cat/1.jpg 0"                                    # not a domain folder: no such check
    (root / "Other/Cat").mkdir(parents=True)
    (root / "Other/Cat/1.jpg").write_bytes(b"x")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    assert len(read_image_list(root / "train.txt", classes, root)) == len(lines)


def test_train_txt_malformed_and_duplicate_lines(tmp_path):
    root, classes = _data(tmp_path)
    text = (root / "train.txt").read_text()
    (root / "train.txt").write_text(text + "TrainSet/Animal/Bear/0.jpg 0\nonlyonefield\nTrainSet/x.jpg one\n"
                                    "./TrainSet/Animal/Bear/1.jpg 0\nTrainSet//Animal/./Bear/2.jpg 0\n")
    with pytest.raises(DataError) as err:
        read_image_list(root / "train.txt", classes, root)
    msg = str(err.value)
    assert "line 16: TrainSet/Animal/Bear/0.jpg is listed twice (also line 1)" in msg
    assert "line 17: expected '<path> <index>'" in msg and "line 18: index 'one' is not an integer" in msg
    # one file under another spelling is the same path (it would fill two shots with one image)
    assert "line 19: TrainSet/Animal/Bear/1.jpg is listed twice (also line 2)" in msg
    assert "line 20: TrainSet/Animal/Bear/2.jpg is listed twice (also line 3)" in msg


def test_all_classes_file_with_duplicate_unseen_name(tmp_path):
    a = tmp_path / "classes.txt"
    a.write_text("Animal_Bear 0\n")
    b = tmp_path / "classes_b.txt"
    b.write_text("Animal_Bear 0\nStanford-Cars_X 1\nStanford-Cars_X 2\n")
    with pytest.raises(DataError, match=r"classes_b.txt: invalid class list:\n  line 3: duplicate class name"):
        load_classes(a, b)


# ----------------------------------------------------------------------------- interruption, atomicity
class CountingEncoder:
    cache_key = "counting"

    def __init__(self, fail_after: int | None = None):
        self.encoded = 0
        self.fail_after = fail_after

    def encode_image(self, x):
        if self.fail_after is not None and self.encoded >= self.fail_after:
            raise KeyboardInterrupt
        self.encoded += len(x)
        return x.reshape(len(x), 3, -1)[:, :, ::97].reshape(len(x), -1)[:, :16] + 1.0


def test_decoding_workers_do_not_outlive_a_killed_main_process(tmp_path):
    """A main process killed outright (kill -9, the out-of-memory killer) cannot stop its decoding workers; they
    notice it is gone and exit instead of waiting for work forever."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time\n"
              "from cascade.features import Preprocess, _decode_in_processes\n"
              "if __name__ == '__main__':\n"
              "    gen = _decode_in_processes(Preprocess.clip(32), [], [], 2, 4)\n"
              "    import multiprocessing as mp\n"
              "    print(' '.join(str(p.pid) for p in mp.active_children()), flush=True)\n"
              "    time.sleep(600)\n")
    (tmp_path / "main.py").write_text(script)
    p = subprocess.Popen([sys.executable, str(tmp_path / "main.py")], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2
    p.send_signal(signal.SIGKILL)
    p.wait()

    def running(pid):
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    deadline = time.time() + 20
    while time.time() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(running(pid) for pid in pids)


def test_interrupted_extraction_resumes_from_the_cache(tmp_path):
    paths = []
    for i in range(40):
        p = tmp_path / f"im{i:02d}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract_features(CountingEncoder(fail_after=24), paths, cache, batch_size=8, chunk=1000, progress=False)
    # what was computed before the interruption was flushed to the cache ...
    enc = CountingEncoder()
    res = extract_features(enc, paths, cache, batch_size=8, progress=False)
    assert enc.encoded == 16                                    # ... so only the 16 remaining images are encoded
    full = extract_features(CountingEncoder(), paths, tmp_path / "fresh", batch_size=8, progress=False)
    assert np.allclose(res.features, full.features)
    enc3 = CountingEncoder()
    extract_features(enc3, paths, cache, batch_size=8, progress=False)
    assert enc3.encoded == 0


def test_changed_image_file_is_re_encoded(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(_gradient()).save(p)
    enc = CountingEncoder()
    first = extract_features(enc, [p], tmp_path / "c", batch_size=4, progress=False).features
    Image.fromarray(255 - _gradient()).save(p)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    second = extract_features(enc, [p], tmp_path / "c", batch_size=4, progress=False).features
    assert enc.encoded == 8 and not np.allclose(first, second)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "result.txt"
    atomic_write_text(out, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(out) as f:
            f.write("half a line")
            raise RuntimeError("crash in the middle")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]
    with pytest.raises(ValueError):
        write_result(out, ["a.jpg", "b.jpg"], np.zeros((1, 5), int))    # inconsistent: nothing written
    assert out.read_text() == "old\n"


# ----------------------------------------------------------------------------- command-level messages
def test_commands_fail_with_one_clear_line(tmp_path, capsys):
    from cascade.__main__ import main

    root, _ = _data(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--data", str(root), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cascade train: error: converted CLIP weights not found: ViT-B/32: ")
    assert "python -m cascade.convert" in err
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"not really weights")
    ok_weights = ["--set", f"models.clip.ViT-B/32={weights}", "--set", "models.clip.RN101="]
    assert main(["train", "--data", str(tmp_path / "nodata"), "--out", str(out)] + ok_weights) == 2
    assert "nodata: data folder not found; --data (paths.data) must name the dataset folder" in capsys.readouterr().err
    assert main(["train", "--data", str(weights), "--out", str(out)] + ok_weights) == 2
    assert "w.npz: is a file, not a folder; --data (paths.data)" in capsys.readouterr().err
    assert main(["test", "--data", str(root), "--out", str(out)]) == 2
    assert "no trained model (run `bash train.sh` first" in capsys.readouterr().err
    assert main(["train", "--data", str(root), "--set", "sampling.shots=0"]) == 2
    assert "sampling.shots must be >= 1" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("result*"))


def test_a_config_elsewhere_says_where_its_relative_paths_are_read(tmp_path, capsys, monkeypatch):
    """A --config file in another folder: its relative paths are read from the current folder, and an error about
    a path missing here but present beside the file says so (a user often expects the file's folder)."""
    from cascade.__main__ import main

    work = tmp_path / "work"
    _data(work)                      # work/data, as a config in work/ names it
    (work / "run.toml").write_text('[paths]\ndata = "data"\nout = "out"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "work/run.toml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data: data folder not found" in err
    assert (f"relative paths are read from the current folder {tmp_path}, not from the folder of work/run.toml; "
            "work/data exists: run from work, or give absolute paths") in err
    assert main(["test", "--config", "work/run.toml"]) == 2
    assert "out/model: no trained model" in capsys.readouterr().err    # out/ is not beside the file: no 'exists'
    monkeypatch.chdir(work)          # from the file's own folder: the plain message, no note
    assert main(["train", "--config", "run.toml", "--data", "nodata", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nodata: data folder not found" in err and "relative paths" not in err
