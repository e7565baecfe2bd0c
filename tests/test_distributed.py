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
