"""Dataset layout, class lists, few-shot sampling and the split written to out/ (cascade.data).

Also home of the small dataset builder the robustness and end-to-end tests share: `make_dataset` writes the
official layout (classes.txt, TrainSet/<Domain>/<Class>/<image>, train.txt, a flat test folder) with generated
images, using the real class names in tests/data/jittor4/ (see PROVENANCE.md there)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cascade.data import (ClassList, DataError, Example, list_test_images, load_classes, read_class_file,
                          read_image_list, sample_split, split_class_name, split_from_list, write_split)

JITTOR4 = Path(__file__).parent / "data" / "jittor4"


# ----------------------------------------------------------------------------------------- shared helpers
def class_image(label: int, seed: int, size=(64, 48)):
    """A generated RGB image whose colours depend on its class (so features carry some class signal)."""
    from PIL import Image

    rng = np.random.default_rng([label, seed])
    base = np.random.default_rng(label).integers(0, 256, 3)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = base[None, None, :] + 40 * np.sin(xx[..., None] / (3 + label % 7) + yy[..., None] / (2 + seed % 5))
    img = img + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_dataset(root: Path, names: list[str], per_class: dict[int, int] | int = 6, test_per_class: int = 1,
                 test_classes: list[int] | None = None, classes_file: str | None = None,
                 size=(64, 48)) -> dict:
    """Write a dataset in the official layout under ``root``. ``names``: the class list (index order).
    ``per_class``: training images per class (a dict may give 0 to leave a class empty). Returns
    {"train": [(path, label)], "test": {file name: label}}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if classes_file is None:
        (root / "classes.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    else:
        (root / "classes.txt").write_text(Path(classes_file).read_text())
    train = []
    for c, name in enumerate(names):
        k = per_class.get(c, 0) if isinstance(per_class, dict) else per_class
        domain, cls = name.split("_", 1)
        folder = root / "TrainSet" / domain / cls
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(k):
            rel = f"TrainSet/{domain}/{cls}/{j}.jpg"
            class_image(c, j, size).save(root / rel, quality=90)
            train.append((rel, c))
    (root / "train.txt").write_text("".join(f"{p} {c}\n" for p, c in train))
    test = {}
    (root / "TestSetA").mkdir(exist_ok=True)
    for c in (test_classes if test_classes is not None else range(len(names))):
        for j in range(test_per_class):
            fname = f"image_{len(test) + 1001}.jpg"
            class_image(c, 1000 + j, size).save(root / "TestSetA" / fname, quality=90)
            test[fname] = c
    return {"train": train, "test": test}


# --------------------------------------------------------------------------------------------- class lists
def test_real_class_list_domains_and_prompts():
    classes = load_classes(JITTOR4 / "classes.txt")
    assert len(classes) == 374 and classes.n_seen == 374 and classes.n_unseen == 0
    counts = {d: int((np.array(classes.domains) == d).sum()) for d in classes.domain_names}
    assert counts == {"Animal": 52, "Caltech-101": 91, "Food-101": 101, "Thu-dog": 130}   # README's ranges
    assert classes.domain_classes("Thu-dog")[0] == 244 and classes.domain_classes("Thu-dog")[-1] == 373
    i = classes.index("Thu-dog_chinese_rural_dog")
    assert classes.labels[i] == "chinese rural dog"
    prompts = classes.prompts(lambda d: {"Thu-dog": ["a photo of a {}, a type of dog."]}.get(d, ["a {}."]))
    assert prompts[i] == ["a photo of a chinese rural dog, a type of dog."]
    assert prompts[0] == ["a Bear."]


def test_all_classes_file_adds_unseen_classes():
    classes = load_classes(JITTOR4 / "classes.txt", JITTOR4 / "classes_b.txt")
    assert len(classes) == 403 and classes.n_seen == 374 and classes.n_unseen == 29
    assert classes.domains[374:] == ["Stanford-Cars"] * 29
    assert classes.domain_names == ["Animal", "Caltech-101", "Food-101", "Thu-dog", "Stanford-Cars"]


def test_all_classes_file_must_start_with_the_seen_classes(tmp_path):
    a = tmp_path / "classes.txt"
    a.write_text("Animal_Bear 0\nAnimal_Bee 1\n")
    b = tmp_path / "classes_b.txt"
    b.write_text("Animal_Bee 0\nAnimal_Bear 1\nCars_X 2\n")
    with pytest.raises(DataError, match=r"(?s)classes_b.txt: the first 2 classes must be those of .*index 0: "
                                        r"'Animal_Bee' here but 'Animal_Bear'"):
        load_classes(a, b)


def test_split_class_name():
    assert split_class_name("Caltech-101_Faces_easy") == ("Caltech-101", "Faces easy")
    assert split_class_name("Stanford-Cars_Volvo_C30_Hatchback_2012") == ("Stanford-Cars", "Volvo C30 Hatchback 2012")
    assert split_class_name("plain") == ("", "plain")


def test_class_file_tolerates_bom_crlf_and_missing_final_newline(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"\xef\xbb\xbfAnimal_Bear 0\r\nAnimal_Bee 1")
    assert read_class_file(f) == ["Animal_Bear", "Animal_Bee"]


def test_class_file_in_any_index_order(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("Animal_Bee 1\nAnimal_Bear 0\n")
    assert read_class_file(f) == ["Animal_Bear", "Animal_Bee"]


# ---------------------------------------------------------------------------------------- image lists
def test_published_selection_reads_with_four_per_class():
    classes = load_classes(JITTOR4 / "classes.txt")
    sel = read_image_list(JITTOR4 / "train_label.txt", classes, JITTOR4, check_files=False)
    assert len(sel) == 1496
    counts = np.bincount([e.label for e in sel], minlength=374)
    assert (counts == 4).all()
    assert sel[0] == Example("TrainSet/Animal/Bear/7.jpg", 0, 1)


def test_image_list_paths_with_spaces_and_backslashes(tmp_path):
    classes = ClassList(["Animal_Bear", "Animal_Bee"], 2)
    (tmp_path / "TrainSet/Animal/Bear").mkdir(parents=True)
    (tmp_path / "TrainSet/Animal/Bear/a b.jpg").write_bytes(b"x")
    (tmp_path / "t.txt").write_text("TrainSet\\Animal\\Bear\\a b.jpg 0\n")
    assert read_image_list(tmp_path / "t.txt", classes, tmp_path) == [Example("TrainSet/Animal/Bear/a b.jpg", 0, 1)]


# ------------------------------------------------------------------------------------------------ sampling
def _pool(n_classes=5, per=12):
    return [Example(f"TrainSet/D/C{c}/{j}.jpg", c) for c in range(n_classes) for j in range(per)]


def test_sampling_is_seeded_and_per_class():
    classes = ClassList([f"D_C{c}" for c in range(5)], 5)
    pool = _pool()
    a = sample_split(pool, classes, shots=4, seed=0, val_per_class=3)
    b = sample_split(list(reversed(pool)), classes, shots=4, seed=0, val_per_class=3)   # list order is irrelevant
    c = sample_split(pool, classes, shots=4, seed=1, val_per_class=3)
    assert a.support == b.support and a.val == b.val
    assert a.support != c.support
    assert np.bincount([e.label for e in a.support]).tolist() == [4] * 5
    assert np.bincount([e.label for e in a.val]).tolist() == [3] * 5
    assert not {e.path for e in a.support} & {e.path for e in a.val}
    # one class's choice does not depend on the others
    d = sample_split([e for e in pool if e.label != 2], ClassList(["D_C0", "D_C1"], 2), shots=4, seed=0,
                     val_per_class=0)
    assert [e for e in d.support if e.label in (0, 1)] == [e for e in a.support if e.label in (0, 1)]


def test_validation_cap_is_balanced_across_classes():
    classes = ClassList([f"D_C{c}" for c in range(5)], 5)
    s = sample_split(_pool(), classes, shots=4, seed=0, val_per_class=8, val_max=10)
    assert len(s.val) == 10
    assert np.bincount([e.label for e in s.val]).tolist() == [2] * 5


def test_unreadable_support_image_is_replaced_by_the_next_candidate():
    classes = ClassList([f"D_C{c}" for c in range(5)], 5)
    s = sample_split(_pool(), classes, shots=4, seed=0, val_per_class=2)
    first = s.support[0]
    before_val = s.val
    s.exclude(first.path, "corrupt")
    assert first not in s.support and len(s.support) == 20
    assert [e for e in s.support if e.label == first.label][-1] == [e for e in before_val if e.label == first.label][0]
    s.check(classes)


def test_a_class_short_of_readable_images_is_named_with_the_setting_that_allows_it():
    classes = ClassList([f"D_C{c}" for c in range(2)], 2)
    pool = _pool(2, per=4)
    s = sample_split(pool, classes, shots=4, seed=0, val_per_class=0)
    s.exclude(pool[0].path, "corrupt")                 # class 0: 3 readable of 4, nothing to replace it
    with pytest.raises(DataError, match=r"^train.txt: not enough readable training images \(`--set "
                                        r"sampling.allow_fewer=true[^\n]*\n.*D_C0 \(0\): 3 readable of 4 needed"):
        s.check(classes)
    fewer = sample_split(pool, classes, shots=4, seed=0, val_per_class=0, allow_fewer=True)
    fewer.exclude(pool[0].path, "corrupt")
    fewer.check(classes)                               # trains class 0 on its 3
    assert [e.label for e in fewer.support].count(0) == 3
    for e in pool[1:4]:
        fewer.exclude(e.path, "corrupt")
    with pytest.raises(DataError, match=r"D_C0 \(0\): 0 readable of 1 needed") as err:
        fewer.check(classes)                           # no readable image at all: no setting helps
    assert "allow_fewer" not in str(err.value)


def test_given_list_is_the_support_and_the_rest_validates(tmp_path):
    classes = ClassList([f"D_C{c}" for c in range(5)], 5)
    pool = _pool()
    sel = [e for e in pool if e.path.endswith(("/0.jpg", "/1.jpg"))]
    s = split_from_list(sel, pool, classes, val_per_class=5)
    assert sorted(s.support) == sorted(sel)
    assert len(s.val) == 25 and not {e.path for e in s.val} & {e.path for e in sel}


def test_split_written_to_out_reproduces_the_run(tmp_path):
    root = tmp_path / "data"
    names = [f"Animal_C{c}" for c in range(4)]
    make_dataset(root, names, per_class=7, test_per_class=0)
    classes = load_classes(root / "classes.txt")
    pool = read_image_list(root / "train.txt", classes, root)
    s = sample_split(pool, classes, shots=3, seed=42, val_per_class=2)
    info = write_split(s, tmp_path / "out/split")
    assert info["n_support"] == 12 and info["n_val"] == 8 and info["seed"] == 42
    again = read_image_list(tmp_path / "out/split/support.txt", classes, root)
    assert [(e.path, e.label) for e in again] == [(e.path, e.label) for e in s.support]
    s2 = split_from_list(again, pool, classes, seed=42, val_per_class=2)
    assert [(e.path, e.label) for e in s2.val] == [(e.path, e.label) for e in s.val]


def test_test_folder_listing_is_sorted_and_skips_non_images(tmp_path):
    d = tmp_path / "TestSetA"
    d.mkdir()
    for n in ["image_2.jpg", "image_10.JPG", "a.png", ".hidden.jpg", "notes.txt", "Ünïcode 图.jpeg"]:
        (d / n).write_bytes(b"x")
    (d / "sub").mkdir()
    images, skipped = list_test_images(d)
    assert images == sorted(["image_2.jpg", "image_10.JPG", "a.png", "Ünïcode 图.jpeg"])
    assert skipped == sorted([".hidden.jpg", "notes.txt", "sub"])
    # names that cannot be one line of the result file and read back: any line break Python splits at, or bytes
    # that are not UTF-8 (the name then holds surrogates); skipped and named, never a failed write at the end
    odd = ["form\x0cfeed.jpg", "line\u2028sep.jpg", "next\x85line.jpg", "tab\there.jpg", "cr\r.jpg",
           " lead.jpg", "\xa0nbsp.jpg"]                                     # read back stripped
    for n in odd:
        (d / n).write_bytes(b"x")
    with open(os.path.join(os.fsencode(d), b"bad\xffbyte.jpg"), "wb") as f:
        f.write(b"x")
    images, skipped = list_test_images(d)
    assert images == sorted(["image_2.jpg", "image_10.JPG", "a.png", "Ünïcode 图.jpeg"])
    assert skipped == sorted([".hidden.jpg", "notes.txt", "sub", "bad\udcffbyte.jpg"] + odd)
    with pytest.raises(DataError, match="test image folder not found"):
        list_test_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        list_test_images(tmp_path / "empty")
