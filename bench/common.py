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
ROOT = Path(__file__).resolve().parent.parent
# The checkout's nnopt, whatever else is installed: the commit recorded with the results
# (machine_info) is then the code that ran, in the worker processes too (a spawned
# process starts with its parent's sys.path), and a checkout runs without pip install.
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


def medians(rounds: dict) -> dict:
    """Each contender's median over its rounds."""
    return {name: statistics.median(times) for name, times in rounds.items()}


def timeit_rounds(fns: dict, *, repeat=7, min_time=0.05, sync=None) -> dict:
    """Seconds per call of each function in each of ``repeat`` interleaved rounds, in an
    order that rotates (nobody always runs first): round i of every contender ran within
    the same stretch of time, so ratios are best taken round by round (``put_ratio``)."""
    calls = {name: _calibrate(fn, min_time, sync) for name, fn in fns.items()}
    rounds = {name: [] for name in fns}
    for r in range(repeat):
        for name in rotated(list(fns), r):
            rounds[name].append(_run(fns[name], calls[name], sync))
    return rounds


def rotated(names, r):
    """``names`` in round ``r``'s order: the list turned left by r places."""
    r %= len(names)
    return names[r:] + names[:r]


def round_ratio(top, bottom):
    """(median, lowest, highest) of top[i] / bottom[i] over interleaved rounds: the
    ratio with its spread, each round's contenders having shared the machine's mood."""
    ratios = [t / b for t, b in zip(top, bottom, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def put_ratio(row, name, top, bottom, scale=lambda v: v):
    """``row[name]``: the median over interleaved rounds of top[i] / bottom[i] (scaled),
    and ``row[name + "_range"]``: its lowest and highest round."""
    median, low, high = round_ratio(top, bottom)
    row[name], row[f"{name}_range"] = scale(median), [scale(low), scale(high)]


def with_range(row, key, fmt="{:.2f}x"):
    """A ratio of ``row`` with its lowest and highest round: '0.85x (0.82 to 0.88)'."""
    if key not in row:
        return "-"
    text = fmt.format(row[key])
    if f"{key}_range" in row:
        low, high = (fmt.format(v).rstrip("x%") for v in row[f"{key}_range"])
        text += f" ({low} to {high})"
    return text


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
                calls, warm = args
                for _ in range(warm):  # untimed: see compare
                    made[key]()
                result = _run(made[key], calls)
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


def compare(contenders: dict, *, repeat=7, min_time=0.05, pause=0.25, warm=0.25) -> dict:
    """Seconds per call of each ``name: (worker, key)`` in each of ``repeat`` interleaved
    rounds (take ratios round by round: ``put_ratio``). Each worker's turn starts with a
    pause, which lets the last worker's idle threads stop spinning (OpenBLAS's spin for
    about 0.1 s after a call) so that nobody runs beside them. What runs first after that
    pause runs slow (measured: the textbook step 5-15% slower for its first ~10 ms), so
    every timed round follows an untimed ``warm`` fraction of it (none where one call fills
    a round: it is long enough), and ``turns`` makes each contender as often the first of
    its worker's turn as the others: exactly so where ``repeat`` is a multiple of the
    number of contenders per worker (even, for two)."""
    calls = {name: worker.ask("calibrate", key, min_time) for name, (worker, key) in contenders.items()}
    rounds = {name: [] for name in contenders}
    for r in range(repeat):
        for turn in turns(contenders, r):
            time.sleep(pause)
            for name in turn:
                worker, key = contenders[name]
                rounds[name].append(worker.ask("time", key, calls[name], int(calls[name] * warm)))
    return rounds


def turns(contenders: dict, r):
    """Round ``r`` of ``name: (worker, key)`` as the workers' turns: each worker's
    contenders together, the turns rotated by r and so are the contenders within each. A
    plain rotation of all names put the same contender first after a switch of process in
    most rounds (with two workers of two: one in 7 rounds of 7, its partner in 2), which
    biased every overhead measured within a worker."""
    groups = {}
    for name, (worker, _) in contenders.items():
        groups.setdefault(id(worker), []).append(name)
    return [rotated(group, r) for group in rotated(list(groups.values()), r)]


def put_rounds(row, rounds):
    """Each contender's median seconds (``row[name + "_s"]``), its rounds beside them
    (``row["per_round_s"][name]``)."""
    row.update({f"{name}_s": t for name, t in medians(rounds).items()})
    row["per_round_s"] = rounds


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
    info["threads"] = threads()
    try:  # which code measured (absent where the tree was copied without .git)
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            info["commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# the environment variables that set a library's thread count
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "NNOPT_BLAS_POLICY")


def threads() -> dict:
    """The thread counts this process's libraries run with. The workers (see Worker) are
    spawned with the same environment and cores, so they start with the same counts;
    nnopt's BLAS policy (nnopt.fast.threads) then picks a count per product, at most the
    BLAS one here."""
    from threadpoolctl import threadpool_info
    info = {"cpu_count": os.cpu_count(),
            "env": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
            "threadpools": [{"api": pool["internal_api"], "threads": pool["num_threads"],
                             "library": os.path.basename(pool["filepath"])}
                            for pool in threadpool_info()]}
    if hasattr(os, "sched_getaffinity"):
        info["affinity"] = len(os.sched_getaffinity(0))
    if "numba" in sys.modules:  # its default count (numba's prange loops use it)
        info["numba"] = sys.modules["numba"].config.NUMBA_NUM_THREADS
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].get_num_threads()
    return info


def table(rows, columns) -> str:
    """Rows of dicts as an aligned text table; a value with a ``_range`` beside it (its
    lowest and highest round) is shown with it: 0.851 (0.82 to 0.88)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    def cell(row, column):
        if column not in row:
            return ""
        if f"{column}_range" in row:
            low, high = row[f"{column}_range"]
            return f"{fmt(row[column])} ({fmt(low)} to {fmt(high)})"
        return fmt(row[column])
    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def save(path, payload) -> Path:
    """``payload`` as JSON at ``path`` (made with its folders), after the machine record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
