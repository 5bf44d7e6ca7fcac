"""The whole user journey, as a user runs it: convert checkpoints with `python -m cascade.convert`, then
`bash train.sh` and `bash test.sh` in a folder holding data/ (the challenge's layout, with the REAL 374 seen
class names and the 29 unseen Stanford-Cars names of classes_b.txt, from tests/data/jittor4/) and out/.

Models are small seeded random CLIPs built with OpenAI's own code (a ViT and a modified ResNet, saved as
PyTorch state dicts) and a ConvNeXt-V2-atto built with timm for the Thu-dog specialist: every one goes through
the real conversion path. Images are generated; a few test images are broken on purpose (empty, not an image,
truncated) and one has a non-ASCII name.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
JITTOR4 = Path(__file__).parent / "data" / "jittor4"
sys.path.insert(0, str(Path(__file__).parent))

SHOTS = 4
TEST_CLASSES = list(range(0, 374, 11)) + [244, 250, 300, 373]     # every domain, several Thu-dog classes


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd, cwd, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _convert(src: Path, dst: Path):
    r = _run([sys.executable, "-m", "cascade.convert", str(src), str(dst)], REPO)
    assert r.returncode == 0, r.stderr
    assert dst.is_file()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from _reference import build_reference
    from test_data import class_image, make_dataset

    root = tmp_path_factory.mktemp("journey")
    data = root / "data"
    names = [line.split()[0] for line in (JITTOR4 / "classes.txt").read_text().splitlines() if line.strip()]
    assert len(names) == 374
    info = make_dataset(data, names, per_class=SHOTS + 1, test_per_class=1, test_classes=TEST_CLASSES,
                        classes_file=str(JITTOR4 / "classes.txt"), size=(40, 30))
    (data / "classes_b.txt").write_text((JITTOR4 / "classes_b.txt").read_text())
    # an unreadable training image: sampled or not, the run must report it and never train on it
    broken_train = data / "TrainSet/Animal/Bird/2.jpg"
    broken_train.write_bytes(broken_train.read_bytes()[:40])
    test_dir = data / "TestSetA"
    (test_dir / "zero.jpg").write_bytes(b"")
    (test_dir / "notes.png").write_text("not an image")
    good = (test_dir / "image_1001.jpg").read_bytes()
    (test_dir / "truncated.jpg").write_bytes(good[: len(good) // 3])
    class_image(244, 5, (40, 30)).save(test_dir / "柴犬 Shiba ü.jpg")
    (test_dir / "readme.txt").write_text("not listed: no image extension")

    # checkpoints -> converted weights, through the real command
    weights = root / "out" / "weights"
    weights.mkdir(parents=True)
    for ref_name, file in (("tiny-vit", "ViT-B-32"), ("tiny-rn", "RN101")):
        model = build_reference(ref_name, seed=11)
        torch.save(model.state_dict(), root / f"{file}.pt")
        _convert(root / f"{file}.pt", weights / f"{file}.npz")
    torch.manual_seed(0)
    cnx = timm.create_model("convnextv2_atto", pretrained=False)
    torch.save({"model": cnx.state_dict()}, root / "convnextv2_atto.pth")
    _convert(root / "convnextv2_atto.pth", weights / "convnextv2_base.npz")
    expected = sorted(list(info["test"]) + ["zero.jpg", "notes.png", "truncated.jpg", "柴犬 Shiba ü.jpg"])
    return {"root": root, "expected": expected, "labels": info["test"]}


# small settings for a 2-core CI machine: one validation image per class, the specialist on cached features
# (one view per support image) with a fixed regularisation and few solver iterations
# the specialist is a ConvNeXt-V2-atto here: its feature key names that size (the weights are checked against it)
ATTO = ["--set", "specialist.feature_key=convnextv2_atto"]
FAST = ["--set", "sampling.val_per_class=1", "--set", "specialist.params.n_views=1", "--set", "specialist.params.C=0.1",
        "--set", "specialist.params.max_iter=30"] + ATTO


@pytest.fixture(scope="module")
def trained(workspace):
    root = workspace["root"]
    r = _run(["bash", str(REPO / "train.sh"), "--all-classes", "classes_b.txt", "--quiet"] + FAST, root)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def tested(workspace, trained):
    r = _run(["bash", str(REPO / "test.sh"), "--quiet"] + FAST, workspace["root"])
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_train_writes_split_model_and_validation_report(workspace, trained):
    out = workspace["root"] / "out"
    support = (out / "split/support.txt").read_text().splitlines()
    assert len(support) == 374 * SHOTS
    assert np.bincount([int(s.rsplit(" ", 1)[1]) for s in support], minlength=374).tolist() == [SHOTS] * 374
    assert "TrainSet/Animal/Bird/2.jpg" not in (out / "split/support.txt").read_text()
    import json

    split = json.loads((out / "split/split.json").read_text())
    assert split["seed"] == 0 and split["n_support"] == 374 * SHOTS
    # seed 0 draws it into Bird's support: it is excluded, reported and replaced by Bird's next candidate
    assert [e["path"] for e in split["excluded"]] == ["TrainSet/Animal/Bird/2.jpg"]
    assert "truncated" in split["excluded"][0]["reason"] and "Animal/Bird/2.jpg" in trained.stderr
    assert (out / "split/support.txt").read_text().count("TrainSet/Animal/Bird/") == SHOTS
    assert len((out / "split/val.txt").read_text().splitlines()) == 374 - len(split["excluded"])
    assert (out / "model/classes.txt").read_text().splitlines()[-1] == "Stanford-Cars_Volvo_C30_Hatchback_2012 402"

    report = json.loads((out / "report/val_metrics.json").read_text())
    domains = [row["domain"] for row in report["accuracy"]]
    assert domains == ["Animal", "Caltech-101", "Food-101", "Thu-dog", "all"]
    assert report["accuracy"][-1]["n"] == 374 - len(split["excluded"])
    assert all(0.0 <= row["top1"] <= row["top5"] <= 100.0 for row in report["accuracy"])
    assert "validation" in trained.stderr and "Thu-dog" in trained.stderr       # the table on stderr
    assert (out / "report/val_metrics.csv").read_text().startswith("domain,n,top1,top5")


def test_result_file_lists_every_test_image_once_sorted(workspace, tested):
    out = workspace["root"] / "out"
    lines = (out / "result.txt").read_text(encoding="utf-8").splitlines()
    names = [line.rsplit(" ", 5)[0] for line in lines]
    assert names == workspace["expected"]                      # every image once, sorted; readme.txt left out
    for line in lines:
        idx = [int(t) for t in line.rsplit(" ", 5)[1:]]
        assert len(idx) == 5 and len(set(idx)) == 5 and all(0 <= i < 403 for i in idx)
    assert "class marginal over these images: " in tested.stderr      # the cascade says which marginal it used
    # ... and, per domain (each has its own cascade here, which makes the checks), whether it balanced its images
    assert "domain Thu-dog: " in tested.stderr and "balanced" in tested.stderr


def test_unreadable_test_images_are_listed_and_reported(workspace, tested):
    out = workspace["root"] / "out"
    bad = {"zero.jpg": "empty file", "notes.png": "not an image", "truncated.jpg": "truncated"}
    reported = dict(line.split("\t", 1) for line in (out / "result_unreadable.txt").read_text().splitlines())
    assert set(reported) == set(bad)
    for name, why in bad.items():
        assert why in reported[name] and name in tested.stderr
    rows = {r["image"]: r for r in csv.DictReader((out / "result_routes.csv").open(encoding="utf-8"))}
    assert sorted(rows) == workspace["expected"]
    assert all(rows[n]["route"] == "unreadable" for n in bad)
    assert all(rows[n]["status"] == "ok" and rows[n]["route"] != "unreadable" for n in rows if n not in bad)
    for r in rows.values():
        scores = [float(r[f"score{i}"]) for i in range(1, 6)]
        assert scores == sorted(scores, reverse=True)


def test_rerun_is_served_by_the_cache_and_identical(workspace, tested):
    root = workspace["root"]
    before = (root / "out/result.txt").read_text(encoding="utf-8")
    shards = sorted((root / "out/cache").rglob("*.keys.npy"))
    r = _run([sys.executable, "-m", "cascade", "test", "--quiet"] + FAST, root)
    assert r.returncode == 0, r.stderr
    assert (root / "out/result.txt").read_text(encoding="utf-8") == before
    assert sorted((root / "out/cache").rglob("*.keys.npy")) == shards   # nothing was encoded again


def test_eval_scores_the_result(workspace, tested):
    root = workspace["root"]
    labels = root / "labels.txt"
    labels.write_text("".join(f"{n} {c}\n" for n, c in workspace["labels"].items()))
    r = _run([sys.executable, "-m", "cascade", "eval", "out/result.txt", str(labels), "--classes",
              "data/classes_b.txt"], root)
    assert r.returncode == 0, r.stderr
    assert "Thu-dog" in r.stdout and "all" in r.stdout and "worst classes" in r.stdout


def test_failure_leaves_previous_outputs_untouched(workspace, tested):
    root = workspace["root"]
    before = (root / "out/result.txt").read_bytes()
    r = _run([sys.executable, "-m", "cascade", "test", "--quiet", "--set", "models.clip.RN101=out/weights/none.npz"],
             root)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("cascade test: error: ") and "none.npz" in r.stderr
    assert (root / "out/result.txt").read_bytes() == before
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".")]     # no temporary files left
    # a bad specialist setting fails at once, naming the setting, and leaves the trained model as it was
    model = (root / "out/model/cascade.npz").read_bytes()
    r = _run([sys.executable, "-m", "cascade", "train", "--quiet", "--set", "specialist.params.finetune=everything"],
             root)
    assert r.returncode == 2 and "specialist.params" in r.stderr and "everything" in r.stderr, r.stderr
    assert (root / "out/model/cascade.npz").read_bytes() == model


def test_backbone_settings_that_do_not_match_are_named(workspace, tested):
    root = workspace["root"]
    before = (root / "out/result.txt").read_bytes()
    # test with a backbone switched off: the model's backbones are named before any weights file is looked for
    r = _run([sys.executable, "-m", "cascade", "test", "--quiet", "--set", "models.clip.RN101="], root)
    assert r.returncode == 2 and "differ from the trained model's ['RN101', 'ViT-B/32']" in r.stderr, r.stderr
    assert "models.clip" in r.stderr and "not found" not in r.stderr
    # a misspelt backbone name beside the right one would encode the same model twice: refused, both named
    model = (root / "out/model/cascade.npz").read_bytes()
    r = _run([sys.executable, "-m", "cascade", "train", "--quiet", "--set",
              "models.clip.ViT-B32=out/weights/ViT-B-32.npz"], root)
    assert r.returncode == 2 and "models.clip.ViT-B/32 and models.clip.ViT-B32 hold the same weights" in r.stderr
    assert (root / "out/model/cascade.npz").read_bytes() == model
    assert (root / "out/result.txt").read_bytes() == before


def test_demo_runs_the_whole_journey_without_downloads(tmp_path):
    """scripts/demo.sh: a synthetic workspace (python -m cascade demo), train, test and eval, as a user runs them;
    the demo takes an empty folder and refuses one that already holds data, and its random weights pass the
    weights check."""
    from cascade.features import clip_encoder

    demo = tmp_path / "demo"
    demo.mkdir()                     # an empty folder is accepted, as `python -m cascade demo` accepts it
    r = _run(["bash", str(REPO / "scripts/demo.sh"), str(demo)], REPO)
    assert r.returncode == 0, r.stderr
    lines = (demo / "out/result.txt").read_text().splitlines()
    assert len(lines) == 72 and all(len(line.split()) == 6 for line in lines)
    assert "all" in r.stdout and "worst classes" in r.stdout and (demo / "out/model/bundle.json").is_file()
    top1 = float(next(line.split()[2] for line in r.stdout.splitlines() if line.startswith("all ")))
    assert top1 > 50.0          # random weights, yet most test images right (12 classes: chance is 8.3 %)
    assert clip_encoder("ViT-B/32", demo / "out/weights/demo-vit.npz").preprocess.size == 64
    named = [w.rstrip(";") for w in r.stdout.strip().splitlines()[-1].split() if w.startswith(str(demo))]
    assert len(named) == 3 and all(Path(w).exists() for w in named), named   # where the last line sends the user
    # the demo's model has no specialist: a test that would give it one is refused before any weights are read
    r = _run([sys.executable, "-m", "cascade", "test", "--config", "demo.toml", "--set", "specialist.enabled=true"],
             demo)
    assert r.returncode == 2 and "has no specialist, but specialist.enabled and specialist.domains give a " \
        "specialist for Thu-dog here" in r.stderr, r.stderr
    # paths read relative to the data root, given from the current folder: the error says how to give them
    for command, option, value, hint in (("train", "--train-list", "out/split/support.txt", "../out/split/support.txt"),
                                         ("test", "--test-dir", "data/TestSetA", "TestSetA")):
        r = _run([sys.executable, "-m", "cascade", command, "--config", "demo.toml", option, value], demo)
        assert r.returncode == 2 and f"is read relative to the data root data, and {value} exists from the " \
            f"current folder: give it as {hint}, or as an absolute path" in r.stderr, r.stderr
    r = _run([sys.executable, "-m", "cascade", "train", "--config", "demo.toml", "--quiet", "--train-list",
              "../out/split/support.txt", "--shots", "3"], demo)             # the list sets the shots
    assert r.returncode == 0 and "--shots 3 is ignored: the given list (../out/split/support.txt" in r.stderr
    r = _run([sys.executable, "-m", "cascade", "demo", str(demo)], REPO)
    assert r.returncode == 2 and "already holds a dataset" in r.stderr
    (demo / "work").mkdir()                           # something of the user's beside an earlier demo: kept
    r = _run(["bash", str(REPO / "scripts/demo.sh"), str(demo)], REPO)
    assert r.returncode == 2 and "holds an earlier demo and files it did not write (work)" in r.stderr, r.stderr
    assert (demo / "work").is_dir() and (demo / "demo.toml").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("mine")
    r = _run(["bash", str(REPO / "scripts/demo.sh"), str(tmp_path / "mine")], REPO)
    assert r.returncode == 2 and "neither empty nor a demo folder" in r.stderr
    assert (tmp_path / "mine/notes.txt").is_file()


def test_wrappers_explain_themselves():
    r = _run(["bash", str(REPO / "train.sh"), "--help"], REPO)
    assert r.returncode == 0 and "--set KEY=VALUE" in r.stdout and "sampling" in r.stdout
    r = _run(["bash", str(REPO / "test.sh"), "--help"], REPO)
    assert r.returncode == 0 and "--test-dir" in r.stdout
    # a misspelt option is reported with the command's own usage
    r = _run(["bash", str(REPO / "test.sh"), "--test_dir", "X"], REPO)
    assert r.returncode == 2 and "python -m cascade test: error: unrecognized arguments: --test_dir X" in r.stderr
    assert "usage: python -m cascade test" in r.stderr


def test_set_up_note_times_set_up_itself_not_the_wait_for_its_lock(tmp_path):
    """scripts/run.sh says "setting up first" only when set-up itself runs past 10 s, not when it waited that long
    for the lock other ranks of an mpirun hold (each then finds set-up done in seconds); it leaves no file behind.
    Ctrl-C during set-up ends it with exit 130 and "cascade test: interrupted". Run on a copy of run.sh beside a
    fake set-up and a fake interpreter."""
    import hashlib
    import shutil
    import signal
    import time

    def fake_root(name, setup_seconds):
        root = tmp_path / name
        (root / "scripts").mkdir(parents=True)
        (root / ".venv/bin").mkdir(parents=True)
        shutil.copy(REPO / "scripts/run.sh", root / "scripts/run.sh")
        (root / "scripts/setup.sh").write_text(f"sleep {setup_seconds}\n")
        (root / ".venv/bin/python").write_text("#!/bin/sh\necho ran\n")
        (root / ".venv/bin/python").chmod(0o755)
        return root

    slow, waiting, stopped = fake_root("slow", 11), fake_root("waiting", 0), fake_root("stopped", 11)
    env = dict(_env(), TMPDIR=str(tmp_path))
    lock = tmp_path / f"cascade-setup-{hashlib.sha256(str(waiting).encode()).hexdigest()[:16]}.lock"
    holder = subprocess.Popen(["flock", str(lock), "sleep", "12"])     # another rank's set-up, holding the lock
    time.sleep(0.5)
    runs = [subprocess.Popen(["bash", str(root / "scripts/run.sh"), "test"], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for root in (slow, waiting, stopped)]
    time.sleep(1.5)
    runs[2].send_signal(signal.SIGINT)                # Ctrl-C during set-up: said as the command says it
    t0 = time.monotonic()
    out_int, err_int = runs[2].communicate(timeout=60)
    closed = time.monotonic() - t0                    # the note's sleeps must not keep the caller's pipe open
    (out_slow, err_slow), (out_wait, err_wait) = [p.communicate(timeout=60) for p in runs[:2]]
    assert runs[2].returncode == 130 and out_int == "" and err_int == "cascade test: interrupted\n"
    assert closed < 5, closed
    holder.wait()
    assert out_slow == "ran\n" and err_slow.count("test: setting up first") == 1
    assert out_wait == "ran\n" and "setting up" not in err_wait
    left = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert lock.name in left and all(n.endswith(".lock") for n in left), left     # no log, no marker


def test_interrupted_train_resumes_from_the_cache(workspace, trained):
    """Ctrl-C in the middle of feature extraction: exit 130 with one line, the features computed so far are in
    the cache, no temporary file and no model are left behind; the rerun reuses them and finishes."""
    import shutil
    import signal
    import time

    root = workspace["root"]
    out = root / "out_interrupted"
    (out / "weights").mkdir(parents=True)
    for f in (root / "out/weights").iterdir():
        shutil.copy(f, out / "weights" / f.name)
    args = [sys.executable, "-m", "cascade", "train", "--out", str(out), "--quiet", "--set", "specialist.enabled=false",
            "--set", "features.batch_size=8", "--set", "features.chunk=16", "--set", "sampling.val_per_class=0"]
    p = subprocess.Popen(args, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list((out / "cache").rglob("*.keys.npy")):
        time.sleep(0.2)
    assert p.poll() is None, "train finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "cascade train: interrupted"
    first = sorted((out / "cache").rglob("*.keys.npy"))
    assert first and not (out / "model").exists()
    assert not [f for f in out.rglob("*") if f.name.startswith(".")]              # no temporary files
    r = _run(args, root)
    assert r.returncode == 0, r.stderr
    assert set(first) <= set((out / "cache").rglob("*.keys.npy"))               # earlier work kept and reused
    assert (out / "model/cascade.npz").is_file()


def test_finetuned_specialist_is_saved_and_encodes_only_the_routed_images(workspace, tested):
    """specialist.params.finetune=last_stage: train fine-tunes the ConvNeXt's last stage for Thu-dog and saves
    the fine-tuned backbone with the model, in the specialist's own state file (its hyperparameters say how it
    was tuned, bundle.json which weights it started from); test reloads it and encodes with it only the test
    images routed to Thu-dog. The CLIP features come from the first run's cache (features.cache points at it)."""
    import json
    import shutil

    from cascade.features import weights_identity
    from cascade.io import load_npz_json, save_npz_json
    from cascade.models.weights import load_weights

    root = workspace["root"]
    out = root / "out_ft"
    (out / "weights").mkdir(parents=True)
    for f in (root / "out/weights").iterdir():
        shutil.copy(f, out / "weights" / f.name)
    ft = ["--out", str(out), "--quiet", "--set", f"features.cache={root / 'out' / 'cache'}",
          "--set", "sampling.val_per_class=1", "--set", "specialist.params.finetune=last_stage",
          "--set", "specialist.params.finetune_epochs=1", "--set", "specialist.params.weight=0.5",
          # random weights: a classifier of the images' domain learns only how many rows each has, and would send
          # every test image to the largest domain (Thu-dog); the class mass alone spreads them, as this test needs
          "--set", "stages.cascade.domain_classifier=false"] + ATTO
    r = _run([sys.executable, "-m", "cascade", "train", "--all-classes", "classes_b.txt"] + ft, root)
    assert r.returncode == 0, r.stderr
    model = out / "model"
    meta = json.loads((model / "bundle.json").read_text())
    assert meta["specialist"]["saved"] == ["Thu-dog"]
    arrays, smeta = load_npz_json(model / "specialist-0.npz")
    tuned = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("backbone_state_/")}
    base, _ = load_weights(out / "weights/convnextv2_base.npz")
    assert smeta["params"]["finetune"] == "last_stage" and smeta["params"]["domain"] == "Thu-dog"
    assert weights_identity(out / "weights/convnextv2_base.npz") == meta["specialist"]["identity"]
    assert not (model / "specialist-0-backbone.npz").exists()
    last = str(len([k for k in base if k.startswith("downsample_layers.") and k.endswith(".0.weight")]) - 1)
    changed = {k for k in base if not np.array_equal(base[k], tuned[k])}
    assert changed and all(k.startswith((f"stages.{last}.", f"downsample_layers.{last}.", "norm.")) for k in changed)

    r = _run([sys.executable, "-m", "cascade", "test"] + ft, root)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((out / "result_routes.csv").open(encoding="utf-8")))
    routed = [row["image"] for row in rows if row["route"] == "specialist:Thu-dog"]
    assert routed, "no test image reached the specialist"
    lines = (out / "result.txt").read_text(encoding="utf-8").splitlines()
    assert [line.rsplit(" ", 5)[0] for line in lines] == workspace["expected"]
    # the fine-tuned backbone's cache holds the routed validation and test images, not the whole test set
    ft_caches = [d for d in (root / "out/cache").iterdir()
                 if (d / "key.json").is_file() and "@ft-" in json.loads((d / "key.json").read_text())["key"]]
    assert len(ft_caches) == 1
    n_rows = sum(len(np.load(f)) for f in ft_caches[0].glob("*.keys.npy"))
    val_routed = json.loads((out / "report/val_metrics.json").read_text())["routes"].get("specialist:Thu-dog", 0)
    n_test = sum(1 for row in rows if row["status"] == "ok")
    assert n_rows == len(routed) + val_routed and len(routed) < n_test
    # a model folder that lost its fine-tuned backbone is refused with the file's name, and nothing is written
    before = (out / "result.txt").read_bytes()
    save_npz_json(model / "specialist-0.npz", {k: v for k, v in arrays.items() if k not in
                                               {f"backbone_state_/{name}" for name in tuned}}, smeta)
    r = _run([sys.executable, "-m", "cascade", "test"] + ft, root)
    assert r.returncode == 2 and "specialist-0.npz" in r.stderr and "retrain" in r.stderr
    assert (out / "result.txt").read_bytes() == before


