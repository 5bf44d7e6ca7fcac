"""Result file, routes CSV and tables (cascade.output) and the atomic writers under them (cascade.io): format,
order, completeness, atomic writes."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from cascade.io import atomic_open, atomic_write_json, replace_dir, save_npz_json
from cascade.output import ResultError, format_table, read_result, write_result, write_routes_csv


def test_result_lines_sorted_by_name_one_per_image(tmp_path):
    names = ["image_1002.jpg", "image_1001.jpg", "a b.png"]
    top5 = np.array([[5, 4, 3, 2, 1], [0, 1, 2, 3, 4], [9, 8, 7, 6, 373]])
    out = tmp_path / "result.txt"
    write_result(out, names, top5)
    text = out.read_text()
    assert text == "a b.png 9 8 7 6 373\nimage_1001.jpg 0 1 2 3 4\nimage_1002.jpg 5 4 3 2 1\n"
    back = read_result(out, n_classes=374)
    assert back == {"a b.png": [9, 8, 7, 6, 373], "image_1001.jpg": [0, 1, 2, 3, 4], "image_1002.jpg": [5, 4, 3, 2, 1]}


def test_result_refuses_duplicates_and_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="duplicate image names"):
        write_result(tmp_path / "r.txt", ["a.jpg", "a.jpg"], np.zeros((2, 5), int))
    with pytest.raises(ValueError, match="expected \\[3, 5\\]"):
        write_result(tmp_path / "r.txt", ["a", "b", "c"], np.zeros((2, 5), int))
    assert not (tmp_path / "r.txt").exists()


@pytest.mark.parametrize("text, expected", [
    ("a.jpg 1 2 3 4\n", "line 1: expected '<file name> <top1>"),
    ("a.jpg 1 2 3 4 x\n", "line 1: class indices must be integers"),
    ("a.jpg 1 2 3 4 999\n", r"line 1: class index 999 out of range \(0..373\)"),
    ("a.jpg 1 2 3 4 -1\n", "line 1: class index -1 out of range"),
    ("a.jpg 1 2 3 4 4\n", "line 1: a class index is repeated"),
    ("a.jpg 1 2 3 4 5\n\na.jpg 1 2 3 4 5\n", "line 3: a.jpg appears twice"),
    ("\n\n", "result file has no lines"),
])
def test_malformed_result_files(tmp_path, text, expected):
    p = tmp_path / "result.txt"
    p.write_text(text)
    with pytest.raises(ResultError, match=expected) as err:
        read_result(p, n_classes=374)
    assert str(p) in str(err.value)


def test_routes_csv(tmp_path):
    p = tmp_path / "routes.csv"
    write_routes_csv(p, ["b.jpg", "a.jpg"], ["lpp", "unreadable"], np.array([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]),
                     np.array([[.5, .2, .1, .1, .05], [.2, .2, .2, .2, .2]]), ["ok", "unreadable: empty file"])
    rows = list(csv.DictReader(p.open()))
    assert [r["image"] for r in rows] == ["a.jpg", "b.jpg"]
    assert rows[0]["route"] == "unreadable" and rows[0]["status"] == "unreadable: empty file"
    assert rows[1]["top1"] == "1" and float(rows[1]["score1"]) == 0.5


def test_replace_dir_swaps_complete_folders(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = tmp_path / ".model.tmp"
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_and_table(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"x": np.float32(1.5), "y": np.arange(2)})
    assert (tmp_path / "m.json").read_text().replace(" ", "").replace("\n", "") == '{"x":1.5,"y":[0,1]}'
    t = format_table([{"domain": "Animal", "n": 3, "top1": 66.6667}], ["domain", "n", "top1"])
    assert t.splitlines()[0].split() == ["domain", "n", "top1"] and "66.67" in t


def test_every_atomic_writer_gives_plain_open_permissions_and_leaves_nothing_on_failure(tmp_path):
    """Result files, fitted stages and converted weights share one atomic writer: their files get 0666 minus
    the umask, like a plain open() (not mkstemp's private 0600), and a failed write leaves no file behind."""
    import os

    from cascade.models.weights import save_weights

    old = os.umask(0o022)
    try:
        write_result(tmp_path / "result.txt", ["a.jpg"], np.array([[0, 1, 2, 3, 4]]))
        save_npz_json(tmp_path / "stage.npz", {"w": np.ones(3)}, {"k": 1})
        save_weights(tmp_path / "weights.npz", {"w": np.ones(3, np.float32)}, {"arch": "test"})
        for name in ("result.txt", "stage.npz", "weights.npz"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
        with pytest.raises(RuntimeError):
            with atomic_open(tmp_path / "broken.txt") as f:
                f.write("half")
                raise RuntimeError("interrupted")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt", "stage.npz", "weights.npz"]
