"""Does the cascade's lead generalise beyond the four shared tasks? Score every method on many variants of them.

    .venv/bin/python benchmarks/generalisation.py [TASK.npz ...] [--redraws 5] [--noise 0.5,1.0,1.5]
                                                  [--no-merge] [--query-frac 0.8] [--no-val] [--noise-seeds 1]
                                                  [--harder 0.5,0.8]
                                                  [--families 2] [--family-sizes 40,80,131] [--groups G1,G2]
                                                  [--only-merged] [--topics 2,3]
                                                  [--set KEY=VALUE ...] [--compare] [--by-task] [--json]
                                                  [--methods cascade,...] [--against BEFORE.jsonl]

Default tasks: benchmarks/realbench/*.npz. The suite it builds, all from real CLIP features (query labels are used
only to score, as in ``python -m cascade bench``):

* ``given``: each task as it is, plus (unless ``--no-merge``) one ``merged`` task joining every closed task into
  one larger task of several domains (classes, rows and text embeddings concatenated; e.g. Caltech-101 + Food-101
  + imagenet_dev = 185 classes), and one ``merged-open`` task joining every open task likewise (the seen classes
  of all first, then the unseen ones), as the challenge's class list joins four domains;
* ``redrawn``: each of those redrawn ``--redraws`` times with another seed: the support rows of every seen class
  drawn again (as many as it had) from its support + validation rows, the others becoming the validation rows,
  and a random ``--query-frac`` of the queries kept;
* ``noisy text``: each task redrawn once and its class text embeddings perturbed,
  ``t <- normalise(t + sigma g / sqrt(D))`` with Gaussian ``g``, for each ``--noise`` sigma. Zero-shot accuracy
  falls (to about 85-91 % at 0.5, 55-67 % at 1.0, 33-54 % at 1.5), standing in for harder tasks whose class names
  CLIP knows less well; support and query images are untouched. ``--noise-seeds N`` makes N such tasks per sigma
  and task (other redraws and noise draws; the first is the one made without the option).
* ``harder images`` (only with ``--harder S1,S2,...``): each task redrawn and every image feature moved towards the
  task's mean feature by ``s`` times its class's offset from it, ``x <- normalise(x - s (m_y - m))`` (``m_y``: the
  mean of all the task's rows of class y, ``m``: the mean of all its rows), for each ``s``: the classes overlap
  more, in the images and against the text (zero-shot falls to 83-90 % at 0.3, 68-81 % at 0.5, 38-43 % at 0.8),
  standing in for fine-grained tasks that CLIP separates poorly. The labels only build the task; no method sees query
  labels. ``--noise-seeds`` tasks per level and task, as for the text noise.

* ``classes`` and ``classes open`` (``--families N``, default 2; ``--family-sizes``, default 40,80,131): from every
  closed task with at least that many classes (imagenet_dev: 131 classes, 4 support, 1 validation and 2 query rows
  per class), N random class subsets of each size, each class's rows dealt again at random into the source's
  counts (support, validation and query rows drawn from the pooled rows of the class), and N open ones per size
  whose first 2/3 of the classes keep support and validation rows (the others are unseen, text only) - other
  seen/unseen splits than the given open task's. ``--family-source`` draws them from other task files than the
  ones given; ``--groups given,classes,...`` keeps only some groups (cheaper runs). ``--only-merged`` keeps only
  the merged tasks and those made from them: a change to the per-domain step changes no other task.

* ``topics`` (only with ``--topics K1,K2,...``): each single-domain task given (and ``--noise-seeds`` - 1 redraws
  of it) split into K domains by topic: its classes clustered by their text embeddings (k-means, seeded), each
  cluster named a domain. Unlike the merged tasks, whose domains come from different image sources, these domains
  share one source and differ only in what the classes are: the case where the cascade's domain classifier can
  learn nothing but the topic (names ``<task>%K``, ``<task>%K#r``).

``--no-val`` drops every task's validation rows after the suite is built (no method sees them: LP++ keeps its last
epoch, the cascade calibrates on its support rows out of fold), as for a submission that may use only the few
labelled shots.

``--set`` changes the ``cascade`` row (an ablation), in the configuration's own dialect (``--set`` of train/test;
values read as TOML, checked like a config): a stage's keyword ``stages.<stage>.<key>=VALUE``, e.g.
``stages.gda.shrinkage=0.3``, ``stages.gda.target=diagonal``, ``stages.gda.mean_prior=0``, ``stages.inmap.n_iter=2000``,
``stages.lpp.epochs=300``, ``stages.lpp.select=last``; the cascade's own keys ``stages.cascade.<key>=VALUE``, e.g.
``stages.cascade.refine=""`` (no refinement), ``stages.cascade.seen=["lpp", "zeroshot"]``, ``stages.cascade.prior=stage``,
``stages.cascade.routing=stage1``, ``stages.cascade.combine=replace``, ``stages.cascade.calibrate=false``,
``stages.cascade.cv_folds=0``, ``stages.cascade.refine_check=false``, ``stages.cascade.rebalance=false``,
``stages.cascade.balance=none|always|check|counts``, ``stages.cascade.balance_min_gain=0.05``,
``stages.cascade.balance_without_val=check`` (what "check" does without validation rows). The
stages start from the default cascade's own settings (cascade/configs/default.toml).

``--compare`` (with ``--set``) runs only two rows, the default cascade and the changed one, and prints per group
their mean top-1 and the paired difference (changed minus default: mean +- standard error over the tasks, and on
how many tasks it wins or loses): whether a change helps beyond the noise of single tasks. With many tasks, e.g.
``--redraws 20 --noise-seeds 4`` (165 tasks), it takes about a minute per row on 2 CPUs.

``--against BEFORE.jsonl`` pairs the same way a change that is not a setting (a new rule in the code): run the
suite at the commit before it with ``--json --methods cascade > BEFORE.jsonl`` (``--methods``: only those rows,
their mean top-1 per group), then the same suite options at the change with ``--against BEFORE.jsonl``.

For each task it prints top-1 per method; then, per group, the mean top-1 of each method, the mean difference of
the cascade to the best single method (zero-shot, InMaP either way, LP++) and to the seeds' cascade, and on how
many tasks the cascade beats each of them (strictly). ``--by-task`` adds the same summary per source task and level
(a group's tasks made from one task file with one noise sigma or overlap level, e.g. ``food101^0.5`` for
``food101^0.5#0`` .. ``#3``; with ``--compare``, the paired difference per source task and level): a group's mean can
hide one kind of task that the cascade loses. ``--json``: one JSON object per task, then a summary object (with
``--by-task``, its ``by_task`` entry).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade.bench import ROWS, evaluate_task, load_task  # noqa: E402
from cascade.metrics import top1_top5  # noqa: E402

SINGLE = ("zero-shot", "inmap", "inmap-nosinkhorn", "lpp")


def cascade_kwargs(settings) -> dict:
    """Cascade keyword arguments from ``--set`` strings in the configuration's dialect (see the module docstring),
    applied over the default cascade's own stages and checked against the stage registry and the declared
    constraints as a configuration file is."""
    from cascade.config import (CASCADE_STAGE_KEYS, CASCADE_TABLE, ConfigError, cascade_stage_names, parse_override,
                                validate_stages)
    from cascade.config import default_cascade
    from cascade.stages import get_stage, stage_name

    default = default_cascade()    # the stages' settings start from the default cascade's own (default.toml)
    tables = {stage_name(st): st.get_params() for st in (default.stages().transductive, *default.stages().seen,
                                                       default.stages().refine)}
    changed: dict = {CASCADE_TABLE: {}}
    try:
        for item in settings:
            parts, value = parse_override(item)
            if len(parts) != 3 or parts[0] != "stages":
                raise ConfigError(f"--set {item}: expected stages.<stage>.<key>=VALUE or stages.cascade.<key>=VALUE")
            changed.setdefault(parts[1], {})[parts[2]] = value
        validate_stages(changed)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    for name, table in changed.items():
        if name != CASCADE_TABLE:
            tables[name] = dict(tables.get(name, {}), **table)
    trans, seen, refine = cascade_stage_names(changed[CASCADE_TABLE])

    def build(name):
        return get_stage(name)(**tables.get(name, {}))

    kw = {k: v for k, v in changed[CASCADE_TABLE].items() if k not in CASCADE_STAGE_KEYS}
    kw.update(transductive=build(trans), seen_stages=[build(n) for n in seen], refine=build(refine) if refine else None)
    return kw


def merge(tasks: list[dict], names=None) -> dict:
    """One task of several domains from several tasks: every task's seen classes (task by task), then every
    task's unseen classes, rows and text embeddings concatenated and relabelled. ``class_domain`` names each
    class's source task (``names``, default ``task0``, ``task1``, ...): the cascade's per-domain step reads it
    (``python -m cascade bench`` tasks have none). For closed tasks the classes keep their order (the first
    task's, then the second's, ...)."""
    names = [f"task{i}" for i in range(len(tasks))] if names is None else list(names)
    parts = [k for k in ("support", "val", "query") if all(f"{k}_x" in t for t in tasks)]
    n_seen = sum(t["n_seen"] for t in tasks)
    out = {f"{k}_{a}": [] for k in parts for a in "xy"}
    seen_at, unseen_at, maps = 0, n_seen, []
    for t in tasks:
        C, S = t["text_x"].shape[0], t["n_seen"]
        maps.append(np.concatenate([seen_at + np.arange(S), unseen_at + np.arange(C - S)]))
        seen_at, unseen_at = seen_at + S, unseen_at + C - S
    C_all = unseen_at
    text = np.zeros((C_all, tasks[0]["text_x"].shape[1]), dtype=tasks[0]["text_x"].dtype)
    domain = [""] * C_all
    for t, m, name in zip(tasks, maps, names):
        text[m] = t["text_x"]
        for c in m:
            domain[c] = name
        for k in parts:
            out[f"{k}_x"].append(t[f"{k}_x"])
            out[f"{k}_y"].append(m[t[f"{k}_y"]])
    task = {k: np.concatenate(v) for k, v in out.items()}
    task.update(text_x=text, n_seen=n_seen, class_domain=np.array(domain))
    return task


def redraw(task: dict, seed: int, query_frac: float) -> dict:
    """Support rows of every seen class drawn again from its support + val rows (same count per class), the
    rest as val rows; a random ``query_frac`` of the queries."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([task["support_x"], task["val_x"]])
    y = np.concatenate([task["support_y"], task["val_y"]])
    sup, val = [], []
    for c in range(task["n_seen"]):
        shots = int(np.sum(task["support_y"] == c))
        idx = rng.permutation(np.flatnonzero(y == c))
        sup.extend(idx[:shots])
        val.extend(idx[shots:])
    sup, val = np.array(sup, dtype=np.int64), np.array(val, dtype=np.int64)
    n_q = len(task["query_y"])
    q = np.sort(rng.permutation(n_q)[:max(1, int(round(query_frac * n_q)))])
    return dict(task, support_x=X[sup], support_y=y[sup], val_x=X[val], val_y=y[val],
                query_x=task["query_x"][q], query_y=task["query_y"][q])