def test_specialist_settings_unlike_trains_are_named(workspace, tested):
    """test refuses a specialist switched off, for other domains, with other weights or another preprocessing
    than train's, naming the setting, before any image is encoded, and leaves the result as it was."""
    import torch
    import timm

    root = workspace["root"]
    before = (root / "out/result.txt").read_bytes()
    torch.manual_seed(1)
    torch.save({"model": timm.create_model("convnextv2_atto", pretrained=False).state_dict()}, root / "other.pth")
    _convert(root / "other.pth", root / "other.npz")
    for setting, named in (("specialist.enabled=false", "has a specialist for Thu-dog, but specialist.enabled and "
                                                       "specialist.domains give no specialist here"),
                           ('specialist.domains=["Thu-dog","Food-101"]', "give a specialist for Thu-dog, Food-101 "
                                                                          "here"),
                           (f'specialist.weights="{root / "other.npz"}"', f"specialist.weights = {root / 'other.npz'}"),
                           ('specialist.params.preset="convnextv2_22k_384"',
                            "specialist.params.preset: preprocessing")):
        r = _run([sys.executable, "-m", "cascade", "test", "--quiet", "--set", setting] + FAST, root)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert named in last and "retrain" in last and "Traceback" not in r.stderr, r.stderr
    assert (root / "out/result.txt").read_bytes() == before


