"""One configuration tree, loaded from TOML and overridable from the command line.

The defaults live in ``cascade/configs/default.toml`` (shipped inside the package). A user file given with
``--config`` is merged over it (only the keys it sets change), then ``--set key.path=value`` overrides are
applied in order (the value is read as a TOML value when it parses as one, e.g. ``300``, ``true``, ``[1, 2]``,
otherwise as a plain string). Unknown keys and wrongly typed values are errors naming the file and the key.

Paths: ``paths.data`` and ``paths.out`` are relative to the current directory, also when a ``--config`` file in
another folder sets them (an error about a missing path then says so); inputs under ``[paths]`` are relative to
the data root, outputs to the out folder; ``{data}`` and ``{out}`` inside any path are expanded.

Stages: each ``[stages.<name>]`` table holds the keyword arguments of the stage registered under ``name``
(:func:`cascade.stages.register_stage`); ``[stages.cascade]`` names the cascade's stages and holds its own keyword
arguments. Every key is checked when the configuration is loaded, before any image is read, against the
registry and the constraints each stage declares (``_parameter_constraints``, the same the stage checks when it
fits); an error names the key as written (``stages.lpp.epochs``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .router import Cascade
from .stages import ParameterError, UnknownStageError, get_stage, stage_name, stage_names, validate_params
from .preprocess import Preprocess, preprocess_for
from .stages.specialist import SpecialistStage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "load_config", "default_config_text", "parse_override", "add_config_arguments",
           "config_from_args", "build_stage", "build_cascade", "default_cascade", "TRAIN_ONLY", "train_settings",
           "changed_settings"]

# the settings only train reads; test applies the trained model's, so the bundle records them (train_settings) and
# test names any that differ (changed_settings) instead of ignoring them without a word
TRAIN_ONLY = ("paths.train_list", "sampling", "prompts", "stages", "specialist.params")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file/override and the key."""


@dataclass
class PathsConfig:
    data: str
    out: str
    classes: str
    all_classes: str
    train_list: str
    test_dir: str
    result: str


@dataclass
class ModelsConfig:
    clip: dict[str, str]


@dataclass
class SamplingConfig:
    shots: int
    seed: int
    list: str
    allow_fewer: bool
    val_per_class: int
    val_max: int


@dataclass
class FeaturesConfig:
    batch_size: int
    workers: int
    chunk: int
    cache: str


@dataclass
class PromptsConfig:
    default: list[str]
    domains: dict[str, list[str]]


@dataclass
class SpecialistConfig:
    enabled: bool
    domains: list[str]
    weights: str
    feature_key: str
    params: dict[str, Any]


@dataclass
class Config:
    paths: PathsConfig
    models: ModelsConfig
    sampling: SamplingConfig
    features: FeaturesConfig
    prompts: PromptsConfig
    stages: dict[str, dict[str, Any]]       # table name -> keyword arguments
    specialist: SpecialistConfig
    # the --config files, if any (set by load_config, not keys of the tree): their relative paths are read from the
    # current folder like every other, and errors about a missing path say so when a file lies elsewhere
    sources: tuple[Path, ...] = dataclasses.field(default=(), init=False, repr=False, compare=False)

    # ---- resolved paths (Path objects; relative ones stay relative to the current directory)
    @property
    def data_dir(self) -> Path:
        return Path(self.paths.data)

    @property
    def out_dir(self) -> Path:
        return Path(self.paths.out)

    def expand(self, value: str, base: Path | None = None) -> Path:
        """Expand ``{data}``/``{out}`` in ``value``; a relative result is taken relative to ``base``."""
        text = value.replace("{data}", self.paths.data).replace("{out}", self.paths.out)
        p = Path(text).expanduser()
        if base is not None and not p.is_absolute() and "{" not in value:
            p = base / p
        return p

    def data_path(self, value: str) -> Path:
        return self.expand(value, self.data_dir)

    def out_path(self, value: str) -> Path:
        return self.expand(value, self.out_dir)

    @property
    def cache_dir(self) -> Path:
        return self.out_path(self.features.cache)

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    @property
    def split_dir(self) -> Path:
        return self.out_dir / "split"

    @property
    def report_dir(self) -> Path:
        return self.out_dir / "report"

    def relative_note(self, path) -> str:
        """A note for an error about a missing ``path``: where a relative path was read from, when the --config
        file lies in another folder (a user may expect its paths to be read from there), and whether it exists
        there. Empty otherwise."""
        path, here = Path(path), Path.cwd()
        elsewhere = [s for s in self.sources if s.parent.resolve() != here.resolve()]
        if not elsewhere or path.is_absolute():
            return ""
        note = (f"relative paths are read from the current folder {here}, not from the folder of "
                + ", ".join(map(str, elsewhere)))
        there = next((s.parent for s in elsewhere if (s.parent / path).exists()), None)
        if there is not None:
            note += f"; {there / path} exists: run from {there}, or give absolute paths"
        return f" ({note})"

    def clip_weights(self) -> dict[str, Path]:
        """Backbone name -> weights path; an empty path ("") switches that backbone off."""
        return {name: self.expand(p) for name, p in self.models.clip.items() if p}

    def templates_for(self, domain: str) -> list[str]:
        return list(self.prompts.domains.get(domain) or self.prompts.default)