def noisy_text(task: dict, sigma: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    T = task["text_x"].astype(np.float64)
    T = T + sigma * rng.standard_normal(T.shape) / np.sqrt(T.shape[1])
    return dict(task, text_x=(T / np.linalg.norm(T, axis=1, keepdims=True)).astype(np.float32))


def harder_images(task: dict, s: float) -> dict:
    """Every image row moved towards the task's mean row by ``s`` times its class's offset, then re-normalised
    (query labels are read to build the task, as they are to score it; no method sees them)."""
    parts = ("support", "val", "query")
    X = np.concatenate([task[f"{k}_x"] for k in parts if f"{k}_x" in task]).astype(np.float64)
    y = np.concatenate([task[f"{k}_y"] for k in parts if f"{k}_x" in task])
    means = np.zeros((task["text_x"].shape[0], X.shape[1]))
    for c in np.unique(y):
        means[c] = X[y == c].mean(axis=0)
    centre = X.mean(axis=0)
    out = dict(task)
    for k in parts:
        if f"{k}_x" in task:
            Z = task[f"{k}_x"].astype(np.float64) - s * (means[task[f"{k}_y"]] - centre)
            out[f"{k}_x"] = (Z / np.linalg.norm(Z, axis=1, keepdims=True)).astype(np.float32)
    return out


def topic_domains(task: dict, k: int, seed: int) -> dict:
    """``task`` with ``class_domain``: its classes clustered into ``k`` topics by their text embeddings (scikit-learn's
    k-means, seeded), domain ``topic<j>`` for cluster j. A task that already has domains keeps them."""
    from sklearn.cluster import KMeans

    C = task["text_x"].shape[0]
    if not 2 <= k <= C:
        raise ValueError(f"a topic split needs 2..{C} domains, got {k}")
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(task["text_x"].astype(np.float64))
    return dict(task, class_domain=np.array([f"topic{j}" for j in labels]))


def class_family(task: dict, n_classes: int, seed: int, n_seen: int | None = None) -> dict:
    """A task drawn from a closed task's pool of rows: ``n_classes`` of its classes (a seeded random subset, in
    random order), every row of them (support, validation and query rows together) dealt again per class into
    as many support, validation and query rows as the source has for that class (so the counts stay those of
    the source: 4 / 1 / 2 per class for imagenet_dev), and, with ``n_seen``, only the first ``n_seen`` classes
    keeping support and validation rows (an open task; its other classes are unseen, text only)."""
    if task["n_seen"] != task["text_x"].shape[0]:
        raise ValueError("class families are drawn from a closed task (every class seen)")
    rng = np.random.default_rng(seed)
    C = task["text_x"].shape[0]
    if not 2 <= n_classes <= C:
        raise ValueError(f"a class family needs 2..{C} classes, got {n_classes}")
    n_seen = n_classes if n_seen is None else int(n_seen)
    if not 1 <= n_seen <= n_classes:
        raise ValueError(f"n_seen must lie in 1..{n_classes}, got {n_seen}")
    parts = ("support", "val", "query")
    X = np.concatenate([task[f"{k}_x"] for k in parts])
    y = np.concatenate([task[f"{k}_y"] for k in parts])
    classes = rng.permutation(C)[:n_classes]
    rows = {k: ([], []) for k in parts}
    for new, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for k in parts:
            n = int(np.sum(task[f"{k}_y"] == c))
            if k != "query" and new >= n_seen:      # an unseen class: its support and val rows are dropped
                start += n
                continue
            take = idx[start:start + n]
            start += n
            rows[k][0].append(take)
            rows[k][1].append(np.full(take.size, new, dtype=np.int64))
    out = {"text_x": task["text_x"][classes], "n_seen": n_seen}
    for k in parts:
        idx = np.concatenate(rows[k][0])
        out[f"{k}_x"], out[f"{k}_y"] = X[idx], np.concatenate(rows[k][1])
    return out


def class_families(paths, sizes, draws: int, open_frac: float = 2 / 3):
    """The class-subset families of every closed task among ``paths`` with at least the largest size's classes:
    per size, ``draws`` closed tasks (group ``classes``) and ``draws`` open ones with ``round(open_frac * n)``
    seen classes (group ``classes open``), each from another seed (other classes, other rows, another seen/unseen
    split). Names: ``<task>/<size>@<draw>`` and ``<task>/<size>o@<draw>``."""
    suite = []
    for path in paths:
        task = load_task(path)
        C = task["text_x"].shape[0]
        if task["n_seen"] != C or "val_x" not in task or C < max(sizes):
            continue
        name = Path(path).stem
        for n in sizes:
            for r in range(draws):
                suite.append(("classes", f"{name}/{n}@{r}", class_family(task, n, 3000 + 97 * n + r)))
        for n in sizes:
            for r in range(draws):
                seen = max(1, int(round(open_frac * n)))
                suite.append(("classes open", f"{name}/{n}o@{r}", class_family(task, n, 4000 + 97 * n + r, seen)))
    return suite


def build_suite(paths, redraws: int, noise, query_frac: float, merged: bool, noise_seeds: int = 1, harder=(),
                family_sizes=(), family_draws: int = 0, family_paths=None, topics=()):
    base = [(Path(p).stem, load_task(p)) for p in paths]
    closed = [(n, t) for n, t in base if t["n_seen"] == t["text_x"].shape[0]]
    opened = [(n, t) for n, t in base if t["n_seen"] < t["text_x"].shape[0]]
    for label, group in (("merged", closed), ("merged-open", opened)):
        if merged and len(group) >= 2 and len({t["text_x"].shape[1] for _, t in group}) == 1:
            base.append((label, merge([t for _, t in group], [n for n, _ in group])))
    suite = [("given", name, t) for name, t in base]
    for name, t in base:
        for r in range(redraws):
            suite.append(("redrawn", f"{name}@{r}", redraw(t, 1000 + r, query_frac)))
    for sigma in noise:
        for name, t in base:
            for r in range(noise_seeds):
                label = f"{name}~{sigma:g}" + (f"#{r}" if noise_seeds > 1 else "")
                suite.append(("noisy text", label, noisy_text(redraw(t, 77 + r, query_frac), sigma, 7 + r)))
    for s in harder:
        for name, t in base:
            for r in range(noise_seeds):
                label = f"{name}^{s:g}" + (f"#{r}" if noise_seeds > 1 else "")
                suite.append(("harder images", label, harder_images(redraw(t, 500 + r, query_frac), s)))
    for k in topics:
        for name, t in base:
            if "class_domain" in t or t["text_x"].shape[0] < 2 * k:
                continue
            for r in range(noise_seeds):
                label = f"{name}%{k}" + (f"#{r}" if noise_seeds > 1 else "")
                suite.append(("topics", label, topic_domains(t if r == 0 else redraw(t, 900 + r, query_frac), k,
                                                             11 + r)))
    if family_sizes and family_draws > 0:
        suite.extend(class_families(paths if family_paths is None else family_paths, family_sizes, family_draws))
    return suite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("tasks", nargs="*", help="task files (default: benchmarks/realbench/*.npz)")
    p.add_argument("--redraws", type=int, default=5, help="redrawn versions of each task (default 5)")
    p.add_argument("--noise", default="0.5,1.0,1.5", help="text-noise sigmas, comma-separated ('' for none)")
    p.add_argument("--query-frac", type=float, default=0.8, help="share of the queries a redrawn task keeps")
    p.add_argument("--no-merge", action="store_true", help="no merged task")
    p.add_argument("--no-val", action="store_true", help="drop the validation rows of every task")
    p.add_argument("--noise-seeds", type=int, default=1,
                   help="noisy-text (and harder-image) tasks per level and task (default 1)")
    p.add_argument("--harder", default="", help="class-overlap levels s in [0, 1) of the 'harder images' group, "
                                                "comma-separated, e.g. 0.5,0.8 (default: none)")
    p.add_argument("--topics", default="", help="domain counts K of the 'topics' group, comma-separated: every "
                   "single-domain task split into K domains by clustering its class names (default: none)")
    p.add_argument("--families", type=int, default=2,
                   help="class-subset tasks per size and kind (closed, open) drawn from each closed task with "
                        "enough classes, e.g. imagenet_dev (default 2; 0: none)")
    p.add_argument("--family-sizes", default="40,80,131",
                   help="class counts of the class-subset families, comma-separated (default 40,80,131)")
    p.add_argument("--family-source", action="append", default=None, metavar="TASK.npz",
                   help="closed task(s) the families are drawn from (default: the task files given)")
    p.add_argument("--groups", default="",
                   help="keep only these groups, comma-separated (given, redrawn, noisy text, harder images, "
                        "classes, classes open); default: all")
    p.add_argument("--only-merged", action="store_true",
                   help="keep only the merged tasks and those made from them (the only tasks of several domains: "
                        "a change to the per-domain step changes nothing else)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the cascade row (repeatable), e.g. --set 'stages.cascade.refine=\"\"' --set "
                        "stages.inmap.n_iter=2000")
    p.add_argument("--compare", action="store_true",
                   help="only the default cascade and the --set one: their paired difference per group")
    p.add_argument("--by-task", action="store_true",
                   help="also summarise per source task and level (e.g. food101^0.5: its redraws together)")
    p.add_argument("--json", action="store_true", help="one JSON object per task, then a summary object")
    p.add_argument("--methods", default=",".join(ROWS),
                   help=f"rows to score, comma-separated (default: all, {','.join(ROWS)}); the summary against the "
                        "best single method needs them all")
    p.add_argument("--against", metavar="BEFORE.jsonl",
                   help="pair this run's cascade (with any --set) with the cascade row of an earlier --json output "
                        "of the same suite, e.g. made at an earlier commit: the paired summary of --compare, for a "
                        "change that is not a setting")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ROWS for m in methods):
        p.error(f"--methods: choose from {', '.join(ROWS)}")
    if args.compare and args.against:
        p.error("--compare and --against: choose one")
    paths = args.tasks or sorted(str(x) for x in (ROOT / "benchmarks" / "realbench").glob("*.npz"))
    try:
        noise = [float(s) for s in args.noise.split(",") if s.strip()]
        harder = [float(s) for s in args.harder.split(",") if s.strip()]
    except ValueError as exc:
        p.error(f"--noise / --harder: {exc}")
    if any(not 0 <= s < 1 for s in harder):
        p.error("--harder levels must lie in [0, 1)")
    if not 0 < args.query_frac <= 1:
        p.error("--query-frac must lie in (0, 1]")
    if args.noise_seeds < 1:
        p.error("--noise-seeds must be at least 1")
    try:
        sizes = [int(s) for s in args.family_sizes.split(",") if s.strip()]
        topics = [int(s) for s in args.topics.split(",") if s.strip()]
    except ValueError as exc:
        p.error(f"--family-sizes / --topics: {exc}")
    if any(k < 2 for k in topics):
        p.error("--topics: at least 2 domains each")
    if args.families < 0 or any(n < 2 for n in sizes):
        p.error("--families must be >= 0 and --family-sizes at least 2 classes each")
    before = read_before(args.against, p) if args.against else None
    if args.compare and not args.set:
        p.error("--compare needs a change to compare with the default (--set KEY=VALUE)")
    kwargs = cascade_kwargs(args.set)
    try:
        suite = build_suite(paths, args.redraws, noise, args.query_frac, not args.no_merge, args.noise_seeds,
                            harder, sizes, args.families, args.family_source, topics)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if groups:
        known = {g for g, _, _ in suite}
        unknown = [g for g in groups if g not in known]
        if unknown:
            p.error(f"--groups: no task in group(s) {unknown} (this suite has {sorted(known)})")
        suite = [item for item in suite if item[0] in groups]
    if args.only_merged:
        suite = [item for item in suite if item[1].startswith("merged")]
        if not suite:
            p.error("--only-merged: this suite has no merged task (--no-merge, or fewer than two tasks of a kind)")
    if args.no_val:
        for _, _, task in suite:
            task.pop("val_x"), task.pop("val_y")
    if args.compare or before is not None:
        return compare(suite, kwargs, args, before)
    t0 = time.perf_counter()
    rows = []
    if not args.json:
        print(f"{len(suite)} tasks; top-1 % on the queries ({os.cpu_count()} CPUs)"
              + ("; no validation rows" if args.no_val else "")
              + (f"; cascade row with {' '.join(args.set)}" if args.set else ""))
        print(f"{'group':<14}{'task':<22}" + "".join(f"{m:>17}" for m in methods))
    for group, name, task in suite:
        labels = task.pop("query_y")
        scores = evaluate_task(task, methods, kwargs)
        top1 = {m: top1_top5(s, labels)["top1"] for m, s in scores.items()}
        rows.append((group, name, top1))
        if args.json:
            print(json.dumps({"group": group, "task": name, "n_query": int(len(labels)), "top1": top1}), flush=True)
        else:
            print(f"{group:<14}{name:<22}" + "".join(f"{top1[m]:>17.2f}" for m in methods), flush=True)
    if set(methods) != set(ROWS):        # some rows only: their mean top-1 per group, nothing to compare
        means = {group: {"tasks": sum(g == group for g, _, _ in rows),
                         "mean_top1": {m: round(float(np.mean([r[m] for g, _, r in rows if g == group])), 2)
                                       for m in methods}}
                 for group in dict.fromkeys(g for g, _, _ in rows)}
        if args.json:
            print(json.dumps({"summary": means, "seconds": round(time.perf_counter() - t0, 1)}))
            return 0
        print(f"\nmean top-1 per group ({time.perf_counter() - t0:.0f} s)")
        print(f"{'group':<14}{'tasks':>6}" + "".join(f"{m:>17}" for m in methods))
        for group, s in means.items():
            print(f"{group:<14}{s['tasks']:>6}" + "".join(f"{s['mean_top1'][m]:>17.2f}" for m in methods))
        return 0
    summary = {group: _method_summary([r for g, _, r in rows if g == group])
               for group in dict.fromkeys(g for g, _, _ in rows)}
    by_task = ({(group, family(name)): _method_summary([r for g, n, r in rows if g == group
                                                        and family(n) == family(name)])
                for group, name, _ in rows} if args.by_task else {})
    if args.json:
        out = {"summary": summary, "seconds": round(time.perf_counter() - t0, 1)}
        if args.by_task:
            out["by_task"] = [dict(group=g, task=f, **s) for (g, f), s in by_task.items()]
        print(json.dumps(out))
        return 0
    print(f"\nmean top-1 per group ({time.perf_counter() - t0:.0f} s)")
    print(f"{'group':<14}{'tasks':>6}" + "".join(f"{m:>17}" for m in ROWS))
    for group, s in summary.items():
        print(f"{group:<14}{s['tasks']:>6}" + "".join(f"{s['mean_top1'][m]:>17.2f}" for m in ROWS))
    print("\ncascade against the best single method (zero-shot, InMaP either way, LP++) and the seeds' cascade")
    for group, s in summary.items():
        n = s["tasks"]
        print(f"  {group:<14} best single: {s['cascade_minus_best_single']:+.2f} points on average, beats it on "
              f"{s['cascade_beats_best_single']}/{n};  seeds' cascade: {s['cascade_minus_seed_cascade']:+.2f}, "
              f"beats it on {s['cascade_beats_seed_cascade']}/{n}")
    if args.by_task:
        print("\nper source task and level: mean top-1, then the cascade minus the best single method of each task "
              "(mean; tasks where the cascade beats it)")
        print(f"{'group':<14}{'task':<20}{'tasks':>6}" + "".join(f"{m:>17}" for m in ROWS)
              + f"{'vs best':>9}{'beats':>7}")
        for (group, fam), s in by_task.items():
            print(f"{group:<14}{fam:<20}{s['tasks']:>6}" + "".join(f"{s['mean_top1'][m]:>17.2f}" for m in ROWS)
                  + f"{s['cascade_minus_best_single']:>+9.2f}"
                  + f"{str(s['cascade_beats_best_single']) + '/' + str(s['tasks']):>7}")
    return 0


