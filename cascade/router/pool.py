"""The pool of experts: the seen stages, how the experts' scores combine, and the balancing to a class marginal.

The experts of a query set are the transductive stage and zero-shot CLIP over all classes, and each seen stage
over the seen classes (one expert per stage, fitted per backbone, logits summed with the backbone weights).
With validation rows, zero-shot rebalanced on the query set is one more expert: per-class biases make its mean
posterior over the queries the class marginal. It scores held-out rows as it scores the queries, so its
exponent can be fitted fairly.

The seen block of a query's distribution is the log-linear pool ``softmax(sum_j w_j log p_j)`` of the experts
over the seen classes, each expert with its own exponent ``w_j`` (fitted on held-out labelled rows). The split
between the seen block and each unseen class comes from the pool of the two experts over all classes, with
exponents fitted over all classes (1/2 each without held-out rows). So probability that a seen row puts on the
unseen classes counts against an expert, and a transductive stage that drifted from the truth cannot move
queries into or out of the unseen classes alone. ``combine="replace"`` (the seeds' cascade) gives the seen
block to the seen stages alone.

Balancing rescales the final distribution per class so that its mean over the queries is the class marginal
(Sinkhorn's balancing kept as per-class biases). It pays where the query set is balanced and the experts' class
bias is the error, which the pool's exponents cannot see; it is kept only when held-out rows gain from it. Without
validation rows, :func:`count_marginal` balances part of the way instead: to the class counts the query set most
likely has, given the marginal, the pool's soft counts and how noisy each of them is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stages.base import Stage, log_softmax, stage_name
from ..stages.calibration import balancing_bias, fit_pool_weights, paired_difference, posterior_blocks, row_blocks
from .folds import out_of_fold
from .joint import combined_logits
from .threads import run_parallel

# probabilities are floored here before balancing: a near-one-hot posterior would otherwise need biases of
# hundreds of nats (and a thousand slow rounds) to give a class the count the marginal asks for
BALANCE_FLOOR = 1e-12
# the final balancing and its check run at most this many rounds of proportional fitting (each two matrix-vector
# products): where classes hold little mass that balances part of the way, which the check's threshold and the
# no-val count rule were measured with; run to convergence it cost the older tasks without validation rows
# (docs/accuracy.md, "Speed")
BALANCE_ROUNDS = 100
# count_marginal: the pool's soft counts are taken to err by this many times the variance they would have if its
# posteriors were calibrated (1: calibrated, the assumption that needs no labelled rows to set)
COUNT_NOISE = 1.0


def clone(stage: Stage) -> Stage:
    """An unfitted copy of ``stage`` with the same hyperparameters."""
    return type(stage)(**stage.get_params())


# ------------------------------------------------------------------------------------------------ seen experts
def fit_seen_stages(prototypes, support: dict, y: np.ndarray, text: dict, n_seen: int, val=None) -> list:
    """Each seen stage fitted on every backbone's support rows over the seen classes: a list (one per stage) of
    {backbone: fitted stage}. ``val``: optional ``({backbone: features}, labels)`` passed to each stage. The fits
    are independent and run side by side (:func:`run_parallel`)."""
    keys = list(support)

    def fit(proto, k):
        return lambda: clone(proto).fit(support[k], y, text=text[k][:n_seen],
                                        val=None if val is None else (val[0][k], val[1]))

    fitted = iter(run_parallel([fit(proto, k) for proto in prototypes for k in keys]))
    return [{k: next(fitted) for k in keys} for _ in prototypes]


def seen_logits_out_of_fold(prototypes, fitted: list, support: dict, y: np.ndarray, text: dict, n_seen: int,
                            weights: dict, folds: np.ndarray) -> list:
    """Each seen stage's combined logits [Ns, S] of the support rows, every fold scored by the stage refitted on
    the other folds (rows of fold -1 are always in training and scored by the ``fitted`` stages)."""
    def score_fold(f, rows):
        feats = {k: v[rows] for k, v in support.items()}
        if f < 0:
            models = fitted
        else:
            train = np.flatnonzero(folds != f)
            models = fit_seen_stages(prototypes, {k: v[train] for k, v in support.items()}, y[train], text, n_seen)
        return [combined_logits(per_backbone, feats, weights) for per_backbone in models]

    return out_of_fold(folds, score_fold)


def seen_log_proba(fitted: list, temperatures, feats: dict, weights: dict, logits=None) -> list:
    """Each seen stage's calibrated log-probabilities [N, S] over the seen classes: one expert of the pool per
    stage (an empty list without seen stages). ``logits``: the stages' combined logits, when already computed."""
    out = []
    for i, (per_backbone, a) in enumerate(zip(fitted, temperatures)):
        z = combined_logits(per_backbone, feats, weights) if logits is None else logits[i]
        out.append(log_softmax(log_softmax(a * z)))      # rows normalised again, as every pool input is
    return out


