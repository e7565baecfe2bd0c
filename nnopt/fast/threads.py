"""How many threads BLAS gets for one matrix product (threadpoolctl sets it): the cores
no other process keeps busy, and every core for large products.

On a quiet machine a second BLAS thread pays from about a MFLOP on (the textbook's first
layer at batch 64: 155-165 us on one thread, 86-97 us on two) and costs nothing below
(OpenBLAS keeps tiny products on one thread itself). But when another process keeps a
core busy, every synchronization between the two threads waits for a descheduled one:
beside a busy loop, two threads took up to 37x one thread's time (64x64 by 64x128: 1.1 ms
against 31 us), erratically from one product to the next. So a product runs on as many
threads as there are cores other processes leave free (:class:`FreeCores`, from
/proc/stat, sampled a few times a second); only a large product, whose long runs per
thread repay even a shared core, always gets every core. Both were measured by
``bench/bench_blas_threads.py`` (float32, the textbook's shapes, quiet and with one core
busy); :data:`BUSY_PARALLEL_MIN_FLOPS` records the line.

The policy never raises BLAS above the thread count it found on first use (a
``threadpool_limits(1)`` or ``OPENBLAS_NUM_THREADS=1`` set before the first product is
kept). ``NNOPT_BLAS_POLICY=0`` in the environment leaves BLAS's thread count alone.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from functools import lru_cache

import numpy as np

#: Products of at least this many flops (2 m k n) run on every core even while another
#: process keeps one busy (bench/results/blas_threads_busy.json): up to 2.1e8 flops
#: (batch 1024's first layer) two threads were then 0.7x to 4x one thread's time (up to
#: 37x at 1e6 flops); at 8.2e8 (batch 4096's) 0.58x-1.02x.
BUSY_PARALLEL_MIN_FLOPS = 1 << 29
ENABLED = os.environ.get("NNOPT_BLAS_POLICY", "1").lower() not in ("0", "false", "no")


@lru_cache(maxsize=None)
def available_cores() -> int:
    """The cores this process may run on (at its first call): its CPU affinity, capped by
    its cgroup's CPU quota (a container's ``--cpus``), where it has one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def cgroup_cpu_quota(self_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The CPUs this process's cgroup may use per period (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``), the smallest on its path up to the root; None
    without a quota. Threads beyond it are throttled together: a BLAS product on more
    threads than the quota waits for each of them in turn."""
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            mounts, read = [root], _cpu_max
        elif "cpu" in controllers.split(","):
            mounts, read = [os.path.join(root, controllers), os.path.join(root, "cpu")], _cfs_quota
        else:
            continue
        mount = next((m for m in mounts if os.path.isdir(m)), None)
        if mount is None:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts) + 1):  # a parent's quota binds its children too
            quota = read(os.path.join(mount, *parts[:depth]))
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _read_fields(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def _cpu_max(folder):
    """cgroup v2: "max 100000" or "<quota> <period>"."""
    fields = _read_fields(os.path.join(folder, "cpu.max"))
    try:
        return int(fields[0]) / int(fields[1])
    except (TypeError, IndexError, ValueError, ZeroDivisionError):  # none, or "max"
        return None


def _cfs_quota(folder):
    """cgroup v1: quota -1 means none."""
    quota = _read_fields(os.path.join(folder, "cpu.cfs_quota_us"))
    period = _read_fields(os.path.join(folder, "cpu.cfs_period_us"))
    try:
        return int(quota[0]) / int(period[0]) if int(quota[0]) > 0 else None
    except (TypeError, IndexError, ValueError, ZeroDivisionError):
        return None


def blas_threads_for(m: int, k: int, n: int, cores: int | None = None,
                     free: int | None = None) -> int:
    """Threads for an (m, k) x (k, n) product: the ``free`` ones of ``cores`` (no other
    process keeps them busy; default: all), every one from BUSY_PARALLEL_MIN_FLOPS."""
    cores = max(1, available_cores() if cores is None else cores)
    if free is None or free >= cores or 2 * m * k * n >= BUSY_PARALLEL_MIN_FLOPS:
        return cores
    return max(1, free)


class FreeCores:
    """How many of this process's cores other processes leave free: the busy time of those
    cores in /proc/stat less this process's own CPU time (its BLAS threads spinning
    between products are its own, not another's load), over the last ``interval`` seconds.

    Sampled at most once per interval, so a call costs a clock read. Where no window of
    this process's activity is at hand (its first call, or after a pause of more than
    ``stale`` seconds, when the window would count the others that ran while it waited,
    such as a benchmark's other contenders), the tasks running at that moment stand in
    (/proc/loadavg, less the caller) until the next window. One core where neither can be
    read."""

    #: Seconds between samples: a busy process appearing costs at most about this long on
    #: threads that wait for it.
    interval = 0.25
    stale = 0.5
    #: Another process's use of up to this fraction of a core leaves the core free.
    slack = 0.25

    def __init__(self, cpus=None, stat_path="/proc/stat", clock=time.monotonic,
                 own_time=time.process_time, loadavg_path="/proc/loadavg"):
        if cpus is None:
            try:
                cpus = os.sched_getaffinity(0)
            except AttributeError:  # not Linux: no /proc/stat either
                cpus = range(os.cpu_count() or 1)
        self.cpus = frozenset(cpus)
        self.stat_path, self.loadavg_path = stat_path, loadavg_path
        self.clock, self.own_time = clock, own_time
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.free = 1
        self.last = None  # (time, busy seconds of self.cpus, own CPU seconds)
        self.next_sample = -math.inf

    def __call__(self) -> int:
        now = self.clock()
        if now < self.next_sample:
            return self.free
        self.next_sample = now + self.interval
        busy = self._busy_seconds()
        if busy is None:
            return self.free
        sample, last = (now, busy, self.own_time()), self.last
        self.last = sample
        if last is not None and now - last[0] <= self.stale:
            others = ((sample[1] - last[1]) - (sample[2] - last[2])) / (now - last[0])
            self.free = self._free_beside(others - self.slack)
        else:
            running = self._running_now()
            if running is not None:
                self.free = self._free_beside(running - 1)
        return self.free

    def _free_beside(self, others):
        return max(1, len(self.cpus) - max(0, math.ceil(others)))

    def _running_now(self):
        """Tasks running or runnable on the machine now, the caller included (/proc/loadavg's
        fourth field, "running/total"), or None."""
        try:
            with open(self.loadavg_path, "rb") as f:
                return int(f.read().split()[3].split(b"/")[0])
        except (OSError, IndexError, ValueError):
            return None

    def _busy_seconds(self):
        """Non-idle seconds of self.cpus since boot, or None."""
        try:
            fd = os.open(self.stat_path, os.O_RDONLY)
            try:  # the per-CPU lines come first; reading no further allocates little
                text = os.read(fd, 256 * (max(self.cpus) + 2))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None
        ticks = 0
        for line in text.split(b"\n"):
            fields = line.split()
            if not fields or not fields[0].startswith(b"cpu"):
                break
            if fields[0] == b"cpu" or int(fields[0][3:]) not in self.cpus:
                continue
            # user nice system idle iowait irq softirq steal: all but idle and iowait
            values = [int(v) for v in fields[1:9]]
            ticks += sum(values) - values[3] - values[4]
        return ticks * self.tick


class BlasThreads:
    """Sets BLAS's thread count only when it changes (a call into each BLAS library: cheap,
    but not free at a few products per layer). Finds the libraries on first use, and
    takes their thread count then as the most it will ever set (``ceiling``)."""

    def __init__(self):
        self.current = None
        self.libraries = None
        self.ceiling = available_cores()

    def _find(self):
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # the policy is an optimization: without it BLAS decides
            return []
        return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]

    def _found(self):
        if self.libraries is None:
            self.libraries = self._find()
            self.ceiling = max(1, min([self.ceiling] + [lib.num_threads for lib in self.libraries]))
        return self.libraries

    def most(self) -> int:
        """The most threads it will ever set."""
        self._found()
        return self.ceiling

    def use(self, threads: int) -> None:
        libraries = self._found()
        threads = min(threads, self.ceiling)
        if threads == self.current:
            return
        for lib in libraries:
            lib.set_num_threads(threads)
        self.current = threads

    def forget(self) -> None:
        """Someone else changed BLAS's threads (a threadpool_limits block): set them again."""
        self.current = None


