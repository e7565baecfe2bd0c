"""How many threads BLAS gets for one matrix product: one for small products, every core
for large ones (threadpoolctl sets it).

A product on two OpenBLAS threads pays a synchronization between them (about 10 us here)
that the arithmetic of a small product does not repay; and when another process keeps a
core busy, every such synchronization waits for a descheduled thread (a training step of
the textbook network went from 0.6 ms to 2.5 ms with one core busy). A large product
splits into long runs per thread and gains from each core even then. Where the line lies
is measured by ``bench/bench_blas_threads.py`` (float32, the textbook's shapes, quiet and
with one core busy); :data:`BLAS_PARALLEL_MIN_FLOPS` records the result.

``NNOPT_BLAS_POLICY=0`` in the environment leaves BLAS's thread count alone.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

#: Products of fewer flops (2 m k n) run on one thread. bench/bench_blas_threads.py on this
#: project's 2-core machine (bench/results/blas_threads*.json, bench/RESULTS.md "BLAS
#: threads"): up to 2.1e8 flops (batch 1024's first layer) two threads were slower than one,
#: 1.4x-7x, quiet or with a core busy, and far slower (tens of ms) for the small products
#: of a step at batch 64 whenever the second core was taken; from 8.2e8 (batch 4096's)
#: they were faster, 0.5x-0.8x, quiet and busy alike. The line sits between the two.
BLAS_PARALLEL_MIN_FLOPS = 1 << 29
ENABLED = os.environ.get("NNOPT_BLAS_POLICY", "1").lower() not in ("0", "false", "no")


@lru_cache(maxsize=None)
def available_cores() -> int:
    """The cores this process may run on (at its first call)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_threads_for(m: int, k: int, n: int, cores: int | None = None) -> int:
    """Threads for an (m, k) x (k, n) product: 1 below BLAS_PARALLEL_MIN_FLOPS, else all cores."""
    cores = available_cores() if cores is None else cores
    return 1 if 2 * m * k * n < BLAS_PARALLEL_MIN_FLOPS else max(1, cores)


class BlasThreads:
    """Sets BLAS's thread count only when it changes (a call into each BLAS library: cheap,
    but not free at a few products per layer). Finds the libraries on first use."""

    def __init__(self):
        self.current = None
        self.libraries = None

    def _find(self):
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # the policy is an optimization: without it BLAS decides
            return []
        return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]

    def use(self, threads: int) -> None:
        if threads == self.current:
            return
        if self.libraries is None:
            self.libraries = self._find()
        for lib in self.libraries:
            lib.set_num_threads(threads)
        self.current = threads

    def forget(self) -> None:
        """Someone else changed BLAS's threads (a threadpool_limits block): set them again."""
        self.current = None


@lru_cache(maxsize=None)
def blas_threads() -> BlasThreads:
    return BlasThreads()


def product(a, b, out):
    """``a @ b`` into ``out`` (NumPy arrays) with the thread count of :func:`blas_threads_for`."""
    if ENABLED:
        blas_threads().use(blas_threads_for(a.shape[0], a.shape[1], b.shape[1]))
    return np.matmul(a, b, out=out)