def expert_names(transductive: Stage, seen_stages, rebalanced: bool = False) -> list:
    """The names of the seen block's pooled experts, in the order of their exponents: the transductive stage, each
    seen stage, zero-shot and (``rebalanced``) zero-shot rebalanced. A name given again (a seen stage twice, or the
    seen stage "zeroshot" beside the cascade's own zero-shot expert) is numbered, ``zeroshot#2``, so that each
    expert keeps its own exponent where they are reported by name."""
    names = [stage_name(transductive), *(stage_name(st) for st in seen_stages), "zeroshot"]
    names += ["zeroshot-rebalanced"] if rebalanced else []
    return [n if names[:i].count(n) == 0 else f"{n}#{names[:i].count(n) + 1}" for i, n in enumerate(names)]


# -------------------------------------------------------------------------------------------------------- pool
def pool(lp_first: np.ndarray, lp_seen: list, n_seen: int, combine: str = "pool", others=(), weights=None,
         split=None) -> np.ndarray:
    """Distribution over all classes (rows not renormalised).

    ``split`` (default ``lp_first``; log-probabilities over all classes) gives each row's mass on the seen block
    and on each unseen class. The seen block is replaced, at the same total mass, by the log-linear pool
    ``softmax(w_0 lp_first + sum_i w_i lp_seen_i + sum_j w_j others_j)`` over the seen classes
    (``combine="pool"``; ``lp_first``: an expert over all classes; ``lp_seen``: one expert per seen stage;
    ``others``: more experts over the seen classes; ``weights`` None: unit exponents), or by
    ``softmax(sum_i lp_seen_i)`` (``combine="replace"``). Without seen stages it is ``split``'s distribution."""
    S = n_seen
    out = np.exp(lp_first if split is None else split)
    if not lp_seen:
        return out
    experts = [lp_first[:, :S], *lp_seen, *others]
    w = np.ones(len(experts)) if weights is None else weights
    for b in row_blocks(out.shape[0]):          # the pool's [N, S] temporaries a block of rows at a time
        if combine == "pool":
            block = sum(wj * lp[b] for wj, lp in zip(w, experts))
        else:
            block = sum(lp[b] for lp in lp_seen)
        out[b, :S] = out[b, :S].sum(axis=1, keepdims=True) * np.exp(log_softmax(block))
    return out


@dataclass
class Experts:
    """The experts' log-probabilities of one set of rows."""
    transductive: np.ndarray        # [N, C]
    zero_shot: np.ndarray           # [N, C]
    seen: list                      # one [N, S] per seen stage


@dataclass
class PoolWeights:
    """What the final pool learned from the held-out rows."""
    seen_block: np.ndarray | None   # exponents of [transductive, *seen, zero-shot(, rebalanced)]; None: unit ones
    split: np.ndarray | None        # exponents of [transductive, zero-shot] over all classes; None: no split
    bias: np.ndarray | None         # zero-shot's rebalancing biases; None: no rebalanced expert


def rebalancing_bias(zero_shot: np.ndarray, marginal) -> np.ndarray:
    """Per-class biases that make zero-shot's mean posterior over the queries ``marginal`` (None: uniform)."""
    C = zero_shot.shape[1]
    return balancing_bias(zero_shot, np.full(C, 1.0 / C) if marginal is None else marginal)


