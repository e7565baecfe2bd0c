"""The BLAS thread policy (nnopt.fast.threads): threads by product size and by the cores
other processes leave free, measured from /proc/stat."""
import numpy as np
import pytest

from nnopt.fast import threads
from nnopt.fast.threads import BUSY_PARALLEL_MIN_FLOPS, BlasThreads, FreeCores, blas_threads_for


def test_products_run_on_the_free_cores_and_large_ones_on_every_core():
    assert blas_threads_for(64, 784, 128, cores=2) == 2             # quiet: every core
    assert blas_threads_for(64, 784, 128, cores=2, free=1) == 1     # a core taken: one thread
    assert blas_threads_for(1024, 784, 128, cores=2, free=1) == 1   # 2.1e8 flops: one measured faster
    assert blas_threads_for(4096, 784, 128, cores=2, free=1) == 2   # 8.2e8 flops: two measured faster
    assert blas_threads_for(64, 784, 128, cores=16, free=12) == 12
    assert blas_threads_for(64, 784, 128, cores=4, free=9) == 4     # never more than the cores
    assert blas_threads_for(1, BUSY_PARALLEL_MIN_FLOPS // 2, 1, cores=4, free=1) == 4
    assert blas_threads_for(1, BUSY_PARALLEL_MIN_FLOPS // 2 - 1, 1, cores=4, free=1) == 1


class FakeMachine:
    """/proc/stat's per-CPU lines (a file rewritten on each ``advance``), a clock and this
    process's CPU time."""

    def __init__(self, path, cpus=3):
        self.path, self.now, self.own = path, 100.0, 5.0
        self.ticks = [[1000, 7, 300, 5000, 20, 0, 3, 0, 0, 0] for _ in range(cpus)]
        self.write()

    def write(self):
        total = [sum(column) for column in zip(*self.ticks)]
        lines = ["cpu  " + " ".join(map(str, total))]
        lines += [f"cpu{i} " + " ".join(map(str, t)) for i, t in enumerate(self.ticks)]
        lines += ["intr 12345 " + " ".join("0" for _ in range(2000)), "ctxt 99"]
        self.path.write_text("\n".join(lines) + "\n")

    def advance(self, seconds, busy, own):
        """``busy[i]``: the fraction of CPU i kept busy (user time), the rest idle; ``own``:
        CPU seconds this process used meanwhile."""
        for t, fraction in zip(self.ticks, busy):
            t[0] += round(100 * seconds * fraction)
            t[3] += round(100 * seconds * (1 - fraction))
        self.now += seconds
        self.own += own
        self.write()

    def cores(self, cpus=(0, 1), running=None):
        """FreeCores on this machine; ``running``: /proc/loadavg's count of running tasks
        (None: no such file)."""
        loadavg = self.path.parent / "loadavg"
        if running is not None:
            loadavg.write_text(f"0.52 0.95 1.06 {running}/345 31564\n")
        free = FreeCores(cpus, self.path, clock=lambda: self.now, own_time=lambda: self.own,
                         loadavg_path=loadavg)
        free.tick = 0.01
        return free


def test_free_cores_leave_out_this_processes_own_time(tmp_path):
    machine = FakeMachine(tmp_path / "stat")
    free = machine.cores()
    assert free() == 1  # nothing measured, no /proc/loadavg: as if a core were taken
    machine.advance(0.5, busy=[1.0, 1.0], own=1.0)  # both cores busy, all of it ours
    assert free() == 2
    machine.advance(0.5, busy=[1.0, 1.0], own=0.5)  # half of it another process's
    assert free() == 1
    machine.advance(0.5, busy=[0.1, 0.05], own=0.0)  # others' daemons: within the slack
    assert free() == 2


def test_free_cores_count_only_this_processes_cpus(tmp_path):
    machine = FakeMachine(tmp_path / "stat", cpus=3)
    free = machine.cores(cpus=(0, 1))
    free()
    machine.advance(0.5, busy=[0.0, 0.0, 1.0], own=0.0)  # CPU 2 is not ours to use
    assert free() == 2
    machine.advance(0.5, busy=[0.0, 1.0, 0.0], own=0.0)
    assert free() == 1


def test_free_cores_sample_once_per_interval(tmp_path):
    machine = FakeMachine(tmp_path / "stat")
    free = machine.cores()
    free()
    machine.advance(free.interval / 2, busy=[1.0, 1.0], own=0.0)
    assert free() == 1 and free.last[0] == 100.0  # too soon: no new sample
    machine.advance(free.interval / 2, busy=[0.0, 0.0], own=0.0)
    assert free() == 1  # the sample spans the whole interval: others kept a core busy
    machine.advance(free.interval, busy=[0.0, 0.0], own=0.0)
    assert free() == 2


def test_free_cores_without_a_window_count_the_tasks_running_now(tmp_path):
    machine = FakeMachine(tmp_path / "stat")
    assert machine.cores(running=1)() == 2  # the caller alone
    assert machine.cores(running=2)() == 1  # and one more
    assert machine.cores(running=9)() == 1


def test_free_cores_after_a_pause_do_not_count_who_ran_meanwhile(tmp_path):
    machine = FakeMachine(tmp_path / "stat")
    free = machine.cores(running=1)
    free()
    machine.advance(free.interval, busy=[1.0, 1.0], own=2 * free.interval)
    assert free() == 2
    # this process waits 3 s while another one runs on both cores (a benchmark's rounds)
    machine.advance(3.0, busy=[1.0, 1.0], own=0.0)
    assert free() == 2  # what ran while it waited says nothing: the caller runs alone now
    machine.advance(free.interval, busy=[1.0, 1.0], own=free.interval)
    assert free() == 1  # ... but a window of its own activity beside a busy core does


def test_free_cores_without_proc_stat_keep_one_thread(tmp_path):
    free = FreeCores((0, 1), tmp_path / "missing", clock=iter(range(0, 100, 10)).__next__)
    assert [free() for _ in range(3)] == [1, 1, 1]


def test_the_policy_never_raises_blas_above_the_limit_it_found(monkeypatch):
    class Library:
        def __init__(self, num_threads):
            self.num_threads, self.calls = num_threads, []

        def set_num_threads(self, n):
            self.calls.append(n)

    limited = Library(1)
    blas = BlasThreads()
    monkeypatch.setattr(blas, "_find", lambda: [limited])
    blas.use(2)
    blas.use(1)
    assert limited.calls == [1]  # a threadpool_limits(1) set before nnopt's first product

    free = Library(2)
    blas = BlasThreads()
    monkeypatch.setattr(blas, "_find", lambda: [free])
    monkeypatch.setattr(blas, "ceiling", 2)
    for n in (2, 2, 1, 1, 2):
        blas.use(n)
    assert free.calls == [2, 1, 2]  # set only when it changes


@pytest.mark.parametrize("shape", [((64, 784), (784, 128)), ((4096, 784), (784, 128))])
def test_product_is_the_matrix_product(shape, monkeypatch):
    monkeypatch.setattr(threads, "ENABLED", True)
    rng = np.random.default_rng(3)
    a, b = rng.random(shape[0]), rng.random(shape[1])
    out = np.empty((shape[0][0], shape[1][1]))
    result = threads.product(a, b, out)
    assert result is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)


def test_inside_fixed_every_product_takes_its_count_whatever_the_load(monkeypatch):
    monkeypatch.setattr(threads, "ENABLED", True)
    monkeypatch.setattr(threads, "free_cores", lambda: (lambda: 1))  # a busy machine
    asked = []

    class Recording:
        current = None

        def use(self, count):
            asked.append(count)
    monkeypatch.setattr(threads, "blas_threads", lambda: Recording())
    a = np.ones((64, 784), np.float32)
    b, out = np.ones((784, 128), np.float32), np.empty((64, 128), np.float32)
    threads.product(a, b, out)
    with threads.fixed(2):
        threads.product(a, b, out)
        with threads.fixed(3):
            threads.product(a, b, out)
        threads.product(a, b, out)
    threads.product(a, b, out)
    assert asked == [1, 2, 3, 2, 1]
    with threads.fixed():
        threads.product(a, b, out)
    assert asked[-1] == threads.available_cores()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path):
    write(tmp_path / "self", "0::/user.slice/job\n")
    write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    write(tmp_path / "fs" / "user.slice" / "cpu.max", "150000 100000\n")  # 1.5 CPUs
    write(tmp_path / "fs" / "user.slice" / "job" / "cpu.max", "400000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path / "self", str(tmp_path / "fs")) == 1.5


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    write(folder / "cpu.cfs_quota_us", "200000\n")
    write(folder / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_quota(tmp_path / "self", str(tmp_path / "fs")) == 2.0
    write(folder / "cpu.cfs_quota_us", "-1\n")
    assert threads.cgroup_cpu_quota(tmp_path / "self", str(tmp_path / "fs")) is None
    write(folder / "cpu.cfs_quota_us", "garbage\n")
    assert threads.cgroup_cpu_quota(tmp_path / "self", str(tmp_path / "fs")) is None
    assert threads.cgroup_cpu_quota(tmp_path / "missing", str(tmp_path / "fs")) is None


def test_a_forked_child_takes_its_own_limit(monkeypatch):
    """A worker forked after the parent's first product (nnopt.experiments' pool) and
    limited to one thread stays at one: the parent's policy state is not inherited."""
    import multiprocessing
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    threads.blas_threads().use(1)  # the parent found the libraries (limit 2 or more), set 1
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(1, initializer=_limit_to_one_thread) as pool:
            assert pool.apply(_threads_after_a_product) == [1]
    finally:
        threads.blas_threads().forget()


def _limit_to_one_thread():
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)


def _threads_after_a_product():
    from threadpoolctl import threadpool_info
    a = np.ones((1024, 1024))
    threads.product(a, a, np.empty_like(a))  # 2.1e9 flops: the policy's every core
    return sorted({i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"})
