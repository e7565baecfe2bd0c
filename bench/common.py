"""Shared bench helpers: timing, machine facts, table/JSON/PNG output.

Speed is reported as ratios against references measured in the same process and run
(these machines are shared and noisy), never as absolute pass/fail thresholds.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def timeit(fn, *, repeat=5, min_time=0.05, sync=None):
    """Median seconds per call over ``repeat`` rounds of at least ``min_time`` each."""
    return timeit_many({"fn": fn}, repeat=repeat, min_time=min_time, sync=sync)["fn"]


def timeit_many(fns: dict, *, repeat=7, min_time=0.05, sync=None) -> dict:
    """Median seconds per call of each function, measured in interleaved rounds, so a
    slow spell of a shared machine hits every contender alike (same process: for
    contenders that share a runtime safely, e.g. on a GPU; see Worker otherwise)."""
    return medians(timeit_rounds(fns, repeat=repeat, min_time=min_time, sync=sync))


def medians(rounds: dict) -> dict:
    """Each contender's median over its rounds."""
    return {name: statistics.median(times) for name, times in rounds.items()}


def timeit_rounds(fns: dict, *, repeat=7, min_time=0.05, sync=None) -> dict:
    """Seconds per call of each function in each of ``repeat`` interleaved rounds: round i
    of every contender ran within the same stretch of time, so ratios are best taken
    round by round (``round_ratio``)."""
    calls = {name: _calibrate(fn, min_time, sync) for name, fn in fns.items()}
    rounds = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            rounds[name].append(_run(fn, calls[name], sync))
    return rounds


def round_ratio(top, bottom):
    """(median, lowest, highest) of top[i] / bottom[i] over interleaved rounds: the
    ratio with its spread, each round's contenders having shared the machine's mood."""
    ratios = [t / b for t, b in zip(top, bottom, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _run(fn, calls, sync=None):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - start) / calls


def _calibrate(fn, min_time, sync=None):
    """How many calls make a round of at least ``min_time`` seconds (after a warm-up)."""
    fn()
    calls = 1
    while _run(fn, calls, sync) * calls < min_time and calls <= 1 << 20:
        calls *= 2
    return calls


# --- contenders in their own processes ---------------------------------------------------
# nnopt and PyTorch share one OpenMP runtime when they share a process (torch's CPU wheel
# loads the system libgomp, as numba does), so whichever is imported first sets the other's
# thread policy. Each side therefore runs in a worker process of its own, in its default
# environment; the coordinator times them in interleaved rounds, one at a time.
def _serve(conn, module_name):
    import importlib
    module = importlib.import_module(module_name)
    made = {}
    while True:
        op, key, args = conn.recv()
        try:
            if op == "make":
                made[key] = getattr(module, args[0])(*args[1:])
                result = None
            elif op == "calibrate":
                result = _calibrate(made[key], *args)
            elif op == "time":
                result = _run(made[key], args[0])
            elif op == "drop":
                made.pop(key, None)
                result = None
            else:
                break
            conn.send(("ok", result))
        except Exception as exc:  # reported to the coordinator, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    """A process that builds timed callables with factories of ``module`` and times them."""

    def __init__(self, module):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, module), daemon=True)
        self.process.start()

    def ask(self, op, key, *args):
        self.conn.send((op, key, args))
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker {op} {key}: {result}")
        return result

    def close(self):
        self.conn.send(("stop", None, ()))
        self.process.join(timeout=10)


def compare(contenders: dict, *, repeat=7, min_time=0.05, pause=0.25) -> dict:
    """Median seconds per call of each ``name: (worker, key)``, in interleaved rounds whose
    order rotates. The pause lets the last side's idle threads stop spinning first
    (OpenBLAS's spin for about 0.1 s after a call) so that nobody runs beside them."""
    calls = {name: worker.ask("calibrate", key, min_time) for name, (worker, key) in contenders.items()}
    rounds = {name: [] for name in contenders}
    names, previous = list(contenders), None
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            worker, key = contenders[name]
            if worker is not previous:
                time.sleep(pause)
                previous = worker
            rounds[name].append(worker.ask("time", key, calls[name]))
    return medians(rounds)


# --- the machine with one core busy ------------------------------------------------------
def _spin():  # a `while True: pass` process
    while True:
        pass


@contextlib.contextmanager
def busy_process(enabled=True):
    """Run a busy-looping process for the duration of the block (if ``enabled``)."""
    if not enabled:
        yield None
        return
    import multiprocessing as mp
    process = mp.get_context("spawn").Process(target=_spin, daemon=True)
    process.start()
    try:
        yield process
    finally:
        process.terminate()
        process.join(timeout=10)


def machine() -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for name in ("numba", "torch", "cupy", "array_api_compat"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    try:  # which code measured (absent where the tree was copied without .git)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            info["commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def table(rows, columns) -> str:
    """Rows of dicts as an aligned text table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def save(name, payload) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def finish(fig, ax, path):
    """Legend, grid, layout; save the figure as PNG."""
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def torch_or_none():
    try:
        import torch
    except ImportError:
        print("note: torch is not installed; PyTorch columns are left out "
              "(pip install torch==2.13.0)")
        return None
    return torch


def have_torch() -> bool:
    """Whether torch is installed, without importing it here (see Worker)."""
    import importlib.util
    found = importlib.util.find_spec("torch") is not None
    if not found:
        print("note: torch is not installed; PyTorch columns are left out (pip install torch==2.13.0)")
    return found
