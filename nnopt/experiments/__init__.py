"""The chapter's experiments: ``python -m nnopt.experiments NAME [--out DIR] [--quick]``.

Each experiment returns a report :class:`~nnopt.experiments.report.Section` with its
figures, tables and the textbook claims it checks; ``all`` runs them into one report.
"""
import contextlib
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from . import batchnorm, contours, initialization, optimizers

EXPERIMENTS = {"init": initialization.run, "optimizers": optimizers.run,
               "contours": contours.run, "bn": batchnorm.run}

#: Sections that run on one core: with others, they go to a side process, so the two cores
#: stay busy while the optimizers' engine or the BN workers use one of them less.
ONE_CORE = ("init", "contours")
#: Sections that time training steps: the side process has finished before they start.
TIMES_STEPS = ("bn",)


def run_sections(ctx, names) -> list:
    """Every section of ``names``, in that order; with several on the CPU, the one-core
    sections run beside the others in a separate process."""
    side = [n for n in names if n in ONE_CORE] if len(names) > 1 and ctx.device == "cpu" else []
    if len(side) == len(names):
        side = side[1:]  # nothing else to overlap the first one with
    done = {}
    with (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if side
          else contextlib.nullcontext()) as pool:
        futures = {name: pool.submit(run_section, ctx, name) for name in side}
        for name in names:
            if name in futures:
                continue
            if name in TIMES_STEPS:
                for future in futures.values():
                    future.result()
            done[name] = run_section(ctx, name)
        done.update({name: future.result() for name, future in futures.items()})
    return [done[name] for name in names]


def run_section(ctx, name):
    t0 = time.perf_counter()
    section = EXPERIMENTS[name](ctx)
    print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return section