def family(name: str) -> str:
    """A task's source task and level: its name without the redraw (``@r``) or draw (``#r``) suffix."""
    return name.split("@")[0].split("#")[0]


def _method_summary(sel: list) -> dict:
    """Mean top-1 per method over tasks ``sel`` (dicts method -> top-1) and the cascade against the best single
    method and the seeds' cascade of each task."""
    best = np.array([max(r[m] for m in SINGLE) for r in sel])
    casc = np.array([r["cascade"] for r in sel])
    seed = np.array([r["seed-cascade"] for r in sel])
    return {
        "tasks": len(sel),
        "mean_top1": {m: round(float(np.mean([r[m] for r in sel])), 2) for m in ROWS},
        "cascade_minus_best_single": round(float(np.mean(casc - best)), 2),
        "cascade_beats_best_single": int(np.sum(casc > best)),
        "cascade_minus_seed_cascade": round(float(np.mean(casc - seed)), 2),
        "cascade_beats_seed_cascade": int(np.sum(casc > seed)),
    }


def read_before(path: str, parser) -> dict:
    """{(group, task): the cascade's top-1} of an earlier ``--json`` output (``--against``)."""
    before = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "summary" in rec:
                    continue
                if "cascade" not in rec.get("top1", {}):
                    parser.error(f"--against {path}, line {n}: no cascade top-1 (a --json output of a run that "
                                 "scored the cascade row is needed)")
                before[(rec["group"], rec["task"])] = float(rec["top1"]["cascade"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--against {path}: {exc}")
    if not before:
        parser.error(f"--against {path}: no task records")
    return before


def compare(suite, kwargs: dict, args, before: dict | None = None) -> int:
    """The default cascade against the ``--set`` one on every task: paired differences per group. ``before``
    (``--against``): the first of each pair read from an earlier run, {(group, task): top-1}, instead of scored."""
    default = cascade_kwargs([])
    change = " ".join(args.set)
    first = "the default cascade"          # what the change is paired with
    if before is not None:
        missing = [f"{g}/{n}" for g, n, _ in suite if (g, n) not in before]
        if missing:
            raise SystemExit(f"--against {args.against}: no record of {len(missing)} task(s) of this suite, e.g. "
                             f"{missing[0]} (run it with the same suite options)")
        change, first = f"this run{' with ' + change if change else ''}", f"the cascade of {args.against}"
    t0 = time.perf_counter()
    if not args.json:
        print(f"{len(suite)} tasks; top-1 % on the queries ({os.cpu_count()} CPUs)"
              + ("; no validation rows" if args.no_val else "") + f"; {first} against {change}")
        heads = ("default", "changed") if before is None else ("before", "now")
        print(f"{'group':<14}{'task':<24}{heads[0]:>10}{heads[1]:>10}{'diff':>8}")
    rows = []
    for group, name, task in suite:
        labels = task.pop("query_y")
        a = (before[(group, name)] if before is not None
             else top1_top5(evaluate_task(task, ("cascade",), default)["cascade"], labels)["top1"])
        b = top1_top5(evaluate_task(task, ("cascade",), kwargs)["cascade"], labels)["top1"]
        rows.append((group, name, a, b))
        if args.json:
            print(json.dumps({"group": group, "task": name, "n_query": int(len(labels)), "default": a,
                              "changed": b}), flush=True)
        else:
            print(f"{group:<14}{name:<24}{a:>10.2f}{b:>10.2f}{b - a:>+8.2f}", flush=True)
    summary = {group: _paired_summary([r for r in rows if r[0] == group])
               for group in dict.fromkeys(r[0] for r in rows)}
    by_task = ({(r[0], family(r[1])): _paired_summary([q for q in rows if q[0] == r[0]
                                                       and family(q[1]) == family(r[1])])
                for r in rows} if args.by_task else {})
    if args.json:
        out = {"summary": summary, "change": change, "seconds": round(time.perf_counter() - t0, 1)}
        if args.by_task:
            out["by_task"] = [dict(group=g, task=f, **s) for (g, f), s in by_task.items()]
        print(json.dumps(out))
        return 0
    print(f"\n{change} against {first}, per group ({time.perf_counter() - t0:.0f} s): mean top-1, "
          "paired difference (mean +- standard error), tasks won / lost")
    for group, s in summary.items():
        print(f"  {group:<14}{s['tasks']:>4} tasks  {s['default']:6.2f} -> {s['changed']:6.2f}  "
              f"{s['diff']:+.3f} +- {s['diff_se']:.3f}  won {s['wins']}, lost {s['losses']}")
    if args.by_task:
        print("per source task and level:")
        for (group, fam), s in by_task.items():
            print(f"  {group:<14}{fam:<20}{s['tasks']:>4} tasks  {s['default']:6.2f} -> {s['changed']:6.2f}  "
                  f"{s['diff']:+.3f} +- {s['diff_se']:.3f}  won {s['wins']}, lost {s['losses']}")
    return 0


def _paired_summary(sel: list) -> dict:
    """Mean top-1 of the default and the changed cascade over rows ``(group, task, default, changed)`` and their
    paired difference (mean, standard error; nan for a single task), tasks won and lost."""
    a = np.array([r[2] for r in sel])
    b = np.array([r[3] for r in sel])
    d = b - a
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"tasks": len(d), "default": round(float(a.mean()), 2), "changed": round(float(b.mean()), 2),
            "diff": round(float(d.mean()), 3), "diff_se": round(se, 3), "wins": int(np.sum(d > 0)),
            "losses": int(np.sum(d < 0))}

if __name__ == "__main__":
    sys.exit(main())
