"""The ``Cascade`` estimator: fit the inductive experts on the support rows, then score a query set.

``fit`` keeps the labelled rows and fits what needs no query: each seen stage per backbone, the temperatures of
the seen stages and of zero-shot CLIP, and the inductive pool behind the prior estimate. ``predict`` runs the
algorithm's steps on a query set (see :mod:`cascade.router`). Every weight and temperature is fitted on labelled
rows the expert did not train on: the validation rows or, without them, the support rows scored out of fold.
Query labels are never used.

The fitted cascade is saved as arrays plus JSON meta (``state_dict`` / ``from_state``), never pickled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from numbers import Integral, Real
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..io import load_npz_json, save_npz_json
from ..metrics import topk_indices
from ..stages import calibration
from ..stages.base import (BOOL, HasParams, Interval, NotFittedError, Options, Stage, WeightTable, describe_stage,
                           log_softmax, stage_name, validate_params)
from ..stages.calibration import (compatible_marginal, estimate_prior, fill_rows, fit_pool_weights,
                                  fit_temperature, marginal_test, row_blocks)
from ..stages.gda import GDA
from ..stages.inmap import InMaP
from ..stages.lpp import LinearProbePP
from .folds import class_folds
from .domains import (classifier_from_state, classifier_state, domain_mass, domain_posterior,
                      fit_domain_classifier, rescale_domains)
from .joint import (backbone_weights, check_feature_set, check_fit_inputs, combined_logits, joint_features,
                    joint_logits)
from .pool import (Experts, PoolWeights, balance_gain, balanced, clone, count_marginal, expert_names, fit_pool,
                   fit_seen_stages, pool, pooled, rebalancing_bias, seen_log_proba, seen_logits_out_of_fold)
from .refine import Refinement, one_hot
from .routing import apply_specialists, route, route_names
from .threads import run_parallel

FORMAT = "cascade.router/2"
ZERO_SHOT_SCALE = 100.0          # CLIP's logit scale, used when the cascade is not calibrated
MIN_DOMAIN_QUERIES = 2           # a domain cascade scores its queries only when there are at least this many


@dataclass
class CascadeResult:
    """Output of :meth:`Cascade.predict`."""
    scores: np.ndarray                 # [N, C] probabilities (rows sum to 1)
    top5: np.ndarray                   # [N, k] class indices, best first (k = min(5, C)), distinct
    route: list                        # per query: "unseen", "seen" or "specialist:<name>"
    details: dict = field(default_factory=dict)   # diagnostics (prior, weights, temperatures, steps)


class CascadeStages(NamedTuple):
    """The stages a cascade's parameters name (:meth:`Cascade.stages`)."""
    transductive: Stage
    seen: list
    refine: Stage | None


@dataclass
class QueryExperts:
    """The experts' log-probabilities of a block of query rows (``rows``: a slice), made when asked.
    ``stage``/``temperature``: the transductive stage once fitted on the queries.

    A query set of one block of rows (at most ``calibration.CHUNK_ROWS``: every request is then for all its rows)
    keeps zero-shot's and the seen stages' log-probabilities from their first request until :meth:`release`, so
    that the marginal estimate, the rebalancing biases and the pool share one computation. A larger set recomputes
    them for every block where they are used, never holding them for all its rows (docs/scale.md). The
    transductive stage's are asked for once (twice with ``routing="stage1"``, after the refinement, where keeping
    them would hold one more [N, C] array through it) and are never kept."""
    model: "Cascade"
    feats: dict
    xq: np.ndarray
    stage: Stage | None = None
    temperature: float = 1.0
    _kept: dict = field(default_factory=dict, repr=False)

    def _rows(self, rows) -> dict:
        return {k: v[rows] for k, v in self.feats.items()}

    def _once(self, name: str, rows, make):
        """``make(rows)``, kept under ``name`` when ``rows`` are all the rows of a one-block query set. The kept
        arrays are read-only: every user makes its own arrays from them."""
        n = len(self.xq)
        if n > calibration.CHUNK_ROWS or not isinstance(rows, slice) or rows.indices(n) != (0, n, 1):
            return make(rows)
        if name not in self._kept:
            out = make(rows)
            for a in out if isinstance(out, list) else [out]:
                a.flags.writeable = False
            self._kept[name] = out
        out = self._kept[name]
        return list(out) if isinstance(out, list) else out

    def release(self):
        """Drop the kept log-probabilities (once the pool is made, nothing asks for them again)."""
        self._kept.clear()

    def zero_shot(self, rows) -> np.ndarray:
        return self._once("zero_shot", rows, lambda r: self.model._zero_shot_log_proba(self.xq[r]))

    def seen(self, rows) -> list:
        return self._once("seen", rows, lambda r: self.model._seen_log_proba(self._rows(r)))

    def transductive(self, rows) -> np.ndarray:
        return self.model._transductive_log_proba(self.stage, self.temperature, self.xq[rows])

    def pooled(self, rows, weights: PoolWeights) -> np.ndarray:
        """The pool of all experts of ``rows`` with the fitted ``weights``."""
        m = self.model
        return pooled(Experts(self.transductive(rows), self.zero_shot(rows), self.seen(rows)), weights, m.n_seen_,
                      m.combine)


