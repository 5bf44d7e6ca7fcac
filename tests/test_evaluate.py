"""`python -m cascade eval`: top-1/top-5 overall and per domain, worst classes, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade.__main__ import main
from cascade.evaluate import LabelError, evaluate_files, topk_table, worst_classes

JITTOR4 = Path(__file__).parent / "data" / "jittor4"


def test_topk_table_by_domain():
    top = np.array([[0, 1, 2, 3, 4], [2, 1, 0, 3, 4], [5, 2, 3, 4, 1], [3, 4, 5, 0, 1]])
    y = np.array([0, 1, 2, 6])
    rows = topk_table(top, y, ["A", "A", "B", "B", "B", "B", "C"])
    by = {r["domain"]: r for r in rows}
    assert [r["domain"] for r in rows] == ["A", "B", "C", "all"]
    assert by["A"] == {"domain": "A", "n": 2, "top1": 50.0, "top5": 100.0}
    assert by["B"]["top1"] == 0.0 and by["B"]["top5"] == 100.0
    assert by["C"]["top5"] == 0.0
    assert by["all"]["n"] == 4 and by["all"]["top1"] == 25.0 and by["all"]["top5"] == 75.0


def test_worst_classes_with_confusions():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([1, 1, 0, 1, 1, 0])
    rows = worst_classes(p, y, ["zero", "one", "two"], n=2)
    assert rows[0]["name"] == "two" and rows[0]["top1"] == 0.0 and rows[0]["confused_with"] == "zero (0)"
    assert rows[1]["name"] == "zero" and rows[1]["confused_with"] == "one (1)" and rows[1]["times"] == 2


def _files(tmp_path, lines, labels):
    r = tmp_path / "result.txt"
    r.write_text("".join(lines))
    l = tmp_path / "labels.txt"
    l.write_text("".join(labels))
    return r, l


def test_eval_command_per_domain_with_real_class_list(tmp_path, capsys):
    r, l = _files(tmp_path, ["image_1.jpg 0 1 2 3 4\n", "image_2.jpg 250 244 3 4 5\n", "image_3.jpg 7 8 9 10 11\n"],
                  ["image_1.jpg 0\n", "TestSetA/image_2.jpg 244\n", "image_3.jpg 100\n"])
    js = tmp_path / "m.json"
    assert main(["eval", str(r), str(l), "--classes", str(JITTOR4 / "classes.txt"), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "Animal" in out and "Thu-dog" in out and "worst classes" in out
    data = json.loads(js.read_text())
    by = {row["domain"]: row for row in data["accuracy"]}
    assert by["all"]["n"] == 3 and by["all"]["top1"] == pytest.approx(100 / 3) and by["all"]["top5"] == \
        pytest.approx(200 / 3)
    assert by["Thu-dog"]["top1"] == 0.0 and by["Thu-dog"]["top5"] == 100.0
    worst = data["worst_classes"]
    assert [(w["name"], w["top1"], w["confused_with"]) for w in worst[:2]] == [
        ("Caltech-101_joshua_tree", 0.0, "Animal_Chicken (7)"), ("Thu-dog_Shiba_Dog", 0.0, "Thu-dog_miniature_poodle (250)")]


def test_eval_missing_lines_are_an_error_unless_allowed(tmp_path):
    r, l = _files(tmp_path, ["a.jpg 0 1 2 3 4\n"], ["a.jpg 0\n", "b.jpg 4\n"])
    with pytest.raises(LabelError, match=r"1 labelled image\(s\) have no result line, e.g. b.jpg"):
        evaluate_files(r, l)
    rows, _, info = evaluate_files(r, l, allow_missing=True)
    assert rows[-1]["top1"] == 50.0 and info["n_missing"] == 1


@pytest.mark.parametrize("result, labels, expected", [
    ("a.jpg 0 1 2 3\n", "a.jpg 0\n", "result.txt: malformed result file:\n  line 1: expected"),
    ("a.jpg 0 1 2 3 4\n", "a.jpg zero\n", "labels.txt: malformed labels file:\n  line 1: index 'zero'"),
    ("a.jpg 0 1 2 3 4\n", "a.jpg\n", "labels.txt: malformed labels file:\n  line 1: expected"),
    ("a.jpg 0 1 2 3 400\n", "a.jpg 0\n", "line 1: class index 400 out of range"),
    ("a.jpg 0 1 2 3 4\n", "a.jpg 999\n", "label(s) out of range"),
    # matched by file name: two labels on one result line, or one label on several (never counted twice)
    ("a.jpg 0 1 2 3 4\n", "x/a.jpg 0\ny/a.jpg 1\n",
     "result.txt matched by several labels by file name, e.g. a.jpg (labels x/a.jpg, y/a.jpg)"),
    ("x/a.jpg 0 1 2 3 4\ny/a.jpg 1 2 3 4 0\n", "a.jpg 0\n",
     "result.txt by file name, e.g. a.jpg; name the images as the result file does"),
    # the two files given the other way round, or the result twice: said so, not misread
    ("a.jpg 0\nb.jpg 3\n", "a.jpg 0 1 2 3 4\nb.jpg 3 1 2 0 4\n",
     "result.txt: holds one class index per line, as a labels file does; give the result file first"),
    ("a.jpg 0 1 2 3 4\n", "a.jpg 0 1 2 3 4\n",
     "labels.txt: every line holds a name and several class indices, as a result file does"),
])
def test_eval_malformed_files_exit_2_with_one_line(tmp_path, capsys, result, labels, expected):
    r, l = _files(tmp_path, [result], [labels])
    assert main(["eval", str(r), str(l), "--classes", str(JITTOR4 / "classes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cascade eval: error: ") and expected in err


def test_eval_a_line_named_exactly_is_not_shared_by_file_name(tmp_path):
    """x/a.jpg names its line exactly; y/a.jpg has no line of its own (missing), it does not share x/a.jpg's."""
    r, l = _files(tmp_path, ["x/a.jpg 0 1 2 3 4\n", "x/b.jpg 4 3 2 1 0\n"],
                  ["x/a.jpg 0\n", "y/a.jpg 1\n", "x/b.jpg 4\n"])
    with pytest.raises(LabelError, match=r"1 labelled image\(s\) have no result line, e.g. y/a.jpg"):
        evaluate_files(r, l)
    rows, _, info = evaluate_files(r, l, allow_missing=True)
    assert info["n_missing"] == 1 and rows[-1]["top1"] == pytest.approx(200 / 3)


