"""An expert defined in this file, outside cascade/, joins the cascade's pool by registering itself and being named
in the configuration: it is checked with the config, fitted, pooled with its own exponent, saved, loaded and
reported, with no edit anywhere under cascade/."""
from __future__ import annotations

import json
from numbers import Real

import numpy as np
import pytest

from _tiny_workspace import NAMES, make_workspace, overrides
from cascade.bundle import Bundle
from cascade.config import ConfigError, load_config
from cascade.pipeline import test as run_test
from cascade.pipeline import train
from cascade.router import Cascade
from cascade.stages import (InMaP, LinearProbePP, Stage, UnknownStageError, ZeroShot, check_features, check_labels,
                            get_stage, register_stage, stage_names)
from cascade.stages.base import Interval


@register_stage("ncm")
class NearestClassMean(Stage):
    """Nearest class mean: ``logits = x . m_c / temperature``, ``m_c`` the normalised mean of class c's support
    rows (an inductive expert over the classes of ``text``)."""

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature

    def fit(self, X, y=None, *, text=None, val=None, query=None):
        self._validate_params()
        text = check_features(text, "text")
        X = check_features(X, "X", dim=text.shape[1])
        y = check_labels(y, X.shape[0], text.shape[0], "y")
        means = np.stack([X[y == c].mean(axis=0) for c in range(text.shape[0])])
        self.means_ = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
        return self

    def decision_function(self, X):
        self._check_fitted()
        X = check_features(X, "X", dim=self.means_.shape[1])
        return X @ self.means_.T / np.float32(self.temperature)


