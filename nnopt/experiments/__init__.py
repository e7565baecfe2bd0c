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


def run_sections(ctx, names) -> list:
    """Every section of ``names``, in that order. Several on the CPU: BN's step times are
    taken first, with the machine to itself; then the sections and BN's training runs are
    tasks for one worker per core, each on one thread (a task's threads would only wait on
    each other beside the other worker), BN's section last, from its runs."""
    if len(names) == 1 or ctx.device != "cpu" or (os.cpu_count() or 1) == 1:
        return [run_section(ctx, name) for name in names]
    start_method = _start_method()
    if start_method.get_start_method() == "fork":
        _warm_up(ctx)
    times = batchnorm.timed_steps(ctx) if "bn" in names else None
    workers = os.cpu_count()
    with ProcessPoolExecutor(workers, mp_context=start_method,
                             initializer=batchnorm._one_thread) as pool:
        # The curve-fitting engine first, one part per worker: the longest work, split.
        engine = ([pool.submit(optimizers.train_part, ctx, part, workers) for part in range(workers)]
                  if "optimizers" in names else [])
        sections = {name: pool.submit(run_section, ctx, name)
                    for name in names if name not in ("optimizers", "bn")}
        trained = ([pool.submit(batchnorm.train_one, (batchnorm.settings(ctx), *task))
                    for task in batchnorm.plan(ctx)] if "bn" in names else [])
        # Each section from its results, as soon as they are in (the engine's come first).
        if engine:
            sections["optimizers"] = pool.submit(run_section, ctx, "optimizers",
                                                 [future.result() for future in engine])
        if trained:
            sections["bn"] = pool.submit(run_section, ctx, "bn",
                                         [future.result() for future in trained], times)
        return [sections[name].result() for name in names]


def run_section(ctx, name, *args):
    t0 = time.perf_counter()
    section = EXPERIMENTS[name](ctx, *args)
    print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return section


def _warm_up(ctx):
    """What every worker would load for itself, loaded once before they are forked:
    pyplot, the data, and numba's compiled layer, optimizer and curve-fitting kernels (from
    its disk cache; about 1.7 s per process). Only the plain-loop kernels run here: numba's
    thread pool stays unstarted, so the fork stays safe."""
    import numpy as np
    from .. import datasets, mlp, optim
    from ..losses import SoftmaxCrossEntropy
    from . import curvefit, regression
    from .report import figure_module
    figure_module()
    datasets.load(ctx.dataset, ctx.data_dir)
    curvefit.train_seeds([("sgd", {"lr": 0.1})], [regression.curve(0)],
                         [curvefit.initial_params(0)], [0], max_epochs=0, parallel=False)
    rng = np.random.default_rng(0)
    x, y = rng.random((8, 784), dtype=np.float32), rng.integers(0, 10, 8)
    for bn in (False, True):
        model = mlp([784, 16, 10], "relu", batchnorm=bn, seed=0)
        opt = optim.SGD(model, lr=0.1)
        model.zero_grad()
        model.loss_and_backward(x, y, SoftmaxCrossEntropy())
        opt.step()


def _start_method():
    """fork where it is safe: it skips the workers' imports (a second each), but a fork
    after numba's thread pool has started leaves the child's pool hung, and on macOS the
    system libraries do not survive a fork (spawn is Python's default there)."""
    import sys
    from numba.np.ufunc import parallel
    started = getattr(parallel, "_is_initialized", True)
    safe = sys.platform.startswith("linux") and not started
    return multiprocessing.get_context("fork" if safe else "spawn")
