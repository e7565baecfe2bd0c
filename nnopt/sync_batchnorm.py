r"""Synchronized Batch Normalization: the statistics of the global batch, over all ranks.

Without synchronization each rank of a data-parallel run normalizes over its own shard
(m samples), which is another model than one process with the global batch (M = N m
samples): noisier means and variances, a different gradient. Synchronized, each rank
computes per-feature sums, one allreduce adds them, and everything after that is the
textbook formula over M samples, so N ranks x m samples train like 1 process x M.

Forward, one allreduce of (sum, sum of squares, count); the sums are taken about a shift
:math:`K` (the running mean, identical on every rank), so that the one-pass variance
:math:`\frac{1}{M}\sum (x-K)^2 - (\mu-K)^2` does not lose float32 digits to cancellation
when the features' mean is large against their spread:

.. math:: \mu = K + \frac1M\sum(x-K),\quad \sigma^2 = \frac1M\sum(x-K)^2 - (\mu-K)^2,\quad
    \hat x = \frac{x-\mu}{\sqrt{\sigma^2+\epsilon}}

Backward, one allreduce of :math:`(\sum d, \sum d\,\hat x)`:

.. math:: dx = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}\Big(d - \frac{\sum d}{M}
    - \hat x\,\frac{\sum d\,\hat x}{M}\Big)

while :math:`d\gamma, d\beta` stay this rank's sums: the gradient allreduce of the whole
flat buffer (``nnopt.distributed``) combines them with every other parameter's. Each
rank's d is the gradient of its own shard's mean loss, N times its share of the global
mean loss; dx carries the same factor N into the layers below, and the final average
over ranks removes it, as for the parameters.
"""
from __future__ import annotations

from . import batchnorm as reference
from .backend import namespace_of
from .errors import InputError
from .layers import check_dtype, check_input


def _communicator(sync):
    if sync is True:
        from .distributed import current
        return current()
    return sync


def sync_batchnorm_forward(x, gamma, beta, eps, comm, shift=None):
    """Training-mode forward over the union of every rank's ``x``: the reference's
    factored steps (:mod:`nnopt.batchnorm`) with their sums added over ranks. ``shift``
    must be the same on every rank (default 0). Returns ``(z, mean, var, count, cache)``;
    ``count`` (M) is a 0-d array."""
    xp = namespace_of(x)
    n = x.shape[1]
    shift = xp.zeros_like(gamma) if shift is None else shift
    sum_dev, sum_sq_dev = reference.batchnorm_shifted_sums(x, shift)
    local = xp.full((1,), x.shape[0], dtype=x.dtype)
    stats = xp.concat([sum_dev, sum_sq_dev, local])
    comm.allreduce_sum(stats)
    count = stats[2 * n]
    mean, var, inv_std = reference.batchnorm_statistics(stats[:n], stats[n:2 * n], shift,
                                                        count, eps)
    z = reference.batchnorm_apply(x, mean, reference.batchnorm_scale(gamma, inv_std), beta)
    return z, mean, var, count, (x, mean, inv_std, gamma, count)


def sync_batchnorm_backward(d, cache, comm):
    """Returns ``(dx, dgamma, dbeta)``: dx for the global batch statistics, dgamma and
    dbeta this rank's share (to be summed, or averaged, over ranks with the others)."""
    xp = namespace_of(d)
    x, mean, inv_std, gamma, count = cache
    n = d.shape[1]
    sum_d, sum_dc = reference.batchnorm_backward_sums(d, x, mean)
    dgamma, dbeta = sum_dc * inv_std, sum_d
    # a new buffer: this rank's sum_d, sum_dc stay local for dgamma, dbeta
    total = comm.allreduce_sum(xp.concat([sum_d, sum_dc]))
    a, b, c, _, _ = reference.batchnorm_backward_coefficients(total[:n], total[n:], count,
                                                              gamma, inv_std)
    return a * d - b * (x - mean) - c, dgamma, dbeta


# --- the BatchNorm layer's training-mode hooks (BatchNorm(..., sync=True)) ----------------
def layer_forward(layer, x):
    """``layer.forward(x, train=True)`` with global statistics; running statistics are
    updated from them, so they are identical on every rank."""
    check_input(layer, x, layer.n)
    check_dtype(layer, x, layer.gamma)
    comm = _communicator(layer.sync)
    z, mean, var, count, layer.sync_cache = sync_batchnorm_forward(
        x, layer.gamma.data, layer.beta.data, layer.eps, comm,
        shift=layer.buffers["running_mean"])
    if x.shape[0] < 2 and float(count) < 2:  # the host read only where it can matter
        raise InputError(f"{layer!r} in training mode needs a global batch of at least 2 "
                         f"samples, got {int(float(count))}")
    layer._update_running(mean, var, count)
    return z


def layer_backward(layer, d):
    dx, dgamma, dbeta = sync_batchnorm_backward(d, layer.sync_cache, _communicator(layer.sync))
    layer.gamma.grad += dgamma
    layer.beta.grad += dbeta
    return dx