def _task(n_classes=6, n_seen=5, dim=16, shots=4, n_query=60, seed=0, spread=0.4):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    text = centres + 0.3 * rng.standard_normal(centres.shape)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def rows(labels):
        x = centres[labels] + spread * rng.standard_normal((len(labels), dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    ys = np.repeat(np.arange(n_seen), shots)
    yv = np.repeat(np.arange(n_seen), 3)
    yq = rng.integers(0, n_classes, n_query)
    return ({"bb": rows(ys)}, ys, ({"bb": rows(yv)}, yv), {"bb": rows(yq)}, yq, {"bb": text.astype(np.float32)},
            n_seen)


def test_the_registry_is_the_list_of_stage_names():
    assert {"zeroshot", "inmap", "lpp", "gda", "ncm"} <= set(stage_names())
    assert get_stage("ncm") is NearestClassMean and get_stage("lpp") is LinearProbePP
    with pytest.raises(UnknownStageError, match="unknown stage 'nope'.*registered: .*ncm"):
        get_stage("nope")
    with pytest.raises(ValueError, match="taken"):
        register_stage("lpp")(type("OtherProbe", (Stage,), {}))
    assert register_stage("ncm")(NearestClassMean) is NearestClassMean       # registering again is harmless


def test_each_seen_expert_is_pooled_with_its_own_exponent_and_survives_save_load(tmp_path):
    support, ys, val, query, yq, text, S = _task()
    m = Cascade(InMaP(n_iter=30), [LinearProbePP(epochs=30, select="last"), NearestClassMean()])
    res = m.fit(support, ys, text, S, val=val).predict(query)
    names, weights = res.details["pool_experts"], res.details["pool_weights"]
    assert names == ["inmap", "lpp", "ncm", "zeroshot", "zeroshot-rebalanced"] and len(weights) == 5
    # the exponents are the maximum-likelihood pool of the five experts on the validation rows: ncm has its own
    assert np.all(np.asarray(weights) >= 0) and len(res.details["seen_temperatures"]) == 2
    lp_seen = m._seen_log_proba(query)
    assert len(lp_seen) == 2 and not np.allclose(lp_seen[0], lp_seen[1])
    path = m.save(tmp_path / "m.npz")
    back = Cascade.load(path)
    assert [type(s) for s in back.seen_stages] == [LinearProbePP, NearestClassMean]
    np.testing.assert_array_equal(back.seen_fitted_[1]["bb"].means_, m.seen_fitted_[1]["bb"].means_)
    np.testing.assert_allclose(back.predict(query).scores, res.scores, atol=1e-6)


def test_config_names_and_checks_the_new_expert():
    cfg = load_config(overrides=['stages.cascade.seen=["lpp", "ncm"]', "stages.ncm.temperature=0.1"])
    assert cfg.stages["cascade"]["seen"] == ["lpp", "ncm"] and cfg.stages["ncm"] == {"temperature": 0.1}
    with pytest.raises(ConfigError, match=r"stages\.ncm\.temperature: expected a number > 0, got -1"):
        load_config(overrides=["stages.ncm.temperature=-1"])
    with pytest.raises(ConfigError, match=r"stages\.ncm\.temp: unknown keyword \(known in \[stages\.ncm\]: "
                                          r"temperature\)"):
        load_config(overrides=["stages.ncm.temp=1"])
    with pytest.raises(ConfigError, match=r"stages\.cascade\.seen: no stage is registered as 'ncn'"):
        load_config(overrides=['stages.cascade.seen=["lpp", "ncn"]'])
    with pytest.raises(ConfigError, match=r"stages\.ncn: no stage is registered as 'ncn'"):
        load_config(overrides=["stages.ncn.temperature=1"])
    # a stage named twice in seen would be the same expert (one table of settings per stage)
    with pytest.raises(ConfigError, match=r"stages\.cascade\.seen: 'lpp' named twice"):
        load_config(overrides=['stages.cascade.seen=["lpp", "ncm", "lpp"]'])
    # the refinement is fitted on soft labels: a stage that cannot take them is refused at load, not mid-train
    for name in ("lpp", "zeroshot", "inmap", "ncm"):
        with pytest.raises(ConfigError, match=rf"stages\.cascade\.refine: '{name}' does not fit on soft labels"):
            load_config(overrides=[f"stages.cascade.refine={name}"])
    with pytest.raises(ValueError, match="refine stage 'lpp' does not fit on soft labels"):
        support, ys, _, _, _, text, S = _task()
        Cascade(refine=LinearProbePP()).fit(support, ys, text, S)


@pytest.mark.parametrize("value, expected", [
    ('{"RN50" = 1.0}', r"backbone_weights: 'RN50' is not a backbone of models\.clip \(ViT-B/32, RN101\)"),
    ('{"ViT-B/32" = 1.0, "RN50" = 3.0}', r"backbone_weights: 'RN50' is not a backbone of models\.clip"),
    ('{"ViT-B/32" = -1.0}', r"backbone_weights: expected a table of non-negative weights with a positive sum"),
    ('{"ViT-B/32" = 0.0}', r"backbone_weights: expected a table of non-negative weights with a positive sum"),
    ('{"ViT-B/32" = "a"}', r"backbone_weights: expected a table of non-negative weights with a positive sum"),
    ('{"ViT-B/32" = true}', r"backbone_weights: expected a table of non-negative weights with a positive sum"),
])
def test_backbone_weights_are_checked_at_load_naming_the_key(value, expected):
    """Refused when the config loads, before any image is read (they were found only after encoding, or a
    misspelt backbone was ignored without a word)."""
    with pytest.raises(ConfigError, match=r"stages\.cascade\." + expected):
        load_config(overrides=[f"stages.cascade.backbone_weights={value}"])
    assert load_config(overrides=['stages.cascade.backbone_weights={"RN101" = 2.0}'])
    # a backbone switched off keeps its weight in the table; the ones switched on must weigh something
    assert load_config(overrides=['stages.cascade.backbone_weights={"ViT-B/32" = 0.5, "RN101" = 0.5}',
                                  'models.clip.RN101=""'])
    with pytest.raises(ConfigError, match=r"backbone_weights: no weight on the backbones switched on \(ViT-B/32\)"):
        load_config(overrides=['stages.cascade.backbone_weights={"RN101" = 1.0}', 'models.clip.RN101=""'])


def test_a_repeated_expert_name_is_numbered_so_each_keeps_its_exponent():
    support, ys, val, query, yq, text, S = _task()
    m = Cascade(InMaP(n_iter=30), [LinearProbePP(epochs=30, select="last"), ZeroShot(), LinearProbePP(epochs=5)])
    res = m.fit(support, ys, text, S, val=val).predict(query)
    names = res.details["pool_experts"]
    assert names == ["inmap", "lpp", "zeroshot", "lpp#2", "zeroshot#2", "zeroshot-rebalanced"]
    assert len(res.details["pool_weights"]) == len(names)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("registry"))


def test_train_and_test_with_the_new_expert_named_in_the_config(workspace, capsys):
    root = workspace
    cfg = load_config(overrides=overrides(root, 'stages.cascade.seen=["lpp", "ncm"]', "stages.ncm.temperature=0.1",
                                          "stages.lpp.epochs=20"))
    summary = train(cfg, progress=False)
    err = capsys.readouterr().err
    # reported: the train summary and the log name the new expert with its fitted exponent
    assert set(summary["pool"]) == {"inmap", "lpp", "ncm", "zeroshot", "zeroshot-rebalanced"}
    assert "pooled experts (exponents fitted on held-out rows): inmap " in err and " ncm " in err
    saved = json.loads((root / "out/report/train.json").read_text())
    assert saved["pool"] == summary["pool"]
    # saved and loaded: the bundle names the stages and rebuilds the fitted expert from the registry
    info = json.loads((root / "out/model/bundle.json").read_text())
    assert info["stages"] == {"transductive": "inmap", "seen": ["lpp", "ncm"], "refine": "gda"}
    bundle = Bundle.load(root / "out/model")
    cascade = bundle.cascade
    assert [type(s) for s in cascade.seen_stages] == [LinearProbePP, NearestClassMean]
    assert cascade.seen_stages[1].temperature == 0.1
    ncm = cascade.seen_fitted_[1]["ViT-B/32"]
    assert ncm.means_.shape == (len(NAMES), cascade.text_["ViT-B/32"].shape[1])
    summary = run_test(cfg, progress=False)
    err = capsys.readouterr().err
    assert summary["images"] == len(NAMES) and " ncm " in err
    lines = (root / "out/result.txt").read_text().splitlines()
    assert len(lines) == len(NAMES) and all(len(line.split()) == 6 for line in lines)
