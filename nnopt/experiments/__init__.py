"""The chapter's experiments: ``python -m nnopt.experiments NAME [--out DIR] [--quick]``.

Each experiment returns a report :class:`~nnopt.experiments.report.Section` with its
figures, tables and the textbook claims it checks; ``all`` runs them into one report.
"""
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from . import batchnorm, contours, initialization, optimizers

EXPERIMENTS = {"init": initialization.run, "optimizers": optimizers.run,
               "contours": contours.run, "bn": batchnorm.run}
#: The longest first: the pool's two workers finish at about the same time.
POOL_ORDER = ("optimizers", "init", "contours")


def run_sections(ctx, names) -> list:
    """Every section of ``names``, in that order. Several on the CPU: the sections and BN's
    training runs are tasks for one worker per core, each on one thread (a task's threads
    would only wait on each other beside the other worker); this process then writes BN's
    section, whose step timings need the machine to itself."""
    if len(names) == 1 or ctx.device != "cpu" or (os.cpu_count() or 1) == 1:
        return [run_section(ctx, name) for name in names]
    with ProcessPoolExecutor(os.cpu_count(), mp_context=_start_method(),
                             initializer=batchnorm._one_thread) as pool:
        sections = {name: pool.submit(run_section, ctx, name)
                    for name in sorted(names, key=_pool_rank) if name != "bn"}
        trained = ([pool.submit(batchnorm.train_one, (batchnorm.settings(ctx), *task))
                    for task in batchnorm.plan(ctx)] if "bn" in names else [])
        done = {name: future.result() for name, future in sections.items()}
        trained = [future.result() for future in trained]
    if "bn" in names:
        done["bn"] = run_section(ctx, "bn", trained)
    return [done[name] for name in names]


def run_section(ctx, name, *args):
    t0 = time.perf_counter()
    section = EXPERIMENTS[name](ctx, *args)
    print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return section


def _pool_rank(name):
    return POOL_ORDER.index(name) if name in POOL_ORDER else len(POOL_ORDER)


def _start_method():
    """fork where it is safe: it skips the workers' imports (a second each), but a fork
    after numba's thread pool has started leaves the child's pool hung."""
    from numba.np.ufunc import parallel
    started = getattr(parallel, "_is_initialized", True)
    return multiprocessing.get_context("spawn" if started else "fork")
