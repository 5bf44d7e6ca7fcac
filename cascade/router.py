"""The cascade: which stage sees which query, and how their scores combine.

``Cascade`` chains
1. a transductive stage over ALL classes (default: InMaP with an estimated class marginal) fitted on the
   query set itself at ``predict`` time;
2. inductive stages over the SEEN classes (default: LP++), fitted on the support rows per backbone at
   ``fit`` time, their logits combined across backbones with ``backbone_weights``;
3. optional specialists that re-rank the queries routed to their domain.

Routing: a query whose best class under stage 1 is unseen keeps stage 1's ranking (route ``"unseen"``).
Every other query (route ``"seen"``) gets, for the seen classes,
``P1(seen | x) * softmax(t * (log p1(c|x) + beta * sum_s log p_s(c|x)))`` (a product of experts whose
probabilities use temperatures calibrated on held-out labelled rows; the product's own temperature ``t`` is
fitted on the validation rows too, else 1; ``beta`` in [0, 1], the weight of the
inductive experts, maximises the log-likelihood of the validation rows when ``fit`` was given some, else
1; see docs/stages.md) and keeps stage 1's probabilities
for the unseen classes, so each row is a distribution over all classes and top-5 lists may include unseen
classes. With ``combine="replace"`` the seen block is stage-2 alone (the seeds' cascade).

Several CLIP backbones: the transductive stage runs once on the concatenation of the backbones' features
scaled by ``sqrt(w_b)`` (text likewise), so its logits are the weighted sum of per-backbone cosine
similarities and the rows stay unit-norm; each inductive stage is fitted per backbone and its logits summed
with the same weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .stages.base import (Stage, check_features, check_labels, load_npz_json, log_softmax,
                          save_npz_json, softmax)
from .stages.inmap import InMaP, fit_temperature
from .stages.lpp import LinearProbePP

ROUTE_UNSEEN = "unseen"
ROUTE_SEEN = "seen"


@dataclass
class CascadeResult:
    """Output of :meth:`Cascade.predict`."""
    scores: np.ndarray                 # [N, C] probabilities (rows sum to 1)
    top5: np.ndarray                   # [N, k] class indices, best first (k = min(5, C)), distinct
    route: list                        # per query: "unseen", "seen" or "specialist:<name>"
    details: dict = field(default_factory=dict)   # diagnostics (prior, temperatures, steps)


def _clone(stage: Stage) -> Stage:
    return type(stage)(**stage.get_params())


def _as_dict(name: str, value) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict of feature arrays keyed by backbone name")
    return value


class Cascade:
    """Routed cascade of stages (see the module docstring).

    Parameters
    ----------
    transductive : Stage
        Stage over all classes fitted on the queries; ``fit(X, text=..., support_x=..., support_y=...)``.
        Default ``InMaP(prior="auto", n_iter=200, tol=1e-5)``: at most 200 proxy steps (on the real
        tasks the arg-max has settled by then while the authors' 2000 steps cost 10x more; see
        docs/stages.md, "Speed").
    seen_stages : sequence of Stage
        Inductive stages over the seen classes; ``fit(X, y, text=..., val=...)``. Default
        ``[LinearProbePP(select="last")]``.
    backbone_weights : dict or None
        Weight per CLIP backbone (normalised to sum 1); None = equal weights over the backbones present
        in both ``support`` and ``text``.
    combine : "product" | "replace"
        How seen-routed queries are scored (see the module docstring).
    calibrate : bool
        Fit each expert's temperature by maximum likelihood on held-out labelled rows: the validation rows
        when given to ``fit`` (for the inductive stages), the support rows for the transductive stage (it
        never sees their labels). Without validation rows the inductive stages keep temperature 1. With
        validation rows, ``predict`` also chooses the inductive experts' weight ``beta`` on them.
    specialists : sequence
        Objects with ``classes_``, ``feature_key`` (or ``query_key``, preferred when present), ``name``
        (optional) and ``rerank(probs, X)``. The query dict's entry for that key is either a feature array
        [N, D] or a callable ``rows -> [len(rows), D]`` that computes features for the queries routed to the
        specialist only (so an expensive backbone runs on those images alone).
    """

    def __init__(self, transductive: Stage | None = None, seen_stages=None, backbone_weights=None,
                 combine: str = "product", calibrate: bool = True, specialists=()):
        if transductive is None:
            transductive = InMaP(prior="auto", n_iter=200, tol=1e-5)
        self.transductive = transductive
        self.seen_stages = list(seen_stages) if seen_stages is not None else [LinearProbePP(select="last")]
        self.backbone_weights = backbone_weights
        self.combine = combine
        self.calibrate = calibrate
        self.specialists = list(specialists)

    # ------------------------------------------------------------------------------------------------
    def fit(self, support: dict, support_y, text: dict, n_seen: int, val=None) -> "Cascade":
        """Fit the inductive stages on the support rows.

        support: {backbone: [Ns, D_b]}; support_y: [Ns] labels in 0..n_seen-1; text: {backbone: [C, D_b]}
        (seen classes first); val: optional ``({backbone: [Nv, D_b]}, labels)`` for model selection and
        calibration only.
        """
        if self.combine not in ("product", "replace"):
            raise ValueError(f"combine must be 'product' or 'replace', got {self.combine!r}")
        support = _as_dict("support", support)
        text = _as_dict("text", text)
        keys = [k for k in text if k in support]
        if not keys:
            raise ValueError(f"no backbone is in both support ({sorted(support)}) and text ({sorted(text)})")
        n_classes = None
        texts, sups = {}, {}
        for k in keys:
            texts[k] = check_features(text[k], f"text[{k!r}]")
            if n_classes is None:
                n_classes = texts[k].shape[0]
            elif texts[k].shape[0] != n_classes:
                raise ValueError(f"text[{k!r}] has {texts[k].shape[0]} classes, another backbone has "
                                 f"{n_classes}")
            sups[k] = check_features(support[k], f"support[{k!r}]", dim=texts[k].shape[1])
        n_rows = {k: v.shape[0] for k, v in sups.items()}
        if len(set(n_rows.values())) != 1:
            raise ValueError(f"support backbones have different row counts: {n_rows}")
        if not isinstance(n_seen, (int, np.integer)) or not 1 <= int(n_seen) <= n_classes:
            raise ValueError(f"n_seen must be an integer in 1..{n_classes}, got {n_seen!r}")
        n_seen = int(n_seen)
        y = check_labels(support_y, next(iter(n_rows.values())), n_seen, "support_y", require_all=True)
        weights = self._weights(keys)
        val_sets = None
        if val is not None:
            vfeat, vy = val
            vfeat = _as_dict("val features", vfeat)
            val_sets = {}
            for k in keys:
                if k not in vfeat:
                    raise ValueError(f"val features lack backbone {k!r}")
                val_sets[k] = check_features(vfeat[k], f"val[{k!r}]", dim=texts[k].shape[1])
            vy = check_labels(vy, next(iter(val_sets.values())).shape[0], n_seen, "val_y", require_all=False)

        fitted = []
        for proto in self.seen_stages:
            per_backbone = {}
            for k in keys:
                st = _clone(proto)
                kw = {}
                if val_sets is not None and "val" in _fit_kwargs(st):
                    kw["val"] = (val_sets[k], vy)
                per_backbone[k] = st.fit(sups[k], y, text=texts[k][:n_seen], **kw)
            fitted.append(per_backbone)
        temps = [1.0] * len(fitted)
        if self.calibrate and val_sets is not None:
            for i, per_backbone in enumerate(fitted):
                z = self._combined_logits(per_backbone, val_sets, weights)
                temps[i] = fit_temperature(z, vy)
        self.backbones_ = keys
        self.weights_ = weights
        self.n_classes_ = int(n_classes)
        self.n_seen_ = n_seen
        self.text_ = texts
        self.support_ = sups
        self.support_y_ = y
        # labelled held-out rows, kept to weigh the experts at predict time (calibrate=True only)
        self.val_ = val_sets if (self.calibrate and val_sets is not None) else None
        self.val_y_ = vy if self.val_ is not None else None
        self.seen_fitted_ = fitted
        self.seen_temperatures_ = temps
        return self

    def _weights(self, keys) -> dict:
        if self.backbone_weights is None:
            w = {k: 1.0 for k in keys}
        else:
            w = {k: float(self.backbone_weights.get(k, 0.0)) for k in keys}
            if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
                raise ValueError(f"backbone_weights must be non-negative with a positive sum over {keys}")
        s = sum(w.values())
        return {k: v / s for k, v in w.items()}

    @staticmethod
    def _combined_logits(per_backbone: dict, feats: dict, weights: dict) -> np.ndarray:
        z = None
        for k, st in per_backbone.items():
            part = weights[k] * st.decision_function(feats[k]).astype(np.float64)
            z = part if z is None else z + part
        return z

    def _joint(self, feats: dict) -> np.ndarray:
        """Concatenate backbones scaled by sqrt(weight): dot products become weighted sums."""
        parts = [np.sqrt(self.weights_[k], dtype=np.float32) * feats[k] for k in self.backbones_]
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    def _check_fitted(self):
        if not hasattr(self, "seen_fitted_"):
            raise ValueError("this Cascade is not fitted yet; call fit(...) first")

    def _check_query(self, query: dict) -> dict:
        query = _as_dict("query", query)
        out = {}
        for k in self.backbones_:
            if k not in query:
                raise ValueError(f"query features lack backbone {k!r} (have {sorted(query)})")
            out[k] = check_features(query[k], f"query[{k!r}]", dim=self.text_[k].shape[1])
        rows = {k: v.shape[0] for k, v in out.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"query backbones have different row counts: {rows}")
        return out

    # ------------------------------------------------------------------------------------------------
    def predict(self, query: dict) -> CascadeResult:
        """Score the queries (transductively: the query set is used, without labels, to fit stage 1)."""
        self._check_fitted()
        feats = self._check_query(query)
        n = next(iter(feats.values())).shape[0]
        C, S = self.n_classes_, self.n_seen_
        xq = self._joint(feats)
        tj = self._joint(self.text_)
        sj = self._joint(self.support_)
        stage = _clone(self.transductive)
        kw = {}
        if "support_x" in _fit_kwargs(stage):
            kw = {"support_x": sj, "support_y": self.support_y_}
        stage.fit(xq, text=tj, **kw)
        z1 = stage.decision_function(xq).astype(np.float64)
        a1 = 1.0
        if self.calibrate:
            z1s = stage.decision_function(sj).astype(np.float64)
            a1 = fit_temperature(z1s, self.support_y_)
        lp1 = log_softmax(a1 * z1)
        p1 = np.exp(lp1)
        route_unseen = np.argmax(lp1, axis=1) >= S if S < C else np.zeros(n, bool)

        beta, t_prod = 1.0, 1.0
        if self.combine == "product" and getattr(self, "val_", None) is not None:
            lp1v = log_softmax(a1 * stage.decision_function(self._joint(self.val_)).astype(np.float64))
            lp2v = self._seen_log_proba(self.val_, None)
            beta = self._fit_expert_weight(lp1v, lp2v, self.val_y_)
            # the product of two calibrated experts that share the text prior is over-confident: its own
            # temperature, fitted on the same held-out rows, keeps the seen block calibrated against the
            # unseen classes' stage-1 probabilities (it never changes the order inside the seen block)
            t_prod = fit_temperature(lp1v[:, :S] + beta * lp2v, self.val_y_)
        seen_lp = self._seen_log_proba(feats, lp1, beta, t_prod)
        scores = p1.copy()
        seen_rows = ~route_unseen
        if seen_rows.any():
            mass = p1[seen_rows, :S].sum(axis=1, keepdims=True)
            scores[seen_rows, :S] = mass * np.exp(seen_lp[seen_rows])
        route = [ROUTE_UNSEEN if u else ROUTE_SEEN for u in route_unseen]
        scores = self._apply_specialists(scores, query, route)
        scores /= scores.sum(axis=1, keepdims=True)
        top5 = _topk(scores, min(5, C))
        details = {"transductive_temperature": a1, "expert_weight": beta, "product_temperature": t_prod,
                   "seen_temperatures": list(self.seen_temperatures_),
                   "n_unseen_routed": int(route_unseen.sum())}
        for name in ("prior_", "n_iter_"):
            if hasattr(stage, name):
                details[name.rstrip("_")] = getattr(stage, name)
        return CascadeResult(scores=scores, top5=top5, route=route, details=details)

    @staticmethod
    def _fit_expert_weight(lp1: np.ndarray, lp2: np.ndarray, y: np.ndarray, grid: int = 21) -> float:
        """Weight ``beta`` in [0, 1] of the inductive expert maximising the mean log-likelihood of the
        labelled held-out rows ``y`` under ``softmax(lp1[:, :S] + beta * lp2)`` (grid search; ties go to
        the larger weight). ``lp1``: the transductive stage's log-probabilities of those rows (it never
        saw their labels); ``lp2``: the seen stages' combined log-probabilities."""
        S = lp2.shape[1]
        rows = np.arange(len(y))
        best, best_ll = 1.0, -np.inf
        for beta in np.linspace(1.0, 0.0, grid):
            ll = log_softmax(lp1[:, :S] + beta * lp2)[rows, y].mean()
            if ll > best_ll + 1e-12:
                best, best_ll = float(beta), ll
        return best

    def _seen_log_proba(self, feats: dict, lp1: np.ndarray | None, beta: float = 1.0,
                        temperature: float = 1.0) -> np.ndarray:
        """Combined log-probabilities over the seen classes (rows normalised): the seen stages' calibrated
        log-probabilities weighted by ``beta``, plus stage 1's when ``combine="product"``, the sum scaled by
        ``temperature``."""
        S = self.n_seen_
        total = 0.0
        for per_backbone, a in zip(self.seen_fitted_, self.seen_temperatures_):
            total = total + log_softmax(a * self._combined_logits(per_backbone, feats, self.weights_))
        if self.combine == "product" and lp1 is not None:
            total = beta * total + lp1[:, :S]
        return log_softmax(temperature * total)

    def _apply_specialists(self, scores: np.ndarray, query: dict, route: list) -> np.ndarray:
        if not self.specialists:
            return scores
        top1 = np.argmax(scores, axis=1)
        for spec in self.specialists:
            classes = np.asarray(spec.classes_, dtype=np.int64)
            name = getattr(spec, "name", type(spec).__name__)
            rows = np.flatnonzero(np.isin(top1, classes) & np.array([r == ROUTE_SEEN for r in route]))
            if rows.size == 0:
                continue
            key = getattr(spec, "query_key", spec.feature_key)
            if key not in query:
                raise ValueError(f"specialist {name!r} needs query features {key!r} (have {sorted(query)})")
            X = query[key]
            if callable(X):  # features computed on demand, for the routed rows only
                X = X(rows)
                if len(X) != rows.size:
                    raise ValueError(f"query[{key!r}] returned {len(X)} rows for {rows.size} requested")
            else:
                X = np.asarray(X)[rows]
            X = check_features(X, f"query[{key!r}]", normalised=False)
            new = np.asarray(spec.rerank(scores[rows].copy(), X), dtype=np.float64)
            if new.shape != (rows.size, scores.shape[1]):
                raise ValueError(f"specialist {name!r} returned shape {new.shape}, expected "
                                 f"{(rows.size, scores.shape[1])}")
            others = np.setdiff1d(np.arange(scores.shape[1]), classes)
            if not np.allclose(new[:, others], scores[rows][:, others]):
                raise ValueError(f"specialist {name!r} changed probabilities outside its classes")
            if not np.all(np.isfinite(new)) or np.any(new < 0):
                raise ValueError(f"specialist {name!r} returned negative or non-finite probabilities")
            scores[rows] = new
            for r in rows:
                route[r] = f"specialist:{name}"
        return scores

    # ------------------------------------------------------------------------------------------------
    def support_oof_proba(self, n_folds: int = 4, random_state: int = 0) -> np.ndarray:
        """Out-of-fold probabilities [Ns, C] of the support rows from the inductive (seen) stages.

        Rows are split into ``n_folds`` folds per class (round-robin after a seeded shuffle); each fold is
        scored by the seen stages refitted on the other folds (their calibrated temperatures are reused),
        blended with zero-shot over all classes as stage 1 would be without queries. Rows of a class
        with a single support row cannot be held out and are scored by the full model. The inductive experts
        get weight 1 here (``beta`` is chosen at ``predict`` time, with the queries). Use these to choose
        a specialist's blending weight without touching query labels.
        """
        self._check_fitted()
        y = self.support_y_
        rng = np.random.default_rng(random_state)
        fold = np.full(y.shape[0], -1)
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            if idx.size >= 2:
                fold[idx] = np.arange(idx.size) % min(n_folds, idx.size)
        C, S = self.n_classes_, self.n_seen_
        tj = self._joint(self.text_)
        sj = self._joint(self.support_)
        zs = sj.astype(np.float64) @ tj.T.astype(np.float64)
        a0 = fit_temperature(zs, y) if self.calibrate else 100.0
        lp0 = log_softmax(a0 * zs)
        out = np.empty((y.shape[0], C))
        for f in range(-1, max(n_folds, 1)):
            test = np.flatnonzero(fold == f) if f >= 0 else np.flatnonzero(fold == -1)
            if test.size == 0:
                continue
            train = np.flatnonzero(fold != f) if f >= 0 else np.arange(y.shape[0])
            sub = Cascade(self.transductive, self.seen_stages, self.backbone_weights, self.combine,
                          calibrate=False)
            sub.fit({k: v[train] for k, v in self.support_.items()}, y[train], self.text_, S)
            sub.seen_temperatures_ = list(self.seen_temperatures_)
            feats = {k: v[test] for k, v in self.support_.items()}
            lp = lp0[test]
            seen_lp = sub._seen_log_proba(feats, lp)
            p = np.exp(lp)
            p[:, :S] = p[:, :S].sum(axis=1, keepdims=True) * np.exp(seen_lp)
            out[test] = p / p.sum(axis=1, keepdims=True)
        return out

    # ------------------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write the fitted cascade to ``directory`` (cascade.npz: arrays + JSON meta). No pickle."""
        self._check_fitted()
        directory = Path(directory)
        arrays = {"support_y": self.support_y_}
        for i, k in enumerate(self.backbones_):
            arrays[f"text/{i}"] = self.text_[k]
            arrays[f"support/{i}"] = self.support_[k]
            if getattr(self, "val_", None) is not None:
                arrays[f"val/{i}"] = self.val_[k]
        if getattr(self, "val_", None) is not None:
            arrays["val_y"] = self.val_y_
        stages_meta = []
        for j, per_backbone in enumerate(self.seen_fitted_):
            metas = []
            for i, k in enumerate(self.backbones_):
                a, m = per_backbone[k].state_dict()
                for name, arr in a.items():
                    arrays[f"seen/{j}/{i}/{name}"] = arr
                metas.append(m)
            stages_meta.append(metas)
        meta = {
            "format": "cascade.router/1",
            "backbones": self.backbones_, "weights": self.weights_, "n_classes": self.n_classes_,
            "n_seen": self.n_seen_, "seen_temperatures": self.seen_temperatures_,
            "combine": self.combine, "calibrate": self.calibrate,
            "backbone_weights": self.backbone_weights,
            "transductive": {"class": type(self.transductive).__name__,
                             "params": _jsonable(self.transductive.get_params())},
            "seen_prototypes": [{"class": type(s).__name__, "params": _jsonable(s.get_params())}
                                for s in self.seen_stages],
            "seen_fitted": stages_meta,
        }
        return save_npz_json(directory / "cascade.npz", arrays, meta)

    @classmethod
    def load(cls, directory, specialists=()) -> "Cascade":
        """Read a cascade written by :meth:`save` (specialists are not saved; pass them again)."""
        path = Path(directory) / "cascade.npz"
        arrays, meta = load_npz_json(path)
        if meta.get("format") != "cascade.router/1":
            raise ValueError(f"{path}: unknown format {meta.get('format')!r}")
        trans = Stage.from_state({}, {"class": meta["transductive"]["class"],
                                      "params": meta["transductive"]["params"], "state": {}})
        protos = [Stage.from_state({}, {"class": m["class"], "params": m["params"], "state": {}})
                  for m in meta["seen_prototypes"]]
        obj = cls(trans, protos, meta["backbone_weights"], meta["combine"], meta["calibrate"], specialists)
        keys = meta["backbones"]
        obj.backbones_ = keys
        obj.weights_ = meta["weights"]
        obj.n_classes_, obj.n_seen_ = meta["n_classes"], meta["n_seen"]
        obj.seen_temperatures_ = meta["seen_temperatures"]
        obj.text_ = {k: arrays[f"text/{i}"] for i, k in enumerate(keys)}
        obj.support_ = {k: arrays[f"support/{i}"] for i, k in enumerate(keys)}
        obj.support_y_ = arrays["support_y"]
        if "val_y" in arrays:
            obj.val_ = {k: arrays[f"val/{i}"] for i, k in enumerate(keys)}
            obj.val_y_ = arrays["val_y"]
        else:
            obj.val_, obj.val_y_ = None, None
        fitted = []
        for j, metas in enumerate(meta["seen_fitted"]):
            per_backbone = {}
            for i, k in enumerate(keys):
                prefix = f"seen/{j}/{i}/"
                a = {name[len(prefix):]: v for name, v in arrays.items() if name.startswith(prefix)}
                per_backbone[k] = Stage.from_state(a, metas[i])
            fitted.append(per_backbone)
        obj.seen_fitted_ = fitted
        return obj


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        json.dumps(v)  # raises for objects that cannot be saved
        out[k] = v
    return out


def _fit_kwargs(stage) -> set:
    import inspect
    return set(inspect.signature(stage.fit).parameters)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
