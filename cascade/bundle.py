"""The trained model as one bundle: the cascade, the specialists, the class list and the identities of the encoders
it was fitted with, written and read in one place.

A bundle is a folder (``out/model/``)::

    bundle.json                  format and version, classes, encoders' identities, specialist setup, split, stages
    classes.txt                  the class list the result refers to (seen classes first, then unseen ones)
    cascade.npz                  the cascade and its fitted stages (``Cascade.state_dict``)
    specialist-<i>.npz           specialist i's whole state (``SpecialistStage.state_dict``): its head and, when
                                 it was fine-tuned, its backbone's weights (arrays ``backbone_state_/<name>``)

Every stage persists through the one state mechanism, ``state_dict``/``from_state``: arrays plus a JSON document in
one ``.npz`` (:func:`cascade.io.save_npz_json`), read with ``allow_pickle=False``. The stages are rebuilt from the
registry by the names the bundle records, so a bundle loads whatever registered stages it names.

Saving is transactional: the new folder is written beside the old one, validated by loading it back, and only then
swapped in as a whole (:func:`cascade.io.replace_dir`); a failure at any point leaves the previous model folder
as it was. A bundle of another format version is refused with an error that says to train again.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .data import ClassList, read_class_file
from .io import atomic_write_json, atomic_write_text, load_npz_json, replace_dir, save_npz_json
from .router import Cascade
from .stages import UnknownStageError, stage_name
from .stages.specialist import SpecialistStage

__all__ = ["Bundle", "BundleError", "FORMAT", "VERSION"]

FORMAT = "cascade.bundle"
VERSION = 2  # 2: a fine-tuned specialist's backbone is part of its specialist-<i>.npz
INFO_FILE = "bundle.json"
CASCADE_FILE = "cascade.npz"
CLASSES_FILE = "classes.txt"


class BundleError(ValueError):
    """A model folder is missing, damaged, incomplete or from an incompatible version; the message names it."""


@dataclass
class Bundle:
    """A trained model: the fitted cascade (with its specialists), the classes it scores and what it was fitted
    with.

    ``encoders``: CLIP backbone name -> identity of its weights (a hash), checked again at test time.
    ``specialist``: the specialist's setup at train time (``feature_key``, ``domains``, ``identity`` of its
    weights, ``preprocess`` key); the fitted specialists themselves are ``cascade.specialists``.
    ``split``: the few-shot split's description (``data.write_split``), kept for the record.
    ``settings``: the settings only train reads (:func:`cascade.config.train_settings`), so that test can name
    those it is given differently; ``None`` for a model saved before they were recorded.
    """
    cascade: Cascade
    classes: ClassList
    encoders: dict = field(default_factory=dict)
    specialist: dict = field(default_factory=dict)
    split: dict | None = None
    settings: dict | None = None

    # ------------------------------------------------------------------------------------------------ save
    def save(self, folder) -> Path:
        """Write the bundle to ``folder`` as a whole: into a temporary folder beside it, validated by loading it,
        then swapped in. On any failure the previous ``folder`` is left untouched and nothing else remains."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            self._write(tmp)
            self._check_same(Bundle.load(tmp), tmp)
            replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _write(self, folder: Path) -> None:
        cascade = self.cascade
        save_npz_json(folder / CASCADE_FILE, *cascade.state_dict())
        saved = []
        for i, sp in enumerate(cascade.specialists):
            save_npz_json(folder / _specialist_file(i), *sp.state_dict())
            saved.append(sp.name)
        atomic_write_text(folder / CLASSES_FILE, self.classes.to_lines())
        stages = cascade.stages()
        atomic_write_json(folder / INFO_FILE, {
            "format": FORMAT, "version": VERSION,
            "n_classes": len(self.classes), "n_seen": self.classes.n_seen,
            "backbones": list(self.encoders), "clip_weights": dict(self.encoders),
            "stages": {"transductive": stage_name(stages.transductive),
                       "seen": [stage_name(s) for s in stages.seen],
                       "refine": stage_name(stages.refine) if stages.refine is not None else None},
            "specialist": dict(self.specialist, saved=saved),
            "split": self.split, "settings": self.settings})

    def _check_same(self, other: "Bundle", folder: Path) -> None:
        """The bundle read back from ``folder`` describes the same model (classes, encoders, stages)."""
        c, o = self.cascade, other.cascade
        same = (other.classes.names == self.classes.names and other.classes.n_seen == self.classes.n_seen
                and other.encoders == dict(self.encoders) and o.backbones_ == c.backbones_
                and [type(s) for s in o.stages().seen] == [type(s) for s in c.stages().seen]
                and len(o.specialists) == len(c.specialists))
        if not same:
            raise BundleError(f"{folder}: the model read back differs from the one written; nothing was replaced")

    # ------------------------------------------------------------------------------------------------ load
    @classmethod
    def load(cls, folder) -> "Bundle":
        """Read a bundle written by :meth:`save`; :class:`BundleError` naming the file for a missing, damaged or
        incompatible one."""
        folder = Path(folder)
        info_path = folder / INFO_FILE
        if not info_path.is_file():
            if (folder / "pipeline.json").is_file() or (folder / CASCADE_FILE).is_file():
                raise BundleError(f"{folder}: a model written by an older version of cascade (no {INFO_FILE}); "
                                  "run train again")
            raise BundleError(f"{folder}: no trained model (run `bash train.sh` first, with the same --out)")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{info_path}: damaged model description ({exc}); run train again") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
            got = (f"{info.get('format')!r} version {info.get('version')!r}" if isinstance(info, dict)
                   else repr(info))
            raise BundleError(f"{info_path}: model format {got}, this version of cascade reads {FORMAT!r} version "
                              f"{VERSION}; run train again")
        try:
            classes = ClassList(read_class_file(folder / CLASSES_FILE), int(info["n_seen"]),
                                str(folder / CLASSES_FILE))
            specialists = [_load_specialist(folder, i, name)
                           for i, name in enumerate(info["specialist"].get("saved") or [])]
            path = folder / CASCADE_FILE
            arrays, meta = load_npz_json(path)
            try:
                cascade = Cascade.from_state(arrays, meta, specialists, source=str(path))
            except UnknownStageError as exc:
                raise BundleError(f"{path}: {exc}; the model was trained with a stage that is not registered here "
                                  "(import the module that defines it, or retrain)") from None
            bundle = cls(cascade=cascade, classes=classes, encoders=dict(info["clip_weights"]),
                         specialist={k: v for k, v in info["specialist"].items() if k != "saved"},
                         split=info.get("split"), settings=info.get("settings"))
            if bundle.settings is not None and not isinstance(bundle.settings, dict):
                raise TypeError(f"{INFO_FILE} settings: expected a table, got {type(bundle.settings).__name__}")
        except BundleError:
            raise
        except FileNotFoundError as exc:
            raise BundleError(f"{folder}: incomplete model ({exc}); run train again") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{folder}: damaged model ({type(exc).__name__}: {exc}); run train again") from None
        if (cascade.n_classes_ != len(classes) or cascade.n_seen_ != classes.n_seen
                or not set(cascade.backbones_) <= set(bundle.encoders)):
            raise BundleError(f"{folder}: its files disagree (classes or backbones); run train again")
        return bundle


def _specialist_file(i: int) -> str:
    return f"specialist-{i}.npz"


def _load_specialist(folder: Path, i: int, name: str) -> SpecialistStage:
    """Specialist ``i`` from its state file; its recorded name must be the one ``bundle.json`` lists."""
    path = folder / _specialist_file(i)
    sp = SpecialistStage.from_state(*load_npz_json(path))
    if sp.name != name:
        raise BundleError(f"{path}: holds the specialist for {sp.name!r}, {INFO_FILE} lists {name!r}; run train again")
    if sp.finetune != "none" and not hasattr(sp, "backbone_state_"):
        raise BundleError(f"{path}: a fine-tuned specialist without its backbone's weights; retrain")
    return sp