@lru_cache(maxsize=None)
def blas_threads() -> BlasThreads:
    return BlasThreads()


@lru_cache(maxsize=None)
def free_cores() -> FreeCores:
    return FreeCores()


def reset() -> None:
    """Forget what the policy found: the BLAS libraries' thread limit, the last thread count
    set and the load windows. Run in a forked child, whose CPU time starts afresh and which
    may set its own limit (a worker's ``threadpool_limits(1)``) before its first product."""
    blas_threads.cache_clear()
    free_cores.cache_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reset)


_FIXED = None  # the thread count of every product inside fixed(), else None: by the load


@contextlib.contextmanager
def fixed(count=None):
    """Every product inside the block on ``count`` threads (default: the cores this process
    may use, the quiet machine's choice), whatever the load. OpenBLAS's results depend on
    its thread count in the last bits (64x784 @ 784x24, float32: up to 3e-5 apart on one
    thread and on two), so a run that must repeat bit for bit, such as nnopt.train's
    (a resumed run equals the uninterrupted one), takes one count throughout."""
    global _FIXED
    saved, _FIXED = _FIXED, max(1, available_cores() if count is None else int(count))
    try:
        yield
    finally:
        _FIXED = saved


def product(a, b, out):
    """``a @ b`` into ``out`` (NumPy arrays) on the threads of :func:`blas_threads_for`, or
    inside :func:`fixed` on its count."""
    if ENABLED:
        threads = (_FIXED if _FIXED is not None else
                   blas_threads_for(a.shape[0], a.shape[1], b.shape[1], free=free_cores()()))
        blas = blas_threads()
        if threads != blas.current:
            blas.use(threads)
    return np.matmul(a, b, out=out)