def test_specialist_views_are_cached_so_a_second_train_encodes_nothing(workspace, tested):
    """With augmented views (n_views=2), the first train encodes them into the feature cache; retraining the
    same split finds every view there and writes no new cache shard."""
    import shutil

    root = workspace["root"]
    out = root / "out_views"
    (out / "weights").mkdir(parents=True)
    for f in (root / "out/weights").iterdir():
        shutil.copy(f, out / "weights" / f.name)
    args = [sys.executable, "-m", "cascade", "train", "--all-classes", "classes_b.txt", "--out", str(out), "--quiet",
            "--set", f"features.cache={root / 'out' / 'cache'}", "--set", "sampling.val_per_class=0",
            "--set", "specialist.params.n_views=2", "--set", "specialist.params.C=0.1"] + ATTO
    r = _run(args, root)
    assert r.returncode == 0, r.stderr
    shards = sorted((root / "out/cache").rglob("*.keys.npy"))
    first = (out / "model/specialist-0.npz").read_bytes()
    r = _run(args, root)
    assert r.returncode == 0, r.stderr
    assert sorted((root / "out/cache").rglob("*.keys.npy")) == shards
    assert (out / "model/specialist-0.npz").read_bytes() == first          # same views, same specialist


def test_the_balancing_verdict_is_one_line_naming_its_rule(capsys):
    """test.sh says whether the final scores were balanced, and by which rule (docs/accuracy.md)."""
    from cascade.pipeline import _log_balance

    cases = [
        ({"balanced": True, "balance_rule": "check", "balance_few": False, "balance_gain": 0.2,
          "balance_gain_se": 0.05}, "balanced to the class marginal (held-out log-likelihood gain +0.200"),
        ({"balanced": False, "balance_rule": "check", "balance_few": False, "balance_gain": -0.1,
          "balance_gain_se": 0.05}, "not balanced (held-out log-likelihood gain -0.100"),
        ({"balanced": True, "balance_rule": "check", "balance_few": True, "balance_gain": 0.06,
          "balance_gain_se": 0.05, "balance_rho": 0.0, "balance_why": "few"},
         "few images per class; count rule, rho 0.00"),
        ({"balanced": True, "balance_rule": "counts", "balance_few": False, "balance_rho": 0.5,
          "balance_why": "no_val"}, "no validation rows; count rule, rho 0.50"),
        ({"balanced": True, "balance_rule": "counts", "balance_few": False, "balance_rho": 0.5,
          "balance_why": "setting"}, 'balanced to the class counts (balance = "counts"; count rule, rho 0.50)'),
        ({"balanced": False, "balance_rule": "check", "balance_few": False}, "fewer images than classes"),
        ({"balanced": False, "balance_rule": "none", "balance_few": False}, "balance_without_val"),
    ]
    for details, expected in cases:
        _log_balance(details)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "final scores " in err and expected in err, (details, err)
    _log_balance({})                                  # balance = "none": nothing to say
    assert capsys.readouterr().err == ""


