"""Independent fits side by side: the one place where the cascade runs work in threads.

The cascade's fits are mostly products of small matrices plus element-wise numpy work. BLAS spreads a product over
its threads, but the element-wise work runs on one core, and a small product gains little from a second thread.
Independent fits on the support rows (each seen stage on each backbone, and the folds of their leave-one-fold-out
refits) therefore run in threads of their own, as many at once as BLAS has threads, each on one BLAS thread. Fits
on the query set (the refinement, its check and its folds) run one at a time: two at once would hold the queries'
rows twice, and their large products already keep every core busy. The domain cascades (``per_domain``) are the
exception: each fits and scores its own domain's queries, disjoint subsets whose products are small.

One BLAS thread per fit also makes a fit's result independent of the machine: BLAS's sums are rounded
differently with different numbers of threads, so a fit run beside others equals, bit for bit, the same fit run
with ``OPENBLAS_NUM_THREADS=1``, on two cores or sixteen. A single job runs alone, on all of BLAS's threads. A job
that runs jobs of its own finds one BLAS thread and runs them one after the other.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_info, threadpool_limits


def run_parallel(jobs: list, parallel: bool = True) -> list:
    """``[job() for job in jobs]``, run by as many threads as BLAS has threads now (at most one per job), each job
    on one BLAS thread. ``parallel=False``, a single job or a single BLAS thread: one after the other, as called
    (each job's memory freed before the next starts). An exception of a job is raised here."""
    if not parallel or len(jobs) <= 1:
        return [job() for job in jobs]
    budget = max([lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"] or [1])
    workers = min(len(jobs), budget)
    if workers <= 1:
        return [job() for job in jobs]
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda job: job(), jobs))