def fit_pool(held: Experts | None, y, n_seen: int, combine: str, bias=None) -> PoolWeights:
    """The final pool's exponents, fitted on the held-out rows' experts ``held`` and labels ``y`` (``held`` None:
    unit exponents in the seen block, 1/2 each for the split). ``bias``: zero-shot's rebalancing biases, which
    add the rebalanced expert to the seen block."""
    weights, split = None, None
    n_classes = None if held is None else held.transductive.shape[1]
    if held is not None and combine == "pool":
        if held.seen:
            experts = [held.transductive[:, :n_seen], *held.seen, held.zero_shot[:, :n_seen]]
            if bias is not None:
                experts.append(log_softmax(held.zero_shot + bias)[:, :n_seen])
            weights = fit_pool_weights(experts, y)
        if n_seen < n_classes:      # the seen/unseen split: the experts over all classes
            split = fit_pool_weights([held.transductive, held.zero_shot], y)
    return PoolWeights(seen_block=weights, split=split, bias=bias)


def pooled(experts: Experts, weights: PoolWeights, n_seen: int, combine: str) -> np.ndarray:
    """The final pool of ``experts`` (see the module docstring); rows sum to 1."""
    l1, l0 = experts.transductive, experts.zero_shot
    split = None
    if combine == "pool" and n_seen < l1.shape[1]:
        sw = np.array([0.5, 0.5]) if weights.split is None else weights.split
        split = log_softmax(sw[0] * l1 + sw[1] * l0)
    others = [l0[:, :n_seen]]
    if weights.bias is not None:
        others.append(log_softmax(l0 + weights.bias)[:, :n_seen])
    p = pool(l1, experts.seen, n_seen, combine, others, weights.seen_block, split=split)
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------- balancing
def floored_log(probs: np.ndarray, held: np.ndarray | None = None) -> np.ndarray:
    """The logs of ``probs`` [N, C] floored at ``BALANCE_FLOOR``, followed by those of ``held`` rows when given: one
    array in the dtype of ``probs``, made a block of rows at a time (no concatenated copy)."""
    n = len(probs)
    lp = np.empty((n + (0 if held is None else len(held)), probs.shape[1]), dtype=probs.dtype)
    for b in row_blocks(n):
        lp[b] = np.log(np.maximum(probs[b], BALANCE_FLOOR))
    if held is not None:
        lp[n:] = np.log(np.maximum(held, BALANCE_FLOOR))
    return lp


def final_bias(lp: np.ndarray, target) -> np.ndarray:
    """Per-class biases that balance the log-probabilities ``lp`` to ``target`` (a marginal or class counts), by
    at most ``BALANCE_ROUNDS`` rounds: the final balancing's and its checks' recipe."""
    return balancing_bias(lp, target, n_iter=BALANCE_ROUNDS, tol=1e-4, method="rounds")


