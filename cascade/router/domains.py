"""Which domain each query belongs to, for the per-domain cascades (step 7, ``per_domain``).

The challenge's classes come from four image sources (Animal, Caltech-101, Food-101, Thu-dog). Each domain's
own cascade scores the queries that belong to it, so a query sent to the wrong domain cannot be right. Two
signals say where a query belongs:

* the mass the global distribution gives each domain's classes (what the class names and the support rows say);
* a domain classifier on the image features, fitted on the labelled rows with their class's domain as the label.
  Sources differ in how their images look (framing, background, resolution, what else is in the picture), which
  the class names do not say.

``domain_classifier`` and ``domain_mass_weight`` choose: without the classifier the mass alone decides; with it,
each query's domain probabilities are ``mass ** w * classifier``, renormalised (``w``: the mass's exponent; 0:
the classifier alone). The mass is overconfident where the class names mislead, the classifier where few
labelled rows trained it, so neither gets the last word (the choice of ``w``: docs/accuracy.md, "Several domains
in one task"). The classifier is scikit-learn's ``LogisticRegression`` with a weak regularisation (``C = 10``):
unit-norm CLIP features give small logits, and with the default ``C = 1`` and the support rows alone it tells
the domains apart worse than the class mass does. Only its coefficients are saved.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..stages.calibration import row_blocks

DOMAIN_C = 10.0                  # the classifier's inverse regularisation


def domain_mass(scores: np.ndarray, class_domain: np.ndarray, n_domains: int) -> np.ndarray:
    """[N, K] float64: each row's probability summed over each domain's classes (a block of rows at a time, so a
    float32 ``scores`` is never copied whole to float64)."""
    member = np.zeros((scores.shape[1], n_domains))
    member[np.arange(scores.shape[1]), class_domain] = 1.0
    return np.concatenate([np.asarray(scores[b], dtype=np.float64) @ member for b in row_blocks(len(scores))])


def fit_domain_classifier(x: np.ndarray, domain: np.ndarray, C: float = DOMAIN_C) -> LogisticRegression | None:
    """A multinomial logistic regression of the rows' domain on their joint features ``x``, or None where the rows
    come from fewer than two domains (there is nothing to tell apart)."""
    if len(np.unique(domain)) < 2:
        return None
    return LogisticRegression(C=C, max_iter=2000).fit(np.asarray(x, dtype=np.float64), domain)


def classifier_state(clf: LogisticRegression | None) -> dict:
    """The fitted classifier as arrays (empty for None): its coefficients, intercepts and domain indices."""
    if clf is None:
        return {}
    return {"coef": clf.coef_, "intercept": clf.intercept_, "classes": clf.classes_}


def classifier_from_state(arrays: dict) -> LogisticRegression | None:
    """The classifier :func:`classifier_state` wrote (None where it wrote nothing): a ``LogisticRegression``
    whose fitted attributes are set, so that ``predict_proba`` is scikit-learn's own."""
    if "coef" not in arrays:
        return None
    clf = LogisticRegression()
    clf.coef_, clf.intercept_ = np.asarray(arrays["coef"]), np.asarray(arrays["intercept"])
    clf.classes_ = np.asarray(arrays["classes"])
    clf.n_features_in_ = clf.coef_.shape[1]
    return clf


def domain_posterior(mass: np.ndarray, clf: LogisticRegression | None, x: np.ndarray,
                     mass_weight: float = 0.5) -> np.ndarray:
    """[N, K]: each query's probability of each domain, ``mass ** mass_weight * classifier`` renormalised.
    ``mass``: the global distribution's mass per domain; ``x``: the queries' joint features; ``clf`` None: the
    mass alone. The classifier only shares out, among the domains it knows, the mass the global distribution
    gives them together: a domain without labelled rows (unseen classes only) keeps its mass."""
    if clf is None:
        return mass
    known = np.asarray(clf.classes_, dtype=np.int64)
    proba = np.concatenate([clf.predict_proba(np.asarray(x[b], dtype=np.float64)) for b in row_blocks(len(x))])
    inside = mass[:, known]
    total = inside.sum(axis=1, keepdims=True)
    share = inside ** mass_weight * proba
    norm = share.sum(axis=1, keepdims=True)
    # where the product vanishes (the mass is 0 on every domain the classifier favours), the mass alone
    share = np.where(norm > 0, share / np.where(norm > 0, norm, 1.0), inside / np.where(total > 0, total, 1.0))
    out = mass.copy()
    out[:, known] = total * share
    return out


def rescale_domains(scores: np.ndarray, class_domain: np.ndarray, mass: np.ndarray, posterior: np.ndarray) -> None:
    """Scale each row's classes of each domain (in place) so that the domain holds ``posterior`` instead of
    ``mass``: the ranking inside a domain is kept, and rows still sum to 1 (up to a domain the global
    distribution gave no mass at all, which stays at 0)."""
    if posterior is mass:
        return
    ratio = np.divide(posterior, mass, out=np.zeros_like(mass), where=mass > 0)
    for b in row_blocks(len(scores)):
        scores[b] *= ratio[b][:, class_domain].astype(scores.dtype, copy=False)
