"""The cascade: which stage sees which query, and how their scores combine.

``Cascade`` chains, for a query set (all backbones' features of the same images):

1. **inductive experts**, fitted on the support rows at ``fit`` time: zero-shot CLIP over ALL classes
   (temperature fitted on the support rows) and the seen stages (default LP++) over the SEEN classes, per
   backbone, their logits summed with ``backbone_weights`` (temperature fitted on the validation rows);
2. **the class marginal of the query set** (``prior="estimate"``): zero-shot's own EM estimate (the marginal
   InMaP's ``prior="auto"`` takes) when it is statistically compatible with the soft class counts of the
   inductive experts' pooled posterior after the refinement of step 4 (``compatible_marginal``); otherwise
   that refined posterior's mean, kept only when it beats the uniform marginal by the BIC margin
   (``marginal_test``). It becomes the Sinkhorn marginal of the transductive stage;
3. **the transductive stage** over ALL classes (default InMaP), fitted on the queries at ``predict`` time;
4. **pooling and refinement**: the seen block of each query's distribution is the log-linear pool
   ``softmax(w1 log p1 + sum_i w_seen_i log p_seen_i + w3 log p_zero-shot + w4 log p_rebalanced)`` of the
   transductive stage, each seen stage (one expert and one exponent each), zero-shot and zero-shot rebalanced on the query set (``rebalance``, with validation rows:
   per-class biases that make its mean posterior over the queries the marginal of step 2; exponents fitted on the
   validation rows); the split between the seen block and each unseen class comes from the pool of the two
   experts over ALL classes, ``softmax(v1 log p1 + v2 log p_zero-shot)`` (exponents fitted on the validation rows
   over all classes, so probability a seen row puts on unseen
   classes counts against an expert; 1/2 each without held-out rows). A transductive stage that has
   drifted from the truth (InMaP on a few dozen queries, say) thus cannot move queries into or out of the
   unseen classes either. The ``refine`` stage (default :class:`~cascade.stages.gda.GDA`, a shared-covariance
   Gaussian classifier) is then fitted on the queries with that distribution as soft labels plus the labelled
   support rows, and its posterior (temperature fitted on the validation rows) is the final score over all
   classes, unless the held-out rows show it significantly worse than the pooled distribution it refines
   (``refine_check``: the refinement refitted with the held-out rows among its soft-labelled rows, so that they
   are scored in sample as the queries are; dropped when its mean log-likelihood of their labels falls more
   than ``refine_check`` standard errors below the pool's). On tasks whose classes CLIP separates poorly a
   Gaussian fitted to mostly wrong soft labels does worse than the experts it started from. Last (``balance``),
   the final distribution is balanced to the class marginal of step 2 when the held-out rows, balanced together
   with the queries, gain more than ``balance_min_gain`` nats per row from it (balanced query sets over many
   classes: the experts' class bias is then the error, which the pool's exponents cannot see);
5. **routing** (``routing="joint"``): a query whose final arg-max is an unseen class is routed ``unseen`` (it
   leaves the cascade with that ranking); the others are ``seen`` and may be re-ranked by a specialist inside its
   domain. ``routing="stage1"`` is the seeds' rule: a query whose stage-1 arg-max is unseen keeps stage 1's
   probabilities, the others keep stage 1's mass on the unseen classes.

``combine="replace"`` (the seeds' cascade) gives the seen block to the seen stages alone. Several CLIP backbones:
the transductive stage and the refinement run once on the concatenation of the backbones' features scaled by
``sqrt(w_b)`` (text likewise), so cosine logits become the weighted sum of per-backbone cosines and rows stay
unit-norm. Every weight and temperature is fitted on labelled rows the expert did not train on: the validation
rows or, without them, the support rows scored out of fold (``cv_folds``: LP++ and the refinement refitted
without each fold). Query labels are never used. See docs/stages.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .metrics import topk_indices
from .stages.base import (BOOL, HasParams, Interval, Options, Stage, TypeOf, check_features, check_labels,
                          describe_stage, load_npz_json, log_softmax, save_npz_json, stage_name, validate_params)
from .stages import calibration
from .stages.calibration import (balancing_bias, compatible_marginal, estimate_prior, fit_pool_weights,
                                 fit_temperature, marginal_test, paired_difference, row_blocks, store_dtype)
from .stages.gda import GDA
from .stages.inmap import InMaP
from .stages.lpp import LinearProbePP

ROUTE_UNSEEN = "unseen"
ROUTE_SEEN = "seen"
FORMAT = "cascade.router/2"
ZERO_SHOT_SCALE = 100.0          # CLIP's logit scale, used when the cascade is not calibrated
# probabilities are floored here before balancing: a near-one-hot posterior would otherwise need biases of
# hundreds of nats (and a thousand slow rounds) to give a class the count the marginal asks for
BALANCE_FLOOR = 1e-12
BALANCE_ROUNDS = 100            # at most this many rounds of the balancing (each two matrix-vector products)
# The cascade's own settings of its default stages (the stages' defaults stay the papers'): the refinement makes
# the authors' 2000 InMaP steps and 300 LP++ epochs unnecessary (docs/stages.md, "Speed"; measured with
# benchmarks/generalisation.py)
DEFAULT_INMAP_STEPS = 50
DEFAULT_LPP_EPOCHS = 100


@dataclass
class CascadeResult:
    """Output of :meth:`Cascade.predict`."""
    scores: np.ndarray                 # [N, C] probabilities (rows sum to 1)
    top5: np.ndarray                   # [N, k] class indices, best first (k = min(5, C)), distinct
    route: list                        # per query: "unseen", "seen" or "specialist:<name>"
    details: dict = field(default_factory=dict)   # diagnostics (prior, weights, temperatures, steps)


def _clone(stage: Stage) -> Stage:
    return type(stage)(**stage.get_params())


def _as_dict(name: str, value) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict of feature arrays keyed by backbone name")
    return value


class Cascade(HasParams):
    """Routed cascade of stages (see the module docstring).

    Parameters
    ----------
    transductive : Stage
        Stage over all classes fitted on the queries: ``fit(support_x, support_y, text=..., query=...)``.
        Default ``InMaP(n_iter=50)``: 50 proxy steps instead of the authors' 2000 (with the refinement after
        it, more steps change nothing measurable and cost 40x more; see docs/stages.md, "Speed").
    seen_stages : sequence of Stage
        Inductive stages over the seen classes, ``fit(X, y, text=..., val=...)``, each one expert of the pool
        with its own fitted exponent. Default
        ``[LinearProbePP(epochs=100, select="auto")]`` (the authors run 300 epochs, see "Speed"; "auto": the
        last epoch unless the validation rows show a clearly better one, see :mod:`cascade.stages.lpp`).
    refine : Stage, None or "default"
        Transductive refinement over all classes, ``fit(X, soft_labels)`` (soft labels [N, C]); "default":
        ``GDA(shrinkage=0.5)``; None: the pooled distribution is the final score.
    prior : "estimate" | "stage"
        "estimate": the router estimates the query set's class marginal (step 2) and sets it as the
        transductive stage's ``prior`` (when it has one); "stage": the stage's own setting is used.
    routing : "joint" | "stage1"
        Which distribution decides that a query belongs to an unseen class (see the module docstring).
    backbone_weights : dict or None
        Weight per CLIP backbone (normalised to sum 1); None = equal weights over the backbones present
        in both ``support`` and ``text``.
    combine : "pool" | "replace"
        How the seen block is scored: the pool of stage 1, the seen stages and zero-shot, or the seen stages
        alone.
    calibrate : bool
        Fit temperatures and pooling weights on held-out labelled rows (zero-shot and stage 1 on the support
        rows, whose labels they never see; the seen stages, the pools and the refinement on the validation
        rows). Without validation rows, the support rows scored out of fold stand in for them (``cv_folds``).
        False: CLIP's fixed scale, unit weights, temperature 1 for everything.
    cv_folds : int
        Without validation rows (and ``calibrate=True``): the support rows are split into this many folds per
        class, the seen stages refitted on the other folds score each fold, the refinement likewise leaves each
        fold out, and these out-of-fold scores of the support rows calibrate everything the validation rows
        would (rows of a class with a single support row cannot be held out and are left out). 0 or 1: no
        held-out rows; the pools then get unit weights and the refinement's temperature is fitted to its own
        soft labels.
    rebalance : bool
        With validation rows and ``combine="pool"``: add zero-shot CLIP rebalanced on the query set to the pool of the
        seen block, ``softmax(log p_zero-shot + b)`` with per-class biases ``b`` chosen so that its mean posterior
        over the queries equals the class marginal given to the transductive stage (``balancing_bias``: InMaP's
        Sinkhorn balancing at zero-shot's calibrated temperature, kept as biases). Unlike the transductive stage,
        whose proxies are fitted on the queries they score, it scores the held-out rows as it scores the queries,
        so its exponent is fitted fairly; where the query set is balanced and CLIP's class bias is what goes wrong
        (classes that overlap), it carries the balancing the pool would otherwise under-weight. Its exponent
        is fitted with the others (0 when the held-out rows find no use for it). Not used when the support rows out
        of fold stand in for validation rows: a few shots per class fit a fourth exponent poorly (with 10 % of the
        queries it cost the redrawn tasks 0.12 points; docs/stages.md).
    refine_check : float or None
        With held-out rows: keep the refinement only unless its mean log-likelihood of their labels (refitted with
        them as soft-labelled rows, see step 4) falls more than this many standard errors (of the paired
        per-row difference) below the pooled distribution's. None or False: always keep it.
    balance : "check" | "always" | "none"
        Balance the final distribution of the queries to the class marginal of step 2 (per-class biases that make
        its mean over the queries that marginal: Sinkhorn's balanced assignment, as InMaP balances its
        pseudo-labels). "check": only when the held-out rows, joining the queries in the balanced set so that they
        are scored in sample, gain more than ``balance_min_gain`` nats per row in mean log-likelihood of their
        labels and more than one standard error of that mean (never without held-out rows, nor for fewer queries
        than classes, whose counts no marginal describes). Only with ``combine="pool"``. Balancing forces the class counts of the query set; it pays where
        the query set is balanced and the experts' class bias is the error (many overlapping classes, few queries
        per class) and costs where the counts of a sampled query set deviate from the marginal.
    balance_min_gain : float
        The smallest mean gain (nats per held-out row) at which "check" balances (docs/accuracy.md: the
        measured gains on balanced ImageNet tasks and on sampled Food-101 / Caltech-101 query sets).
    specialists : sequence
        Objects with ``classes_``, ``feature_key`` (or ``query_key``, preferred when present), ``name``
        (optional) and ``rerank(probs, X)``. The query dict's entry for that key is either a feature array
        [N, D] or a callable ``rows -> [len(rows), D]`` that computes features for the queries routed to the
        specialist only (so an expensive backbone runs on those images alone).
    """

    #: the keys of ``[stages.cascade]`` besides the stage names, checked here and when the config is loaded
    _parameter_constraints = {
        "prior": [Options("estimate", "stage")],
        "routing": [Options("joint", "stage1")],
        "combine": [Options("pool", "replace")],
        "calibrate": [BOOL],
        "cv_folds": [Interval(Integral, 0, None)],
        "refine_check": [Interval(Real, 0, None), Options(None, False)],
        "rebalance": [BOOL],
        "backbone_weights": [TypeOf(dict, "a table of weights per backbone"), Options(None)],
        "balance": [Options("none", "check", "always")],
        "balance_min_gain": [Interval(Real, 0, None)],
    }

    def __init__(self, transductive: Stage | None = None, seen_stages=None, refine="default",
                 prior: str = "estimate", routing: str = "joint", backbone_weights=None,
                 combine: str = "pool", calibrate: bool = True, cv_folds: int = 4, specialists=(),
                 refine_check=2.0, rebalance: bool = True, balance: str = "check", balance_min_gain: float = 0.1):
        if transductive is None:
            transductive = InMaP(n_iter=DEFAULT_INMAP_STEPS)
        self.transductive = transductive
        self.seen_stages = (list(seen_stages) if seen_stages is not None
                            else [LinearProbePP(epochs=DEFAULT_LPP_EPOCHS, select="auto")])
        self.refine = GDA() if isinstance(refine, str) and refine == "default" else refine
        self.prior = prior
        self.routing = routing
        self.backbone_weights = backbone_weights
        self.combine = combine
        self.calibrate = calibrate
        self.cv_folds = cv_folds
        self.specialists = list(specialists)
        self.refine_check = refine_check
        self.rebalance = rebalance
        self.balance = balance
        self.balance_min_gain = balance_min_gain

    def _check_params(self):
        validate_params(self._parameter_constraints, self.get_params())
        if not isinstance(self.transductive, Stage):
            raise ValueError(f"transductive must be a Stage, got {self.transductive!r}")
        if self.refine is not None and not isinstance(self.refine, Stage):
            raise ValueError(f"refine must be a Stage or None, got {self.refine!r}")
        for st in self.seen_stages:
            if not isinstance(st, Stage):
                raise ValueError(f"seen_stages must be Stages, got {st!r}")
            if st.transductive:
                raise ValueError(f"seen stage {stage_name(st)!r} is transductive; the seen experts are fitted on the "
                                 "support rows before any query is known")

    # ------------------------------------------------------------------------------------------------
    def fit(self, support: dict, support_y, text: dict, n_seen: int, val=None) -> "Cascade":
        """Fit the inductive experts on the support rows.

        support: {backbone: [Ns, D_b]}; support_y: [Ns] labels in 0..n_seen-1; text: {backbone: [C, D_b]}
        (seen classes first); val: optional ``({backbone: [Nv, D_b]}, labels)`` for model selection and
        calibration only.
        """
        self._check_params()
        self._oof_cache = None          # out-of-fold logits of an earlier fit's support rows
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
        val_sets = None
        if val is not None:
            vfeat, vy = val
            vfeat = _as_dict("val features", vfeat)
            val_sets = {}
            for k in keys:
                if k not in vfeat:
                    raise ValueError(f"val features lack backbone {k!r}")
                val_sets[k] = check_features(vfeat[k], f"val[{k!r}]", dim=texts[k].shape[1], min_rows=0)
            n_val = {k: v.shape[0] for k, v in val_sets.items()}
            if len(set(n_val.values())) != 1:
                raise ValueError(f"val backbones have different row counts: {n_val}")
            vy = check_labels(vy, next(iter(n_val.values())), n_seen, "val_y", require_all=False)
            if not vy.size:                     # zero validation rows: as if none were given
                val_sets = None

        self.backbones_ = keys
        self.weights_ = self._weights(keys)
        self.n_classes_ = int(n_classes)
        self.n_seen_ = n_seen
        self.text_ = texts
        self.support_ = sups
        self.support_y_ = y
        fitted = []
        for proto in self.seen_stages:
            per_backbone = {}
            for k in keys:
                per_backbone[k] = _clone(proto).fit(sups[k], y, text=texts[k][:n_seen],
                                                    val=None if val_sets is None else (val_sets[k], vy))
            fitted.append(per_backbone)
        self.seen_fitted_ = fitted
        # held-out labelled rows: the validation rows, or else the support rows scored out of fold
        self.val_folds_, self.val_seen_logits_ = None, None
        if self.calibrate and val_sets is None and self.cv_folds > 1:
            folds = _folds(y, self.cv_folds)
            keep = folds >= 0
            if keep.any():
                val_sets = {k: v[keep] for k, v in sups.items()}
                vy = y[keep]
                self.val_folds_ = folds[keep]
                self.val_seen_logits_ = [z[keep] for z in self._oof_seen_logits(folds)]
        use_val = self.calibrate and val_sets is not None
        temps = [1.0] * len(fitted)
        if use_val:
            for i in range(len(fitted)):
                temps[i] = fit_temperature(self._held_out_seen_logits(i, val_sets), vy)
        self.seen_temperatures_ = temps
        # zero-shot CLIP over all classes, its temperature fitted on the support rows (it never saw them)
        self.zero_shot_temperature_ = (fit_temperature(self._zero_shot_logits(sups), y) if self.calibrate
                                       else ZERO_SHOT_SCALE)
        # labelled held-out rows, kept to weigh the experts at predict time (calibrate=True only)
        self.val_ = val_sets if use_val else None
        self.val_y_ = vy if use_val else None
        # the pool of zero-shot and the seen stages (the inductive posterior behind the prior estimate)
        self.inductive_pool_ = None
        if use_val and self.combine == "pool" and fitted:
            lp0v, lp_seen_v = self._val_experts()
            self.inductive_pool_ = fit_pool_weights([lp0v[:, :n_seen], *lp_seen_v], vy).tolist()
        return self

    def _val_experts(self):
        """Zero-shot's and the seen stages' log-probabilities of the validation rows (computed once)."""
        cache = getattr(self, "_val_cache", None)
        if cache is None or cache[0] is not self.val_:
            if getattr(self, "val_seen_logits_", None) is None:
                lp_seen = self._seen_log_proba(self.val_)
            else:
                lp_seen = self._seen_log_proba(None, logits=self.val_seen_logits_)
            cache = (self.val_, self._zero_shot_log_proba(self.val_), lp_seen)
            self._val_cache = cache
        return cache[1], cache[2]

    def _held_out_seen_logits(self, i: int, feats: dict) -> np.ndarray:
        """Seen stage ``i``'s combined logits of the held-out rows (out of fold when they are support rows)."""
        if getattr(self, "val_seen_logits_", None) is not None:
            return self.val_seen_logits_[i]
        return self._combined_logits(self.seen_fitted_[i], feats, self.weights_)

    def _oof_seen_logits(self, folds: np.ndarray) -> list:
        """Each seen stage's combined logits [Ns, S] of the support rows, every fold scored by the stage refitted
        on the other folds (rows of fold -1 are always in training and scored by the full model). Computed once
        per fold assignment (``fit`` without validation rows and ``support_oof_proba`` share them)."""
        cache = getattr(self, "_oof_cache", None)
        if cache is not None and np.array_equal(cache[0], folds):
            return cache[1]
        y = self.support_y_
        out = [np.empty((y.shape[0], self.n_seen_)) for _ in self.seen_stages]
        for f in range(-1, int(folds.max()) + 1):
            test = np.flatnonzero(folds == f)
            if test.size == 0:
                continue
            feats = {k: v[test] for k, v in self.support_.items()}
            if f < 0:
                fitted = self.seen_fitted_
            else:
                train = np.flatnonzero(folds != f)
                fitted = [{k: _clone(proto).fit(self.support_[k][train], y[train],
                                                text=self.text_[k][:self.n_seen_])
                           for k in self.backbones_} for proto in self.seen_stages]
            for i, per_backbone in enumerate(fitted):
                out[i][test] = self._combined_logits(per_backbone, feats, self.weights_)
        self._oof_cache = (folds.copy(), out)
        return out

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
            if weights[k] == 0:
                continue
            part = weights[k] * st.decision_function(feats[k]).astype(np.float64)
            z = part if z is None else z + part
        return z

    def _joint(self, feats: dict) -> np.ndarray:
        """Concatenate backbones scaled by sqrt(weight): dot products become weighted sums (a backbone of weight
        0 is left out)."""
        keys = [k for k in self.backbones_ if self.weights_[k] > 0]
        dims = [feats[k].shape[1] for k in keys]
        out = np.empty((feats[keys[0]].shape[0], sum(dims)), dtype=np.float32)   # written in place: no copies
        start = 0
        for k, d in zip(keys, dims):
            np.multiply(np.sqrt(self.weights_[k], dtype=np.float32), feats[k], out=out[:, start:start + d])
            start += d
        return out

    def _zero_shot_logits(self, feats: dict) -> np.ndarray:
        tj = self._joint(self.text_).T.astype(np.float64)
        n = feats[self.backbones_[0]].shape[0]
        out = np.empty((n, tj.shape[1]))
        for b in row_blocks(n):                     # no float64 copy of all rows' joint features
            out[b] = self._joint({k: feats[k][b] for k in self.backbones_}).astype(np.float64) @ tj
        return out

    def _zero_shot_log_proba(self, feats: dict) -> np.ndarray:
        return log_softmax(self.zero_shot_temperature_ * self._zero_shot_logits(feats))

    def _seen_log_proba(self, feats: dict, logits=None) -> list:
        """Each seen stage's calibrated log-probabilities [N, S] over the seen classes: one expert of the pool
        per stage (an empty list without seen stages). ``logits``: the stages' combined logits, when already
        computed."""
        out = []
        for i, (per_backbone, a) in enumerate(zip(self.seen_fitted_, self.seen_temperatures_)):
            z = self._combined_logits(per_backbone, feats, self.weights_) if logits is None else logits[i]
            out.append(log_softmax(log_softmax(a * z)))      # rows normalised again, as every pool input is
        return out

    def _pool(self, lp_first: np.ndarray, lp_seen: list, others=(), weights=None, split=None) -> np.ndarray:
        """Distribution over all classes: ``split``'s (default ``lp_first``; log-probabilities over all classes),
        with its seen block replaced, at the same total mass, by the log-linear pool ``softmax(w_0 lp_first +
        sum_i w_i lp_seen_i + sum_j w_j others_j)`` over the seen classes (``combine="pool"``; ``lp_first``: an
        expert over all classes; ``lp_seen``: one expert per seen stage; ``others``: more experts'
        log-probabilities over the seen classes) or by ``softmax(sum_i lp_seen_i)`` (``combine="replace"``)."""
        S = self.n_seen_
        out = np.exp(lp_first if split is None else split)
        if not lp_seen:
            return out
        experts = [lp_first[:, :S], *lp_seen, *others]
        w = np.ones(len(experts)) if weights is None else weights
        for b in row_blocks(out.shape[0]):          # the pool's [N, S] temporaries a block of rows at a time
            if self.combine == "pool":
                block = sum(wj * lp[b] for wj, lp in zip(w, experts))
            else:
                block = sum(lp[b] for lp in lp_seen)
            out[b, :S] = out[b, :S].sum(axis=1, keepdims=True) * np.exp(log_softmax(block))
        return out

    def _support_joint(self) -> np.ndarray:
        """The support rows' joint features (built once per fitted or loaded support set)."""
        cache = getattr(self, "_support_joint_cache", None)
        if cache is None or cache[0] is not self.support_:
            cache = (self.support_, self._joint(self.support_))
            self._support_joint_cache = cache
        return cache[1]

    def _support_rows(self):
        """The support rows as rows of the refinement: joint features and one-hot labels over all classes."""
        onehot = np.zeros((len(self.support_y_), self.n_classes_))
        onehot[np.arange(len(self.support_y_)), self.support_y_] = 1.0
        return self._support_joint(), onehot

    def _refined(self, xq: np.ndarray, soft: np.ndarray, val_joint):
        """Fit the refinement stage on the queries (soft labels ``soft``) and the labelled support rows; its
        posterior over the queries and its temperature."""
        C, n = self.n_classes_, len(xq)
        sj, onehot = self._support_rows()
        g = self._fit_refine([(xq, soft), (sj, onehot)])
        folds = getattr(self, "val_folds_", None)
        z, zv = None, None
        if not self.calibrate:
            t = 1.0
        elif val_joint is not None and folds is not None:
            # the held-out rows are support rows: each fold scored by the refinement fitted without it
            support_folds = _folds(self.support_y_, self.cv_folds)
            zv = np.empty((len(folds), C))
            for f in np.unique(folds):
                train = support_folds != f
                zv[folds == f] = self._fit_refine([(xq, soft), (sj[train], onehot[train])]).decision_function(
                    val_joint[folds == f])
            t = fit_temperature(zv, self.val_y_)
        elif val_joint is not None:
            zv = g.decision_function(val_joint)
            t = fit_temperature(zv, self.val_y_)
        else:                       # the temperature from the queries' own scores: kept, in store_dtype
            z = _gather(n, C, lambda b: g.decision_function(xq[b]))
            t = fit_temperature(z, soft / soft.sum(axis=1, keepdims=True))
        self._refined_val = None if zv is None else np.exp(log_softmax(t * zv))
        # the queries' posterior, a block of rows at a time (their scores recomputed unless kept above)
        return _gather(n, C, lambda b: np.exp(log_softmax(
            t * (g.decision_function(xq[b]) if z is None else np.asarray(z[b], dtype=np.float64))))), t

    def _fit_refine(self, parts):
        """A clone of the refinement stage fitted on the rows of ``parts`` [(X, soft labels), ...] as on their
        concatenation. Beyond ``CHUNK_ROWS`` rows, without making it when the stage can (its ``fit_parts``, as the
        GDA's, serves its ``fit``), so that the large query set is not copied to add a few labelled rows."""
        g = _clone(self.refine)
        cls = type(g)
        owner = next((c for c in cls.__mro__ if "fit_parts" in vars(c)), None)
        if (owner is not None and cls.fit is owner.fit
                and sum(len(X) for X, _ in parts) > calibration.CHUNK_ROWS):
            return g.fit_parts(parts)
        return g.fit(np.concatenate([X for X, _ in parts]), np.concatenate([Y for _, Y in parts]))

    def _refinement_gain(self, xq: np.ndarray, soft: np.ndarray, val_joint: np.ndarray, soft_v: np.ndarray):
        """Mean and standard error of the per-row difference in log-likelihood of the held-out rows' labels,
        refinement minus ``soft_v`` (the pooled distribution of those rows). The refinement is refitted with the
        held-out rows among its rows, soft-labelled by ``soft_v`` exactly as the queries are by ``soft``, so they
        are scored in sample as the queries are (held-out support rows: each fold in turn, the other folds with
        their labels); its temperature is fitted on them, as the pool's exponents were. At most as many held-out
        rows as there are queries take part (a seeded random subset): more would make the refitted model mostly
        theirs, not the refinement being judged (with a few dozen queries and hundreds of validation rows, the
        check then dropped refinements that were helping the queries)."""
        C = self.n_classes_
        sj, onehot = self._support_rows()
        folds = getattr(self, "val_folds_", None)
        y = self.val_y_
        if len(y) > len(xq):
            keep = np.sort(np.random.default_rng(0).permutation(len(y))[:len(xq)])
            val_joint, soft_v, y = val_joint[keep], soft_v[keep], y[keep]
            if folds is not None:
                folds = folds[keep]
        if folds is None:
            z = self._fit_refine([(xq, soft), (val_joint, soft_v), (sj, onehot)]).decision_function(val_joint)
        else:
            support_folds = _folds(self.support_y_, self.cv_folds)
            z = np.empty((len(folds), C))
            for f in np.unique(folds):
                train, held = support_folds != f, folds == f
                z[held] = self._fit_refine([(xq, soft), (sj[train], onehot[train]),
                                            (val_joint[held], soft_v[held])]).decision_function(val_joint[held])
        rows = np.arange(len(y))
        d = (log_softmax(fit_temperature(z, y) * z)[rows, y]
             - np.log(np.maximum(soft_v[rows, y], np.finfo(np.float64).tiny)))
        return paired_difference(d)

    def _balance_gain(self, scores: np.ndarray, scores_v: np.ndarray, marginal: np.ndarray):
        """Mean and standard error of the per-row gain in log-likelihood of the held-out rows' labels when the
        final distribution is balanced to ``marginal``. The held-out rows join the queries in the balanced set, so
        they are scored in sample as the queries are; being rows of the seen classes, their share of the target
        marginal is ``marginal`` restricted to the seen classes (no label of theirs is used). At most as many
        held-out rows as queries take part (a seeded random subset), so the set stays mostly the queries'."""
        y = self.val_y_
        n, S = len(scores), self.n_seen_
        if len(y) > n:
            keep = np.sort(np.random.default_rng(0).permutation(len(y))[:n])
            scores_v, y = scores_v[keep], y[keep]
        seen = np.zeros_like(marginal)
        seen[:S] = marginal[:S]
        if seen.sum() <= 0:
            return 0.0, float("inf")
        target = n * marginal / marginal.sum() + len(y) * seen / seen.sum()
        lp = np.empty((n + len(scores_v), scores.shape[1]), dtype=scores.dtype)    # no concatenated copy
        for b in row_blocks(n):
            lp[b] = np.log(np.maximum(scores[b], BALANCE_FLOOR))
        lp[n:] = np.log(np.maximum(scores_v, BALANCE_FLOOR))
        bias = balancing_bias(lp, target, n_iter=BALANCE_ROUNDS, tol=1e-4)
        lv = lp[n:]
        rows = np.arange(len(y))
        d = log_softmax(lv + bias)[rows, y] - log_softmax(lv)[rows, y]
        return paired_difference(d)

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
        """Score the queries (transductively: the query set is used, without labels, by stage 1, the prior
        estimate and the refinement).

        Memory grows linearly in the number of queries N: besides their features and one joint copy, it keeps
        at most about three [N, C] arrays at a time. The experts' log-probabilities are recomputed a block of
        rows at a time wherever they are used (:func:`~cascade.stages.calibration.row_blocks`), never kept for
        all queries; the distributions that are kept (pooled, refined, balanced) are float64 up to
        ``calibration.FLOAT64_ROWS`` queries and float32 beyond (docs/scale.md)."""
        self._check_fitted()
        self._check_params()
        feats = self._check_query(query)
        n = next(iter(feats.values())).shape[0]
        C, S = self.n_classes_, self.n_seen_
        xq = self._joint(feats)
        tj = self._joint(self.text_)
        sj = self._support_joint()
        val = getattr(self, "val_", None)
        val_joint = self._joint(val) if val is not None else None
        details = {}

        def rows(b):
            return {k: v[b] for k, v in feats.items()}

        def zero_shot(b):                   # the inductive experts' log-probabilities of the rows b
            return self._zero_shot_log_proba(rows(b))

        def seen(b):
            return self._seen_log_proba(rows(b))

        stage = _clone(self.transductive)
        if self.prior == "estimate" and "prior" in stage.get_params():
            # zero-shot's own EM estimate (what InMaP's prior="auto" takes)
            q_zs, _ = estimate_prior(_gather(n, C, zero_shot))
            inductive = _gather(n, C, lambda b: self._pool(zero_shot(b), seen(b), weights=self.inductive_pool_))
            if self.refine is not None:
                inductive, _ = self._refined(xq, inductive, val_joint)
            q, gain, kept = marginal_test(inductive)
            source = "refined" if kept else "uniform"
            if compatible_marginal(q_zs, inductive):
                q, source = q_zs, "zero-shot"
            del inductive
            stage.set_params(prior=q)
            details.update(prior=q, prior_gain=gain, prior_source=source)
        stage.fit(sj, self.support_y_, text=tj, query=xq)
        a1 = (fit_temperature(stage.decision_function(sj).astype(np.float64), self.support_y_)
              if self.calibrate else 1.0)

        def transductive(b):
            return log_softmax(a1 * stage.decision_function(xq[b]).astype(np.float64))

        # the final pool: stage 1, the seen stages, zero-shot CLIP (the text prior, from which stage 1 drifts) and
        # zero-shot rebalanced on the query set to stage 1's class marginal (biases that score any row alike)
        weights, split_weights, bias = None, None, None
        if (val is not None and getattr(self, "val_folds_", None) is None and self.rebalance
                and self.combine == "pool" and self.seen_stages):
            marginal = details.get("prior", getattr(stage, "prior_", None))
            bias = balancing_bias(_gather(n, C, zero_shot), np.full(C, 1.0 / C) if marginal is None else marginal)
            details["rebalance_bias"] = bias
        if val is not None:
            lp1v = log_softmax(a1 * stage.decision_function(val_joint).astype(np.float64))
            lp0v, lp_seen_v = self._val_experts()
            if self.combine == "pool" and self.seen_stages:
                experts = [lp1v[:, :S], *lp_seen_v, lp0v[:, :S]]
                if bias is not None:
                    experts.append(log_softmax(lp0v + bias)[:, :S])
                weights = fit_pool_weights(experts, self.val_y_)
            if self.combine == "pool" and S < C:   # the seen/unseen split: the experts over all classes
                split_weights = fit_pool_weights([lp1v, lp0v], self.val_y_)
        if self.combine == "pool" and S < C:
            if split_weights is None:
                split_weights = np.array([0.5, 0.5])
            details["split_weights"] = [float(v) for v in split_weights]

        def pooled(l1, l0, l_seen):
            split = None
            if self.combine == "pool" and S < C:
                split = log_softmax(split_weights[0] * l1 + split_weights[1] * l0)
            others = [l0[:, :S]] if bias is None else [l0[:, :S], log_softmax(l0 + bias)[:, :S]]
            p = self._pool(l1, l_seen, others, weights, split=split)
            return p / p.sum(axis=1, keepdims=True)

        scores = _gather(n, C, lambda b: pooled(transductive(b), zero_shot(b), seen(b)))
        scores_v = pooled(lp1v, lp0v, lp_seen_v) if val is not None else None
        t_ref = None
        if self.refine is not None:
            refined, t_ref = self._refined(xq, scores, val_joint)
            refined_v = self._refined_val
            if self.refine_check is not None and self.refine_check is not False and val is not None:
                gain, se = self._refinement_gain(xq, scores, val_joint, scores_v)
                dropped = bool(gain < -float(self.refine_check) * se)
                details.update(refine_gain=gain, refine_gain_se=se, refine_dropped=dropped)
                if dropped:
                    refined, t_ref, refined_v = scores, None, scores_v
            scores, scores_v = refined, refined_v
            del refined                     # one name for the kept distribution: balancing may replace it
        if self.balance != "none" and self.combine == "pool":      # "replace": the seeds' rule, unbalanced
            marginal = details.get("prior", getattr(stage, "prior_", None))
            marginal = np.full(C, 1.0 / C) if marginal is None else np.asarray(marginal, dtype=np.float64)
            keep = self.balance == "always"
            if self.balance == "check" and scores_v is not None and n >= C:
                gain, se = self._balance_gain(scores, scores_v, marginal)
                keep = bool(gain > max(float(self.balance_min_gain), se))
                details.update(balance_gain=gain, balance_gain_se=se)
            details["balanced"] = keep
            if keep:
                scores = _balanced(scores, marginal)

        if S == C:
            unseen = np.zeros(n, bool)
        elif self.routing == "joint":
            unseen = scores.argmax(axis=1) >= S
        else:   # the seeds' rule: stage 1 decides, and keeps its probabilities outside the seen block
            unseen = np.empty(n, bool)
            for b in row_blocks(n):
                p1 = np.exp(transductive(b))
                u = p1.argmax(axis=1) >= S
                seen_mass = p1[:, :S].sum(axis=1, keepdims=True)
                block = scores[b, :S] / scores[b, :S].sum(axis=1, keepdims=True)
                new = np.concatenate([seen_mass * block, p1[:, S:]], axis=1)
                new[u] = p1[u]
                scores[b], unseen[b] = new, u
        route = [ROUTE_UNSEEN if u else ROUTE_SEEN for u in unseen]
        scores = self._apply_specialists(scores, query, route)
        scores /= scores.sum(axis=1, keepdims=True)
        top5 = topk_indices(scores, min(5, C))
        details.update(transductive_temperature=a1, pool_weights=None if weights is None else list(weights),
                       pool_experts=self.pool_experts(rebalanced=bias is not None),
                       refine_temperature=t_ref, seen_temperatures=list(self.seen_temperatures_),
                       n_unseen_routed=int(unseen.sum()))
        if hasattr(stage, "n_iter_"):
            details["n_iter"] = stage.n_iter_
        return CascadeResult(scores=scores, top5=top5, route=route, details=details)

    def pool_experts(self, rebalanced: bool = False) -> list:
        """The names of the seen block's pooled experts, in the order of ``details["pool_weights"]``: the
        transductive stage, each seen stage, zero-shot and (``rebalanced``) zero-shot rebalanced."""
        names = [stage_name(self.transductive), *(stage_name(st) for st in self.seen_stages), "zeroshot"]
        return names + ["zeroshot-rebalanced"] if rebalanced else names

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
        """Out-of-fold probabilities [Ns, C] of the support rows from the inductive experts.

        Rows are split into ``n_folds`` folds per class (round-robin after a seeded shuffle); each fold is
        scored by the seen stages refitted on the other folds (their calibrated temperatures are reused),
        pooled with zero-shot over all classes as the inductive posterior behind the prior estimate (no
        queries are involved). Rows of a class with a single support row cannot be held out and are scored by
        the full model. Use these to choose a specialist's blending weight without touching query labels.
        """
        self._check_fitted()
        logits = self._oof_seen_logits(_folds(self.support_y_, n_folds, random_state))
        lp0 = self._zero_shot_log_proba(self.support_)
        p = self._pool(lp0, self._seen_log_proba(None, logits=logits), weights=self.inductive_pool_)
        return p / p.sum(axis=1, keepdims=True)

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """(arrays, JSON meta) of the fitted cascade: its settings, its stages (each through its own
        ``state_dict``) and the labelled rows it keeps for calibration at predict time. No pickle; the model
        bundle (:mod:`cascade.bundle`) writes them with the rest of a trained model."""
        self._check_fitted()
        arrays = {"support_y": self.support_y_}
        for i, k in enumerate(self.backbones_):
            arrays[f"text/{i}"] = self.text_[k]
            arrays[f"support/{i}"] = self.support_[k]
            if getattr(self, "val_", None) is not None:
                arrays[f"val/{i}"] = self.val_[k]
        if getattr(self, "val_", None) is not None:
            arrays["val_y"] = self.val_y_
        if getattr(self, "val_folds_", None) is not None:      # held-out rows = support rows out of fold
            arrays["val_folds"] = self.val_folds_
            for j, z in enumerate(self.val_seen_logits_):
                arrays[f"val_seen/{j}"] = z
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
            "format": FORMAT,
            "backbones": self.backbones_, "weights": self.weights_, "n_classes": self.n_classes_,
            "n_seen": self.n_seen_, "seen_temperatures": self.seen_temperatures_,
            "zero_shot_temperature": self.zero_shot_temperature_, "inductive_pool": self.inductive_pool_,
            "combine": self.combine, "calibrate": self.calibrate, "cv_folds": int(self.cv_folds),
            "prior": self.prior, "routing": self.routing, "refine_check": self.refine_check,
            "rebalance": bool(self.rebalance),
            "balance": self.balance, "balance_min_gain": float(self.balance_min_gain),
            "backbone_weights": self.backbone_weights,
            "transductive": describe_stage(self.transductive),
            "refine": describe_stage(self.refine) if self.refine is not None else None,
            "seen_prototypes": [describe_stage(s) for s in self.seen_stages],
            "seen_fitted": stages_meta,
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict, specialists=(), source: str = "cascade state") -> "Cascade":
        """Rebuild a fitted cascade from :meth:`state_dict`'s output (``source`` names it in errors). Its stages
        are found in the stage registry by the names the state gives. Specialists are not part of it; pass
        them again."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"{source}: format {meta.get('format')!r} is not {FORMAT!r} (a model written by "
                             f"another version of cascade); run train again")

        def build(m):
            return Stage.from_state({}, dict(m, state={}))

        if meta["refine"] is not None and meta["refine"]["class"] == "GDA":
            # written before the GDA had a mean prior: its means were the plain weighted means
            meta["refine"]["params"].setdefault("mean_prior", 0.0)

        obj = cls(build(meta["transductive"]), [build(m) for m in meta["seen_prototypes"]],
                  refine=build(meta["refine"]) if meta["refine"] is not None else None, prior=meta["prior"],
                  routing=meta["routing"], backbone_weights=meta["backbone_weights"], combine=meta["combine"],
                  calibrate=meta["calibrate"], cv_folds=meta.get("cv_folds", 4), specialists=specialists,
                  # written before the check existed: the refinement was always kept
                  refine_check=meta.get("refine_check"),
                  # written before the rebalanced zero-shot expert existed: the pool had none
                  rebalance=bool(meta.get("rebalance", False)),
                  # written before the balancing existed: the final distribution was never balanced
                  balance=meta.get("balance", "none"), balance_min_gain=meta.get("balance_min_gain", 0.1))
        keys = meta["backbones"]
        obj.backbones_ = keys
        obj.weights_ = meta["weights"]
        obj.n_classes_, obj.n_seen_ = meta["n_classes"], meta["n_seen"]
        obj.seen_temperatures_ = meta["seen_temperatures"]
        obj.zero_shot_temperature_ = meta["zero_shot_temperature"]
        obj.inductive_pool_ = meta["inductive_pool"]
        obj.text_ = {k: arrays[f"text/{i}"] for i, k in enumerate(keys)}
        obj.support_ = {k: arrays[f"support/{i}"] for i, k in enumerate(keys)}
        obj.support_y_ = arrays["support_y"]
        if "val_y" in arrays:
            obj.val_ = {k: arrays[f"val/{i}"] for i, k in enumerate(keys)}
            obj.val_y_ = arrays["val_y"]
        else:
            obj.val_, obj.val_y_ = None, None
        obj.val_folds_ = arrays.get("val_folds")
        obj.val_seen_logits_ = ([arrays[f"val_seen/{j}"] for j in range(len(meta["seen_fitted"]))]
                                if obj.val_folds_ is not None else None)
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

    def save(self, directory) -> Path:
        """Write the fitted cascade alone to ``directory``/cascade.npz (arrays + JSON meta, no pickle); a whole
        trained model is written by :class:`cascade.bundle.Bundle`."""
        return save_npz_json(Path(directory) / "cascade.npz", *self.state_dict())

    @classmethod
    def load(cls, directory, specialists=()) -> "Cascade":
        """Read a cascade written by :meth:`save` (specialists are not saved; pass them again)."""
        path = Path(directory) / "cascade.npz"
        arrays, meta = load_npz_json(path)
        return cls.from_state(arrays, meta, specialists, source=str(path))


def _folds(y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold of each row, per class round-robin after a seeded shuffle (so every fold holds about the same share
    of every class and each training part keeps every class); -1 for the rows of a class with a single row,
    which cannot be held out."""
    rng = np.random.default_rng(seed)
    fold = np.full(y.shape[0], -1)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if idx.size >= 2:
            fold[idx] = np.arange(idx.size) % min(n_folds, idx.size)
    return fold