# --------------------------------------------------------------------------------------------- dict <-> tree
def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    missing = sorted(names - set(data))      # every value comes from default.toml: the dataclasses hold none
    if missing:
        raise ConfigError(f"{where or 'config'}: missing key(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    """Recursive merge: tables merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def default_config_text() -> str:
    return resources.files("cascade").joinpath("configs/default.toml").read_text(encoding="utf-8")


def _read_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.lpp.epochs=300"`` -> (["stages", "lpp", "epochs"], 300). The value is read as TOML when it
    parses as a TOML value, else kept as a string (so ``paths.data=/x/y`` needs no quotes)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. stages.lpp.epochs=300")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = [p.strip().strip('"') for p in key.split(".")]
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: empty key")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def _apply_override(tree: dict, parts: list[str], value: Any, source: str) -> None:
    node = tree
    for depth, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])} is not a table")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The default config, merged with the TOML file at ``path`` (if given; several are merged in order), then
    ``--set`` overrides."""
    tree = _read_toml(default_config_text(), "cascade/configs/default.toml")
    files = [] if path is None else [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    source = "config"
    cfg = _build_checked(tree, source) if not files else None
    for p in files:              # merged in order: each file's keys over the ones before
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read config file ({exc})") from None
        tree = _merge(tree, _read_toml(text, str(p)))
        source = str(p) if source == "config" else f"{source} + {p}"
        cfg = _build_checked(tree, str(p))
    for item in overrides:       # each override checked as it is applied, so the error names it
        parts, value = parse_override(item)
        _apply_override(tree, parts, value, f"--set {item}")
        cfg = _build_checked(tree, f"--set {item}")
    try:
        _validate(cfg)
    except ConfigError as exc:
        where = source + (" with --set " + " ".join(overrides) if overrides else "")
        raise ConfigError(f"{where}: {exc}") from None
    cfg.sources = tuple(files)
    return cfg


def _build_checked(tree: dict, where: str) -> Config:
    """The Config of ``tree``, every stage table checked against the registry and the stages' constraints; errors
    are prefixed with ``where`` (the file or the ``--set`` item)."""
    try:
        cfg = _build(Config, tree, "")
        validate_stages(cfg.stages)
        _check_keywords(SpecialistStage, cfg.specialist.params, "specialist.params", skip=("feature_key",))
        _check_preset(cfg.specialist.params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg


def _check_preset(params: dict) -> None:
    """``specialist.params.preset`` names a known preprocessing (or is a valid table of one), whether or not the
    specialist is enabled, as every other key of the table is checked."""
    if "preset" not in params or isinstance(params["preset"], Preprocess):
        return
    try:
        preprocess_for(params["preset"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"specialist.params.preset: {exc}") from None


def _validate(cfg: Config) -> None:
    s = cfg.sampling
    if s.shots < 1:
        raise ConfigError(f"sampling.shots must be >= 1, got {s.shots}")
    if s.val_per_class < 0 or s.val_max < 0:
        raise ConfigError("sampling.val_per_class and sampling.val_max must be >= 0")
    if cfg.features.batch_size < 1:
        raise ConfigError(f"features.batch_size must be >= 1, got {cfg.features.batch_size}")
    if cfg.features.chunk < 1:
        raise ConfigError(f"features.chunk must be >= 1, got {cfg.features.chunk}")
    if not any(cfg.models.clip.values()):
        raise ConfigError("models.clip is empty: name at least one CLIP backbone and its weights")
    weights = cfg.stages.get(CASCADE_TABLE, {}).get("backbone_weights")
    if isinstance(weights, dict):       # its form is checked with the other [stages.cascade] keys
        on = [k for k, p in cfg.models.clip.items() if p]
        unknown = [k for k in weights if k not in cfg.models.clip]     # one switched off ("") keeps its weight
        if unknown:
            raise ConfigError(f"stages.{CASCADE_TABLE}.backbone_weights: {', '.join(map(repr, unknown))} is not a "
                              f"backbone of models.clip ({', '.join(cfg.models.clip)})")
        if not sum(float(weights.get(k, 0.0)) for k in on) > 0:
            raise ConfigError(f"stages.{CASCADE_TABLE}.backbone_weights: no weight on the backbones switched on "
                              f"({', '.join(on)})")
    for name, templates in [("prompts.default", cfg.prompts.default)] + [
            (f"prompts.domains.{d}", t) for d, t in cfg.prompts.domains.items()]:
        if not templates:
            raise ConfigError(f"{name}: empty list of prompt templates")
        for t in templates:
            if t.count("{}") != 1:
                raise ConfigError(f"{name}: template {t!r} must contain exactly one '{{}}' (the class name)")


# ---------------------------------------------------------------------------------------------------- stages
CASCADE_TABLE = "cascade"
# keys of [stages.cascade] that name stages (the rest are keyword arguments of Cascade)
CASCADE_STAGE_KEYS = ("transductive", "seen", "refine")


def cascade_stage_names(table: dict) -> tuple[str, list[str], str | None]:
    """(transductive, [seen, ...], refine or None) named by a ``[stages.cascade]`` table (defaults: inmap,
    ["lpp"], gda; ``seen`` may be one name; ``refine = ""`` is no refinement)."""
    seen = table.get("seen", ["lpp"])
    return (table.get("transductive", "inmap"), [seen] if isinstance(seen, str) else list(seen),
            table.get("refine", "gda") or None)


def build_stage(cfg: "Config", name: str):
    """The stage registered as ``name``, built from its ``[stages.<name>]`` table (keyword arguments, unchanged;
    checked against the registry and the stage's constraints when the config was loaded)."""
    return get_stage(name)(**cfg.stages.get(name, {}))


def build_cascade(cfg: "Config") -> Cascade:
    """The Cascade of ``[stages.cascade]``: its transductive stage, seen stages and refinement named there, each
    built from its own ``[stages.<name>]`` table; the table's other keys are the Cascade's keyword arguments."""
    table = cfg.stages.get(CASCADE_TABLE, {})
    trans, seen, refine = cascade_stage_names(table)
    kwargs = {k: v for k, v in table.items() if k not in CASCADE_STAGE_KEYS}
    return Cascade(transductive=build_stage(cfg, trans), seen_stages=[build_stage(cfg, n) for n in seen],
                   refine=build_stage(cfg, refine) if refine else None, **kwargs)


def default_cascade(overrides: list[str] | tuple[str, ...] = ()) -> Cascade:
    """The cascade as shipped: :func:`build_cascade` of the default configuration (cascade/configs/default.toml,
    the one place for the cascade's defaults), with ``--set`` style ``overrides`` such as
    ``"stages.lpp.epochs=300"``. ``Cascade()`` alone takes the stages' own (paper) defaults instead."""
    return build_cascade(load_config(None, overrides))


def _check_keywords(cls, table: dict, where: str, skip=(), also=()) -> None:
    """Unknown keywords and values outside ``cls``'s declared constraints are ConfigErrors naming the key
    (``skip``: constructor arguments the table cannot set; ``also``: keys the table has besides them)."""
    names = cls._param_names() if hasattr(cls, "_param_names") else list(cls().get_params())
    known = [*also, *(k for k in names if k not in skip)]
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown keyword (known in [{where}]: {', '.join(known)})")
    try:
        validate_params(cls._parameter_constraints, table, prefix=f"{where}.")
    except ParameterError as exc:
        raise ConfigError(str(exc)) from None


def validate_stages(stages: dict) -> None:
    """Check every ``[stages.*]`` table against the stage registry and the stages' declared constraints."""
    for name, table in stages.items():
        where = f"stages.{name}"
        if name == CASCADE_TABLE:
            continue
        try:
            cls = get_stage(name)
        except UnknownStageError:
            raise ConfigError(f"{where}: no stage is registered as {name!r} (registered: "
                              f"{', '.join(stage_names())}; see docs/extending.md)") from None
        _check_keywords(cls, table, where)
    table = stages.get(CASCADE_TABLE, {})
    where = f"stages.{CASCADE_TABLE}"
    for key in CASCADE_STAGE_KEYS:
        if key not in table:
            continue
        value = table[key]
        ok = (isinstance(value, str) or (key == "seen" and isinstance(value, list)
                                         and all(isinstance(v, str) for v in value)))
        if not ok:
            raise ConfigError(f"{where}.{key}: expected a stage name{' or a list of them' if key == 'seen' else ''}"
                              f", got {value!r}")
    trans, seen, refine = cascade_stage_names(table)
    for key, names in (("transductive", [trans]), ("seen", seen), ("refine", [refine] if refine else [])):
        for n in names:
            try:
                cls = get_stage(n)
            except UnknownStageError:
                raise ConfigError(f"{where}.{key}: no stage is registered as {n!r} (registered: "
                                  f"{', '.join(stage_names())})") from None
            if key == "seen" and cls.transductive:
                raise ConfigError(f"{where}.seen: {stage_name(cls)!r} is a transductive stage; the seen experts are "
                                  "fitted before the queries are known")
            if key == "refine" and not cls.soft_labels:
                raise ConfigError(f"{where}.refine: {stage_name(cls)!r} does not fit on soft labels, which the "
                                  "refinement is given (the pooled posterior of the queries); \"gda\" does")
    if table.get("combine") == "replace" and table.get("balance") in ("always", "counts"):
        raise ConfigError(f"{where}.balance = {table['balance']!r} has no effect with combine = \"replace\" (the "
                          "seeds' cascade, whose scores are never balanced); use combine = \"pool\"")
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}.seen: {', '.join(map(repr, twice))} named twice; a stage's settings are its one "
                          f"[stages.<name>] table, so a second one would be the same expert")
    _check_keywords(Cascade, table, where, skip=("transductive", "seen_stages", "refine", "specialists"),
                    also=CASCADE_STAGE_KEYS)


