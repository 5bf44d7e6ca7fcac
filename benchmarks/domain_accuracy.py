"""How often is a query of a merged task given its own domain? The per-domain step's first decision, measured.

    .venv/bin/python benchmarks/domain_accuracy.py [TASK.npz ...] [--redraws 3] [--noise 0.5,1.0] [--harder 0.3,0.5]
                                                   [--noise-seeds 2] [--no-val] [--c 1,10,100] [--weights 0,0.5,1]

The tasks are ``generalisation.py``'s merged tasks and those made from them (given, redrawn, noisy text, harder
images; same options, same seeds). For each, the default cascade's inductive experts (zero-shot and LP++, pooled
with the exponents it fits for its marginal estimate) give each query a mass per domain, and the domain
classifier of ``cascade/router/domains.py`` is fitted on the labelled rows (support and, unless ``--no-val``,
validation rows) with each ``--c``. Printed per group and kind (closed / open): the share of queries (%) whose
most probable domain is their own, by the mass alone (``mass``), by each classifier alone (``clf C``) and by
``mass ** w * classifier`` for each ``--weights`` w and C (``w@C``). Query labels only score.

``--per-source`` also fits the default cascade (per-domain, with its classifier) on each given merged task and
prints, per source domain, its queries' top-1, the share of them given another domain, and what that domain's
own cascade decided (balanced or not, and the balancing check's gain) - where what the domain step still loses
is seen.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generalisation import build_suite  # noqa: E402

from cascade.bench import BACKBONE  # noqa: E402
from cascade.config import default_cascade  # noqa: E402
from cascade.router.domains import domain_mass, domain_posterior, fit_domain_classifier  # noqa: E402
from cascade.router.pool import pool  # noqa: E402


def _floats(text: str, what: str, parser) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what}: comma-separated numbers expected, got {text!r}")


def task_accuracy(task: dict, Cs, weights, use_val: bool = True) -> dict:
    """{rule: % of the task's queries given their own domain} (see the module docstring)."""
    names = list(dict.fromkeys(task["class_domain"].tolist()))
    cd = np.array([names.index(d) for d in task["class_domain"]])
    val = ({BACKBONE: task["val_x"]}, task["val_y"]) if use_val and "val_x" in task else None
    m = default_cascade().set_params(per_domain=False)
    m.fit({BACKBONE: task["support_x"]}, task["support_y"], {BACKBONE: task["text_x"]}, task["n_seen"], val=val)
    feats = {BACKBONE: task["query_x"]}
    inductive = pool(m._zero_shot_log_proba(m._joint(feats)), m._seen_log_proba(feats), m.n_seen_, m.combine,
                     weights=m.inductive_pool_)
    mass = domain_mass(inductive, cd, len(names))
    truth = cd[task["query_y"]]
    x, y = [task["support_x"]], [task["support_y"]]
    if val is not None:
        x.append(task["val_x"])
        y.append(task["val_y"])
    x, y = np.concatenate(x), cd[np.concatenate(y)]
    xq = task["query_x"]
    out = {"mass": 100 * np.mean(mass.argmax(1) == truth)}
    for C in Cs:
        clf = fit_domain_classifier(x, y, C=C)
        out[f"clf {C:g}"] = 100 * np.mean(domain_posterior(mass, clf, xq, 0.0).argmax(1) == truth)
        for w in weights:
            if w > 0:
                out[f"{w:g}@{C:g}"] = 100 * np.mean(domain_posterior(mass, clf, xq, w).argmax(1) == truth)
    return out


def per_source(task: dict, label: str, use_val: bool = True) -> None:
    """The default cascade on ``task``: per source domain, top-1 of its queries, % sent to another domain and its
    domain cascade's balancing verdict."""
    val = ({BACKBONE: task["val_x"]}, task["val_y"]) if use_val and "val_x" in task else None
    m = default_cascade().fit({BACKBONE: task["support_x"]}, task["support_y"], {BACKBONE: task["text_x"]},
                              task["n_seen"], val=val, domains=task["class_domain"])
    res = m.predict({BACKBONE: task["query_x"]})
    y, pred, dom = task["query_y"], res.scores.argmax(1), task["class_domain"]
    print(f"{label}: top-1 {100 * np.mean(pred == y):.2f}")
    entries = {e["domain"]: e for e in res.details.get("domains", [])}
    for name in dict.fromkeys(dom.tolist()):
        mine = dom[y] == name
        e = entries.get(name, {})
        verdict = "global scores"
        if e.get("rescored"):
            verdict = ("balanced part of the way (count rule)" if e.get("balance_few") else "balanced"
                       ) if e.get("balanced") else "not balanced"
            if e.get("balance_gain") is not None:
                verdict += f", check's gain {e['balance_gain']:+.3f}"
        print(f"  {name:<16} {int(mine.sum()):>5} queries  top-1 {100 * np.mean(pred[mine] == y[mine]):6.2f}  "
              f"sent to another domain {100 * np.mean(dom[pred[mine]] != name):5.2f} %  "
              f"its cascade: {e.get('n_queries', 0)} queries, {verdict}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("tasks", nargs="*", help="task files (default: benchmarks/realbench/*.npz)")
    p.add_argument("--redraws", type=int, default=3, help="redrawn versions of each merged task (default 3)")
    p.add_argument("--noise", default="0.5,1.0", help="text-noise sigmas, comma-separated ('' for none)")
    p.add_argument("--harder", default="0.3,0.5", help="class-overlap levels of the harder images ('' for none)")
    p.add_argument("--noise-seeds", type=int, default=2, help="noisy-text and harder-image tasks per level")
    p.add_argument("--query-frac", type=float, default=0.8, help="share of the queries a redrawn task keeps")
    p.add_argument("--no-val", action="store_true", help="no validation rows (the classifier sees the support rows)")
    p.add_argument("--c", default="1,10", help="the classifier's inverse regularisations C (default 1,10)")
    p.add_argument("--weights", default="0.5,1", help="exponents w of the mass in mass ** w * classifier")
    p.add_argument("--per-source", action="store_true",
                   help="also the default cascade's top-1 per source domain of each given merged task")
    a = p.parse_args(argv)
    Cs, weights = _floats(a.c, "--c", p), _floats(a.weights, "--weights", p)
    noise, harder = _floats(a.noise, "--noise", p), _floats(a.harder, "--harder", p)
    if not Cs or any(c <= 0 for c in Cs) or any(w < 0 for w in weights) or a.noise_seeds < 1:
        p.error("--c must be positive, --weights non-negative, --noise-seeds at least 1")
    paths = a.tasks or sorted(str(x) for x in (ROOT / "benchmarks" / "realbench").glob("*.npz"))
    suite = build_suite(paths, a.redraws, noise, a.query_frac, True, a.noise_seeds, harder)
    suite = [item for item in suite if item[1].startswith("merged")]
    if not suite:
        p.error("no merged task: give at least two closed (or two open) task files with the same feature size")
    print(f"{len(suite)} merged tasks; % of queries given their own domain"
          + ("; no validation rows" if a.no_val else "") + f" ({os.cpu_count()} CPUs)")
    rows = {}
    for group, name, task in suite:
        acc = task_accuracy(task, Cs, weights, use_val=not a.no_val)
        rows.setdefault((group, "open" if name.startswith("merged-open") else "closed"), []).append(acc)
    keys = list(next(iter(rows.values()))[0])
    print(f"{'group':<14}{'kind':<8}{'tasks':>6}" + "".join(f"{k:>10}" for k in keys))
    for (group, kind), accs in rows.items():
        print(f"{group:<14}{kind:<8}{len(accs):>6}" + "".join(f"{np.mean([r[k] for r in accs]):>10.2f}" for k in keys))
    if a.per_source:
        for group, name, task in suite:
            if group == "given":
                per_source(task, name, use_val=not a.no_val)
    return 0


if __name__ == "__main__":
    sys.exit(main())
