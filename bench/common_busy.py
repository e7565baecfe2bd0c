"""A ``while True: pass`` process beside a benchmark: the machine with one core busy."""
from __future__ import annotations

import contextlib
import multiprocessing as mp


def _spin():
    while True:
        pass


@contextlib.contextmanager
def busy_process(enabled=True):
    """Run a busy-looping process for the duration of the block (if ``enabled``)."""
    if not enabled:
        yield None
        return
    process = mp.get_context("spawn").Process(target=_spin, daemon=True)
    process.start()
    try:
        yield process
    finally:
        process.terminate()
        process.join(timeout=10)
