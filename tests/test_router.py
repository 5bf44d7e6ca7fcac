"""The Cascade router: routing rule, valid top-5, several backbones, specialists, OOF, save/load, errors."""
import numpy as np
import pytest

from cascade.router import Cascade
from cascade.stages import InMaP, LinearProbePP


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def task(n_classes=8, n_seen=6, shots=4, n_query=80, dims=(16, 12), seed=0, spread=0.35):
    rng = np.random.default_rng(seed)
    ys = np.repeat(np.arange(n_seen), shots)
    yq = np.arange(n_query) % n_classes
    support, query, text = {}, {}, {}
    for i, d in enumerate(dims):
        c = unit(rng.standard_normal((n_classes, d)))
        key = f"bb{i}"
        support[key] = unit(c[ys] + spread * rng.standard_normal((ys.size, d)))
        query[key] = unit(c[yq] + spread * rng.standard_normal((n_query, d)))
        text[key] = unit(c + 0.3 * spread * rng.standard_normal(c.shape))
    return support, ys, query, yq, text, n_seen


def small():
    return Cascade(InMaP(prior="auto", n_iter=60), [LinearProbePP(epochs=40, select="last")])


def test_predict_shapes_valid_top5_and_routes():
    support, ys, query, yq, text, S = task()
    res = small().fit(support, ys, text, S).predict(query)
    n, C = 80, 8
    assert res.scores.shape == (n, C) and np.allclose(res.scores.sum(1), 1.0)
    assert res.top5.shape == (n, 5)
    assert all(len(set(row)) == 5 for row in res.top5.tolist())
    assert res.top5.min() >= 0 and res.top5.max() < C
    assert len(res.route) == n and set(res.route) <= {"seen", "unseen"}
    np.testing.assert_array_equal(res.top5[:, 0], res.scores.argmax(1))
    # it actually classifies (seen and unseen queries)
    assert np.mean(res.top5[:, 0] == yq) > 0.8


def test_unseen_routing_rule_keeps_transductive_ranking():
    support, ys, query, yq, text, S = task(seed=1)
    model = small().fit(support, ys, text, S)
    res = model.predict(query)
    unseen = np.array([r == "unseen" for r in res.route])
    assert unseen.any() and (~unseen).any()
    # recompute stage 1 alone: queries whose stage-1 arg-max is unseen are exactly the unseen-routed ones
    # and keep stage 1's probabilities unchanged
    from cascade.stages.base import log_softmax
    from cascade.stages.inmap import fit_temperature
    xq, tj, sj = model._joint(query), model._joint(model.text_), model._joint(model.support_)
    st = InMaP(prior="auto", n_iter=60).fit(xq, text=tj, support_x=sj, support_y=ys)
    a = fit_temperature(st.decision_function(sj), ys)
    p1 = np.exp(log_softmax(a * st.decision_function(xq).astype(np.float64)))
    np.testing.assert_array_equal(unseen, p1.argmax(1) >= S)
    np.testing.assert_allclose(res.scores[unseen], p1[unseen], atol=1e-6)
    # seen-routed rows keep stage 1's mass on the unseen classes
    np.testing.assert_allclose(res.scores[~unseen][:, S:], p1[~unseen][:, S:], atol=1e-6)


def test_replace_mode_is_the_seed_rule():
    support, ys, query, yq, text, S = task(seed=2)
    m = Cascade(InMaP(n_iter=60), [LinearProbePP(epochs=40)], combine="replace", calibrate=False)
    res = m.fit(support, ys, text, S).predict(query)
    seen = np.array([r == "seen" for r in res.route])
    lpp = sum(w * m.seen_fitted_[0][k].predict_proba(query[k]) for k, w in m.weights_.items())
    # within the seen block the ranking is LP++'s (combined logits)
    z = sum(w * m.seen_fitted_[0][k].decision_function(query[k]) for k, w in m.weights_.items())
    np.testing.assert_array_equal(res.scores[seen][:, :S].argmax(1), z[seen].argmax(1))
    assert lpp.shape == (80, S)


def test_backbone_weights_change_scores_and_single_backbone_works():
    support, ys, query, yq, text, S = task(seed=3)
    a = small().fit(support, ys, text, S).predict(query).scores
    m = Cascade(InMaP(n_iter=60), [LinearProbePP(epochs=40)], backbone_weights={"bb0": 1.0, "bb1": 0.0})
    b = m.fit(support, ys, text, S).predict(query).scores
    one = {k: v for k, v in support.items() if k == "bb0"}
    c = Cascade(InMaP(n_iter=60), [LinearProbePP(epochs=40)]).fit(one, ys, {"bb0": text["bb0"]}, S)
    np.testing.assert_allclose(b, c.predict({"bb0": query["bb0"]}).scores, atol=1e-4)
    assert not np.allclose(a, b)


