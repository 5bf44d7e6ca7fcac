"""Stage algorithms pinned on tiny hand-checkable inputs, invariances, persistence and bad inputs."""
import numpy as np
import pytest

from cascade.stages import (GDA, InMaP, LinearProbePP, NotFittedError, Stage, ZeroShot, estimate_prior,
                            fit_pool_weights, fit_temperature, get_stage, image_opt, marginal_test, sinkhorn,
                            stage_names)
from cascade.stages.base import log_softmax
from cascade.stages.calibration import labels_on_top
from cascade.stages.inmap import sharpen_confident


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def toy(n_classes=3, dim=8, shots=4, n_query=30, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_classes, dim)))
    ys = np.repeat(np.arange(n_classes), shots)
    yq = np.arange(n_query) % n_classes
    sx = unit(centres[ys] + spread * rng.standard_normal((ys.size, dim)))
    qx = unit(centres[yq] + spread * rng.standard_normal((n_query, dim)))
    text = unit(centres + 0.5 * spread * rng.standard_normal(centres.shape))
    return sx, ys, qx, yq, text


# ---------------------------------------------------------------------------------------------- zero-shot
def test_zeroshot_is_scaled_cosine():
    text = unit([[1, 0], [0, 1]])
    x = unit([[3, 4]])
    z = ZeroShot().fit(text=text).decision_function(x)
    np.testing.assert_allclose(z, [[60.0, 80.0]], rtol=1e-5)   # cos / 0.01
    assert ZeroShot().fit(text=text).predict(x).tolist() == [1]


def test_not_fitted_error():
    for cls in (ZeroShot, InMaP, LinearProbePP, GDA):
        with pytest.raises(NotFittedError, match="not fitted"):
            cls().decision_function(unit([[1.0, 0.0]]))


# ---------------------------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_marginals_and_hand_case():
    logits = np.array([[0.30, 0.10], [0.29, 0.10], [0.10, 0.30]])
    P = sinkhorn(logits, tau_t=0.01, n_iter=200)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-9)            # rows are distributions
    np.testing.assert_allclose(P.sum(0), [1.5, 1.5], atol=1e-6)     # uniform columns: N/C each
    # the second row, the least sure of class 0, is pushed towards class 1
    assert P[1, 1] > P[0, 1] > 0.1 and P[2, 1] > 0.9
    # a prior is honoured
    P = sinkhorn(logits, tau_t=0.01, n_iter=500, prior=np.array([2.0, 1.0]))
    np.testing.assert_allclose(P.sum(0), [2.0, 1.0], atol=1e-5)


def test_sinkhorn_one_round_by_hand():
    M = np.log(np.array([[0.6, 0.4], [0.2, 0.8]])) * 0.01   # softmax(M / 0.01) = the table
    P = sinkhorn(M, tau_t=0.01, n_iter=1)
    A = np.array([[0.6, 0.4], [0.2, 0.8]]) / 2
    A = A / A.sum(0) / 2
    A = A / A.sum(1, keepdims=True) / 2
    np.testing.assert_allclose(P, A * 2, atol=1e-12)


def test_sinkhorn_survives_a_class_no_query_finds_plausible():
    """Class 2 trails every row's best by 0.2 (20 logit units at tau 0.01): its column underflows to zero in
    the authors' probability-domain iterations (0/0); the log-domain fallback still balances the columns and
    agrees with the probability domain wherever that one works."""
    rng = np.random.default_rng(0)
    logits = 0.02 * rng.standard_normal((40, 3))
    logits[:, 2] -= 8.0
    P = sinkhorn(logits, tau_t=0.001, n_iter=200)
    assert np.all(np.isfinite(P))
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(P.sum(0), [40 / 3] * 3, rtol=1e-3)
    from cascade.stages.inmap import _sinkhorn_log
    ok = 0.05 * rng.standard_normal((30, 4))
    np.testing.assert_allclose(sinkhorn(ok, n_iter=20), _sinkhorn_log(ok / 0.01, None, 20), atol=1e-12)


def test_sharpen_confident():
    p = np.array([[0.7, 0.3], [0.55, 0.45]])
    np.testing.assert_array_equal(sharpen_confident(p, 0.6), [[1, 0], [0.55, 0.45]])


