"""Independent fits side by side: the one place where the cascade runs work in threads.

The cascade's fits are mostly products of small matrices plus element-wise numpy work. BLAS spreads a product over
its threads, but the element-wise work runs on one core, and a small product gains little from a second thread.
Independent fits on the support rows (each seen stage on each backbone, and the folds of their leave-one-fold-out
refits) therefore run in threads of their own, each with its share of BLAS's threads. Fits on the query set (the
refinement, its check and its folds) run one at a time: two at once would hold the queries' rows twice, and their
large products already keep both cores busy. With a single BLAS thread (one core, or ``OPENBLAS_NUM_THREADS=1``)
the jobs run one after the other. A fit's result depends only on the number of BLAS threads it runs on (the
rounding of BLAS's sums), not on what runs beside it: on two cores every one of several fits runs on one thread,
as it would with ``OPENBLAS_NUM_THREADS=1``. A job that runs jobs of its own finds one BLAS thread and runs them
one after the other.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_info, threadpool_limits


def run_parallel(jobs: list, parallel: bool = True) -> list:
    """``[job() for job in jobs]``, the jobs run by as many threads as BLAS may use (its thread count now), each
    with its share of BLAS's threads. A fit is mostly products of small matrices, where one BLAS thread per fit
    does more work per core than several threads on one fit, and the fits' element-wise numpy work, which BLAS
    threads never share, runs side by side too. ``parallel=False``: one after the other (each job's memory
    freed before the next starts)."""
    if not parallel:
        return [job() for job in jobs]
    budget = max([lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"] or [1])
    workers = min(len(jobs), budget)
    if workers <= 1:
        return [job() for job in jobs]
    with threadpool_limits(limits=max(1, budget // workers), user_api="blas"), ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda job: job(), jobs))