class DogSpecialist:
    name = "dogs"
    feature_key = "special"

    def __init__(self, classes):
        self.classes_ = np.asarray(classes)
        self.calls = 0

    def rerank(self, probs, X):
        self.calls += 1
        out = probs.copy()
        block = out[:, self.classes_]
        out[:, self.classes_] = block[:, ::-1]          # swap ranking inside its own classes only
        return out


def test_specialist_hook_only_touches_its_classes_and_routes():
    support, ys, query, yq, text, S = task(seed=4)
    spec = DogSpecialist([0, 1])
    q = dict(query, special=np.random.default_rng(0).standard_normal((80, 5)).astype(np.float32))
    base = small().fit(support, ys, text, S).predict(query)
    res = Cascade(InMaP(prior="auto", n_iter=60), [LinearProbePP(epochs=40, select="last")],
                  specialists=[spec]).fit(support, ys, text, S).predict(q)
    hit = np.array([r == "specialist:dogs" for r in res.route])
    assert spec.calls == 1 and hit.any()
    assert np.all(np.isin(base.scores[hit].argmax(1), [0, 1]))
    np.testing.assert_allclose(res.scores[~hit], base.scores[~hit], atol=1e-9)
    np.testing.assert_allclose(res.scores[hit][:, 2:], base.scores[hit][:, 2:], atol=1e-9)

    class Bad(DogSpecialist):
        def rerank(self, probs, X):
            return probs * 0 + 0.1
    with pytest.raises(ValueError, match="outside its classes"):
        Cascade(InMaP(n_iter=20), [LinearProbePP(epochs=10)], specialists=[Bad([0, 1])]).fit(
            support, ys, text, S).predict(q)


def test_specialist_features_on_demand_are_computed_for_the_routed_rows_only():
    """A callable in the query dict is asked for the rows routed to the specialist, once, and gives the same
    result as the full feature array."""
    support, ys, query, yq, text, S = task(seed=4)
    feats = np.random.default_rng(0).standard_normal((80, 5)).astype(np.float32)
    asked = []

    def lazy(rows):
        asked.append(np.asarray(rows))
        return feats[rows]

    def run(special, spec):
        return Cascade(InMaP(prior="auto", n_iter=60), [LinearProbePP(epochs=40, select="last")],
                       specialists=[spec]).fit(support, ys, text, S).predict(dict(query, special=special))

    eager = run(feats, DogSpecialist([0, 1]))
    spec = DogSpecialist([0, 1])
    spec.query_key, spec.feature_key = "special", "unused"      # query_key wins over feature_key
    res = run(lazy, spec)
    hit = np.flatnonzero([r == "specialist:dogs" for r in res.route])
    assert len(asked) == 1 and asked[0].tolist() == hit.tolist() and 0 < hit.size < 80
    np.testing.assert_allclose(res.scores, eager.scores)
    with pytest.raises(ValueError, match="returned 1 rows"):
        run(lambda rows: feats[:1], DogSpecialist([0, 1]))


def test_support_oof_proba():
    support, ys, query, yq, text, S = task(seed=5)
    m = small().fit(support, ys, text, S)
    p = m.support_oof_proba(n_folds=4)
    assert p.shape == (len(ys), 8) and np.allclose(p.sum(1), 1.0)
    assert np.mean(p.argmax(1) == ys) > 0.6
    # out-of-fold: worse fit than in-fold (LP++ reaches 100% on its own training rows)
    full = sum(w * m.seen_fitted_[0][k].predict_proba(support[k]) for k, w in m.weights_.items())
    assert np.mean(full.argmax(1) == ys) == 1.0