def test_eval_worst_must_be_a_count(tmp_path, capsys):
    r, l = _files(tmp_path, ["a.jpg 0 1 2 3 4\n"], ["a.jpg 0\n"])
    with pytest.raises(SystemExit):
        main(["eval", str(r), str(l), "--worst", "-3"])
    assert "argument --worst: expected an integer >= 0, got '-3'" in capsys.readouterr().err


def test_eval_missing_files(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.txt"), str(tmp_path / "l.txt")]) == 2
    assert "none.txt: result file not found" in capsys.readouterr().err


def test_eval_output_faults_name_standard_output_and_a_closed_pipe_ends_quietly(tmp_path):
    """`> /dev/full` is an error naming standard output (not a bare errno); a reader that went away (`| head`)
    ends the command quietly with a shell's status for it (141), the --json figures written all the same."""
    r, l = _files(tmp_path, ["a.jpg 0 1 2 3 4\n"], ["a.jpg 0\n"])
    cmd = [sys.executable, "-m", "cascade", "eval", str(r), str(l), "--classes", str(JITTOR4 / "classes.txt")]
    root = Path(__file__).parents[1]
    with open("/dev/full", "w") as full:
        p = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=root, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == ("cascade eval: error: standard output: No space left on device "
                                                      "(errno 28 ENOSPC); free some space and rerun (outputs written "
                                                      "before are unchanged)"), p.stderr
    p = subprocess.Popen(cmd + ["--json", str(tmp_path / "m.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=root)
    p.stdout.close()            # the reader is gone before the command writes a line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"][-1]["top1"] == 100.0