def apply_bias(lp: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``lp`` replaced in place, a block of rows at a time, by the posterior ``softmax(lp + bias)``."""
    for b in row_blocks(len(lp)):
        lp[b] = np.exp(log_softmax(np.asarray(lp[b], dtype=np.float64) + bias))
    return lp


def balanced(probs: np.ndarray, marginal) -> np.ndarray:
    """``probs`` [N, C] rescaled per class so that their mean over the rows is ``marginal``; rows sum to 1.

    Sinkhorn's balancing kept as per-class biases (:func:`~cascade.stages.calibration.balancing_bias`), on the
    probabilities floored at ``BALANCE_FLOOR``. Made a block of rows at a time, in the dtype of ``probs``."""
    lp = floored_log(probs)
    return apply_bias(lp, final_bias(lp, marginal))


def held_subset(n_queries: int, y: np.ndarray, *arrays):
    """(``y``, ``arrays``...) cut to at most ``n_queries`` held-out rows (a seeded random subset, in order): the
    checks that score held-out rows in sample among the queries keep the set mostly the queries'."""
    if len(y) <= n_queries:
        return (y, *arrays)
    keep = np.sort(np.random.default_rng(0).permutation(len(y))[:n_queries])
    return (y[keep], *(a[keep] for a in arrays))


def joint_target(n_queries: int, n_held: int, marginal: np.ndarray, n_seen: int):
    """Class counts that the queries and ``n_held`` held-out rows balanced together are given: the queries'
    share is ``marginal``; the held-out rows, being rows of the seen classes, take ``marginal`` restricted to the
    seen classes (no label of theirs is used). None when the marginal puts no mass on the seen classes."""
    seen = np.zeros_like(marginal)
    seen[:n_seen] = marginal[:n_seen]
    if seen.sum() <= 0:
        return None
    return n_queries * marginal / marginal.sum() + n_held * seen / seen.sum()


def balance_gain(scores: np.ndarray, held_scores: np.ndarray, held_y: np.ndarray, marginal: np.ndarray,
                 n_seen: int):
    """Mean and standard error of the per-row gain in log-likelihood of the held-out rows' labels when the final
    distribution is balanced to ``marginal``.

    The held-out rows join the queries in the balanced set (:func:`joint_target`), so they are scored in sample
    as the queries are. At most as many held-out rows as queries take part (:func:`held_subset`)."""
    n = len(scores)
    y, held_scores = held_subset(n, held_y, held_scores)
    target = joint_target(n, len(y), marginal, n_seen)
    if target is None:
        return 0.0, float("inf")
    lp = floored_log(scores, held_scores)
    bias = final_bias(lp, target)
    lv = lp[n:]
    rows = np.arange(len(y))
    d = log_softmax(lv + bias)[rows, y] - log_softmax(lv)[rows, y]
    return paired_difference(d)


def count_marginal(probs: np.ndarray, marginal, noise: float = COUNT_NOISE) -> tuple[np.ndarray, float]:
    """(class marginal to balance ``probs`` [N, C] to, ``rho``): ``marginal`` moved towards the soft class counts of
    ``probs`` as far as the counts' own noise says, per class (a partial balancing that needs no labelled rows).

    An empirical-Bayes estimate of the query set's class counts ``n``. The prior: ``n_k = N q_k + d_k`` with
    ``Var d_k = rho N q_k (1 - q_k)``, where ``rho = 1`` is a query set drawn at random from the marginal ``q``
    and ``rho = 0`` one built to it (e.g. two images per class). The evidence: the soft counts ``m_k = sum_i p_ik``
    err by ``e_k`` with ``Var e_k = noise * v_k``, ``v_k = sum_i p_ik (1 - p_ik)`` (the count's variance if the
    posteriors were calibrated). ``rho`` follows by moments from the chi-square distance of ``m`` to ``N q``,
    ``E sum_k (m_k - N q_k)^2 / (N q_k) = rho (C - 1) + noise sum_k v_k / (N q_k)`` (at least 0), and each count
    from its posterior mean ``N q_k + lam_k (m_k - N q_k)``, ``lam_k = s_k / (s_k + noise v_k)``,
    ``s_k = rho N q_k (1 - q_k)``. A pool whose counts deviate from ``q`` less than its own uncertainty (a biased
    pool on a balanced set) is balanced fully (``rho = 0``); a confident pool on a set whose counts deviate by
    sampling keeps nearly its own counts."""
    n, c = probs.shape
    q = np.asarray(marginal, dtype=np.float64)
    q = q / q.sum()
    m, v = np.zeros(c), np.zeros(c)
    for _, pb in posterior_blocks(probs):
        m += pb.sum(axis=0)
        v += (pb * (1.0 - pb)).sum(axis=0)
    e = n * q
    pos = e > 0
    chi2 = float(np.sum((m[pos] - e[pos]) ** 2 / e[pos]))
    expected_noise = float(noise * np.sum(v[pos] / e[pos]))
    rho = max(0.0, (chi2 - expected_noise) / max(int(pos.sum()) - 1, 1))
    s = rho * e * (1.0 - q)
    lam = np.divide(s, s + noise * v, out=np.zeros(c), where=(s + noise * v) > 0)
    counts = e + lam * (m - e)
    return counts / counts.sum(), rho