class Cascade(HasParams):
    """Routed cascade of stages (see :mod:`cascade.router` for the algorithm).

    The constructor's defaults are the stages' own, the papers' settings. The cascade as shipped (fewer InMaP
    steps and LP++ epochs, which the refinement makes unnecessary) is the one of cascade/configs/default.toml:
    :func:`cascade.config.default_cascade` builds it.

    Parameters
    ----------
    transductive : Stage or None
        Stage over all classes fitted on the queries: ``fit(support_x, support_y, text=..., query=...)``.
        None: ``InMaP()``.
    seen_stages : sequence of Stage or None
        Inductive stages over the seen classes, ``fit(X, y, text=..., val=...)``, each one expert of the pool
        with its own fitted exponent. None: ``[LinearProbePP()]``.
    refine : Stage, None or "default"
        Transductive refinement over all classes, ``fit(X, soft_labels)`` (soft labels [N, C]); "default":
        ``GDA()``; None: the pooled distribution is the final score.
    prior : "estimate" | "stage"
        "estimate": the cascade estimates the query set's class marginal and sets it as the transductive
        stage's ``prior`` (when it has one); "stage": the stage's own setting is used.
    routing : "joint" | "stage1"
        Which distribution decides that a query belongs to an unseen class (:mod:`cascade.router.routing`).
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
        With validation rows and ``combine="pool"``: add zero-shot CLIP rebalanced on the query set to the pool
        of the seen block, ``softmax(log p_zero-shot + b)`` with per-class biases ``b`` chosen so that its mean
        posterior over the queries equals the class marginal given to the transductive stage. Unlike the
        transductive stage, whose proxies are fitted on the queries they score, it scores the held-out rows as it
        scores the queries, so its exponent is fitted fairly. Its exponent is fitted with the others (0 when the
        held-out rows find no use for it). Not used when the support rows out of fold stand in for validation
        rows: a few shots per class fit a fourth exponent poorly (docs/stages.md).
    refine_check : float or None
        With held-out rows: keep the refinement only unless its mean log-likelihood of their labels (refitted with
        them as soft-labelled rows, :mod:`cascade.router.refine`) falls more than this many standard errors (of
        the paired per-row difference) below the pooled distribution's. None or False: always keep it.
    balance : "check" | "always" | "counts" | "none"
        Balance the final distribution of the queries to the class marginal (per-class biases that make its mean
        over the queries that marginal: Sinkhorn's balanced assignment, as InMaP balances its pseudo-labels).
        "check": only when the held-out rows, joining the queries in the balanced set so that they are scored
        in sample, gain more than ``balance_min_gain`` nats per row in mean log-likelihood of their labels and
        more than one standard error of that mean (never for fewer queries than classes, whose counts no marginal
        describes); without validation rows, ``balance_without_val`` decides instead. "counts": balanced part of
        the way, to the class counts the query set most likely has given the marginal and how noisy the pool's
        soft counts are (:func:`~cascade.router.pool.count_marginal`; no held-out rows are used). Only with
        ``combine="pool"``.
    balance_min_gain : float
        The smallest mean gain (nats per held-out row) at which "check" balances (docs/accuracy.md).
    balance_few_per_class : float
        Where "check" declines on a query set of fewer queries per class than this, the final distribution is
        balanced part of the way by the count rule (as ``balance="counts"``; the refinement is not refitted).
        With a few queries per class the query-fitted experts memorise the queries, and held-out rows underrate
        them and their balancing (docs/accuracy.md, "Few queries per class"). 0: never.
    balance_without_val : "counts" | "check" | "none"
        What ``balance="check"`` does without validation rows: "counts" (see ``balance``), "check" on the support
        rows scored out of fold (``cv_folds``; their gain does not tell balanced query sets from others,
        docs/accuracy.md), or "none".
    balance_refit : bool
        When the final distribution is balanced: refit the refinement on the pooled distribution balanced to the
        same marginal (its soft labels then carry the marginal as well), and take as the final distribution the
        balanced product of that refinement's posterior and the balanced pool (the pool anchors the refinement,
        as TransCLIP's text prior anchors its Gaussian mixture). A Gaussian fitted to unbalanced soft labels
        learns the experts' class bias, which balancing its output afterwards undoes only in part. Also where the
        check dropped the refinement of the unbalanced pool: that check judged another fit, and the anchor keeps
        a weak refinement from overriding the pool. One more refinement fit, only where the final distribution
        is balanced.
    refit_with_val : bool
        With validation rows that cover every class (a closed task): the balanced refit also fits on them, with
        their labels, as on more support rows. Its temperature is then the refinement's of step 5, fitted while
        they were held out (fitting it on them in sample would make it too sharp). Not on open tasks, whose
        validation rows come from the seen classes only and would pull the Gaussian's class prior and
        covariance towards them (docs/accuracy.md, "The balanced refit with the validation rows").
    per_domain : bool
        Where the classes fall into several domains (``fit(..., domains=...)``): after the balancing, score the
        queries again with one cascade per domain, each fitted on its domain's classes alone (the same settings),
        and let its distribution replace the global one inside the domain each query belongs to most. A query set
        that mixes domains is a mixture of query sets of different shapes (one balanced, one not; one whose
        refinement helps, one where it hurts), and the global checks, which judge all domains at once, cannot
        suit each of them (docs/accuracy.md, "Several domains in one task"). A domain with no seen class, or with
        a single class, keeps the global scores. The domain cascades are fitted and run side by side
        (:func:`~cascade.router.threads.run_parallel`).
    domain_classifier : bool
        With ``per_domain``: fit a classifier of the labelled rows' domain on their joint features and let it
        help say which domain each query belongs to (:mod:`cascade.router.domains`): the domains of a task come
        from different image sources, whose look the class names do not carry. False: the global mass alone.
    domain_mass_weight : float
        The exponent of the global mass per domain in the query's domain probabilities, ``mass ** w *
        classifier`` (0: the classifier alone; 1: their product).
    domain_global : "inductive" | "pool"
        Where every domain has its own cascade (and ``routing="joint"``), the global distribution only says which
        domain a query belongs to: "inductive" takes it from zero-shot and the seen stages pooled (steps 2-6 over
        all classes are not made, which saves InMaP over all classes); "pool" makes steps 2-4 (the global pool,
        neither refined nor balanced).
    refit_check : float or None
        With validation rows: keep the balanced refit only unless the validation rows, taking part in it as the
        queries do (in both balancings and among the refinement's rows), find its mean log-likelihood of their
        labels more than this many standard errors below the balanced pool's; the balanced pool is then the final
        distribution. The refit is trusted more than the refinement (it gains on the class-subset families), so
        the bar is higher than ``refine_check``'s: it drops the refit where the classes overlap so much that the
        Gaussian fitted to the pool's soft labels costs points (docs/accuracy.md). Without validation rows the
        refit is kept (support rows scored fold by fold dropped refits that gained). None or False: always keep
        it. One more refinement fit, only where the refit is made.
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
        "refit_check": [Interval(Real, 0, None), Options(None, False)],
        "rebalance": [BOOL],
        "backbone_weights": [WeightTable(), Options(None)],
        "balance": [Options("none", "check", "always", "counts")],
        "balance_without_val": [Options("counts", "check", "none")],
        "balance_min_gain": [Interval(Real, 0, None)],
        "balance_few_per_class": [Interval(Real, 0, None)],
        "balance_refit": [BOOL],
        "refit_with_val": [BOOL],
        "per_domain": [BOOL],
        "domain_classifier": [BOOL],
        "domain_mass_weight": [Interval(Real, 0, None)],
        "domain_global": [Options("inductive", "pool")],
    }

    def __init__(self, transductive: Stage | None = None, seen_stages=None, refine="default",
                 prior: str = "estimate", routing: str = "joint", backbone_weights=None,
                 combine: str = "pool", calibrate: bool = True, cv_folds: int = 4, specialists=(),
                 refine_check=1.0, rebalance: bool = True, balance: str = "check", balance_min_gain: float = 0.1,
                 balance_refit: bool = True, balance_without_val: str = "counts",
                 balance_few_per_class: float = 5.0, refit_check=2.0, per_domain: bool = True,
                 domain_classifier: bool = True, domain_mass_weight: float = 0.5,
                 domain_global: str = "inductive", refit_with_val: bool = True):
        self.transductive = transductive
        self.seen_stages = seen_stages
        self.refine = refine
        self.prior = prior
        self.routing = routing
        self.backbone_weights = backbone_weights
        self.combine = combine
        self.calibrate = calibrate
        self.cv_folds = cv_folds
        self.specialists = specialists
        self.refine_check = refine_check
        self.rebalance = rebalance
        self.balance = balance
        self.balance_min_gain = balance_min_gain
        self.balance_refit = balance_refit
        self.balance_without_val = balance_without_val
        self.balance_few_per_class = balance_few_per_class
        self.refit_check = refit_check
        self.per_domain = per_domain
        self.domain_classifier = domain_classifier
        self.domain_mass_weight = domain_mass_weight
        self.domain_global = domain_global
        self.refit_with_val = refit_with_val

    def stages(self) -> CascadeStages:
        """The stages the parameters name, the defaults filled in: ``transductive=None`` is ``InMaP()``,
        ``seen_stages=None`` is ``[LinearProbePP()]``, ``refine="default"`` is ``GDA()`` (the stages' own
        defaults; the shipped configuration is cascade/configs/default.toml)."""
        return CascadeStages(InMaP() if self.transductive is None else self.transductive,
                             [LinearProbePP()] if self.seen_stages is None else list(self.seen_stages),
                             GDA() if isinstance(self.refine, str) and self.refine == "default" else self.refine)

    def _check_params(self):
        validate_params(self._parameter_constraints, self.get_params())
        stages = self.stages()
        if not isinstance(stages.transductive, Stage):
            raise ValueError(f"transductive must be a Stage, got {self.transductive!r}")
        if stages.refine is not None and not isinstance(stages.refine, Stage):
            raise ValueError(f"refine must be a Stage, None or 'default', got {self.refine!r}")
        if stages.refine is not None and not stages.refine.soft_labels:
            raise ValueError(f"refine stage {stage_name(stages.refine)!r} does not fit on soft labels, which the "
                             "refinement is given (the pooled posterior of the queries); GDA does")
        for st in stages.seen:
            if not isinstance(st, Stage):
                raise ValueError(f"seen_stages must be Stages, got {st!r}")
            if st.transductive:
                raise ValueError(f"seen stage {stage_name(st)!r} is transductive; the seen experts are fitted on the "
                                 "support rows before any query is known")

    def _check_fitted(self):
        if not hasattr(self, "seen_fitted_"):
            raise NotFittedError("this Cascade is not fitted yet; call fit(...) first")

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self, support: dict, support_y, text: dict, n_seen: int, val=None, domains=None) -> "Cascade":
        """Fit the inductive experts on the support rows.

        support: {backbone: [Ns, D_b]}; support_y: [Ns] labels in 0..n_seen-1; text: {backbone: [C, D_b]}
        (seen classes first); val: optional ``({backbone: [Nv, D_b]}, labels)`` for model selection and
        calibration only; domains: optional domain name per class ([C]), for ``per_domain``.
        """
        self._check_params()
        self._oof_cache = None          # out-of-fold logits of an earlier fit's support rows
        keys, texts, sups, y, n_seen, val = check_fit_inputs(support, support_y, text, n_seen, val)
        given_val = val                 # the domains' cascades hold out their own rows when there are none
        self.backbones_ = keys
        self.weights_ = backbone_weights(keys, self.backbone_weights)
        self.n_classes_ = int(texts[keys[0]].shape[0])
        self.n_seen_ = n_seen
        self.text_ = texts
        self.support_ = sups
        self.support_y_ = y
        self.seen_fitted_ = fit_seen_stages(self.stages().seen, sups, y, texts, n_seen, val)
        # held-out labelled rows: the validation rows, or else the support rows scored out of fold
        self.val_folds_, self.val_seen_logits_ = None, None
        if self.calibrate and val is None and self.cv_folds > 1:
            folds = class_folds(y, self.cv_folds)
            keep = folds >= 0
            if keep.any():
                val = ({k: v[keep] for k, v in sups.items()}, y[keep])
                self.val_folds_ = folds[keep]
                self.val_seen_logits_ = [z[keep] for z in self._oof_seen_logits(folds)]
        use_val = self.calibrate and val is not None
        # the seen stages' temperatures on the held-out rows, zero-shot's on the support rows (it never saw them)
        # (Platt's targets where validation rows are all ranked right; calibration.fit_temperature)
        self.seen_temperatures_ = [fit_temperature(self._held_out_seen_logits(i, val[0]), val[1],
                                                   platt=self.val_folds_ is None) if use_val
                                   else 1.0 for i in range(len(self.seen_fitted_))]
        self.zero_shot_temperature_ = (fit_temperature(self._zero_shot_logits(self._support_joint()), y)
                                       if self.calibrate else ZERO_SHOT_SCALE)
        # labelled held-out rows, kept to weigh the experts at predict time (calibrate=True only)
        self.val_, self.val_y_ = val if use_val else (None, None)
        # the pool of zero-shot and the seen stages (the inductive posterior behind the prior estimate)
        self.inductive_pool_ = None
        if use_val and self.combine == "pool" and self.seen_fitted_:
            lp0v, lp_seen_v = self._val_experts()
            self.inductive_pool_ = fit_pool_weights([lp0v[:, :n_seen], *lp_seen_v], self.val_y_).tolist()
        self._fit_domains(domains, given_val)
        return self

    def _fit_domains(self, domains, val) -> None:
        """``domain_names_``, ``class_domain_`` ([C] index into them) and ``domain_cascades_``: per domain, a
        cascade with the same settings fitted on the domain's classes alone (seen ones first, each block in
        ascending order) and on its support and validation rows, or None where the domain keeps the global
        scores (no seen class, a single class); ``domain_classifier_``: the domain of the labelled rows (support
        and validation) on their joint features (:mod:`.domains`). All empty unless ``per_domain`` and at least
        two domains."""
        self.domain_names_, self.class_domain_, self.domain_cascades_ = [], None, []
        self.domain_classifier_ = None
        if not self.per_domain or domains is None:
            return
        domains = [str(d) for d in domains]
        if len(domains) != self.n_classes_:
            raise ValueError(f"domains: {len(domains)} names for {self.n_classes_} classes")
        names = list(dict.fromkeys(domains))
        if len(names) < 2:
            return
        self.domain_names_ = names
        self.class_domain_ = np.array([names.index(d) for d in domains], dtype=np.int64)
        params = {k: v for k, v in self.get_params().items() if k not in ("specialists", "per_domain")}
        stages = self.stages()
        jobs = {}
        for i in range(len(names)):
            classes = self._domain_classes(i)
            seen = classes[classes < self.n_seen_]
            if len(seen) == 0 or len(classes) < 2:
                continue
            relabel = np.full(self.n_classes_, -1, dtype=np.int64)
            relabel[seen] = np.arange(len(seen))
            rows = np.isin(self.support_y_, seen)
            sub_val = None
            if val is not None and np.isin(val[1], seen).any():
                vrows = np.isin(val[1], seen)
                sub_val = ({k: v[vrows] for k, v in val[0].items()}, relabel[val[1][vrows]])
            sub = Cascade(**dict(params, transductive=clone(stages.transductive),
                                 seen_stages=[clone(st) for st in stages.seen],
                                 refine=None if stages.refine is None else clone(stages.refine),
                                 specialists=(), per_domain=False))
            jobs[i] = partial(sub.fit, {k: v[rows] for k, v in self.support_.items()}, relabel[self.support_y_[rows]],
                              {k: t[classes] for k, t in self.text_.items()}, len(seen), val=sub_val)
        fitted = dict(zip(jobs, run_parallel(list(jobs.values()))))
        self.domain_cascades_ = [fitted.get(i) for i in range(len(names))]
        if self.domain_classifier:
            rows_x, rows_y = [self._support_joint()], [self.support_y_]
            if val is not None:
                rows_x.append(self._joint(val[0]))
                rows_y.append(np.asarray(val[1]))
            self.domain_classifier_ = fit_domain_classifier(np.concatenate(rows_x),
                                                            self.class_domain_[np.concatenate(rows_y)])

    def _domain_classes(self, i: int) -> np.ndarray:
        """Domain ``i``'s classes, seen ones first (indices are ascending and seen classes come first)."""
        return np.flatnonzero(self.class_domain_ == i)

    # ------------------------------------------------------------------------------------------------ predict
    def predict(self, query: dict) -> CascadeResult:
        """Score the queries (transductively: the query set is used, without labels, by the transductive stage,
        the marginal estimate, the refinement and the balancing).

        Memory grows linearly in the number of queries N: besides their features and one joint copy, at most
        about three [N, C] arrays are kept at a time (four with the balanced refit, which keeps the pool). Beyond
        one block of rows (``calibration.CHUNK_ROWS``) the experts' log-probabilities are recomputed a block of
        rows at a time wherever they are used, never kept for all queries; a one-block set keeps zero-shot's and
        the seen stages' until the pool is made (:class:`QueryExperts`). The distributions that are kept (pooled,
        refined, balanced) are float64 up to ``calibration.FLOAT64_ROWS`` queries and float32 beyond
        (docs/scale.md)."""
        self._check_fitted()
        self._check_params()
        used = [k for k in self.backbones_ if self.weights_[k] > 0]      # a backbone of weight 0 may be absent
        feats = check_feature_set(query, used, "query", {k: t.shape[1] for k, t in self.text_.items()})
        n, C, S = len(feats[used[0]]), self.n_classes_, self.n_seen_
        xq = self._joint(feats)
        details = {}

        # 1. the experts of a block of query rows, made on demand (never kept for all queries)
        experts = QueryExperts(self, feats, xq)
        if self._domains_decide():
            # every domain has its own cascade, which makes steps 2-6 over its classes: the global distribution
            # only helps say which domain a query belongs to, and the inductive experts' pool says it as well
            scores = fill_rows(n, C, lambda rows: pool(experts.zero_shot(rows), experts.seen(rows), S, self.combine,
                                                        weights=self.inductive_pool_))
            experts.release()
            self._predict_domains(feats, xq, scores, details)
            return self._finish(scores, query, experts, details)
        held_x = self._val_joint()
        refinement = self._refinement(held_x) if self.stages().refine is not None else None
        # 2. the class marginal of the query set, the transductive stage's prior
        stage = clone(self.stages().transductive)
        if self.prior == "estimate" and "prior" in stage.get_params():
            stage.set_params(prior=self._estimate_marginal(xq, experts.zero_shot, experts.seen, refinement, details))
        # 3. the transductive stage over all classes, fitted on the queries
        a1 = self._fit_transductive(stage, xq)
        experts.stage, experts.temperature = stage, a1
        held = (Experts(self._transductive_log_proba(stage, a1, held_x), *self._val_experts())
                if held_x is not None else None)
        # 4. the pool of experts, its exponents fitted on the held-out rows
        marginal = details.get("prior", getattr(stage, "prior_", None))
        weights = fit_pool(held, self.val_y_, S, self.combine, self._rebalancing(experts.zero_shot, n, marginal))
        scores = fill_rows(n, C, partial(experts.pooled, weights=weights))
        experts.release()
        held_scores = pooled(held, weights, S, self.combine) if held is not None else None
        held_pool = held_scores           # the held-out rows' pool, for the balanced refit's check of step 6
        # 5. the refinement fitted on the queries with the pool as soft labels, dropped when held-out rows object
        #    (steps 5 and 6 are skipped where every domain has its own cascade: the global distribution then only
        #    says which domain each query belongs to, and the pool says it as well)
        by_domain = self._domains_cover_all()
        keep_pool = self.balance_refit and self.balance != "none" and self.combine == "pool" and not by_domain
        t_ref, pool_scores = None, (scores if keep_pool else None)   # kept only for the balanced refit of step 6
        t_fitted = None       # the refinement's temperature, fitted on held-out rows (also where it is dropped)
        if refinement is not None and not by_domain:
            scores, held_scores, t_ref, t_fitted = self._refine(refinement, xq, scores, held_scores, details)
        # 6. the final distribution balanced to the class marginal, when held-out rows gain from it (the refinement
        #    then refitted on the balanced pool and anchored by it, ``balance_refit``); where they decline on a few
        #    queries per class, part of the way by the count rule (``balance_few_per_class``, no refit)
        if self.balance != "none" and self.combine == "pool" and not by_domain:   # "replace": the seeds' rule
            scores, target = self._balance(scores, held_scores, marginal, details)
            refit = (details["balanced"] and self.balance_refit and refinement is not None
                     and not details["balance_few"])
            if refit:
                del scores
                scores, t_ref = self._balanced_refit(refinement, xq, pool_scores, target, held_pool, details,
                                                     t_fitted)
                refit = not details.get("refit_dropped", False)
            details["balance_refit"] = refit
        del pool_scores
        # 7. where the classes fall into domains, each query scored again by its domain's own cascade
        if getattr(self, "domain_cascades_", None):
            self._predict_domains(feats, xq, scores, details)
        details.update(self._pool_details(weights), transductive_temperature=a1, refine_temperature=t_ref)
        if hasattr(stage, "n_iter_"):
            details["n_iter"] = stage.n_iter_
        return self._finish(scores, query, experts, details)

    def _finish(self, scores: np.ndarray, query: dict, experts: QueryExperts, details: dict) -> CascadeResult:
        """8. routing, then the specialists re-rank inside their domains."""
        scores, unseen = route(scores, experts.transductive, self.n_seen_, self.routing)
        routes = route_names(unseen)
        scores = apply_specialists(self.specialists, scores, query, routes)
        scores /= scores.sum(axis=1, keepdims=True)
        details.update(seen_temperatures=list(self.seen_temperatures_), n_unseen_routed=int(unseen.sum()))
        return CascadeResult(scores=scores, top5=topk_indices(scores, min(5, self.n_classes_)), route=routes,
                             details=details)

    def _domains_cover_all(self) -> bool:
        """Whether every domain has a cascade of its own (then every class is scored again by one)."""
        cascades = getattr(self, "domain_cascades_", None)
        return bool(cascades) and all(c is not None for c in cascades)

    def _domains_decide(self) -> bool:
        """Whether the global steps 2-6 are left out (``domain_global="inductive"``): every domain has its own
        cascade and the joint routing reads the final scores alone (``routing="stage1"`` needs the global
        transductive stage)."""
        return self.domain_global == "inductive" and self.routing == "joint" and self._domains_cover_all()

    def _predict_domains(self, feats: dict, xq: np.ndarray, scores: np.ndarray, details: dict) -> None:
        """Each query's domain probabilities (:func:`~.domains.domain_posterior`: the global distribution's mass
        per domain, to the power ``domain_mass_weight``, times the domain classifier) rescale its global scores
        domain by domain; inside its most probable domain the domain cascade's distribution times that probability
        replaces them (in place), so rows still sum to 1. The domain cascades see only their own queries: each
        checks its balancing and its refinement on its own query set. ``details["domains"]``: one entry per
        domain."""
        mass = domain_mass(scores, self.class_domain_, len(self.domain_names_))
        clf = getattr(self, "domain_classifier_", None) if self.domain_classifier else None
        post = domain_posterior(mass, clf, xq, self.domain_mass_weight)
        rescale_domains(scores, self.class_domain_, mass, post)
        assign = post.argmax(axis=1)
        rows = [np.flatnonzero(assign == i) for i in range(len(self.domain_names_))]
        todo = [i for i, sub in enumerate(self.domain_cascades_)
                if sub is not None and len(rows[i]) >= MIN_DOMAIN_QUERIES]
        results = dict(zip(todo, run_parallel([partial(self.domain_cascades_[i].predict,
                                                        {k: v[rows[i]] for k, v in feats.items()}) for i in todo])))
        out = []
        for i, name in enumerate(self.domain_names_):
            entry = {"domain": name, "n_queries": int(len(rows[i])), "rescored": False}
            if i in results:
                res = results.pop(i)
                scores[np.ix_(rows[i], self._domain_classes(i))] = res.scores * post[rows[i], i:i + 1]
                d = res.details
                entry.update(rescored=True, balanced=bool(d.get("balanced", False)),
                             balance_refit=bool(d.get("balance_refit", False)),
                             refine_dropped=bool(d.get("refine_dropped", False)),
                             refit_dropped=bool(d.get("refit_dropped", False)),
                             balance_few=bool(d.get("balance_few", False)), balance_gain=d.get("balance_gain"),
                             balance_rho=d.get("balance_rho"), balance_why=d.get("balance_why"))
            out.append(entry)
        details["domains"] = out

    def _estimate_marginal(self, xq: np.ndarray, zero_shot, seen, refinement, details: dict) -> np.ndarray:
        """The class marginal of the query set. Zero-shot's own EM estimate (the marginal InMaP's
        ``prior="auto"`` takes) when it is statistically compatible with the soft class counts of the inductive
        experts' pooled posterior, refined as the final pool will be; otherwise that refined posterior's mean,
        kept only when it beats the uniform marginal by the BIC margin. ``zero_shot(rows)``, ``seen(rows)``: the
        inductive experts of a block of query rows."""
        n, C = len(xq), self.n_classes_
        q_zs, _ = estimate_prior(fill_rows(n, C, zero_shot))     # made first: one [N, C] array at a time
        inductive = fill_rows(n, C, lambda rows: pool(zero_shot(rows), seen(rows), self.n_seen_, self.combine,
                                                      weights=self.inductive_pool_))
        if refinement is not None:
            inductive = refinement.fit_predict(xq, inductive, platt=False)[0]   # the BIC test's: at the bound
        q, gain, kept = marginal_test(inductive)
        source = "refined" if kept else "uniform"
        if compatible_marginal(q_zs, inductive):
            q, source = q_zs, "zero-shot"
        details.update(prior=q, prior_gain=gain, prior_source=source)
        return q

    def _fit_transductive(self, stage: Stage, xq: np.ndarray) -> float:
        """Fit ``stage`` on the queries ``xq``, the support rows and the joint text; its temperature, fitted on
        the support rows (whose labels it never saw)."""
        sj = self._support_joint()
        stage.fit(sj, self.support_y_, text=self._text_joint(), query=xq)
        return (fit_temperature(stage.decision_function(sj).astype(np.float64), self.support_y_)
                if self.calibrate else 1.0)

    @staticmethod
    def _transductive_log_proba(stage: Stage, temperature: float, x: np.ndarray) -> np.ndarray:
        return log_softmax(temperature * stage.decision_function(x).astype(np.float64))

    def _rebalancing(self, zero_shot, n: int, marginal):
        """Zero-shot's rebalancing biases on the ``n`` queries (the rebalanced expert; ``zero_shot(rows)``: its
        log-probabilities of a block of rows), or None where it is not used: without validation rows (held-out
        support rows fit its exponent poorly), with ``rebalance`` off, with ``combine="replace"`` or without seen
        stages."""
        if (self.val_ is None or self.val_folds_ is not None or not self.rebalance or self.combine != "pool"
                or not self.stages().seen):
            return None
        return rebalancing_bias(fill_rows(n, self.n_classes_, zero_shot), marginal)

    def _refine(self, refinement: Refinement, xq: np.ndarray, scores: np.ndarray, held_scores, details: dict):
        """(scores, held-out rows' scores, temperature, fitted temperature) after the refinement, or the pool's
        (temperature None) when the check drops it; the fitted temperature is returned either way."""
        refined, refined_held, t_ref = refinement.fit_predict(xq, scores)
        if self.refine_check is not None and self.refine_check is not False and self.val_ is not None:
            gain, se = refinement.gain(xq, scores, held_scores)
            dropped = bool(gain < -float(self.refine_check) * se)
            details.update(refine_gain=gain, refine_gain_se=se, refine_dropped=dropped)
            if dropped:
                return scores, held_scores, None, t_ref
        return refined, refined_held, t_ref, t_ref

    def _balance(self, scores: np.ndarray, held_scores, marginal, details: dict):
        """(scores, target marginal): ``scores`` balanced to ``marginal`` (None: uniform) when ``balance`` says so
        ("check": when the held-out rows gain enough from it; without validation rows, ``balance_without_val``),
        or to the count estimate of :func:`~cascade.router.pool.count_marginal` ("counts", and "check" declining
        on fewer than ``balance_few_per_class`` queries per class: ``details["balance_few"]``)."""
        C = self.n_classes_
        marginal = np.full(C, 1.0 / C) if marginal is None else np.asarray(marginal, dtype=np.float64)
        rule = self.balance
        if rule == "check" and (self.val_ is None or self.val_folds_ is not None):    # no validation rows
            rule = self.balance_without_val
        details["balance_rule"] = rule
        keep, few = rule == "always", False
        if rule == "check" and held_scores is not None and len(scores) >= C:
            gain, se = balance_gain(scores, held_scores, self.val_y_, marginal, self.n_seen_)
            keep = bool(gain > max(float(self.balance_min_gain), se))
            few = (not keep and self.val_folds_ is None                      # validation rows, not folds
                   and len(scores) < float(self.balance_few_per_class) * C)
            details.update(balance_gain=gain, balance_gain_se=se)
        if (rule == "counts" or few) and len(scores) >= C:
            marginal, rho = count_marginal(scores, marginal)
            keep = True
            why = "few" if few else "setting" if self.balance == "counts" else "no_val"
            details.update(balance_rho=rho, balance_target=marginal, balance_why=why)
        details.update(balanced=keep, balance_few=few)
        return (balanced(scores, marginal) if keep else scores), marginal

    def _balanced_refit(self, refinement: Refinement, xq: np.ndarray, pool_scores: np.ndarray, marginal,
                        held_pool, details: dict, t_fitted=None):
        """(final distribution, temperature): the refinement refitted on the pool balanced to ``marginal``, its
        posterior times that balanced pool, balanced again (per-class biases cancel in the product); or the
        balanced pool alone (temperature None) where ``refit_check`` drops the refit (``details["refit_dropped"]``;
        ``held_pool``: the held-out rows' pooled distribution). With ``refit_with_val``, validation rows that
        cover every class join the refit's rows with their labels, at the temperature ``t_fitted`` (step 5's,
        fitted while they were held out; ``details["refit_with_val"]``)."""
        C = self.n_classes_
        marginal = np.full(C, 1.0 / C) if marginal is None else np.asarray(marginal, dtype=np.float64)
        if (self.refit_check is not None and self.refit_check is not False and held_pool is not None
                and refinement.held_x is not None and refinement.held_folds is None):     # validation rows
            gain, se = refinement.balanced_gain(xq, pool_scores, held_pool, marginal, self.n_seen_)
            dropped = bool(gain < -float(self.refit_check) * se)
            details.update(refit_gain=gain, refit_gain_se=se, refit_dropped=dropped)
            if dropped:
                return balanced(pool_scores, marginal), None
        pool_balanced = balanced(pool_scores, marginal)
        labelled = ()
        if (self.refit_with_val and t_fitted is not None and refinement.held_x is not None
                and refinement.held_folds is None and len(np.unique(refinement.held_y)) == C):
            labelled = [(refinement.held_x, one_hot(refinement.held_y, C))]
        details["refit_with_val"] = bool(labelled)
        refit, _, t_ref = refinement.fit_predict(xq, pool_balanced, labelled, t_fitted)
        tiny = np.finfo(np.float64).tiny
        for rows in row_blocks(len(refit)):            # the product replaces the refit, a block of rows at a time
            anchored = (np.log(np.maximum(np.asarray(refit[rows], dtype=np.float64), tiny))
                        + np.log(np.maximum(np.asarray(pool_balanced[rows], dtype=np.float64), tiny)))
            refit[rows] = np.exp(log_softmax(anchored))
        del pool_balanced
        return balanced(refit, marginal), t_ref

    def _pool_details(self, weights) -> dict:
        out = {"pool_weights": None if weights.seen_block is None else list(weights.seen_block),
               "pool_experts": self.pool_experts(rebalanced=weights.bias is not None)}
        if weights.bias is not None:
            out["rebalance_bias"] = weights.bias
        if self.combine == "pool" and self.n_seen_ < self.n_classes_:
            out["split_weights"] = [float(v) for v in (weights.split if weights.split is not None else (0.5, 0.5))]
        return out

    def pool_experts(self, rebalanced: bool = False) -> list:
        """The names of the seen block's pooled experts, in the order of ``details["pool_weights"]``: the
        transductive stage, each seen stage, zero-shot and (``rebalanced``) zero-shot rebalanced."""
        stages = self.stages()
        return expert_names(stages.transductive, stages.seen, rebalanced)

    # ------------------------------------------------------------------------------------ the fitted experts
    def _joint(self, feats: dict) -> np.ndarray:
        """Joint features of ``feats`` (:func:`~cascade.router.joint.joint_features`)."""
        return joint_features(feats, self.weights_)

    def _support_joint(self) -> np.ndarray:
        """The support rows' joint features (built once per fitted or loaded support set)."""
        return self._stored_joint("support_")

    def _text_joint(self) -> np.ndarray:
        """The class text's joint features (built once, as the support rows')."""
        return self._stored_joint("text_")

    def _val_joint(self) -> np.ndarray | None:
        """The validation rows' joint features, or None without them (built once, as the support rows')."""
        return self._stored_joint("val_") if self.val_ is not None else None

    def _stored_joint(self, attr: str) -> np.ndarray:
        """Joint features of the stored rows ``self.<attr>``, kept until those rows are replaced (a new fit or
        load), so that each ``predict`` does not concatenate them again."""
        cache = self.__dict__.setdefault("_joint_cache", {})
        rows = getattr(self, attr)
        if attr not in cache or cache[attr][0] is not rows:
            cache[attr] = (rows, self._joint(rows))
        return cache[attr][1]

    def _refinement(self, held_x) -> Refinement:
        """The refine stage with the labelled rows it is fitted and judged with (``held_x``: the held-out rows'
        joint features, or None)."""
        folds = self.val_folds_
        return Refinement(self.stages().refine, self._support_joint(), self.support_y_, self.n_classes_,
                          held_x=held_x, held_y=self.val_y_, held_folds=folds,
                          support_folds=None if folds is None else class_folds(self.support_y_, self.cv_folds),
                          calibrate=self.calibrate)

    def _zero_shot_logits(self, x: np.ndarray) -> np.ndarray:
        """Zero-shot CLIP's logits of the joint features ``x``."""
        return joint_logits(x, self._text_joint())

    def _zero_shot_log_proba(self, x: np.ndarray) -> np.ndarray:
        return log_softmax(self.zero_shot_temperature_ * self._zero_shot_logits(x))

    def _seen_log_proba(self, feats: dict, logits=None) -> list:
        """Each seen stage's calibrated log-probabilities [N, S] over the seen classes (one expert per stage)."""
        return seen_log_proba(self.seen_fitted_, self.seen_temperatures_, feats, self.weights_, logits)

    def _val_experts(self):
        """Zero-shot's and the seen stages' log-probabilities of the held-out rows (computed once)."""
        cache = getattr(self, "_val_cache", None)
        if cache is None or cache[0] is not self.val_:
            if self.val_seen_logits_ is None:
                lp_seen = self._seen_log_proba(self.val_)
            else:
                lp_seen = self._seen_log_proba(None, logits=self.val_seen_logits_)
            cache = (self.val_, self._zero_shot_log_proba(self._val_joint()), lp_seen)
            self._val_cache = cache
        return cache[1], cache[2]

    def _held_out_seen_logits(self, i: int, feats: dict) -> np.ndarray:
        """Seen stage ``i``'s combined logits of the held-out rows (out of fold when they are support rows)."""
        if self.val_seen_logits_ is not None:
            return self.val_seen_logits_[i]
        return self._seen_logits(i, feats)

    def _seen_logits(self, i: int, feats: dict) -> np.ndarray:
        return combined_logits(self.seen_fitted_[i], feats, self.weights_)

    def _oof_seen_logits(self, folds: np.ndarray) -> list:
        """Each seen stage's combined logits [Ns, S] of the support rows out of fold. Computed once per fold
        assignment (``fit`` without validation rows and ``support_oof_proba`` share them)."""
        cache = getattr(self, "_oof_cache", None)
        if cache is not None and np.array_equal(cache[0], folds):
            return cache[1]
        out = seen_logits_out_of_fold(self.stages().seen, self.seen_fitted_, self.support_, self.support_y_,
                                      self.text_, self.n_seen_, self.weights_, folds)
        self._oof_cache = (folds.copy(), out)
        return out

    def support_oof_proba(self, n_folds: int = 4, random_state: int = 0) -> np.ndarray:
        """Out-of-fold probabilities [Ns, C] of the support rows from the inductive experts.

        Rows are split into ``n_folds`` folds per class (round-robin after a seeded shuffle); each fold is
        scored by the seen stages refitted on the other folds (their calibrated temperatures are reused),
        pooled with zero-shot over all classes as the inductive posterior behind the prior estimate (no
        queries are involved). Rows of a class with a single support row cannot be held out and are scored by
        the full model. Use these to choose a specialist's blending weight without touching query labels.
        """
        self._check_fitted()
        logits = self._oof_seen_logits(class_folds(self.support_y_, n_folds, random_state))
        lp0 = self._zero_shot_log_proba(self._support_joint())
        p = pool(lp0, self._seen_log_proba(None, logits=logits), self.n_seen_, self.combine,
                 weights=self.inductive_pool_)
        return p / p.sum(axis=1, keepdims=True)

    # ------------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> tuple[dict, dict]:
        """(arrays, JSON meta) of the fitted cascade: its settings, its stages (each through its own
        ``state_dict``) and the labelled rows it keeps for calibration at predict time. No pickle; the model
        bundle (:mod:`cascade.bundle`) writes them with the rest of a trained model."""
        self._check_fitted()
        stages = self.stages()
        arrays = {"support_y": self.support_y_}
        for i, k in enumerate(self.backbones_):
            arrays[f"text/{i}"] = self.text_[k]
            arrays[f"support/{i}"] = self.support_[k]
            if self.val_ is not None:
                arrays[f"val/{i}"] = self.val_[k]
        if self.val_ is not None:
            arrays["val_y"] = self.val_y_
        if self.val_folds_ is not None:      # held-out rows = support rows out of fold
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
            "refit_check": self.refit_check,
            "rebalance": bool(self.rebalance),
            "balance": self.balance, "balance_min_gain": float(self.balance_min_gain),
            "balance_refit": bool(self.balance_refit), "refit_with_val": bool(self.refit_with_val),
            "balance_without_val": self.balance_without_val,
            "balance_few_per_class": float(self.balance_few_per_class),
            "backbone_weights": self.backbone_weights,
            "transductive": describe_stage(stages.transductive),
            "refine": describe_stage(stages.refine) if stages.refine is not None else None,
            "seen_prototypes": [describe_stage(s) for s in stages.seen],
            "seen_fitted": stages_meta,
            "per_domain": bool(self.per_domain), "domain_classifier": bool(self.domain_classifier),
            "domain_mass_weight": float(self.domain_mass_weight),
            "domain_global": self.domain_global,
        }
        if getattr(self, "domain_cascades_", None):
            cascades = []
            for i, sub in enumerate(self.domain_cascades_):
                if sub is None:
                    cascades.append(None)
                    continue
                a, m = sub.state_dict()
                arrays.update({f"domain/{i}/{name}": v for name, v in a.items()})
                cascades.append(m)
            meta["domains"] = {"names": self.domain_names_, "class_domain": self.class_domain_.tolist(),
                               "cascades": cascades}
            arrays.update({f"domain_clf/{k}": v for k, v in classifier_state(self.domain_classifier_).items()})
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
                  balance=meta.get("balance", "none"), balance_min_gain=meta.get("balance_min_gain", 0.1),
                  # written before the refit existed: a balanced final distribution was the refinement's, balanced
                  balance_refit=bool(meta.get("balance_refit", False)),
                  # written before the validation rows joined the balanced refit: it fitted without them
                  refit_with_val=bool(meta.get("refit_with_val", False)),
                  # written before the count rule existed: without validation rows the check ran on the support rows
                  balance_without_val=meta.get("balance_without_val", "check"),
                  # written before the few-queries fallback existed: a declined check left the scores unbalanced
                  balance_few_per_class=meta.get("balance_few_per_class", 0.0),
                  # written before the refit's check existed: the balanced refit was always kept
                  refit_check=meta.get("refit_check"),
                  # written before the domain cascades existed: one cascade over all classes
                  per_domain=bool(meta.get("per_domain", False)),
                  # written before the domain classifier existed: the global pool's mass decided the domain
                  domain_classifier=bool(meta.get("domain_classifier", False)),
                  domain_mass_weight=meta.get("domain_mass_weight", 0.5),
                  domain_global=meta.get("domain_global", "pool"))
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
        obj.domain_names_, obj.class_domain_, obj.domain_cascades_ = [], None, []
        obj.domain_classifier_ = classifier_from_state({name[len("domain_clf/"):]: v for name, v in arrays.items()
                                                        if name.startswith("domain_clf/")})
        dom = meta.get("domains")
        if dom:
            obj.domain_names_ = list(dom["names"])
            obj.class_domain_ = np.asarray(dom["class_domain"], dtype=np.int64)
            for i, m in enumerate(dom["cascades"]):
                prefix = f"domain/{i}/"
                a = {name[len(prefix):]: v for name, v in arrays.items() if name.startswith(prefix)}
                obj.domain_cascades_.append(None if m is None else
                                            cls.from_state(a, m, source=f"{source} (domain {dom['names'][i]!r})"))
        return obj

    def save(self, path) -> Path:
        """Write the fitted cascade alone to the file ``path`` (.npz: arrays + JSON meta, no pickle; atomically), as a
        stage is saved. A trained model (cascade, classes, encoders, specialists) is written by
        :class:`cascade.bundle.Bundle` alone, which owns the model folder."""
        return save_npz_json(Path(path), *self.state_dict())

    @classmethod
    def load(cls, path, specialists=()) -> "Cascade":
        """Read a cascade written by :meth:`save` (specialists are not saved; pass them again)."""
        path = Path(path)
        arrays, meta = load_npz_json(path)
        return cls.from_state(arrays, meta, specialists, source=str(path))
