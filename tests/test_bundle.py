"""The model bundle: one owner of the trained model, versioned, replaced as a whole. A train that fails at any point
(a setting refused when the config is loaded, a failure after fitting, a bundle that does not read back) leaves the
previous model folder and split byte-identical and no temporary folder behind."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _tiny_workspace import make_workspace, overrides
from cascade.__main__ import main
from cascade.bundle import VERSION, Bundle, BundleError
from cascade.config import load_config
from cascade.data import ClassList
from cascade.io import load_npz_json, save_npz_json
from cascade.pipeline import train
from cascade.router import Cascade
from cascade.stages import GDA, InMaP, LinearProbePP
from cascade.stages.specialist import SpecialistStage


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(root, *more):
    args = []
    for item in overrides(root, *more):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("bundle"))
    train(load_config(overrides=overrides(root, "stages.lpp.epochs=20")), progress=False)
    return root


def test_bundle_holds_the_whole_model(trained):
    model = trained / "out/model"
    info = json.loads((model / "bundle.json").read_text())
    assert info["format"] == "cascade.bundle" and info["version"] == VERSION == 2
    assert info["n_classes"] == 6 and info["n_seen"] == 6 and info["backbones"] == ["ViT-B/32"]
    assert info["stages"] == {"transductive": "inmap", "seen": ["lpp"], "refine": "gda"}
    assert info["split"]["n_support"] == 12
    bundle = Bundle.load(model)
    assert bundle.classes.names[0] == "Animal_Bear" and bundle.encoders == info["clip_weights"]
    assert bundle.cascade.n_classes_ == 6 and bundle.cascade.specialists == []


def test_a_train_without_validation_rows_leaves_no_earlier_validation_report(tmp_path):
    root = make_workspace(tmp_path)
    train(load_config(overrides=overrides(root, "stages.lpp.epochs=5")), progress=False)
    report = root / "out/report"
    assert (report / "val_metrics.json").is_file() and (report / "val_metrics.csv").is_file()
    summary = train(load_config(overrides=overrides(root, "stages.lpp.epochs=5", "sampling.val_per_class=0")),
                    progress=False)
    assert summary["n_val"] == 0 and "val" not in summary
    assert not (report / "val_metrics.json").exists() and not (report / "val_metrics.csv").exists()
    assert json.loads((report / "train.json").read_text())["n_val"] == 0


@pytest.mark.parametrize("setting, message", [
    ("stages.gda.shrinkage=5", "stages.gda.shrinkage: expected a number in [0, 1], got 5"),
    ("stages.lpp.epochs=abc", "stages.lpp.epochs: expected an integer >= 1, got 'abc'"),
    ("stages.inmap.n_iter=-1", "stages.inmap.n_iter: expected an integer >= 1, got -1"),
    ("stages.lpp.epochs=-5", "stages.lpp.epochs: expected an integer >= 1, got -5"),
    ("stages.cascade.cv_folds=two", "stages.cascade.cv_folds: expected an integer >= 0, got 'two'"),
])
def test_a_bad_stage_setting_fails_at_load_in_one_line_and_changes_nothing(trained, tmp_path, capsys, setting,
                                                                          message):
    before = _snapshot(trained / "out")
    assert main(["train", "--quiet", *_cli(trained, setting)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cascade train: error: --set {setting}: {message}"]
    assert _snapshot(trained / "out") == before
    # checked before any image is read: a fresh output folder gets no split, no cache, no model
    fresh = tmp_path / "fresh"
    args = _cli(trained, setting) + ["--set", f'paths.out="{fresh}"']
    assert main(["train", "--quiet", *args]) == 2
    assert not fresh.exists()


def test_a_failure_after_fitting_leaves_the_previous_model_and_split_byte_identical(trained, monkeypatch,
                                                                                     tmp_path):
    from cascade.router import Cascade

    out = trained / "out"
    before = _snapshot(out / "model"), _snapshot(out / "split")

    def broken(self, query):
        raise RuntimeError("injected failure after fitting")

    monkeypatch.setattr(Cascade, "predict", broken)
    # a different split (seed 1): had anything been written, the files would differ
    cfg = load_config(overrides=overrides(trained, "stages.lpp.epochs=20", "sampling.seed=1"))
    with pytest.raises(RuntimeError, match="injected"):
        train(cfg, progress=False)
    assert (_snapshot(out / "model"), _snapshot(out / "split")) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]        # no temporary folder left
    # into a fresh output folder: the features are cached, but no split and no model appear
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="injected"):
        train(load_config(overrides=overrides(trained, "stages.lpp.epochs=20", f'paths.out="{fresh}"')),
              progress=False)
    assert (fresh / "cache").is_dir() and not (fresh / "split").exists() and not (fresh / "model").exists()
    assert not [p.name for p in fresh.iterdir() if p.name.startswith(".")]


def test_a_bundle_that_does_not_read_back_is_never_swapped_in(trained, monkeypatch):
    out = trained / "out"
    before = _snapshot(out / "model"), _snapshot(out / "split")

    def unreadable(cls, folder):
        raise BundleError(f"{folder}: injected failure while validating the written bundle")

    monkeypatch.setattr(Bundle, "load", classmethod(unreadable))
    cfg = load_config(overrides=overrides(trained, "stages.lpp.epochs=20", "sampling.seed=1"))
    with pytest.raises(BundleError, match="injected"):
        train(cfg, progress=False)
    assert (_snapshot(out / "model"), _snapshot(out / "split")) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_incompatible_or_old_model_folders_are_refused_by_name(trained, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained / "out/model", model)
    info = json.loads((model / "bundle.json").read_text())
    (model / "bundle.json").write_text(json.dumps(dict(info, version=99)))
    with pytest.raises(BundleError, match=r"bundle.json: model format 'cascade.bundle' version 99, this version of "
                                          r"cascade reads 'cascade.bundle' version 2; run train again"):
        Bundle.load(model)
    (model / "bundle.json").unlink()                     # a folder written before the bundle existed
    with pytest.raises(BundleError, match="older version of cascade .no bundle.json.; run train again"):
        Bundle.load(model)
    with pytest.raises(BundleError, match="no trained model"):
        Bundle.load(tmp_path / "nothing")
    # through the command: one line naming the file, exit 2, no result written
    out = tmp_path / "out"
    shutil.copytree(trained / "out/model", out / "model")
    (out / "model/bundle.json").write_text(json.dumps(dict(info, version=0)))
    args = _cli(trained) + ["--set", f'paths.out="{out}"', "--set",
                            f'models.clip={{"ViT-B/32"="{trained / "out/weights/ViT-B-32.npz"}"}}']
    assert main(["test", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundle.json" in err[0] and "version 0" in err[0] and "run train again" in err[0]
    assert not (out / "result.txt").exists()


def _blobs(rng, means, n_per_class):
    y = np.repeat(np.arange(len(means)), n_per_class)
    X = means[y] + 0.6 * rng.standard_normal((len(y), means.shape[1]))
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def test_specialists_round_trip_through_the_bundle(tmp_path):
    """A cascade with two specialists, one of them fine-tuned (its backbone's weights part of its state), saved
    and loaded through the bundle: each specialist comes back from its one state file, and the loaded model
    gives the same scores and routes on the same queries. A specialist file that lost its backbone is refused."""
    rng = np.random.default_rng(0)
    names = ["Animal_Bear", "Animal_Bee", "Animal_Cat", "Food-101_Pizza", "Food-101_Sushi", "Food-101_Taco"]
    classes = ClassList(names, len(names))
    D, D_sp = 16, 12
    text = rng.standard_normal((len(names), D))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    sx, sy = _blobs(rng, text, 4)
    qx, qy = _blobs(rng, text, 10)
    cascade = Cascade(transductive=InMaP(n_iter=20), seen_stages=[LinearProbePP(epochs=20)], refine=GDA())
    cascade.fit({"ViT-B/32": sx}, sy, {"ViT-B/32": text}, len(names))
    sp_means = rng.standard_normal((len(names), D_sp))
    sp_support, _ = _blobs(rng, sp_means, 4)
    sp_query, _ = _blobs(rng, sp_means, 10)
    specialists = []
    for domain, finetune in (("Animal", "none"), ("Food-101", "last_stage")):
        rows = np.isin(sy, classes.domain_classes(domain))
        sp = SpecialistStage(domain=domain, feature_key="convnextv2_atto", C=1.0, weight=0.5, finetune=finetune)
        sp.fit(sp_support[rows], sy[rows])
        if finetune != "none":       # what fit_images leaves besides the head: the tuned weights and their hash
            sp.backbone_state_ = {"stages.3.0.weight": rng.standard_normal((2, 3)).astype(np.float32)}
            sp.backbone_sha256_ = "1" * 64
            sp.feature_key_ = "convnextv2_atto@ft-111111111111"
        specialists.append(sp)
    cascade.specialists = specialists
    query = {"ViT-B/32": qx, "convnextv2_atto": sp_query, "convnextv2_atto@ft-111111111111": sp_query}
    before = cascade.predict(query)

    folder = Bundle(cascade=cascade, classes=classes, encoders={"ViT-B/32": "sha256:" + "0" * 64}).save(
        tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "cascade.npz", "classes.txt",
                                                         "specialist-0.npz", "specialist-1.npz"]
    back = Bundle.load(folder)
    loaded = back.cascade.specialists
    assert [sp.name for sp in loaded] == ["Animal", "Food-101"]
    assert [sp.query_key for sp in loaded] == [sp.query_key for sp in specialists]
    assert all(a.get_params() == b.get_params() for a, b in zip(loaded, specialists))
    np.testing.assert_array_equal(loaded[1].backbone_state_["stages.3.0.weight"],
                                  specialists[1].backbone_state_["stages.3.0.weight"])
    assert loaded[1].backbone_sha256_ == "1" * 64 and not hasattr(loaded[0], "backbone_state_")
    after = back.cascade.predict(query)
    assert after.route == before.route and any(r.startswith("specialist:") for r in after.route)
    np.testing.assert_array_equal(after.scores, before.scores)

    arrays, meta = load_npz_json(folder / "specialist-1.npz")
    save_npz_json(folder / "specialist-1.npz", {k: v for k, v in arrays.items()
                                                if not k.startswith("backbone_state_/")}, meta)
    with pytest.raises(BundleError, match=r"specialist-1.npz: a fine-tuned specialist without its backbone's "
                                          r"weights; retrain"):
        Bundle.load(folder)


def test_test_names_the_train_only_settings_it_is_given_differently(trained, tmp_path, capsys):
    """The model holds what the settings only train reads set: test given other values for them names each one
    (and its trained value) and writes the result the model gives; a model saved before train recorded them, or
    the same settings, get no note."""
    out = tmp_path / "out"
    shutil.copytree(trained / "out/model", out / "model")
    here = ["--set", f'paths.out="{out}"', "--set",
            f'models.clip={{"ViT-B/32"="{trained / "out/weights/ViT-B-32.npz"}"}}']
    args = _cli(trained, "stages.lpp.epochs=20") + here
    assert main(["test", "--quiet", *args]) == 0
    assert "note:" not in capsys.readouterr().err
    before = (out / "result.txt").read_bytes()
    # train was given stages.lpp.epochs=20; a test given none of the train-only settings is not told they differ
    assert main(["test", "--quiet", *_cli(trained), *here]) == 0
    assert "note:" not in capsys.readouterr().err
    changed = ["--set", "stages.lpp.epochs=7", "--set", "sampling.seed=3", "--set", 'prompts.domains.Animal=["a {}"]',
               "--set", "stages.cascade.backbone_weights={\"ViT-B/32\" = 1.0}"]
    assert main(["test", "--quiet", *args, *changed]) == 0
    err = capsys.readouterr().err
    assert "note: 4 setting(s) differ from those the model in" in err and "retrain to apply them" in err, err
    assert "stages.lpp.epochs = 7 (trained with 20)" in err and "sampling.seed = 3 (trained with 0)" in err
    assert 'prompts.domains.Animal = ["a {}"] (trained with ["a photo of a {}, a type of animal.", ' in err
    assert 'stages.cascade.backbone_weights."ViT-B/32" = 1.0 (not set at training)' in err
    assert (out / "result.txt").read_bytes() == before      # the model's settings, not the ones given
    info = json.loads((out / "model/bundle.json").read_text())
    assert info["settings"]["stages.lpp.epochs"] == 20 and info["settings"]["paths.train_list"] == "train.txt"
    del info["settings"]                                     # a model saved before train recorded them
    (out / "model/bundle.json").write_text(json.dumps(info))
    assert main(["test", "--quiet", *args, *changed]) == 0
    assert "note:" not in capsys.readouterr().err
    assert (out / "result.txt").read_bytes() == before
