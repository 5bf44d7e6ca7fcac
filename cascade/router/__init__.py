"""The cascade: which stage sees which query, and how their scores combine.

``Cascade.fit`` fits the inductive experts on the support rows: zero-shot CLIP over all classes and each seen
stage (default LP++) over the seen classes. ``Cascade.predict`` then scores a query set in eight steps:

1. the inductive experts score the queries;
2. the class marginal of the query set is estimated (``prior="estimate"``): zero-shot's own EM estimate when it
   agrees with the inductive experts' refined posterior, else that posterior's mean when it beats the uniform
   marginal. It becomes the transductive stage's prior;
3. the transductive stage (default InMaP) is fitted on the queries, over all classes;
4. the experts are pooled: a log-linear pool with one fitted exponent per expert over the seen classes, and the
   pool of the two experts over all classes for the split between seen and unseen classes (:mod:`.pool`);
5. the refinement (default GDA) is fitted on the queries with the pool as soft labels, and dropped when held-out
   rows find it worse than the pool (:mod:`.refine`);
6. the final distribution is balanced to the class marginal when held-out rows gain from it (:mod:`.pool`);
   without validation rows, part of the way, to the class counts the query set most likely has given how noisy
   the pool's soft counts are (``balance_without_val``). The refinement is then refitted on the pool balanced
   the same way, and its posterior times that pool, balanced, is the final distribution (``balance_refit``),
   unless validation rows find that refit worse than the balanced pool (``refit_check``, :mod:`.refine`).
   Where held-out rows decline on a few queries per class, which they underrate, the count rule balances part
   of the way, without the refit (``balance_few_per_class``);
7. where the classes fall into several domains (``per_domain``), each query is scored again by its domain's own
   cascade (the same steps 1-6 over that domain's classes, fitted on its rows alone), whose distribution
   replaces the global one inside the query's most probable domain (the global mass per domain, to the power
   ``domain_mass_weight``, times a classifier of the image sources, :mod:`.domains`). Where every domain has its
   own cascade, steps 2-6 are left to them (``domain_global="inductive"``: zero-shot and the seen stages pooled
   give the global mass; ``"pool"``: steps 2-4 are made, neither refined nor balanced);
8. queries are routed to ``unseen`` or ``seen``, and specialists re-rank the seen ones inside their domains
   (:mod:`.routing`).

Several CLIP backbones count as one through their joint features (:mod:`.joint`). Every weight and temperature
is fitted on labelled rows the expert did not train on: the validation rows or, without them, the support rows
scored out of fold (:mod:`.folds`). Query labels are never used. See docs/stages.md and docs/router.md.
"""
from .cascade import FORMAT, Cascade, CascadeResult
from .routing import ROUTE_SEEN, ROUTE_UNSEEN

__all__ = ["Cascade", "CascadeResult", "FORMAT", "ROUTE_SEEN", "ROUTE_UNSEEN"]