# ------------------------------------------------------------------------------------ settings train reads
def train_settings(cfg: Config) -> dict[str, Any]:
    """The :data:`TRAIN_ONLY` settings of ``cfg`` as dotted keys -> JSON values (lists, not tuples), in the form
    ``bundle.json`` records them."""
    flat: dict[str, Any] = {}
    todo = []
    for name in TRAIN_ONLY:
        node = cfg
        for part in name.split("."):
            node = getattr(node, part)
        todo.append((name, dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node))
    while todo:
        key, value = todo.pop(0)
        if isinstance(value, dict):
            todo[:0] = [(f"{key}.{_bare_key(k)}", v) for k, v in value.items()]
        else:
            flat[key] = json.loads(json.dumps(value, default=repr))     # a Preprocess given from Python
    return flat


def changed_settings(trained: dict[str, Any], now: dict[str, Any], default: dict[str, Any] | None = None) -> list[str]:
    """``key = value (trained with value)`` for each setting of ``now`` that differs from ``trained`` (both from
    :func:`train_settings`), in ``now``'s order, then those it lacks. With ``default`` (the shipped settings), only
    those ``now`` sets away from it: a test run given none of them is not told that train was given others."""
    given = [k for k in now if default is None or k not in default or default[k] != now[k]]
    out = [f"{k} = {_shown(now[k])} ({'trained with ' + _shown(trained[k]) if k in trained else 'not set at training'})"
           for k in given if k not in trained or trained[k] != now[k]]
    out += [f"{k} not set (trained with {_shown(v)})" for k, v in trained.items()
            if k not in now and (default is None or k not in default)]
    return out