def _balanced(probs: np.ndarray, marginal) -> np.ndarray:
    """``probs`` [N, C] rescaled per class so that their mean over the rows is ``marginal`` (Sinkhorn's balancing
    kept as per-class biases, :func:`~cascade.stages.calibration.balancing_bias`, on the probabilities floored at
    ``BALANCE_FLOOR``); rows sum to 1. Made a block of rows at a time in the dtype of ``probs``."""
    lp = np.empty_like(probs)
    for b in row_blocks(len(probs)):
        lp[b] = np.log(np.maximum(probs[b], BALANCE_FLOOR))
    bias = balancing_bias(lp, marginal, n_iter=BALANCE_ROUNDS, tol=1e-4)
    for b in row_blocks(len(lp)):                  # the balanced posterior replaces the log-probabilities
        lp[b] = np.exp(log_softmax(np.asarray(lp[b], dtype=np.float64) + bias))
    return lp


def _gather(n: int, width: int, block) -> np.ndarray:
    """[n, width] array in ``store_dtype(n)`` (float64 up to FLOAT64_ROWS rows) filled with ``block(rows)`` for
    every block of rows: how the cascade keeps a per-query distribution it computes block by block."""
    out = np.empty((n, width), dtype=store_dtype(n))
    for b in row_blocks(n):
        out[b] = block(b)
    return out
