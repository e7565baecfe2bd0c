"""Data parallelism: synchronized BN math (ranks simulated by threads, on every backend),
the training CLI's distributed flags, and real 2-rank MPI jobs (``mpiexec -n 2``, skipped
without mpi4py/mpiexec; .ci/run installs them)."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from nnopt import checkpoint, distributed, train
from nnopt.batchnorm import BatchNorm, batchnorm_backward, batchnorm_forward
from nnopt.model import Sequential
from nnopt.sync_batchnorm import sync_batchnorm_backward, sync_batchnorm_forward
from tests.helpers import dev, host, numeric_grad, rel_err

ROOT = Path(__file__).resolve().parents[1]


# --- N ranks simulated by N threads of one process --------------------------------------
class ThreadComm(distributed.Communicator):
    """A rank of a :func:`run_ranks` group: allreduce through shared slots and a barrier.
    Every rank sums the slots in rank order, so all get bit-identical results, as MPI's
    do."""
    transport = "threads"

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, len(group["slots"])

    def allreduce_sum(self, buf):
        slots, barrier = self.group["slots"], self.group["barrier"]
        slots[self.rank] = buf
        barrier.wait()
        total = slots[0]
        for other in slots[1:]:
            total = total + other
        barrier.wait()  # every rank has read every slot before any is overwritten
        buf[...] = total
        return buf


def run_ranks(size, work):
    """``work(comm)`` on ``size`` threads; returns the results in rank order."""
    group = {"slots": [None] * size, "barrier": threading.Barrier(size, timeout=30)}
    results, errors = [None] * size, []

    def target(rank):
        try:
            results[rank] = work(ThreadComm(group, rank))
        except BaseException as exc:  # report it; the barrier's timeout frees the others
            errors.append(exc)
            group["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def shards(a, size):
    return np.split(a, size)


# --- synchronized BN math --------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("shifted", [False, True])
def test_sync_bn_is_the_global_batch_reference(xp, rng, size, shifted):
    m, n = 12, 5
    x = rng.normal(3.0, 2.0, (m, n))  # a mean far from 0: the one-pass variance's hard case
    d = rng.normal(size=(m, n))
    gamma, beta = rng.normal(size=n), rng.normal(size=n)
    shift = rng.normal(3.0, 0.5, n) if shifted else None
    z, mean, var, cache = batchnorm_forward(dev(xp, x), dev(xp, gamma), dev(xp, beta), 1e-5)
    dx, dgamma, dbeta = batchnorm_backward(dev(xp, d), cache)

    def work(comm):
        xs, ds = shards(x, size)[comm.rank], shards(d, size)[comm.rank]
        out = sync_batchnorm_forward(dev(xp, xs), dev(xp, gamma), dev(xp, beta), 1e-5, comm,
                                     None if shift is None else dev(xp, shift))
        back = sync_batchnorm_backward(dev(xp, ds), out[4], comm)
        return [host(a) for a in out[:3]] + [float(out[3])] + [host(a) for a in back]

    ranks = run_ranks(size, work)
    np.testing.assert_allclose(np.concatenate([r[0] for r in ranks]), host(z), atol=1e-10)
    np.testing.assert_allclose(np.concatenate([r[4] for r in ranks]), host(dx), atol=1e-10)
    for r in ranks:  # statistics identical on every rank
        np.testing.assert_allclose(r[1], host(mean), atol=1e-12)
        np.testing.assert_allclose(r[2], host(var), rtol=1e-10)
        assert r[3] == m
    np.testing.assert_allclose(sum(r[5] for r in ranks), host(dgamma), atol=1e-10)
    np.testing.assert_allclose(sum(r[6] for r in ranks), host(dbeta), atol=1e-10)


def test_sync_bn_backward_by_finite_differences(xp, rng):
    """dJ/dx of J = sum over ranks of sum(w * z), through the global statistics, float64."""
    size, m, n = 2, 6, 3
    x, w = rng.normal(1.0, 1.5, (m, n)), rng.normal(size=(m, n))
    gamma, beta = rng.normal(size=n), rng.normal(size=n)

    def loss(x_full):
        def work(comm):
            xs = shards(x_full, size)[comm.rank]
            z = sync_batchnorm_forward(dev(xp, xs), dev(xp, gamma), dev(xp, beta), 1e-5, comm)[0]
            return float(np.sum(host(z) * shards(w, size)[comm.rank]))
        return sum(run_ranks(size, work))

    def work(comm):
        xs = dev(xp, shards(x, size)[comm.rank])
        cache = sync_batchnorm_forward(xs, dev(xp, gamma), dev(xp, beta), 1e-5, comm)[4]
        return host(sync_batchnorm_backward(dev(xp, shards(w, size)[comm.rank]), cache, comm)[0])

    analytic = np.concatenate(run_ranks(size, work))
    assert rel_err(analytic, numeric_grad(loss, x.copy())) < 1e-6


def test_sync_batchnorm_layer_running_stats_agree(xp, rng):
    """BatchNorm(sync=comm) over 2 ranks: the layer of 1 process over the whole batch."""
    x, d = rng.normal(2.0, 1.0, (8, 4)), rng.normal(size=(8, 4))
    whole = Sequential([BatchNorm(4, unbiased_running_var=True, use_fast_path=False)], xp,
                       "float64")
    z = whole.forward(dev(xp, x))
    dx = whole.backward(dev(xp, d))

    def work(comm):
        model = Sequential([BatchNorm(4, unbiased_running_var=True, sync=comm)], xp, "float64")
        zs = model.forward(dev(xp, shards(x, 2)[comm.rank]))
        dxs = model.backward(dev(xp, shards(d, 2)[comm.rank]))
        comm.allreduce_sum(model.flat.grad)
        bn = model.layers[0]
        evaluated = model.forward(dev(xp, x), train=False)  # the running statistics
        return host(zs), host(dxs), host(model.flat.grad), host(bn.buffers["running_var"]), \
            host(evaluated)

    ranks = run_ranks(2, work)
    bn = whole.layers[0]
    np.testing.assert_allclose(np.concatenate([r[0] for r in ranks]), host(z), atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in ranks]), host(dx), atol=1e-12)
    for r in ranks:
        np.testing.assert_allclose(r[2], host(whole.flat.grad), atol=1e-12)
        np.testing.assert_allclose(r[3], host(bn.buffers["running_var"]), rtol=1e-12)
        np.testing.assert_array_equal(r[4], ranks[0][4])
    np.testing.assert_allclose(ranks[0][4], host(whole.forward(dev(xp, x), train=False)),
                               atol=1e-12)


# --- the CLI's checks, in this process -------------------------------------------------------
def test_distributed_without_mpi4py_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    assert train.main(["--distributed", "--quiet"]) == 2
    assert "pip install 'nnopt[distributed]'" in capsys.readouterr().err


def test_sync_bn_needs_distributed(capsys):
    assert train.main(["--sync-bn", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--sync-bn" in err and "needs --distributed" in err


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        train.make_config(distributed=True, world_size=3, batch_size=64)
    assert train.make_config(distributed=True, world_size=4, batch_size=64)["world_size"] == 4


# --- real MPI jobs -----------------------------------------------------------------------------
def mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        why = "mpi4py is not installed (pip install 'nnopt[distributed]')"
    else:
        why = None if shutil.which("mpiexec") else "mpiexec is not on PATH (pip install mpich)"
    if why and os.environ.get("NNOPT_REQUIRE_MPI"):  # CI installs MPI: a skip would hide a break
        raise RuntimeError(f"NNOPT_REQUIRE_MPI is set but {why}")
    return why


needs_mpi = pytest.mark.skipif(mpi_missing() is not None, reason=str(mpi_missing()))
# Short runs: 50 steps of 64 (3,200 training samples, one epoch), a small network.
SMALL = ["--sizes", "784,24,16,10", "--batch-size", "64", "--val-size", "4800", "--epochs", "1",
         "--check-every", "25", "--target-loss", "0", "--quiet"]


def mpiexec(args, timeout=120, env=None):
    """Run ``mpiexec args`` from the repository; the whole process group is killed on
    timeout, so a hung job fails the test instead of hanging CI."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", **(env or {})}
    proc = subprocess.Popen(["mpiexec", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec {' '.join(args)} hung for {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err


def train_ranks(n, out, *flags):
    rc, stdout, err = mpiexec(["-n", str(n), sys.executable, "-m", "nnopt.train", *SMALL,
                               "--distributed", "--out", str(out), *flags])
    assert rc == 0, f"{stdout}\n{err}"
    return out


def params(folder):
    return checkpoint.load(folder / "checkpoint.npz")[0]


def max_difference(a, b):
    """Largest parameter difference, relative to the largest parameter."""
    scale = max(float(np.max(np.abs(v))) for v in a.values())
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a) / scale


def without_biases_before_bn(state):
    return {k: v for k, v in state.items() if not k.endswith("running_mean") and
            not (k.startswith("fc") and k.endswith(".b") and f"bn{k[2:-2]}.gamma" in state)}


@needs_mpi
def test_communicator_api_on_two_ranks():
    code = ("import numpy as np; from nnopt import distributed as d; c = d.init('cpu');"
            "g = np.full(3, c.rank + 1.0); d.allreduce_mean(g); assert (g == 1.5).all(), g;"
            "p = np.full(2, 7.0 if c.rank == 0 else -1.0); d.broadcast(p); assert (p == 7).all();"
            "assert c.bcast_object({'r': c.rank}) == {'r': 0}; assert c.any(c.rank == 1);"
            "assert (d.rank(), d.size()) == (c.rank, 2); print('ok', c.rank)")
    rc, out, err = mpiexec(["-n", "2", sys.executable, "-c", code], timeout=60)
    assert rc == 0 and out.count("ok") == 2, f"{out}\n{err}"


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """1 process x batch 64, per optimizer (in this process: no MPI involved)."""
    runs = {}
    for name, flags in (("sgd", []), ("adam", ["--optimizer", "adam", "--lr", "0.01"])):
        out = tmp_path_factory.mktemp(f"single-{name}")
        assert train.main(SMALL + flags + ["--out", str(out)]) == 0
        runs[name] = (out, flags)
    return runs


@needs_mpi
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_two_ranks_with_sync_bn_train_like_one_process(tmp_path, one_process_runs, optimizer):
    single, flags = one_process_runs[optimizer]
    ranks = train_ranks(2, tmp_path / "ranks", "--sync-bn", *flags)
    a, b = params(single), params(ranks)
    if optimizer == "adam":
        # A bias just before BN has gradient 0 in exact arithmetic (BN subtracts the mean);
        # Adam divides that rounding noise (~1e-9) by its own root mean square, so these
        # biases, and the running means that contain them, take lr-sized random steps that
        # differ between any two summation orders. BN cancels them: compare the rest.
        a, b = without_biases_before_bn(a), without_biases_before_bn(b)
    difference = max_difference(a, b)
    # float32 rounding (sums in another order), not a different model: 50 steps agree
    # to ~1e-6 of the largest parameter (measured 5e-7 for SGD, 1e-6 for Adam).
    assert difference < 2e-5, f"2 ranks x 32 with sync BN vs 1 x 64: {difference:.2e}"
    a = [json.loads(r) for r in (single / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(r) for r in (ranks / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [25, 50]
    for ra, rb in zip(a, b):  # the training window is the global batch's, not rank 0's
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5
        # the same predictions but where float32 rounding tips a near tie: at most two of
        # the window's 25 x 64 samples
        assert abs(ra["train_accuracy"] - rb["train_accuracy"]) <= 2 / (25 * 64)


@needs_mpi
def test_without_sync_bn_two_ranks_are_another_model(tmp_path, one_process_runs):
    single, _ = one_process_runs["sgd"]
    difference = max_difference(params(single), params(train_ranks(2, tmp_path / "r")))
    # Each rank normalizes over its 32 samples: another gradient, a visibly different
    # network after 50 steps (measured ~0.3 of the largest parameter, running means most).
    print(f"without sync BN, 2 x 32 vs 1 x 64 after 50 SGD steps: {difference:.3f} of the "
          "largest parameter")
    assert difference > 1e-3, difference


@needs_mpi
def test_every_rank_keeps_rank_0s_metrics(tmp_path):
    """Without sync BN each rank validates on its own running statistics; the record rank
    0 broadcasts is the one every rank keeps, so a plateau schedule steps every rank's
    learning rate on the same loss (a rank's own record let the ranks' rates, then their
    parameters, drift apart). Each rank writes its record to its own file: the ranks share
    one stdout, where their lines may interleave."""
    code = ("import json, sys; from pathlib import Path; from mpi4py import MPI\n"
            "from nnopt import train; finish = train.finish\n"
            "def spy(run, curves=True):\n"
            f"    Path({str(tmp_path)!r}, f'history{{MPI.COMM_WORLD.Get_rank()}}.json')"
            ".write_text(json.dumps([r['val_loss'] for r in run.state.history]))\n"
            "    return finish(run, curves)\n"
            "train.finish = spy\n"
            "sys.exit(train.main(sys.argv[1:]))")
    rc, out, err = mpiexec(["-n", "2", sys.executable, "-c", code, *SMALL, "--distributed",
                            "--out", str(tmp_path / "r"), "--schedule", "plateau"])
    assert rc == 0, f"{out}\n{err}"
    histories = [json.loads((tmp_path / f"history{rank}.json").read_text()) for rank in (0, 1)]
    assert len(histories[0]) == 2 and histories[0] == histories[1], histories


@needs_mpi
def test_a_distributed_runs_config_takes_this_jobs_ranks(tmp_path, capsys):
    """--config of a 2-rank run's config.json: how that run was launched is not a setting.
    In one process it trains as one process (all batches, resumable there); in 3 ranks
    the global batch of 64 is refused (it was checked against the saved 2 ranks, and
    each rank silently dropped a sample per step)."""
    saved = train_ranks(2, tmp_path / "two") / "config.json"
    assert train.main(["--config", str(saved), "--out", str(tmp_path / "one")]) == 0
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert (config["distributed"], config["world_size"]) == (False, 1)
    assert train.main(["--resume", str(tmp_path / "one"), "--epochs", "2"]) == 0
    rc, out, err = mpiexec(["-n", "3", sys.executable, "-m", "nnopt.train", "--config",
                            str(saved), "--distributed", "--out", str(tmp_path / "three")])
    assert rc == 2 and "does not split evenly over 3 ranks" in err, f"{out}\n{err}"


@needs_mpi
def test_resume_with_the_same_ranks(tmp_path, capsys):
    straight = train_ranks(2, tmp_path / "straight", "--sync-bn", "--epochs", "2")
    split = train_ranks(2, tmp_path / "split", "--sync-bn")
    before = (split / "checkpoint.npz").read_bytes()
    # Another number of ranks is another run: refused with the reason, in one process
    # (without --distributed) and as a job of one rank
    assert train.main(SMALL + ["--epochs", "2", "--resume", str(split)]) == 2
    err = capsys.readouterr().err
    assert "trained data-parallel over 2 ranks" in err and "mpiexec -n 2" in err
    rc, out, err = mpiexec(["-n", "1", sys.executable, "-m", "nnopt.train", *SMALL, "--sync-bn",
                            "--distributed", "--epochs", "2", "--resume", str(split)])
    assert rc == 2 and "this job: 1 rank(s)" in err, f"{out}\n{err}"
    assert (split / "checkpoint.npz").read_bytes() == before
    train_ranks(2, split, "--sync-bn", "--epochs", "2", "--resume", str(split))
    a, b = params(straight), params(split)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@needs_mpi
def test_ranks_without_distributed_are_refused(tmp_path):
    """Two processes training the same run alone would write the same files."""
    rc, out, err = mpiexec(["-n", "2", sys.executable, "-m", "nnopt.train", *SMALL,
                            "--out", str(tmp_path / "run")])
    assert rc == 2 and err.count("mpiexec started 2 processes but --distributed is not given") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable", distributed.LAUNCHER_SIZE_VARIABLES)
def test_a_launcher_of_several_ranks_is_seen_without_mpi(monkeypatch, capsys, tmp_path, variable):
    for name in distributed.LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_ranks() == 1
    monkeypatch.setenv(variable, "3")
    assert distributed.launched_ranks() == 3
    assert train.main(SMALL + ["--out", str(tmp_path / "run")]) == 2
    assert "mpiexec started 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable", distributed.LAUNCHER_RANK_VARIABLES)
def test_a_refused_launch_is_reported_by_rank_0_alone(monkeypatch, capsys, tmp_path, variable):
    """Every rank of a refused job exits with the error's code; only rank 0 says why (the
    job's output had the same message once per rank)."""
    for name in distributed.LAUNCHER_SIZE_VARIABLES + distributed.LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", "3")
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv(variable, rank)
        assert distributed.launched_rank() == int(rank)
        for argv in (SMALL + ["--out", str(tmp_path / "run")],
                     ["--evaluate", str(tmp_path / "checkpoint.npz")]):
            assert train.main(argv) == 2
            err = capsys.readouterr().err
            assert ("error: " in err) == says and err.count("error: ") <= 1, err
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_distributed_dry_run_reports_once_and_evaluate_asks_for_one_process(tmp_path):
    rc, out, err = mpiexec(["-n", "2", sys.executable, "-m", "nnopt.train", *SMALL,
                            "--distributed", "--dry-run", "--out", str(tmp_path / "r")], timeout=90)
    assert rc == 0, f"{out}\n{err}"
    assert out.count("dry run: configuration") == 1 and "on 2 rank(s)" in out, out
    assert out.count('"sizes"') == 1 and not (tmp_path / "r").exists(), out
    rc, out, err = mpiexec(["-n", "2", sys.executable, "-m", "nnopt.train", "--evaluate",
                            str(tmp_path / "checkpoint.npz")], timeout=60)
    assert rc != 0 and err.count("--evaluate runs in one process; mpiexec started 2") == 1, err


@needs_mpi
def test_a_failing_rank_aborts_the_job_instead_of_hanging(tmp_path):
    # Rank 1 alone fails (its checkpoint is missing) while rank 0 waits in the initial
    # broadcast: without the abort, rank 0 would wait forever.
    cmd = [sys.executable, "-m", "nnopt.train", *SMALL, "--distributed", "--out", str(tmp_path)]
    rc, out, err = mpiexec(["-n", "1", *cmd, ":", "-n", "1", *cmd, "--resume",
                            str(tmp_path / "missing")], timeout=90,
                           env={"NNOPT_ABORT_TIMEOUT": "2"})
    assert rc != 0
    assert "does not exist" in err and "MPI_Abort" in err, err


def gpu_missing():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception:  # no CuPy, no driver
        pass
    return "no CuPy/CUDA GPU here"


@needs_mpi
@pytest.mark.skipif(gpu_missing() is not None, reason=str(gpu_missing()))
def test_nccl_plumbing_on_one_gpu():
    """One rank is enough to exercise the NCCL bootstrap over MPI, the device-pointer
    allreduce and broadcast, and synchronized BN on CuPy arrays."""
    code = "\n".join([
        "import cupy as cp, numpy as np",
        "from nnopt import distributed as d",
        "from nnopt.batchnorm import BatchNorm, batchnorm_backward, batchnorm_forward",
        "c = d.init('gpu')",
        "assert 'NCCL' in c.transport, c.transport",
        "g = cp.arange(5, dtype=cp.float32); c.allreduce_sum(g); d.allreduce_mean(g)",
        "assert cp.all(g == cp.arange(5, dtype=cp.float32)); d.broadcast(g)",
        "x = cp.asarray(np.random.default_rng(0).normal(2, 1, (16, 4)))",
        "bn = BatchNorm(4, sync=True); bn.gamma.data, bn.beta.data = cp.ones(4), cp.zeros(4)",
        "bn.gamma.grad, bn.beta.grad = cp.zeros(4), cp.zeros(4)",
        "bn.buffers = {k: cp.asarray(v) for k, v in bn.buffers.items()}",
        "z = bn.forward(x); dx = bn.backward(x)",
        "zr, _, _, cache = batchnorm_forward(x, cp.ones(4), cp.zeros(4), 1e-5)",
        "assert float(cp.max(cp.abs(z - zr))) < 1e-10",
        "assert float(cp.max(cp.abs(dx - batchnorm_backward(x, cache)[0]))) < 1e-10",
        "print('ok')"])
    rc, out, err = mpiexec(["-n", "1", sys.executable, "-c", code], timeout=120)
    assert rc == 0 and "ok" in out, f"{out}\n{err}"