def _bare_key(key: str) -> str:
    """A key as TOML writes it in a dotted key: bare when it can be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _shown(key)


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------------- argparse glue
def add_config_arguments(parser) -> None:
    """The options every command that reads the config shares."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", action="append", help="a TOML file merged over the defaults "
                   "(cascade/configs/default.toml); only the keys it sets change (repeatable: merged in order)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set stages.lpp.epochs=300 --set sampling.seed=1 (repeatable)")
    g.add_argument("--data", metavar="DIR", help="data root (default: data/ in the current directory)")
    g.add_argument("--out", metavar="DIR", help="output folder (default: out/ in the current directory)")


def config_from_args(args, extra: dict[str, Any] | None = None) -> Config:
    """Load the config from parsed arguments: --config, then explicit flags, then --set (last wins)."""
    flags = []
    if getattr(args, "data", None):
        flags.append(f"paths.data={_quote(args.data)}")
    if getattr(args, "out", None):
        flags.append(f"paths.out={_quote(args.out)}")
    for key, value in (extra or {}).items():
        if value is not None:
            flags.append(f"{key}={_quote(value) if isinstance(value, str) else _toml_value(value)}")
    return load_config(getattr(args, "config", None), flags + list(getattr(args, "overrides", []) or []))


def _quote(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