# ---------------------------------------------------------------------------------------------- image_opt
def test_image_opt_one_step_by_hand():
    X = unit([[1, 0], [0, 1], [1, 1]])
    W0 = unit([[1, 0.2], [0.1, 1]])
    pl = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    W, steps, lr = image_opt(X, W0, pl, lr=10.0, n_iter=1, tau_i=0.04, confidence=0.6, dtype=np.float64)
    target = np.array([[1, 0], [0, 1], [0.5, 0.5]])
    logits = X.astype(np.float64) @ W0.T.astype(np.float64) / 0.04
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    grad = prob.T @ X - target.T @ X
    ref = W0 - 10.0 / (3 * 0.04) * grad
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(W, ref, atol=1e-5)
    assert steps == 1 and lr == 10.0


def test_image_opt_lr_halves_when_gradient_grows_and_tol_stops():
    sx, ys, qx, yq, text = toy(seed=1)
    pl = np.eye(3)[yq]
    W, steps, lr = image_opt(qx, text, pl, n_iter=50)
    assert steps == 50 and lr <= 10.0 and np.log2(10.0 / lr) == int(np.log2(10.0 / lr))
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, atol=1e-5)
    _, steps_tol, _ = image_opt(qx, text, pl, n_iter=2000, tol=1e-4)
    assert steps_tol < 2000


def test_inmap_learns_and_is_permutation_equivariant():
    sx, ys, qx, yq, text = toy(seed=2, spread=0.5)
    m = InMaP(n_iter=100).fit(qx, text=text)
    assert m.proxies_.shape == text.shape and m.n_iter_ == 100
    acc = np.mean(m.predict(qx) == yq)
    assert acc >= np.mean(ZeroShot().fit(text=text).predict(qx) == yq) - 0.05
    perm = np.random.default_rng(0).permutation(len(qx))
    m2 = InMaP(n_iter=100).fit(qx[perm], text=text)              # query order does not matter
    np.testing.assert_allclose(m2.proxies_, m.proxies_, atol=2e-4)
    cperm = np.array([2, 0, 1])                                   # class order permutes the proxies
    m3 = InMaP(n_iter=100).fit(qx, text=text[cperm])
    np.testing.assert_allclose(m3.proxies_, m.proxies_[cperm], atol=2e-4)


def test_inmap_single_query_and_prior_options():
    sx, ys, qx, yq, text = toy()
    m = InMaP(n_iter=10).fit(qx[:1], text=text)
    assert m.decision_function(qx[:1]).shape == (1, 3)
    m = InMaP(n_iter=10, prior=[1, 1, 2]).fit(qx, text=text)
    np.testing.assert_allclose(m.prior_, [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="prior"):
        InMaP(prior="nope").fit(qx, text=text)
    m = InMaP(n_iter=10, prior="auto").fit(sx, ys, text=text, query=qx)
    np.testing.assert_allclose(m.prior_.sum(), 1.0)


def test_estimate_prior_recovers_imbalance_and_bic_keeps_uniform():
    rng = np.random.default_rng(0)
    q_true = np.array([0.7, 0.2, 0.1])
    y = rng.choice(3, size=3000, p=q_true)
    # a calibrated classifier under a uniform prior: it outputs type t, with p(t | y) = 0.7 if t == y
    # else 0.15, and posterior p(y | t) = 0.7 if y == t else 0.15
    conf = np.full((3, 3), 0.15) + 0.55 * np.eye(3)
    t = np.array([rng.choice(3, p=conf[c]) for c in y])
    lik = conf[t]
    logp = np.log(lik / lik.sum(1, keepdims=True))
    q, gain = estimate_prior(logp)
    np.testing.assert_allclose(q, q_true, atol=0.04)
    assert gain > 0
    yb = np.arange(60) % 3                                          # balanced, small: stays uniform
    lik = np.full((60, 3), 0.15)
    lik[np.arange(60), yb] = 0.7
    q, _ = estimate_prior(np.log(lik))
    np.testing.assert_allclose(q, 1 / 3)


def test_fit_temperature_recovers_scale():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 5))
    p = np.exp(3.0 * z)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert abs(fit_temperature(z, y) - 3.0) < 0.3
    # soft targets drawn from softmax(3 z) are fitted exactly; the optimum is where the derivative vanishes
    s = fit_temperature(z, p)
    assert abs(s - 3.0) < 1e-4
    nll = [-(p * log_softmax(t * z)).sum(1).mean() for t in (s * 0.99, s, s * 1.01)]
    assert nll[1] <= min(nll[0], nll[2])
    # perfectly separated labels push the maximum likelihood's scale to the upper bound, anti-correlated ones to
    # the lower; Platt's targets (2 rows: 3/4 on the label) give the separated rows the scale log 3
    z2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert fit_temperature(z2, np.array([0, 1])) == 1e4 and fit_temperature(z2, np.array([1, 0])) == 1e-2
    assert fit_temperature(z2, np.array([0, 1]), platt=True) == pytest.approx(np.log(3.0), rel=1e-6)
    assert fit_temperature(z2, np.array([1, 0]), platt=True) == 1e-2      # not separated: the plain fit
    # a masked class has no share of the targets: the scale is the 2-class one
    z3 = np.array([[1.0, 0.0, -np.inf], [0.0, 1.0, -np.inf]])
    assert fit_temperature(z3, np.array([0, 1]), platt=True) == pytest.approx(np.log(3.0), rel=1e-6)
    # a class whose logit is -inf in every row (e.g. an unseen class in a seen-only stage) has no probability at
    # any scale: the fit equals the one without that column
    zi = np.c_[z, np.full(len(z), -np.inf)]
    assert fit_temperature(zi, y) == pytest.approx(fit_temperature(z, y), rel=1e-9)