def test_the_refit_verdict_is_one_line(capsys):
    """test.sh says whether the GDA refitted on the balanced scores was kept (docs/accuracy.md, refit_check)."""
    from cascade.pipeline import _log_refit

    for dropped, expected in ((False, "kept (held-out log-likelihood gain +0.050 +- 0.040"),
                              (True, "dropped: validation rows find it worse than the balanced pool")):
        _log_refit({"refit_dropped": dropped, "refit_gain": 0.05 if not dropped else -0.5, "refit_gain_se": 0.04})
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "GDA refit on the balanced scores " in err and expected in err, err
    _log_refit({"refit_dropped": False, "refit_gain": 0.05, "refit_gain_se": 0.04, "refit_with_val": True})
    assert "kept, fitted on the validation rows too (held-out" in capsys.readouterr().err
    _log_refit({"balanced": True})                    # no check made: nothing to say
    assert capsys.readouterr().err == ""


def test_the_per_domain_verdicts_are_one_line_per_domain(capsys):
    """test.sh says, per domain, whether its own cascade scored its images again and what it decided
    (docs/accuracy.md, "Several domains in one task")."""
    from cascade.pipeline import _log_domains

    base = {"rescored": True, "balanced": True, "balance_refit": True, "refine_dropped": False,
            "refit_dropped": False}
    _log_domains({"domains": [dict(base, domain="Food-101", n_queries=40),
                              dict(base, domain="Caltech-101", n_queries=12, balanced=False, balance_refit=False,
                                   refine_dropped=True),
                              dict(base, domain="Thu-dog", n_queries=30, balance_refit=False, balance_few=True,
                                   balance_rho=0.31, balance_why="few"),
                              dict(base, domain="Animal", n_queries=20, balance_refit=False, balance_rho=0.5,
                                   balance_why="no_val"),
                              {"domain": "Stanford-Cars", "n_queries": 3, "rescored": False}]})
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[cascade] domain Food-101: 40 images scored again by its own cascade (balanced, GDA refit on the "
        "balanced scores)",
        "[cascade] domain Caltech-101: 12 images scored again by its own cascade (not balanced, refinement dropped)",
        "[cascade] domain Thu-dog: 30 images scored again by its own cascade (balanced to the class counts: the "
        "held-out rows declined, but there are few images per class; count rule, rho 0.31)",
        "[cascade] domain Animal: 20 images scored again by its own cascade (balanced to the class counts: no "
        "validation rows; count rule, rho 0.50)",
        "[cascade] domain Stanford-Cars: 3 images, global scores kept"]
    _log_domains({})                                  # one domain, or per_domain = false: nothing to say
    assert capsys.readouterr().err == ""
