"""``python -m cascade train`` and ``python -m cascade test``: the user journey from a dataset folder to a
submission file.

train: read and validate the class list and train.txt, pick K images per class (seed) or take a given list,
       write the split to out/split/, extract and cache image features for every CLIP backbone (and the
       specialist's backbone for its domains), build the class text embeddings, fit the cascade, save it to
       out/model/ (atomically), and report validation top-1/top-5 overall and per domain (stderr table,
       out/report/val_metrics.json and .csv).
test:  list the flat test folder, extract (cached) features, run the saved cascade, and write out/result.txt
       (`<file name> <top1> ... <top5>`, every image once, sorted by name, atomically) and out/result_routes.csv
       (route and top-5 scores per image; named after the result file). Unreadable test images are still listed,
       with a fallback ranking (the mean of the cascade's probabilities over the readable test images), and
       reported.

Both are resumable: features are cached as they are computed, so a rerun after an interruption continues
where it stopped. No output file is written until its content is complete.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .config import (add_config_arguments, build_cascade, changed_settings, config_from_args, load_config,
                     train_settings)
from .data import DataError, list_test_images, load_classes, read_image_list, sample_split, split_from_list, write_split
from .evaluate import topk_table, worst_classes
from .features import ModelEncoder, clip_encoder, convnext_encoder, extract_features, text_features
from .io import atomic_write_json, atomic_write_text, os_problem, replace_dir, writing
from .metrics import topk_indices
from .output import format_table, write_result, write_routes_csv, write_table_csv
from .runtime import is_main, jittor, mpi_world, run_ranked, status
from .stages.specialist import SpecialistStage

__all__ = ["add_parser", "train", "test", "PipelineError"]


class PipelineError(ValueError):
    """An expected failure of train/test (missing model, weights, mismatched classes): one clear line."""


def _log_marginal(details: dict) -> None:
    """One line on the class marginal the cascade used for the query set (docs/stages.md, step 2)."""
    q, source = details.get("prior"), details.get("prior_source")
    if q is None:
        return
    q = np.asarray(q)
    if np.allclose(q, 1.0 / len(q)):
        _log(f"class marginal over these images: uniform over {len(q)} classes (no evidence of imbalance)")
        return
    how = {"zero-shot": "zero-shot EM", "refined": "the refined posterior"}.get(source, str(source))
    _log(f"class marginal over these images: estimated ({how}); largest class {q.max() * 100:.1f} %, "
         f"smallest {q.min() * 100:.2f} %")


def _log_refinement(details: dict) -> None:
    """One line when the cascade checked its GDA refinement on held-out rows (docs/stages.md, step 5)."""
    if "refine_dropped" not in details:
        return
    gain, se = details["refine_gain"], details["refine_gain_se"]
    verdict = ("dropped: held-out rows find it worse than the pooled experts"
               if details["refine_dropped"] else "kept")
    _log(f"GDA refinement {verdict} (held-out log-likelihood gain {gain:+.3f} +- {se:.3f} per row)")


def _log_balance(details: dict) -> None:
    """One line on whether the final scores were balanced to the class marginal, and why (docs/accuracy.md)."""
    if "balanced" not in details:
        return
    rule = details.get("balance_rule")
    if details["balanced"] and "balance_rho" in details:
        _log(f"final scores balanced to the class counts ({_count_rule(details)})")
    elif "balance_gain" in details:
        verdict = "balanced to the class marginal" if details["balanced"] else "not balanced"
        _log(f"final scores {verdict} (held-out log-likelihood gain {details['balance_gain']:+.3f} "
             f"+- {details['balance_gain_se']:.3f} per row)")
    elif details["balanced"]:
        _log(f"final scores balanced to the class marginal (rule {rule!r})")
    elif rule == "none":
        _log("final scores not balanced (no validation rows and balance_without_val = \"none\")")
    else:
        _log("final scores not balanced (fewer images than classes)")


def _count_rule(details: dict) -> str:
    """Why the count rule balanced, and its ``rho`` (0: the query set reads as built to the marginal, balanced
    fully; 1: as drawn at random from it, balanced towards its own counts), for the global and per-domain lines."""
    why = {"few": "the held-out rows declined, but there are few images per class",
           "setting": 'balance = "counts"'}.get(details.get("balance_why"), "no validation rows")
    return f"{why}; count rule, rho {details['balance_rho']:.2f}"


def _log_refit(details: dict) -> None:
    """One line when validation rows judged the GDA refitted on the balanced pool (docs/accuracy.md)."""
    if "refit_dropped" not in details:
        return
    verdict = ("dropped: validation rows find it worse than the balanced pool, which is the final score"
               if details["refit_dropped"] else
               "kept, fitted on the validation rows too" if details.get("refit_with_val") else "kept")
    _log(f"GDA refit on the balanced scores {verdict} (held-out log-likelihood gain {details['refit_gain']:+.3f} "
         f"+- {details['refit_gain_se']:.3f} per row)")


def _log_domains(details: dict) -> None:
    """One line per domain whose own cascade scored its queries again (docs/accuracy.md, "Several domains")."""
    for d in details.get("domains", []):
        if not d["rescored"]:
            _log(f"domain {d['domain'] or '-'}: {d['n_queries']} images, global scores kept")
            continue
        counts = d.get("balance_rho") is not None
        steps = [(f"balanced to the class counts: {_count_rule(d)}" if counts else "balanced") if d["balanced"]
                 else "not balanced"]
        if d["balance_refit"]:
            steps.append("GDA refit on the balanced scores")
        elif d["refit_dropped"]:
            steps.append("refit dropped")
        if d["refine_dropped"]:
            steps.append("refinement dropped")
        _log(f"domain {d['domain'] or '-'}: {d['n_queries']} images scored again by its own cascade "
             f"({', '.join(steps)})")


def _pool_summary(details: dict) -> dict | None:
    """The seen block's pooled experts and their fitted exponents, by name (None when the pool had unit
    weights)."""
    weights = details.get("pool_weights")
    if weights is None:
        return None
    return {name: round(float(w), 4) for name, w in zip(details["pool_experts"], weights)}


def _log_pool(details: dict) -> None:
    """One line naming each pooled expert with its exponent fitted on the held-out rows."""
    pool = _pool_summary(details)
    if pool:
        _log("pooled experts (exponents fitted on held-out rows): "
             + ", ".join(f"{name} {w:.3f}" for name, w in pool.items()))


def _log(msg: str) -> None:
    if is_main():   # under mpirun, rank 0 speaks for the run
        print(f"[cascade] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- filesystem faults
LOW_SPACE = 64 << 20  # below this many free bytes in an output folder, a warning says the run may fail


def _check_outputs(folders) -> None:
    """Fail at once, before any long work, when an output folder cannot be used: a file where a folder should
    be (e.g. ``--out`` naming a file), or a folder that cannot be written (read-only file system, no
    permission). ``folders`` are (path, setting) pairs. Nothing is created: a folder that does not exist yet is
    checked through the nearest existing folder above it. A nearly full disk gets a warning."""
    probed = set()
    for folder, setting in folders:
        folder = Path(folder)
        p = folder
        while not (p.exists() or p.is_symlink()) and p.parent != p:
            p = p.parent
        if p.exists() and not p.is_dir():
            where = "" if p == folder else f" (on the way to {folder})"
            raise PipelineError(f"{p}: is a file, not a folder{where}; {setting} must name a folder")
        if p.is_symlink() and not p.exists():
            raise PipelineError(f"{p}: is a broken symbolic link, not a folder; {setting} must name a folder")
        key = p.resolve()
        if key in probed:
            continue
        probed.add(key)
        try:
            fd, probe = tempfile.mkstemp(prefix=".cascade-write-check-", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PipelineError(f"{p}: cannot write to this folder: {os_problem(exc)}; {setting} must name a "
                                "writable folder (nothing was changed)") from None
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        if free < LOW_SPACE:
            _log(f"warning: only {free / 2**20:.1f} MiB free in {p}; the run may fail with a full disk")


def _check_data_root(cfg, *inputs) -> None:
    """Fail at once when the data root cannot hold the ``inputs`` (path settings read relative to it, such as
    ``cfg.paths.classes``): ``--data`` naming a file, or a folder that does not exist."""
    root = cfg.data_dir
    if root.is_dir() or all(Path(v).is_absolute() or "{" in v for v in inputs):
        return
    problem = "is a file, not a folder" if root.exists() else "data folder not found"
    raise PipelineError(f"{root}: {problem}; --data (paths.data) must name the dataset folder, the one holding "
                        f"{cfg.paths.classes}{cfg.relative_note(root)}")


def _data_input(cfg, value: str, setting: str) -> Path:
    """The path of a setting read relative to the data root. Missing there but present from the current folder
    (``--train-list out/split/support.txt``): an error that says how to give it."""
    path = cfg.data_path(value)
    here = Path(value)
    if not path.exists() and not here.is_absolute() and here.exists():
        raise PipelineError(f"{path}: not found; {setting} is read relative to the data root {cfg.data_dir}, and "
                            f"{here} exists from the current folder: give it as "
                            f"{os.path.relpath(here.resolve(), cfg.data_dir.resolve())}, or as an absolute path")
    return path


# ------------------------------------------------------------------------------------------------ shared
def _classes(cfg):
    all_path = cfg.data_path(cfg.paths.all_classes) if cfg.paths.all_classes else None
    return load_classes(cfg.data_path(cfg.paths.classes), all_path)


def _clip_encoders(cfg) -> dict:
    weights = cfg.clip_weights()
    missing = [f"{name}: {p}" for name, p in weights.items() if not p.is_file()]
    if missing:
        first = next(p for p in weights.values() if not p.is_file())
        raise PipelineError("converted CLIP weights not found: " + "; ".join(missing) + ". Convert OpenAI's "
                            f"checkpoints first, e.g. `python -m cascade.convert {first.stem}.pt {first}`, or point "
                            "models.clip.<name> at them (--set; an empty value switches a backbone off)"
                            + cfg.relative_note(first))
    encoders = {name: clip_encoder(name, p) for name, p in weights.items()}
    seen = {}
    for name, enc in encoders.items():      # e.g. a misspelt name beside the right one: the same model twice
        if enc.identity in seen:
            raise PipelineError(f"models.clip.{seen[enc.identity]} and models.clip.{name} hold the same weights "
                                f"({weights[name]}); each backbone once (is one of the names misspelt?)")
        seen[enc.identity] = name
    return encoders


def _specialist_domains(cfg, classes) -> list[str]:
    """The domains the configuration gives a specialist: those of ``specialist.domains`` in the class list (none
    when ``specialist.enabled`` is off)."""
    sp = cfg.specialist
    return [d for d in sp.domains if d in classes.domain_names] if sp.enabled else []


def _specialist_setup(cfg, classes):
    """(encoder, domains) for the specialist, or (None, []) when it is off or no configured domain exists."""
    sp = cfg.specialist
    present = _specialist_domains(cfg, classes)
    absent = [d for d in sp.domains if d not in classes.domain_names] if sp.enabled else []
    if absent:
        _log(f"specialist domain(s) {', '.join(absent)} not in the class list: ignored")
    if not present:
        return None, []
    path = cfg.expand(sp.weights)
    if not path.is_file():
        raise PipelineError(f"{path}: specialist weights not found (convert the ConvNeXt-V2 checkpoint with "
                            f"`python -m cascade.convert SRC {path}`, or switch the specialist off with "
                            "--set specialist.enabled=false)" + cfg.relative_note(path))
    stage = _new_specialist(cfg)
    return convnext_encoder(cfg.specialist.feature_key, path, stage.preprocess,
                            where="specialist.weights"), present


def _new_specialist(cfg, domain=None):
    """A specialist for ``domain`` from ``[specialist]``; bad parameters fail here, before any long work."""
    try:
        return SpecialistStage(domain=domain, feature_key=cfg.specialist.feature_key,
                               **cfg.specialist.params).validate()
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"specialist.params: {exc}") from None


def _check_specialist_domains(cfg, classes, trained: dict, model_dir) -> None:
    """Refuse a test run whose configuration gives the specialist other domains (or none, or one where the model
    has none) than the model's specialist (``trained``: the bundle's record) was fitted for, before any weights
    file is read."""
    here, there = _specialist_domains(cfg, classes), list(trained.get("domains") or [])
    if sorted(here) == sorted(there):
        return

    def name(domains):
        return "a specialist for " + ", ".join(domains) if domains else "no specialist"
    raise PipelineError(f"the model in {model_dir} has {name(there)}, but specialist.enabled and specialist.domains "
                        f"give {name(here)} here; give test the [specialist] settings train had, or retrain")


def _check_specialist(encoder, trained: dict, cfg, model_dir) -> None:
    """Refuse a test run whose specialist (``encoder``, from the configuration) has other weights or another
    preprocessing than the model's specialist (``trained``: the bundle's record) was fitted with, naming the
    setting."""
    if encoder.identity != trained.get("identity"):
        raise PipelineError(f"specialist.weights = {cfg.expand(cfg.specialist.weights)}: not the weights the model "
                            f"in {model_dir} was trained with; point it at those, or retrain")
    if encoder.preprocess.cache_key != trained.get("preprocess"):
        raise PipelineError(f"specialist.params.preset: preprocessing {encoder.preprocess.cache_key} differs from "
                            f"{trained.get('preprocess')}, the one the model in {model_dir} was trained with; give "
                            "test the specialist.params train had, or retrain")


def _extract(encoders: dict, paths, cfg, progress: bool, what: str, then=None):
    """Features of ``paths`` for every encoder: ({key: [N, D]}, failures {index: (path, reason)}). Backbones
    run one after the other and each model is released when done (``then(key, encoder)`` runs first, on rank
    0 only), so only one model is in memory at a time. Under mpirun every rank makes this call and encodes its
    share of the images (``extract_features(distributed=True)``); only rank 0 gets the features."""
    feats, failures = {}, {}
    for key, enc in encoders.items():
        res = extract_features(enc, paths, cfg.cache_dir, batch_size=cfg.features.batch_size,
                               workers=cfg.features.workers, chunk=cfg.features.chunk, progress=progress,
                               desc=f"{key} {what}", distributed=True)
        feats[key] = res.features
        for f in res.failures:
            failures.setdefault(f.index, (f.path, f.reason))
        if then is not None and is_main():
            then(key, enc)
        enc.release()
    return feats, failures


def _fit_specialists(cfg, classes, domains, encoder, support, y_sup, support_feats, oof, progress):
    """One fitted specialist per domain, on the domain's support images, choosing its blending weight with
    the cascade's out-of-fold probabilities of the support rows. Frozen backbone: several augmented views per
    image through the specialist's backbone when n_views > 1 (cached in the feature cache), else the cached
    test-view features. finetune="last_stage"/"all": the backbone is fine-tuned per domain (the stage learns
    its weights, ``backbone_state_``, saved with the model), and the shared encoder is released so the next
    domain starts again from the original weights."""
    out = []
    key = cfg.specialist.feature_key
    for d in domains:
        stage = _new_specialist(cfg, domain=d)
        rows = np.flatnonzero(np.isin(y_sup, classes.domain_classes(d)))
        paths = [str(cfg.data_dir / support[r].path) for r in rows]
        if stage.finetune != "none":
            jittor()
            where = status.get("device", "cpu")
            _log(f"fine-tuning the specialist backbone ({stage.finetune}) for {d} on {rows.size} support images on "
                 f"the {where}" + (" (slow: about 1 h for last_stage, 4 h for all at Base size on 2 cores; see "
                                   "docs/specialist.md)" if where == "cpu" else ""))
            stage.fit_images(paths, y_sup[rows], encoder, clip_probs=oof[rows], progress=progress)
            encoder.release()  # the stage keeps the tuned network; the next domain reloads the original weights
        elif int(getattr(stage, "n_views", 1)) > 1:
            _log(f"fitting the {d} specialist on {rows.size} support images")
            stage.fit_images(paths, y_sup[rows], encoder, clip_probs=oof[rows], progress=progress,
                             cache_dir=cfg.cache_dir)
        else:
            _log(f"fitting the {d} specialist on {rows.size} support images")
            stage.fit(support_feats[key][rows], y_sup[rows], clip_probs=oof[rows])
        out.append(stage)
    return out


def _finetuned_encoder(stage, preprocess):
    """An encoder over a specialist's fine-tuned backbone held in memory: the tuned network itself after
    fit_images (``encoder_``), else one built from its weights (``backbone_state_``). Its identity (the weights'
    hash, computed once by the stage and saved with its state) is the same at train and test, so both share
    cached features."""
    def loader():
        if hasattr(stage, "encoder_"):
            return stage.encoder_
        # lazy: the architecture module imports Jittor (about a second), which --help, eval and bench never need
        from .models.convnextv2 import model_from_state

        return model_from_state(stage.backbone_state_)

    return ModelEncoder(stage.query_key, loader, f"sha256:{stage.backbone_sha256_}", preprocess)


def _specialist_query_features(specialists, base_encoder, paths, cfg, progress, what):
    """{query key: rows -> features}: each specialist's backbone encodes only the images routed to it (rows of
    ``paths``), through the feature cache. A fine-tuned backbone is the specialist's own (its learned
    ``backbone_state_``, in memory after train and read back with the model bundle at test)."""
    out, encoders = {}, []
    for sp in specialists:
        key = sp.query_key
        if key in out:
            continue
        enc = base_encoder if sp.finetune == "none" else _finetuned_encoder(sp, base_encoder.preprocess)
        encoders.append(enc)
        out[key] = _on_demand(enc, paths, cfg, progress, what)
    return out, encoders


def _on_demand(encoder, paths, cfg, progress, what):
    def features(rows):
        res = extract_features(encoder, [paths[r] for r in rows], cfg.cache_dir, batch_size=cfg.features.batch_size,
                               workers=cfg.features.workers, chunk=cfg.features.chunk, progress=progress,
                               desc=f"{encoder.name} {what} (routed)")
        if res.failures:
            _report_failures({f.index: (f.path, f.reason) for f in res.failures}, what)
            raise DataError(f"{what} images became unreadable during the run; rerun")
        return res.features

    return features


def _report_failures(failures: dict, what: str) -> None:
    if not failures or not is_main():
        return
    _log(f"{len(failures)} {what} image(s) could not be read:")
    for i, (p, reason) in sorted(failures.items())[:20]:
        print(f"  {p}: {reason}", file=sys.stderr)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- train
def train(cfg, progress: bool = True) -> dict:
    """Fit the cascade on the few-shot split and save it; returns a summary (also out/report/train.json)."""
    t0 = time.time()
    _check_outputs([(cfg.out_dir, "--out (paths.out)"), (cfg.cache_dir, "features.cache"),
                    (cfg.split_dir, "--out (paths.out)"), (cfg.report_dir, "--out (paths.out)"),
                    (cfg.model_dir, "--out (paths.out)")])
    _check_data_root(cfg, cfg.paths.classes, cfg.paths.train_list)
    encoders = _clip_encoders(cfg)  # first: a missing weights file is reported before any long work
    classes = _classes(cfg)
    _log(f"{len(classes)} classes ({classes.n_seen} seen, {classes.n_unseen} unseen) in domains "
         f"{', '.join(d or '-' for d in classes.domain_names)}")
    train_list = cfg.data_path(cfg.paths.train_list)
    pool = read_image_list(train_list, classes, cfg.data_dir)
    s = cfg.sampling
    if s.list:
        sel_path = _data_input(cfg, s.list, "--train-list (sampling.list)")
        selection = read_image_list(sel_path, classes, cfg.data_dir)
        split = split_from_list(selection, pool, classes, s.seed, s.val_per_class, s.val_max, source=str(sel_path))
    else:
        split = sample_split(pool, classes, s.shots, s.seed, s.val_per_class, s.val_max, s.allow_fewer,
                             source=str(train_list))
    sp_encoder, sp_domains = _specialist_setup(cfg, classes)

    # Decode/encode with the first backbone; unreadable support images are replaced by the class's next
    # candidate (a given list cannot be changed: its unreadable images are an error).
    # Its class text embeddings are made while its model is loaded, and its features are kept for the fit.
    first_key, first = next(iter(encoders.items()))
    text = {}

    def encode_text(key, enc):
        text[key] = _class_text(enc, classes, cfg, progress)

    while True:
        support, val = split.support, split.val
        paths = [cfg.data_dir / e.path for e in support + val]
        first_feats, failures = _extract({first_key: first}, paths, cfg, progress, "train", then=encode_text)
        if not failures:
            break
        rel = support + val
        for i, (_, reason) in failures.items():
            split.exclude(rel[i].path, reason)
        _report_failures(failures, "training")
        bad_support = [f"{rel[i].path}: {r}" for i, (_, r) in failures.items() if i < len(support)]
        if bad_support and split.fixed_support:
            raise DataError(f"{cfg.data_path(s.list)}: {len(bad_support)} selected image(s) cannot be read:\n  "
                            + "\n  ".join(bad_support[:20]))
        split.check(classes)
    # the split is written beside out/split/ and swapped in with the model: a run that fails leaves no new split
    split_tmp = cfg.out_dir / f".split.tmp-{os.getpid()}"
    try:
        summary = _fit_and_save(cfg, classes, split, split_tmp, encoders, (first_feats, text), sp_encoder, sp_domains,
                                paths, progress, t0)
    finally:
        shutil.rmtree(split_tmp, ignore_errors=True)
    return summary


def _class_text(encoder, classes, cfg, progress: bool):
    """The class text embeddings of one backbone (cached)."""
    return text_features(encoder, classes.prompts(cfg.templates_for), cfg.cache_dir, progress=progress)


def _fit_and_save(cfg, classes, split, split_tmp, encoders, first, sp_encoder, sp_domains, paths, progress,
                  t0) -> dict:
    """train, once the split is final: features, text embeddings, the cascade and the specialists, the validation
    report; then the model bundle and the split replace the previous ones (only when everything succeeded).
    ``first``: (features, text embeddings) of the backbones already encoded while the split was checked."""
    support, val = split.support, split.val
    with writing(cfg.split_dir):
        split_info = write_split(split, split_tmp) if is_main() else None
    n_sup = len(support)
    _log(f"split: {n_sup} support images, {len(val)} validation images")

    done, text = first

    def encode_text(key, enc):
        text[key] = _class_text(enc, classes, cfg, progress)

    more, failures = _extract({k: enc for k, enc in encoders.items() if k not in done}, paths, cfg, progress, "train",
                              then=encode_text)
    feats = {k: done[k] if k in done else more[k] for k in encoders}   # in the backbones' order
    if failures:  # decoding is the same for every backbone, so this only happens if files change under us
        _report_failures(failures, "training")
        raise DataError("training images became unreadable during the run; rerun train")
    y_all = np.array([e.label for e in support + val], dtype=np.int64)
    support_feats = {k: v[:n_sup] for k, v in feats.items()}
    val_feats = {k: v[n_sup:] for k, v in feats.items()}
    y_sup, y_val = y_all[:n_sup], y_all[n_sup:]
    # the specialist's backbone encodes the support images (one view each) here, where every rank takes part;
    # its own augmented views and the routed validation images are encoded by rank 0 below
    if sp_encoder is not None:
        key = cfg.specialist.feature_key
        proto = _new_specialist(cfg)
        if proto.finetune == "none" and int(proto.n_views) <= 1:
            sp_feats, sp_fail = _extract({key: sp_encoder}, paths[:n_sup], cfg, progress, "train")
            if sp_fail:
                _report_failures(sp_fail, "training")
                raise DataError("training images became unreadable during the run; rerun train")
            support_feats[key] = sp_feats[key]
    if not is_main():   # under mpirun: this rank's share of the images is encoded; rank 0 fits and writes
        return {"rank": mpi_world()[0], "seconds": round(time.time() - t0, 1)}

    cascade = build_cascade(cfg)
    _log(f"fitting the cascade on {n_sup} support images")
    cascade.fit(support_feats, y_sup, text, classes.n_seen, val=(val_feats, y_val) if len(y_val) else None,
                domains=classes.domains)

    sp_encoders = []
    if sp_encoder is not None:
        # the specialist fits on the support images' features (above, or its own augmented views), then encodes
        # only the validation images the cascade routes to its domain (on demand, below)
        oof = cascade.support_oof_proba()
        cascade.specialists = _fit_specialists(cfg, classes, sp_domains, sp_encoder, support, y_sup, support_feats,
                                               oof, progress)
        if len(y_val):
            lazy, sp_encoders = _specialist_query_features(cascade.specialists, sp_encoder, paths[n_sup:], cfg,
                                                           progress, "validation")
            val_feats.update(lazy)

    summary = {"classes": len(classes), "n_seen": classes.n_seen, "n_support": n_sup, "n_val": int(len(y_val)),
               "seconds": None}
    report = None
    if len(y_val):
        pred = cascade.predict(val_feats)
        for enc in sp_encoders:
            enc.release()
        top5 = np.asarray(pred.top5)
        rows = topk_table(top5, y_val, classes.domains)
        worst = worst_classes(top5[:, 0], y_val, classes.names, n=10)
        report = (rows, {"accuracy": rows, "worst_classes": worst, "routes": _count(pred.route)})
        summary["val"] = rows
        _log_pool(pred.details)
        summary["pool"] = _pool_summary(pred.details)

    # the model bundle is written beside out/model/, validated by loading it, then swapped in as a whole
    bundle = Bundle(cascade=cascade, classes=classes, encoders={k: enc.identity for k, enc in encoders.items()},
                    specialist={"feature_key": cfg.specialist.feature_key, "domains": sp_domains,
                                "identity": sp_encoder.identity if sp_encoder else None,
                                "preprocess": (sp_encoder.preprocess.cache_key if sp_encoder else None)},
                    split=split_info, settings=train_settings(cfg))
    bundle.save(cfg.model_dir)
    replace_dir(split_tmp, cfg.split_dir)
    _log(f"model saved to {cfg.model_dir} (split in {cfg.split_dir})")

    if report is None:      # no validation rows: an earlier run's validation report would pass for this one's
        for name in ("val_metrics.csv", "val_metrics.json"):
            (cfg.report_dir / name).unlink(missing_ok=True)
    else:
        rows, metrics = report
        cfg.report_dir.mkdir(parents=True, exist_ok=True)
        write_table_csv(cfg.report_dir / "val_metrics.csv", rows, ["domain", "n", "top1", "top5"])
        atomic_write_json(cfg.report_dir / "val_metrics.json", metrics)
        print("\nvalidation (held-out images of the training pool):\n" + format_table(rows, ["domain", "n", "top1",
              "top5"]) + "\n", file=sys.stderr)
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(cfg.report_dir / "train.json", summary)
    _log(f"train done in {summary['seconds']} s")
    return summary


def _count(routes) -> dict:
    out: dict[str, int] = {}
    for r in routes:
        out[str(r)] = out.get(str(r), 0) + 1
    return out


# --------------------------------------------------------------------------------------------------- test
def test(cfg, progress: bool = True) -> dict:
    """Write the submission file for the test folder; returns a summary."""
    t0 = time.time()
    result_path = cfg.out_path(cfg.paths.result)
    if result_path.is_dir():
        raise PipelineError(f"{result_path}: is a folder; --result (paths.result) must name a file")
    _check_outputs([(cfg.out_dir, "--out (paths.out)"), (result_path.parent, "--result (paths.result)"),
                    (cfg.cache_dir, "features.cache")])
    model_dir = cfg.model_dir
    if not model_dir.is_dir():
        raise PipelineError(f"{model_dir}: no trained model (run `bash train.sh` first, with the same --out)"
                          + cfg.relative_note(model_dir))
    bundle = Bundle.load(model_dir)          # the whole model, checked before any image is read
    trained = bundle.classes
    # the model's own class list (saved by train, incl. unseen classes) is the one the result refers to; the
    # configured list must agree with it (the seen classes, and all classes when an all-classes file is set)
    _check_data_root(cfg, cfg.paths.classes, cfg.paths.test_dir)
    configured = _classes(cfg)
    same = (configured.names == trained.names if cfg.paths.all_classes
            else configured.names == trained.names[: trained.n_seen])
    if not same:
        raise PipelineError(f"the class list ({configured.source}, {len(configured)} classes) differs from the one "
                            f"the model in {model_dir} was trained with ({trained.n_seen} seen + {trained.n_unseen} "
                            f"unseen classes); retrain, or use the same paths.classes/paths.all_classes")
    classes = trained
    _note_train_settings(cfg, bundle, model_dir)
    test_dir = _data_input(cfg, cfg.paths.test_dir, "--test-dir (paths.test_dir)")
    names, skipped = list_test_images(test_dir)
    if skipped:
        _log(f"{test_dir}: skipped {len(skipped)} non-image entr{'y' if len(skipped) == 1 else 'ies'} (no image "
             "extension, hidden, a folder, or a name that cannot be one result line): " + ", ".join(map(repr, skipped)))
    _log(f"{len(names)} test images in {test_dir}")

    clip_paths = cfg.clip_weights()
    if set(clip_paths) != set(bundle.encoders):     # before any weights file is read
        raise PipelineError(f"configured backbones {sorted(clip_paths)} (models.clip) differ from the trained "
                            f"model's {sorted(bundle.encoders)} in {model_dir}: give test the models.clip settings "
                            "train had (an empty value switches a backbone off), or retrain")
    encoders = _clip_encoders(cfg)
    changed = [k for k, enc in encoders.items() if enc.identity != bundle.encoders.get(k)]
    if changed:
        raise PipelineError("; ".join(f"models.clip.{k} = {clip_paths[k]}" for k in changed) + ": not the weights "
                            f"the model in {model_dir} was trained with; point it at those (converted with "
                            "python -m cascade.convert), or retrain")
    sp = bundle.specialist
    _check_specialist_domains(cfg, classes, sp, model_dir)
    sp_encoder = None
    if sp.get("domains"):
        sp_encoder, _ = _specialist_setup(cfg, classes)
        _check_specialist(sp_encoder, sp, cfg, model_dir)
    cascade = bundle.cascade
    specialists = cascade.specialists

    paths = [test_dir / n for n in names]
    feats, failures = _extract(encoders, paths, cfg, progress, "test")
    if not is_main():   # under mpirun: this rank's share of the images is encoded; rank 0 predicts and writes
        return {"rank": mpi_world()[0], "images": len(names), "seconds": round(time.time() - t0, 1)}
    _report_failures(failures, "test")
    ok = np.ones(len(names), dtype=bool)
    ok[list(failures)] = False

    n_classes = len(classes)
    scores = np.zeros((len(names), n_classes), dtype=np.float64)
    routes = ["unreadable"] * len(names)
    if ok.any():
        query = {k: v[ok] for k, v in feats.items()}
        sp_encoders = []
        if specialists:  # each specialist's backbone encodes only the test images routed to its domain
            ok_paths = [p for p, good in zip(paths, ok) if good]
            lazy, sp_encoders = _specialist_query_features(specialists, sp_encoder, ok_paths, cfg, progress, "test")
            query.update(lazy)
        pred = cascade.predict(query)
        _log_pool(pred.details)
        _log_marginal(pred.details)
        _log_refinement(pred.details)
        _log_balance(pred.details)
        _log_refit(pred.details)
        _log_domains(pred.details)
        for enc in sp_encoders:
            enc.release()
        s = np.asarray(pred.scores, dtype=np.float64)
        if s.shape != (int(ok.sum()), n_classes):
            raise PipelineError(f"the cascade returned scores of shape {s.shape}, expected "
                                f"{(int(ok.sum()), n_classes)}")
        scores[ok] = s
        for j, r in zip(np.flatnonzero(ok), pred.route):
            routes[j] = str(r)
        fallback = s.mean(axis=0)
        top5_ok = np.asarray(pred.top5)
    else:
        fallback = np.full(n_classes, 1.0 / n_classes)
        top5_ok = None
    if (~ok).any():  # unreadable: ranked by the cascade's mean probability over the readable test images
        scores[~ok] = fallback
    k = min(5, n_classes)
    top5 = np.empty((len(names), k), dtype=np.int64)
    if top5_ok is not None:
        top5[ok] = top5_ok[:, :k]  # the cascade's own ranking for readable images (ties broken its way)
    if (~ok).any():
        top5[~ok] = topk_indices(fallback[None], k)[0]
    top_scores = np.take_along_axis(scores, top5, axis=1)
    status = ["ok" if ok[i] else f"unreadable: {failures[i][1]}" for i in range(len(names))]

    routes_path = result_path.with_name(result_path.stem + "_routes.csv")
    fail_path = result_path.with_name(result_path.stem + "_unreadable.txt")
    # every output is written in full beside its target first (a full disk fails here, leaving the previous
    # outputs as they were), then renamed into place, the submission last
    with writing(result_path.parent):
        result_path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{result_path.name}.", dir=result_path.parent))
    try:
        with writing(routes_path):
            write_routes_csv(staging / routes_path.name, names, routes, top5, top_scores, status)
        if failures:
            with writing(fail_path):
                atomic_write_text(staging / fail_path.name,
                                  "".join(f"{names[i]}\t{r}\n" for i, (_, r) in sorted(failures.items())))
        with writing(result_path):
            write_result(staging / result_path.name, names, top5)
        with writing(result_path.parent):
            os.replace(staging / routes_path.name, routes_path)
            if failures:
                os.replace(staging / fail_path.name, fail_path)
            elif fail_path.exists():
                fail_path.unlink()
            os.replace(staging / result_path.name, result_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"images": len(names), "unreadable": len(failures), "result": str(result_path),
               "routes": _count(routes), "seconds": round(time.time() - t0, 1)}
    _log(f"wrote {result_path} ({len(names)} images; routes: "
         + ", ".join(f"{r} {n}" for r, n in summary["routes"].items()) + f") in {summary['seconds']} s")
    if failures:
        _log(f"{len(failures)} unreadable image(s) are listed with a fallback ranking; see {fail_path}")
    return summary


def _note_train_settings(cfg, bundle, model_dir, show: int = 8) -> None:
    """Name the settings only train reads that test is given differently: the model holds what they set, so
    test cannot apply them (a user changing stages.lpp.epochs at test time would otherwise see nothing change)."""
    if bundle.settings is None:     # a model saved before train recorded its settings
        return
    # the shipped settings are those a test run not given any has: only the ones set away from them are named, and
    # the specialist's preset, which test checks against the model itself (an error there), is left to that check
    differ = [d for d in changed_settings(bundle.settings, train_settings(cfg), train_settings(load_config()))
              if not d.startswith("specialist.params.preset ")]
    if differ:
        more = f"; and {len(differ) - show} more" if len(differ) > show else ""
        _log(f"note: {len(differ)} setting(s) differ from those the model in {model_dir} was trained with, and only "
             "train reads them, so this run uses the model's (retrain to apply them): "
             + "; ".join(differ[:show]) + more)


# ------------------------------------------------------------------------------------------------ commands
def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        description="Read DATA/classes.txt and DATA/train.txt (the challenge layout; see data/README.md), pick "
                    "K images per class (sampling.shots, sampling.seed) or a given list (sampling.list), extract "
                    "and cache features for every CLIP backbone (and the specialist's), fit the cascade, save it "
                    "to OUT/model/ and report validation top-1/top-5 per domain (OUT/report/). Settings come from "
                    "cascade/configs/default.toml, --config and --set.")
    add_config_arguments(p)
    p.add_argument("--shots", type=int, help="K training images per class (sampling.shots)")
    p.add_argument("--seed", type=int, help="sampling seed (sampling.seed)")
    p.add_argument("--train-list", metavar="FILE", help="a given selection instead of sampling, e.g. "
                   "train_label.txt (sampling.list, relative to the data root)")
    p.add_argument("--all-classes", metavar="FILE", help="all classes incl. unseen ones, e.g. classes_b.txt "
                   "(paths.all_classes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)

    q = subparsers.add_parser(
        "test",
        description="Classify every image of DATA/TestSetA (paths.test_dir) with the cascade saved by train and "
                    "write OUT/result.txt (`<file name> <top1> ... <top5>`, sorted by name) and "
                    "OUT/result_routes.csv (each image's route and top-5 scores; named after --result, e.g. "
                    "result_b_routes.csv). Unreadable images are listed too (fallback ranking) and reported in "
                    "OUT/result_unreadable.txt (named likewise).")
    add_config_arguments(q)
    q.add_argument("--test-dir", metavar="DIR", help="folder of test images (paths.test_dir, relative to the "
                   "data root)")
    q.add_argument("--result", metavar="FILE", help="result file (paths.result, relative to the out folder)")
    q.add_argument("--all-classes", metavar="FILE", help="as given to train (paths.all_classes)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_run_test)


def _run_train(args) -> int:
    cfg = config_from_args(args, {"sampling.shots": args.shots, "sampling.seed": args.seed,
                                  "sampling.list": args.train_list, "paths.all_classes": args.all_classes})
    if args.shots is not None and cfg.sampling.list:
        _log(f"--shots {args.shots} is ignored: the given list ({cfg.sampling.list}, sampling.list) sets the shots")
    def work():
        with writing(cfg.out_dir):  # a write that failed without a file name is reported under the out folder
            train(cfg, progress=not args.quiet)
        return 0

    return run_ranked("train", work)


def _run_test(args) -> int:
    cfg = config_from_args(args, {"paths.test_dir": args.test_dir, "paths.result": args.result,
                                  "paths.all_classes": args.all_classes})
    def work():
        with writing(cfg.out_dir):
            test(cfg, progress=not args.quiet)
        return 0

    return run_ranked("test", work)