def test_fit_pool_weights_trusts_the_right_expert():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    good = log_softmax(2.0 * np.eye(4)[y] + rng.standard_normal((400, 4)))          # informative
    noise = log_softmax(3.0 * rng.standard_normal((400, 4)))                       # uninformative
    wrong = log_softmax(2.0 * np.eye(4)[(y + 1) % 4])                               # confidently wrong
    w = fit_pool_weights([good, noise, wrong], y)
    assert w.shape == (3,) and np.all(w >= 0)
    assert w[0] > 0.5 and w[1] < 0.2 * w[0] and w[2] == 0.0
    # the weights maximise the likelihood: a nudge in any direction does not help
    def ll(v):
        return log_softmax(v[0] * good + v[1] * noise + v[2] * wrong)[np.arange(400), y].mean()
    for d in np.eye(3) * 0.05:
        assert ll(w) >= ll(np.maximum(w + d, 0)) - 1e-9 and ll(w) >= ll(np.maximum(w - d, 0)) - 1e-9
    # held-out rows that the pool ranks all right (a few easy rows) give the labels no optimum: the weights fit
    # Platt's targets, here one expert whose log-odds are 1, weighted to the targets' 3/4 (sigmoid(w) = 3/4)
    one = log_softmax(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert fit_pool_weights([one], np.array([0, 1])) == pytest.approx([np.log(3.0)], rel=1e-4)
    # with two such experts the fitted pool is as sure as the targets, not more
    sep = fit_pool_weights([one, log_softmax(np.array([[2.0, 0.0], [0.0, 2.0]]))], np.array([0, 1]))
    assert np.all(np.isfinite(sep)) and sep[0] + 2 * sep[1] == pytest.approx(np.log(3.0), rel=1e-4)
    # one row ranked wrong at every weight is enough for the labels to have an optimum: they are fitted as they are
    three = log_softmax(np.array([[2.0, 0.0], [0.0, 2.0], [0.3, 0.0]]))
    w3 = fit_pool_weights([three], np.array([0, 1, 1]))
    def ll3(v):
        return log_softmax(v * three)[np.arange(3), [0, 1, 1]].mean()
    assert ll3(w3[0]) >= max(ll3(w3[0] * 0.99), ll3(w3[0] * 1.01)) - 1e-12


def test_labels_on_top():
    """Every row's label has its row's largest score (ties count)."""
    z = np.array([[0.0, 1.0, -np.inf], [2.0, 0.0, 1.0]])
    assert labels_on_top(z, np.array([1, 0])) and not labels_on_top(z, np.array([0, 0]))
    assert labels_on_top(np.zeros((2, 3)), np.array([2, 1]))


def test_marginal_test_keeps_uniform_unless_the_data_say_otherwise():
    balanced = np.tile(np.eye(4) * 0.7 + 0.1, (25, 1))                 # 100 rows, soft counts exactly uniform
    q, gain, kept = marginal_test(balanced)
    assert not kept and gain == pytest.approx(0.0, abs=1e-9) and np.allclose(q, 0.25)
    skew = np.concatenate([np.tile([0.9, 0.05, 0.03, 0.02], (70, 1)), np.tile([0.05, 0.9, 0.03, 0.02], (30, 1))])
    q, gain, kept = marginal_test(skew)
    assert kept and gain > 1.5 * np.log(100)
    np.testing.assert_allclose(q, skew.mean(0))
    q, _, kept = marginal_test(np.tile([0.4, 0.2, 0.2, 0.2], (10, 1)))   # ten vague rows cannot justify 3 parameters
    assert not kept and np.allclose(q, 0.25)


# ---------------------------------------------------------------------------------------------- GDA
def test_gda_is_lda_with_the_shrunk_pooled_covariance():
    """On hard labels GDA equals the textbook linear discriminant with the pooled within-class covariance (up to
    a constant per row, which no probability or ranking sees)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 4)) + np.repeat(np.eye(3, 4) * 3, 10, axis=0)
    y = np.repeat(np.arange(3), 10)
    for a, target in ((0.0, "identity"), (0.5, "identity"), (0.5, "diagonal"), (1.0, "diagonal")):
        m = GDA(shrinkage=a, target=target, mean_prior=0.0).fit(X, y)
        mu = np.stack([X[y == k].mean(0) for k in range(3)])
        R = X - mu[y]
        S = R.T @ R / 30
        T = np.trace(S) / 4 * np.eye(4) if target == "identity" else np.diag(np.diag(S))
        S = (1 - a) * S + a * T
        P = np.linalg.inv(S)
        ref = X @ P @ mu.T - 0.5 * np.einsum("kd,de,ke->k", mu, P, mu) + np.log(1 / 3)
        z = m.decision_function(X)
        np.testing.assert_allclose(z - z.mean(1, keepdims=True), ref - ref.mean(1, keepdims=True), atol=1e-3)
        np.testing.assert_allclose(m.means_, mu, atol=1e-5)
        np.testing.assert_allclose(m.covariance_, S, atol=1e-5)
    # the mean prior: each class mean shrinks towards the centre by n_k / (n_k + mean_prior), nothing else moves
    y2 = np.repeat(np.arange(3), (4, 10, 16))
    m = GDA(mean_prior=2.0).fit(X, y2)
    plain = GDA(mean_prior=0.0).fit(X, y2)
    c = X.mean(0)
    mu = np.stack([X[y2 == k].mean(0) for k in range(3)])
    np.testing.assert_allclose(m.means_, c + (mu - c) * (np.array([4, 10, 16]) / np.array([6, 12, 18]))[:, None],
                               atol=1e-5)
    np.testing.assert_allclose(m.covariance_, plain.covariance_)
    np.testing.assert_allclose(m.class_prior_, plain.class_prior_)
    # one soft row carrying 0.1 of a class: with the prior the class mean stays near the centre, so the row is
    # not given to it; without the prior the class mean sits on the row, which it then claims
    # (in 40 dimensions, where a row is far from every other class mean, as CLIP features are)
    X = rng.standard_normal((30, 40)) + np.repeat(np.eye(3, 40) * 3, 10, axis=0)
    Y = np.c_[np.eye(3)[y], np.zeros(30)]
    Y[0] = (0.0, 0.0, 0.0, 0.1)
    assert GDA(mean_prior=1.0).fit(X, Y).predict(X[:1])[0] == 0
    assert GDA(mean_prior=0.0).fit(X, Y).predict(X[:1])[0] == 3


def test_gda_soft_labels_equal_weighted_hard_labels_and_prior():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, 3))
    Y = rng.random((20, 2))
    soft = GDA().fit(X, Y)
    # a row with weights (a, b) counts as a copy of itself with label 0 and weight a, and label 1 with weight b
    hard = GDA().fit(np.concatenate([X, X]), np.concatenate([np.c_[Y[:, 0], 0 * Y[:, 0]], np.c_[0 * Y[:, 1], Y[:, 1]]]))
    np.testing.assert_allclose(soft.decision_function(X), hard.decision_function(X), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(soft.class_prior_, Y.sum(0) / Y.sum())
    uni = GDA(class_prior="uniform").fit(X, Y)
    np.testing.assert_allclose(soft.intercept_ - uni.intercept_, np.log(soft.class_prior_))


def test_gda_learns_equivariant_and_handles_empty_classes():
    sx, ys, qx, yq, text = toy(seed=3, spread=0.5)
    m = GDA().fit(sx, ys)
    assert np.mean(m.predict(qx) == yq) >= 0.75
    perm = np.random.default_rng(0).permutation(len(sx))
    np.testing.assert_allclose(GDA().fit(sx[perm], ys[perm]).decision_function(qx), m.decision_function(qx),
                               rtol=1e-4, atol=1e-3)
    Y = np.eye(4)[ys]                    # a fourth class with no weight at all never wins, and nothing is NaN
    z = GDA().fit(sx, Y).decision_function(qx)
    assert np.all(np.isfinite(z)) and not np.any(z.argmax(1) == 3)
    with pytest.raises(ValueError, match="shrinkage"):
        GDA(shrinkage=1.5).fit(sx, ys)
    with pytest.raises(ValueError, match="target"):
        GDA(target="ledoit").fit(sx, ys)
    with pytest.raises(ValueError, match="mean_prior"):
        GDA(mean_prior=-1).fit(sx, ys)
    with pytest.raises(ValueError, match="non-negative"):
        GDA().fit(sx, -Y)
    with pytest.raises(ValueError, match="positive total"):
        GDA().fit(sx, 0 * Y)
    with pytest.raises(ValueError, match="rows"):
        GDA().fit(sx, Y[:-1])


# ---------------------------------------------------------------------------------------------- LP++
def test_lpp_initialisation_and_step_sizes():
    sx, ys, qx, yq, text = toy(seed=3)
    m = LinearProbePP(epochs=1, alpha_every=10).fit(sx, ys, text=text)
    F = sx.astype(np.float64)
    S = F @ text.T.astype(np.float64)
    own = np.array([S[ys == k, k].mean() for k in range(3)])
    assert m.lr_w_ == pytest.approx(4 * len(F) / np.linalg.eigvalsh(F.T @ F)[-1], rel=1e-4)
    assert m.lr_alpha_ == pytest.approx(len(F) / (4 * (S ** 2).sum(0).max()), rel=1e-4)
    np.testing.assert_allclose(m.alpha_, 250 * own.mean(), rtol=1e-4)   # alpha untouched before epoch 10
    # after one epoch: W = sum of support - lr * grad (momentum buffer = grad on the first step)
    W0 = np.stack([F[ys == k].sum(0) for k in range(3)])
    b0 = np.random.default_rng(0).uniform(-1 / np.sqrt(8), 1 / np.sqrt(8), 3)
    Z = F @ W0.T + b0 + 250 * own.mean() * S
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    R = (P - np.eye(3)[ys]) / len(F)
    np.testing.assert_allclose(m.coef_, W0 - m.lr_w_ * R.T @ F, atol=1e-4)
    np.testing.assert_allclose(m.intercept_, b0 - m.lr_w_ * R.sum(0), atol=1e-5)


def test_lpp_alpha_uses_accumulated_gradient_every_10_epochs():
    sx, ys, qx, yq, text = toy(seed=4)
    sx, ys, qx, yq, text = toy(seed=4, spread=1.0)
    fit = lambda e: LinearProbePP(epochs=e, alpha_scale=1.0).fit(sx, ys, text=text).alpha_
    a9, a10, a19 = fit(9), fit(10), fit(19)
    assert np.allclose(a9, fit(1))
    assert not np.allclose(a9, a10) and np.allclose(a10, a19)
    # epoch 20's alpha step uses the gradient summed over epochs 1..20 (the reference never zeroes it)
    W, b, al = None, None, None
    F, T = sx.astype(np.float64), text.astype(np.float64)
    S, Y, N = F @ T.T, np.eye(3)[ys], len(F)
    W = Y.T @ F
    b = np.random.default_rng(0).uniform(-1 / np.sqrt(8), 1 / np.sqrt(8), 3)
    al = np.full(3, (Y * S).sum(0).mean() / 4)             # alpha_scale 1 x mean own similarity (4 shots)
    lr_w = 4 * N / np.linalg.eigvalsh(F.T @ F)[-1]
    lr_a = N / (4 * (S ** 2).sum(0).max())
    bw, bb, ga = 0, 0, 0
    for ep in range(20):
        Z = F @ W.T + b + al * S
        P = np.exp(Z - Z.max(1, keepdims=True))
        R = (P / P.sum(1, keepdims=True) - Y) / N
        bw, bb = 0.9 * bw + R.T @ F, 0.9 * bb + R.sum(0)
        ga = ga + (R * S).sum(0)
        W, b = W - lr_w * bw, b - lr_w * bb
        if ep in (9, 19):
            al = al - lr_a * ga
    np.testing.assert_allclose(fit(20), al, rtol=1e-3)


def test_lpp_learns_and_val_selection():
    sx, ys, qx, yq, text = toy(seed=5, spread=0.6)
    m = LinearProbePP(epochs=60).fit(sx, ys, text=text, val=(qx, yq))
    assert 0 <= m.best_epoch_ < 60 and m.val_accuracy_ == pytest.approx(np.mean(m.predict(qx) == yq) * 100)
    assert np.mean(m.predict(sx) == ys) == 1.0


def test_paired_difference_is_the_mean_and_its_standard_error():
    from cascade.stages.calibration import paired_difference

    m, se = paired_difference([1.0, 2.0, 3.0, 6.0])
    assert m == 3.0 and se == pytest.approx(np.sqrt(14 / 3) / 2)      # sample variance 14/3 over 4 rows
    assert paired_difference([0.5, 0.5])[1] == 0.0
    assert paired_difference([2.0]) == (2.0, float("inf"))             # one row: no standard error
    assert paired_difference([]) == (0.0, float("inf"))


@pytest.mark.parametrize("method", ["lbfgs", "rounds"])
def test_balancing_bias_makes_the_mean_posterior_the_marginal(method):
    """Per-class biases b with mean_i softmax(log p_i + b) = q: Sinkhorn's column scaling, kept as a bias."""
    from functools import partial

    from cascade.stages.base import log_softmax
    from cascade.stages.calibration import balancing_bias
    balancing_bias = partial(balancing_bias, method=method)

    # by hand: rows (0.9, 0.1) and (0.5, 0.5), balanced marginal. With w = (1, x) the class-0 posteriors are
    # 0.9 / (0.9 + 0.1 x) and 1 / (1 + x), whose sum is 1 at x = 3: b = (-log 3, log 3) / 2 once centred
    b = balancing_bias(np.log([[0.9, 0.1], [0.5, 0.5]]), [0.5, 0.5])
    np.testing.assert_allclose(b, [-np.log(3) / 2, np.log(3) / 2], atol=1e-6)
    rng = np.random.default_rng(0)
    L = log_softmax(3 * rng.standard_normal((60, 5)))
    q = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
    b = balancing_bias(L, 2 * q)                                       # the marginal is normalised
    np.testing.assert_allclose(np.exp(log_softmax(L + b)).mean(axis=0), q, atol=1e-6)
    assert abs(b.mean()) < 1e-9
    # a per-class shift of the logits moves the bias by minus that shift (centred)
    c = np.array([2.0, -1.0, 0.5, 0.0, 3.0])
    np.testing.assert_allclose(balancing_bias(L + c, q), b - (c - c.mean()), atol=1e-5)
    # rows that are already balanced need no bias
    cyc = np.log(np.array([np.roll([0.7, 0.1, 0.1, 0.05, 0.05], k) for k in range(5)]))
    np.testing.assert_allclose(balancing_bias(cyc, np.full(5, 0.2)), 0.0, atol=1e-6)
    # a class of zero marginal gets a large, finite negative bias
    z = balancing_bias(L, [0.5, 0.5, 0.0, 0.0, 0.0])
    assert np.all(np.isfinite(z)) and z[2:].max() < z[:2].min() - 10
    for bad in ([0.5, 0.5], [1, 1, 1, 1, -1], [0, 0, 0, 0, 0], [np.nan, 1, 1, 1, 1]):
        with pytest.raises(ValueError, match="marginal"):
            balancing_bias(L, bad)


def test_balancing_bias_lbfgs_reaches_the_rounds_fixed_point_in_far_fewer_passes(monkeypatch):
    """Classes that hold little mass make proportional fitting slow: capped at 100 rounds it balances only part of
    the way (what the final balancing keeps, BALANCE_ROUNDS). L-BFGS on the convex dual reaches the point that
    thousands of rounds converge to, in a fraction of the passes over the rows."""
    from cascade.stages import calibration
    from cascade.stages.base import log_softmax
    rng = np.random.default_rng(1)
    C = 30
    L = log_softmax(40 * rng.standard_normal((400, C)) - np.linspace(0, 40, C))  # later classes rarely win
    q = np.full(C, 1.0 / C)
    passes = []
    real = calibration._weighted_sums
    monkeypatch.setattr(calibration, "_weighted_sums", lambda P, w: passes.append(1) or real(P, w))

    def run(**kw):
        passes.clear()
        b = calibration.balancing_bias(L, q, **kw)
        return b, len(passes), np.exp(log_softmax(L + b)).mean(axis=0)

    exact, n_exact, m_exact = run(method="rounds", n_iter=100000, tol=1e-9)
    fast, n_fast, m_fast = run(tol=1e-6)
    capped, _, m_capped = run(method="rounds", n_iter=100, tol=1e-4)
    assert np.max(np.abs(m_exact / q - 1)) < 1e-6 and np.max(np.abs(m_fast / q - 1)) < 1e-5
    np.testing.assert_allclose(fast, exact, atol=1e-4)
    assert n_fast * 10 < n_exact and n_exact > 1000
    assert np.max(np.abs(m_capped / q - 1)) > 1e-2                        # 100 rounds stop short of the marginal
    with pytest.raises(ValueError, match="method"):
        calibration.balancing_bias(L, q, method="newton")


def test_lpp_auto_selection_keeps_the_last_epoch_unless_validation_clearly_disagrees():
    """select="auto": the best-validation epoch replaces the last only when it beats it on the validation rows by
    more than 2 standard errors of the paired difference. Clean support rows: the last epoch stays (plain "val"
    picks an earlier one by noise). Half the support labels wrong: training fits them, the clean validation rows
    say so, and the first epoch (still mostly the text classifier) is kept."""
    from cascade.stages.lpp import _significantly_better

    assert _significantly_better(np.ones(10, bool), np.zeros(10, bool))           # d = 1 on every row
    assert not _significantly_better(np.ones(10, bool), np.ones(10, bool))        # no difference
    one = np.zeros(10, bool)
    one[0] = True                               # d: one row of 1 -> mean 0.1, se = 0.1: not 2 se
    assert not _significantly_better(one, np.zeros(10, bool))
    assert not _significantly_better(np.ones(1, bool), np.zeros(1, bool))         # one row: no test
    sx, ys, qx, yq, text = toy(n_classes=4, dim=16, shots=6, n_query=200, seed=0, spread=0.5)
    val, test = (qx[:100], yq[:100]), (qx[100:], yq[100:])
    clean = LinearProbePP(epochs=100, select="auto").fit(sx, ys, text=text, val=val)
    last = LinearProbePP(epochs=100, select="last").fit(sx, ys, text=text, val=val)
    assert clean.best_epoch_ == 99 and LinearProbePP(epochs=100).fit(sx, ys, text=text, val=val).best_epoch_ < 99
    np.testing.assert_array_equal(clean.decision_function(qx), last.decision_function(qx))
    wrong = ys.copy()
    flip = np.random.default_rng(0).random(len(ys)) < 0.5
    wrong[flip] = (ys[flip] + 1) % 4
    auto = LinearProbePP(epochs=100, select="auto").fit(sx, wrong, text=text, val=val)
    overfit = LinearProbePP(epochs=100, select="last").fit(sx, wrong, text=text, val=val)
    assert auto.best_epoch_ == 0
    checked = set(range(10)) | set(range(19, 100, 10))       # the epochs "auto" checks: the first 10, every 10th
    assert LinearProbePP(epochs=100, select="auto").fit(sx, ys[::-1].copy(), text=text, val=val).best_epoch_ in checked
    assert np.mean(auto.predict(test[0]) == test[1]) > np.mean(overfit.predict(test[0]) == test[1]) + 0.2
    with pytest.raises(ValueError, match="select"):
        LinearProbePP(select="best").fit(sx, ys, text=text)


def test_lpp_zero_val_rows_is_no_val():
    sx, ys, qx, yq, text = toy(seed=5, spread=0.6)
    a = LinearProbePP(epochs=30).fit(sx, ys, text=text, val=(qx[:0], yq[:0]))
    b = LinearProbePP(epochs=30).fit(sx, ys, text=text)
    assert not hasattr(a, "val_accuracy_") and a.best_epoch_ == b.best_epoch_ == 29
    np.testing.assert_array_equal(a.decision_function(qx), b.decision_function(qx))


# ---------------------------------------------------------------------------------------------- inputs
def test_bad_inputs_have_clear_errors():
    sx, ys, qx, yq, text = toy()
    with pytest.raises(ValueError, match="dimension"):
        LinearProbePP().fit(sx[:, :4], ys, text=text)
    bad = sx.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LinearProbePP().fit(bad, ys, text=text)
    with pytest.raises(ValueError, match="normalised"):
        InMaP().fit(qx * 2, text=text)
    with pytest.raises(ValueError, match="no support"):
        LinearProbePP().fit(sx[ys != 1], ys[ys != 1], text=text)
    with pytest.raises(ValueError, match="labels"):
        LinearProbePP().fit(sx, ys[:-1], text=text)
    with pytest.raises(ValueError, match="single vector"):
        ZeroShot().fit(text=text).decision_function(qx[0])
    with pytest.raises(ValueError, match="prior must be finite non-negative weights with a positive sum, got sum 0"):
        InMaP(prior=np.zeros(len(text))).fit(qx, text=text)


def test_save_load_roundtrip(tmp_path):
    sx, ys, qx, yq, text = toy()
    for st in (ZeroShot().fit(text=text), InMaP(n_iter=20).fit(qx, text=text),
               LinearProbePP(epochs=20).fit(sx, ys, text=text), GDA().fit(sx, ys)):
        path = st.save(tmp_path / f"{type(st).__name__}.npz")
        back = Stage.load(path)
        assert type(back) is type(st) and back.get_params() == st.get_params()
        np.testing.assert_array_equal(back.decision_function(qx), st.decision_function(qx))
        with np.load(path, allow_pickle=False) as data:   # loadable without pickle
            assert "__meta__" in data.files
    with pytest.raises(FileNotFoundError):
        Stage.load(tmp_path / "missing.npz")
    assert set(stage_names()) >= {"zeroshot", "inmap", "lpp", "gda"}
    assert [get_stage(n) for n in ("zeroshot", "inmap", "lpp", "gda")] == [ZeroShot, InMaP, LinearProbePP, GDA]


def test_params_are_stored_unchanged():
    assert InMaP().get_params() == dict(tau_t=0.01, tau_i=0.04, lr=10.0, n_iter=2000, confidence=0.6,
                                        sinkhorn=True, n_sinkhorn=20, gamma=0.0, prior="uniform", tol=None)
    assert LinearProbePP().get_params()["epochs"] == 300
    assert GDA().get_params() == dict(shrinkage=0.5, class_prior="fit", target="identity", mean_prior=1.0)
    with pytest.raises(ValueError, match="no hyperparameter"):
        InMaP().set_params(foo=1)