def test_save_load_roundtrip(tmp_path):
    support, ys, query, yq, text, S = task(seed=6)
    m = small().fit(support, ys, text, S, val=(query, np.minimum(yq, S - 1)))
    path = m.save(tmp_path / "model")
    with np.load(path, allow_pickle=False) as data:
        assert "__meta__" in data.files
    back = Cascade.load(tmp_path / "model")
    np.testing.assert_allclose(back.predict(query).scores, m.predict(query).scores, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        Cascade.load(tmp_path / "nothing")


def test_bad_inputs():
    support, ys, query, yq, text, S = task(seed=7)
    with pytest.raises(ValueError, match="dimension"):
        small().fit({"bb0": support["bb0"][:, :5]}, ys, {"bb0": text["bb0"]}, S)
    bad = dict(support, bb0=support["bb0"].copy())
    bad["bb0"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        small().fit(bad, ys, text, S)
    with pytest.raises(ValueError, match="normalised"):
        small().fit(dict(support, bb1=support["bb1"] * 3), ys, text, S)
    with pytest.raises(ValueError, match="no support"):
        small().fit({k: v[ys != 2] for k, v in support.items()}, ys[ys != 2], text, S)
    with pytest.raises(ValueError, match="n_seen"):
        small().fit(support, ys, text, 99)
    m = small().fit(support, ys, text, S)
    with pytest.raises(ValueError, match="lack backbone"):
        m.predict({"bb0": query["bb0"]})
    with pytest.raises(ValueError, match="not fitted"):
        small().predict(query)
    one = m.predict({k: v[:1] for k, v in query.items()})          # a query set of one image
    assert one.top5.shape == (1, 5) and len(set(one.top5[0].tolist())) == 5


def test_expert_weight_is_chosen_by_held_out_likelihood():
    from cascade.stages.base import log_softmax
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    lp1 = log_softmax(rng.standard_normal((60, 4)))                 # stage 1: uninformative (4 classes)
    good = log_softmax(np.eye(3)[y] * 4.0)                           # an expert that is right
    bad = log_softmax(np.eye(3)[(y + 1) % 3] * 4.0)                  # an expert that is confidently wrong
    assert Cascade._fit_expert_weight(lp1, good, y) == 1.0
    assert Cascade._fit_expert_weight(lp1, bad, y) == 0.0
    half = log_softmax(np.where(np.arange(60)[:, None] % 2 == 0, np.eye(3)[y], np.eye(3)[(y + 1) % 3]) * 4.0)
    assert 0.0 < Cascade._fit_expert_weight(lp1, half, y) < 1.0     # a mixed expert gets a partial weight


def test_val_rows_set_the_expert_weight_and_are_saved(tmp_path):
    support, ys, query, yq, text, S = task(seed=8)
    seen = yq < S
    val = ({k: v[seen] for k, v in query.items()}, yq[seen])
    m = small().fit(support, ys, text, S, val=val)
    res = m.predict(query)
    assert 0.0 <= res.details["expert_weight"] <= 1.0
    assert small().fit(support, ys, text, S).predict(query).details["expert_weight"] == 1.0   # no val rows
    back = Cascade.load(m.save(tmp_path / "m").parent)
    assert back.predict(query).details["expert_weight"] == res.details["expert_weight"]


def test_product_temperature_is_fitted_on_val_and_keeps_the_seen_order(monkeypatch):
    """With validation rows the seen block is softmax(t * (log p1 + beta log p2)) with t the maximum-likelihood
    temperature on those rows: it maximises their log-likelihood, never reorders the seen classes of a query,
    and only moves seen classes relative to the unseen ones (which keep stage 1's probabilities)."""
    import cascade.router as router
    from cascade.stages.base import log_softmax

    support, ys, query, yq, text, S = task(seed=7, n_query=120, spread=0.5)
    rng = np.random.default_rng(1)
    vy = np.arange(60) % S
    val = {}
    for k in support:   # val rows: more support-like rows of the seen classes
        centres = np.stack([support[k][ys == c].mean(0) for c in range(S)])
        val[k] = unit(centres[vy] + 0.5 * rng.standard_normal((60, support[k].shape[1])))
    m = small().fit(support, ys, text, S, val=(val, vy))
    res = m.predict(query)
    t = res.details["product_temperature"]
    assert np.isfinite(t) and t > 0 and t != 1.0

    real = router.fit_temperature
    calls = []

    def no_product_temperature(z, y, *a, **kw):     # the 1st call fits stage 1's, the 2nd the product's
        calls.append(1)
        return 1.0 if len(calls) == 2 else real(z, y, *a, **kw)
    monkeypatch.setattr(router, "fit_temperature", no_product_temperature)
    plain = m.predict(query)
    assert plain.details["product_temperature"] == 1.0
    seen = np.array([r == "seen" for r in res.route])
    assert seen.any()
    np.testing.assert_array_equal(np.argsort(-res.scores[seen, :S], 1), np.argsort(-plain.scores[seen, :S], 1))
    np.testing.assert_allclose(res.scores[~seen], plain.scores[~seen])
    np.testing.assert_allclose(res.scores[seen, :S].sum(1), plain.scores[seen, :S].sum(1))   # same seen mass
    # t maximises the val log-likelihood of the seen-block combination
    monkeypatch.setattr(router, "fit_temperature", real)
    from cascade.router import _clone
    st = _clone(m.transductive).fit(m._joint(query), text=m._joint(m.text_), support_x=m._joint(m.support_),
                                    support_y=ys)
    a1 = real(st.decision_function(m._joint(m.support_)).astype(np.float64), ys)
    lp1v = log_softmax(a1 * st.decision_function(m._joint(val)).astype(np.float64))
    z = lp1v[:, :S] + res.details["expert_weight"] * m._seen_log_proba(val, None)
    ll = [log_softmax(s * z)[np.arange(60), vy].mean() for s in (0.8 * t, t, 1.25 * t)]
    assert ll[1] >= max(ll[0], ll[2])
