"""The configuration tree: defaults from the shipped TOML, user files merged over them, --set overrides, and
clear errors for unknown keys and wrong types."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cascade.config import (Config, ConfigError, add_config_arguments, changed_settings, config_from_args,
                            default_config_text, load_config, parse_override, train_settings)


def test_defaults_come_from_the_shipped_toml():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.paths.data == "data" and cfg.paths.out == "out"
    assert cfg.sampling.shots == 4 and cfg.sampling.seed == 0
    assert set(cfg.models.clip) == {"ViT-B/32", "RN101"}
    assert cfg.clip_weights()["ViT-B/32"] == Path("out/weights/ViT-B-32.npz")
    assert "dog" in cfg.templates_for("Thu-dog")[0]
    assert cfg.templates_for("Unknown-domain") == cfg.prompts.default
    assert cfg.specialist.domains == ["Thu-dog"]
    assert "[stages.lpp]" in default_config_text()


def test_set_overrides_typed_values_and_nested_tables():
    cfg = load_config(overrides=["stages.lpp.epochs=300", "sampling.seed=7", "paths.data=/x/y z",
                                 "stages.inmap.lr=0.5", "specialist.enabled=false", "models.clip.RN101="])
    assert cfg.stages["lpp"] == {"select": "auto", "epochs": 300}          # merged into the shipped table
    assert cfg.stages["inmap"]["lr"] == 0.5 and cfg.stages["inmap"]["n_iter"] == 50
    assert cfg.sampling.seed == 7
    assert cfg.paths.data == "/x/y z"
    assert cfg.specialist.enabled is False
    assert list(cfg.clip_weights()) == ["ViT-B/32"]          # "" switches a backbone off


def test_paths_expand_relative_to_data_and_out():
    cfg = load_config(overrides=["paths.data=D", "paths.out=O", "paths.all_classes=classes_b.txt"])
    assert cfg.data_path(cfg.paths.classes) == Path("D/classes.txt")
    assert cfg.data_path("/abs/t.txt") == Path("/abs/t.txt")
    assert cfg.out_path(cfg.paths.result) == Path("O/result.txt")
    assert cfg.cache_dir == Path("O/cache")
    assert cfg.clip_weights()["RN101"] == Path("O/weights/RN101.npz")


def test_user_file_merges_over_defaults(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('[sampling]\nshots = 8\n[prompts.domains]\nAnimal = ["a {} in the wild."]\n')
    cfg = load_config(f)
    assert cfg.sampling.shots == 8 and cfg.sampling.seed == 0          # untouched keys keep their default
    assert cfg.templates_for("Animal") == ["a {} in the wild."]
    assert "Thu-dog" in cfg.prompts.domains                              # other domains kept


@pytest.mark.parametrize("text, expected", [
    ("[sampling]\nshotz = 3\n", "unknown key(s) shotz"),
    ("[sampling]\nshots = 'four'\n", "sampling.shots: expected an integer"),
    ("[sampling]\nshots = 0\n", "sampling.shots must be >= 1"),
    ("[prompts]\ndefault = ['no placeholder']\n", "exactly one '{}'"),
    ("[sampling\nshots = 3\n", "not valid TOML"),
    ("[nosuch]\nx = 1\n", "unknown key(s) nosuch"),
])
def test_bad_config_files_name_file_and_key(tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert expected in str(err.value)
    assert str(f) in str(err.value)


def test_missing_config_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/cfg.toml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["sampling.seed"])
    with pytest.raises(ConfigError, match=r"--set sampling.seed=abc: sampling.seed: expected an integer"):
        load_config(overrides=["sampling.seed=abc"])


def test_parse_override_reads_toml_values_or_strings():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")
    assert parse_override('models.clip."ViT-B/32"=x.npz') == (["models", "clip", "ViT-B/32"], "x.npz")


def test_command_line_flags_and_set_order():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args = p.parse_args(["--data", "mydata", "--out", "myout", "--set", "paths.out=other", "--set",
                         "sampling.shots=2"])
    cfg = config_from_args(args, {"sampling.seed": 5, "sampling.list": None})
    assert cfg.paths.data == "mydata"
    assert cfg.paths.out == "other"          # --set comes after the explicit flags
    assert cfg.sampling.shots == 2 and cfg.sampling.seed == 5


def test_several_config_files_merge_in_order(tmp_path):
    """--config twice: both files count, the later one's keys over the earlier's (it used to drop the first)."""
    (tmp_path / "a.toml").write_text('[paths]\ndata = "adata"\n[sampling]\nshots = 2\n')
    (tmp_path / "b.toml").write_text("[sampling]\nshots = 3\nseed = 7\n")
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(tmp_path / "a.toml"), "--config", str(tmp_path / "b.toml")]))
    assert (cfg.paths.data, cfg.sampling.shots, cfg.sampling.seed) == ("adata", 3, 7)
    assert cfg.sources == (tmp_path / "a.toml", tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("[sampling]\nshots = -1\n")
    with pytest.raises(ConfigError, match=r"c\.toml"):                  # an error names the file at fault
        load_config([tmp_path / "a.toml", tmp_path / "c.toml"])


def test_every_value_comes_from_the_shipped_toml():
    """The dataclasses hold no defaults: a key the merged tables lack is named, not silently defaulted."""
    from cascade.config import PathsConfig, _build

    paths = dict(load_config().paths.__dict__)
    del paths["result"]
    with pytest.raises(ConfigError, match=r"^paths: missing key\(s\) result$"):
        _build(PathsConfig, paths, "paths")


def test_train_settings_are_the_train_only_sections_and_their_changes_are_named():
    cfg = load_config()
    flat = train_settings(cfg)
    assert flat["sampling.shots"] == 4 and flat["paths.train_list"] == "train.txt"
    assert flat["prompts.domains.Caltech-101"] == ["a photo of a {}.", "a photo of the {}."]
    assert all(k.split(".")[0] in ("paths", "sampling", "prompts", "stages", "specialist") for k in flat)
    assert not any(k.startswith(("paths.test_dir", "models.", "features.")) for k in flat)   # test reads these
    assert changed_settings(flat, train_settings(cfg)) == []
    now = train_settings(load_config(overrides=["stages.gda.shrinkage=0.3", "stages.tip-adapter.init_alpha=2.0"]))
    del flat["stages.lpp.epochs"]
    now.pop("stages.inmap.n_iter")
    assert changed_settings(flat, now) == ["stages.lpp.epochs = 100 (not set at training)",
                                           "stages.gda.shrinkage = 0.3 (trained with 0.5)",
                                           "stages.tip-adapter.init_alpha = 2.0 (not set at training)",
                                           "stages.inmap.n_iter not set (trained with 50)"]


@pytest.mark.parametrize("overrides, expected", [
    # checked whether or not the specialist is enabled, as the table's other keys are, naming the key
    (['specialist.params.preset="nope"', "specialist.enabled=false"],
     "specialist.params.preset: unknown preprocessing preset 'nope'; known: convnextv2_1k_224"),
    (["specialist.params.preset={resize=3}"], "specialist.params.preset: preprocess: resize (3) must be >= size"),
    # the seeds' cascade is never balanced: asking for it is an error, not a setting without effect
    (['stages.cascade.combine="replace"', 'stages.cascade.balance="always"'],
     'stages.cascade.balance = \'always\' has no effect with combine = "replace"'),
])
def test_settings_that_could_not_take_effect_are_refused_at_load(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert expected in str(err.value)
    assert load_config(overrides=['stages.cascade.combine="replace"', 'stages.cascade.balance="none"'])
