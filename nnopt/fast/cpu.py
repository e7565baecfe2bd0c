"""Numba kernels: one loop per optimizer step and per BN pass, no temporaries.

Each mirrors a reference formula (``nnopt.optim.*.update``, ``nnopt.batchnorm``); the
tests hold them to it. Scalars are cast to the buffers' dtype before the loop, so float32
buffers are updated in float32 arithmetic (as PyTorch and the float32 reference do) and
the loop vectorizes. The optimizer loops are ``prange`` loops (numba vectorizes those,
not its plain serial loops); below ``PARALLEL_MIN`` elements they run on the calling
thread alone, so they neither pay for waking the pool nor fight BLAS's threads for the
two cores in a training step.
"""
from __future__ import annotations

import math
import sys

import numba
import numpy as np
from numba import prange

PARALLEL_MIN = 1 << 18  # elements; smaller work stays on one thread
jit = numba.njit(cache=True, parallel=True)


def launch(kernel, n, *args):
    """Run a prange kernel, on one thread when ``n`` is small."""
    if n >= PARALLEL_MIN:
        return kernel(*args)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


# --- update rules, one element at a time ---------------------------------------------------
# Each ``*_rule`` is the reference formula of nnopt.optim for one element, returning the new
# parameter and state. The flat-buffer kernels below and the batched experiments
# (nnopt.experiments.curvefit) both inline them, so each formula exists once in numba.
rule = numba.njit(inline="always", cache=True)


@rule
def sgd_rule(p, g, lr):
    return p - lr * g


@rule
def momentum_rule(p, g, v, lr, alpha):
    """Textbook: v = alpha v - lr g; p += v."""
    v = alpha * v - lr * g
    return p + v, v


@rule
def momentum_torch_rule(p, g, v, lr, alpha):
    """PyTorch: b = alpha b + g; p -= lr b."""
    v = alpha * v + g
    return p - lr * v, v


@rule
def nag_rule(p, g, v, lr, alpha):
    """Textbook at the stored look-ahead point: v = alpha v - lr g; p += alpha v - lr g."""
    v = alpha * v - lr * g
    return p + (alpha * v - lr * g), v


@rule
def nag_torch_rule(p, g, v, lr, alpha):
    """PyTorch: b = alpha b + g; p -= lr (g + alpha b)."""
    v = alpha * v + g
    return p - lr * (g + alpha * v), v


@rule
def adagrad_rule(p, g, r, lr, eps):
    r = r + g * g
    return p - lr * g / (eps + np.sqrt(r)), r


@rule
def adadelta_rule(p, g, s, r, rho, one_minus_rho, eps, scale):
    s = rho * s + one_minus_rho * g * g
    delta = np.sqrt((r + eps) / (s + eps)) * g
    return p - scale * delta, s, rho * r + one_minus_rho * delta * delta


@rule
def rmsprop_rule(p, g, r, lr, alpha, one_minus_alpha, eps):
    """eps inside the root (textbook)."""
    r = alpha * r + one_minus_alpha * g * g
    return p - lr * g / np.sqrt(r + eps), r


@rule
def rmsprop_torch_rule(p, g, r, lr, alpha, one_minus_alpha, eps):
    """eps outside the root (PyTorch)."""
    r = alpha * r + one_minus_alpha * g * g
    return p - lr * g / (np.sqrt(r) + eps), r


@rule
def adam_rule(p, g, m, v, step, b1, one_minus_b1, b2, one_minus_b2, inv_correction2, eps):
    """p -= lr m_hat / (eps + sqrt(v_hat)), with step = lr / (1 - b1^t) folded in."""
    m = b1 * m + one_minus_b1 * g
    v = b2 * v + one_minus_b2 * g * g
    return p - step * m / (eps + np.sqrt(v * inv_correction2)), m, v


# --- optimizer steps over flat buffers -------------------------------------------------
@jit
def sgd_kernel(p, g, lr):
    for i in prange(p.shape[0]):
        p[i] = sgd_rule(p[i], g[i], lr)


def _velocity_kernel(update):
    @jit
    def kernel(p, g, v, lr, alpha):
        for i in prange(p.shape[0]):
            p[i], v[i] = update(p[i], g[i], v[i], lr, alpha)
    return kernel


momentum_kernel = _velocity_kernel(momentum_rule)
momentum_torch_kernel = _velocity_kernel(momentum_torch_rule)
nag_kernel = _velocity_kernel(nag_rule)
nag_torch_kernel = _velocity_kernel(nag_torch_rule)


@jit
def adagrad_kernel(p, g, r, lr, eps):
    for i in prange(p.shape[0]):
        p[i], r[i] = adagrad_rule(p[i], g[i], r[i], lr, eps)


@jit
def adadelta_kernel(p, g, s, r, rho, one_minus_rho, eps, scale):
    for i in prange(p.shape[0]):
        p[i], s[i], r[i] = adadelta_rule(p[i], g[i], s[i], r[i], rho, one_minus_rho, eps, scale)


def _rmsprop_kernel(update):
    @jit
    def kernel(p, g, r, lr, alpha, one_minus_alpha, eps):
        for i in prange(p.shape[0]):
            p[i], r[i] = update(p[i], g[i], r[i], lr, alpha, one_minus_alpha, eps)
    return kernel


rmsprop_kernel = _rmsprop_kernel(rmsprop_rule)
rmsprop_torch_kernel = _rmsprop_kernel(rmsprop_torch_rule)


@jit
def adam_kernel(p, g, m, v, step, b1, one_minus_b1, b2, one_minus_b2, inv_correction2, eps):
    for i in prange(p.shape[0]):
        p[i], m[i], v[i] = adam_rule(p[i], g[i], m[i], v[i], step, b1, one_minus_b1, b2,
                                     one_minus_b2, inv_correction2, eps)


def _scalars(p, *values):
    cast = p.dtype.type
    return tuple(cast(v) for v in values)


def sgd(p, g, state, hp, t):
    launch(sgd_kernel, p.shape[0], p, g, *_scalars(p, hp["lr"]))


def momentum(p, g, state, hp, t):
    kernel = momentum_torch_kernel if hp["buffer"] == "torch" else momentum_kernel
    launch(kernel, p.shape[0], p, g, state["velocity"], *_scalars(p, hp["lr"], hp["momentum"]))


def nag(p, g, state, hp, t):
    kernel = nag_torch_kernel if hp["buffer"] == "torch" else nag_kernel
    launch(kernel, p.shape[0], p, g, state["velocity"], *_scalars(p, hp["lr"], hp["momentum"]))


def adagrad(p, g, state, hp, t):
    launch(adagrad_kernel, p.shape[0], p, g, state["sum_sq"], *_scalars(p, hp["lr"], hp["eps"]))


def adadelta(p, g, state, hp, t):
    scale = hp["lr"] if hp["lr_scales_step"] else 1.0
    launch(adadelta_kernel, p.shape[0], p, g, state["sq_avg"], state["delta_sq_avg"],
           *_scalars(p, hp["rho"], 1.0 - hp["rho"], hp["eps"], scale))


def rmsprop(p, g, state, hp, t):
    kernel = rmsprop_kernel if hp["eps_inside_root"] else rmsprop_torch_kernel
    launch(kernel, p.shape[0], p, g, state["sq_avg"],
           *_scalars(p, hp["lr"], hp["alpha"], 1.0 - hp["alpha"], hp["eps"]))


def adam(p, g, state, hp, t):
    b1, b2 = hp["betas"]
    launch(adam_kernel, p.shape[0], p, g, state["exp_avg"], state["exp_avg_sq"],
           *_scalars(p, hp["lr"] / (1.0 - b1 ** t), b1, 1.0 - b1, b2, 1.0 - b2,
                     1.0 / (1.0 - b2 ** t), hp["eps"]))


OPTIMIZER_STEPS = {"SGD": sgd, "Momentum": momentum, "NAG": nag, "AdaGrad": adagrad,
                   "AdaDelta": adadelta, "RMSProp": rmsprop, "Adam": adam}


# --- Batch Normalization ---------------------------------------------------------------
# Per-feature sums are taken about the first row (one read of x, without the cancellation
# of E[x^2] - E[x]^2). Small batches: one thread, whole arrays. Large ones: threads take
# chunks of rows (contiguous, streaming reads) with per-feature partial sums, combined once.
CHUNKS = 16
BN_PARALLEL_MIN = 1 << 18


@numba.njit(cache=True)
def _bn_finalize(acc, acc2, shift, m, gamma, beta, eps, momentum, unbiased, running_mean,
                 running_var, mean_out, inv_std_out):
    """Mean, 1/sqrt(var + eps) and running statistics per feature; returns the (scale,
    offset) of z = gamma (x - mean) inv_std + beta = x scale + offset."""
    n = acc.shape[0]
    scale = np.empty(n, dtype=gamma.dtype)
    offset = np.empty(n, dtype=gamma.dtype)
    for k in range(n):
        mu_shifted = acc[k] / m
        var = max(acc2[k] / m - mu_shifted * mu_shifted, 0.0)
        mean = shift[k] + mu_shifted
        inv_std = 1.0 / math.sqrt(var + eps)
        mean_out[k] = mean
        inv_std_out[k] = inv_std
        stored_var = var * m / (m - 1) if unbiased else var
        running_mean[k] = momentum * running_mean[k] + (1.0 - momentum) * mean
        running_var[k] = momentum * running_var[k] + (1.0 - momentum) * stored_var
        scale[k] = gamma[k] * inv_std
        offset[k] = beta[k] - mean * gamma[k] * inv_std
    return scale, offset


@numba.njit(cache=True)
def _bn_backward_coefficients(sum_d, sum_dc, m, gamma, inv_std, dgamma, dbeta):
    """dx = gamma inv_std (d - mean(d) - n mean(d n)) = a d - b (x - mean) - c, with
    n = (x - mean) inv_std: the textbook's backward simplified with sum(x - mean) = 0.
    Also adds dgamma = sum(d n) and dbeta = sum(d)."""
    n = sum_d.shape[0]
    a = np.empty(n, dtype=gamma.dtype)
    b = np.empty(n, dtype=gamma.dtype)
    c = np.empty(n, dtype=gamma.dtype)
    for k in range(n):
        sum_dn = sum_dc[k] * inv_std[k]
        dgamma[k] += sum_dn
        dbeta[k] += sum_d[k]
        a[k] = gamma[k] * inv_std[k]
        b[k] = a[k] * sum_dn * inv_std[k] / m
        c[k] = a[k] * sum_d[k] / m
    return a, b, c


@numba.njit(cache=True)
def _bn_forward_serial(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var,
                       z, mean_out, inv_std_out):
    m, n = x.shape
    shift = x[0].astype(np.float64)
    acc = np.zeros(n)
    acc2 = np.zeros(n)
    for i in range(m):
        for k in range(n):
            dev = x[i, k] - shift[k]
            acc[k] += dev
            acc2[k] += dev * dev
    scale, offset = _bn_finalize(acc, acc2, shift, m, gamma, beta, eps, momentum, unbiased,
                                 running_mean, running_var, mean_out, inv_std_out)
    for i in range(m):
        for k in range(n):
            z[i, k] = x[i, k] * scale[k] + offset[k]


@numba.njit(cache=True, parallel=True)
def _bn_forward_parallel(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var,
                         z, mean_out, inv_std_out):
    m, n = x.shape
    shift = x[0].astype(np.float64)
    acc = np.zeros((CHUNKS, n))
    acc2 = np.zeros((CHUNKS, n))
    rows = (m + CHUNKS - 1) // CHUNKS
    for c in prange(CHUNKS):
        for i in range(c * rows, min(m, (c + 1) * rows)):
            for k in range(n):
                dev = x[i, k] - shift[k]
                acc[c, k] += dev
                acc2[c, k] += dev * dev
    scale, offset = _bn_finalize(acc.sum(axis=0), acc2.sum(axis=0), shift, m, gamma, beta,
                                 eps, momentum, unbiased, running_mean, running_var, mean_out,
                                 inv_std_out)
    for i in prange(m):
        for k in range(n):
            z[i, k] = x[i, k] * scale[k] + offset[k]


@numba.njit(cache=True)
def _bn_backward_serial(d, x, gamma, mean, inv_std, dx, dgamma, dbeta):
    m, n = d.shape
    sum_d = np.zeros(n)
    sum_dc = np.zeros(n)
    for i in range(m):
        for k in range(n):
            dik = d[i, k]
            sum_d[k] += dik
            sum_dc[k] += dik * (x[i, k] - mean[k])
    a, b, c = _bn_backward_coefficients(sum_d, sum_dc, m, gamma, inv_std, dgamma, dbeta)
    for i in range(m):
        for k in range(n):
            dx[i, k] = a[k] * d[i, k] - b[k] * (x[i, k] - mean[k]) - c[k]


@numba.njit(cache=True, parallel=True)
def _bn_backward_parallel(d, x, gamma, mean, inv_std, dx, dgamma, dbeta):
    m, n = d.shape
    acc_d = np.zeros((CHUNKS, n))
    acc_dc = np.zeros((CHUNKS, n))
    rows = (m + CHUNKS - 1) // CHUNKS
    for c in prange(CHUNKS):
        for i in range(c * rows, min(m, (c + 1) * rows)):
            for k in range(n):
                dik = d[i, k]
                acc_d[c, k] += dik
                acc_dc[c, k] += dik * (x[i, k] - mean[k])
    a, b, c0 = _bn_backward_coefficients(acc_d.sum(axis=0), acc_dc.sum(axis=0), m, gamma,
                                         inv_std, dgamma, dbeta)
    for i in prange(m):
        for k in range(n):
            dx[i, k] = a[k] * d[i, k] - b[k] * (x[i, k] - mean[k]) - c0[k]


def _parallel(a):
    # Threads only for big arrays: in a training step BLAS's threads run between these
    # kernels. With numba's pool waiting passively (nnopt.fast sets OMP_WAIT_POLICY) the
    # two pools coexist; if another library made OpenMP spin first, they fight (README).
    return a.size >= BN_PARALLEL_MIN and a.shape[0] >= 2 * CHUNKS


class Scratch:
    """Output buffers handed out again on the next call, but only once nobody else holds
    the previous one (CPython's reference count says so): a fresh multi-megabyte array per
    step costs more in page faults than the kernel that fills it."""

    def __init__(self):
        self.arrays = {}

    def get(self, name, like):
        array = self.arrays.get(name)
        # References: the dict, the local name, getrefcount's argument; more = someone else.
        if (array is not None and array.shape == like.shape and array.dtype == like.dtype
                and sys.getrefcount(array) <= 3):
            return array
        array = self.arrays[name] = np.empty_like(like)
        return array


def bn_forward(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var, out=None):
    """Fused training-mode forward; returns ``(z, mean, inv_std)`` and updates the running
    statistics in place. ``out``: an array to write z into."""
    n = x.shape[1]
    z = np.empty_like(x) if out is None else out
    mean, inv_std = np.empty(n, dtype=x.dtype), np.empty(n, dtype=x.dtype)
    kernel = _bn_forward_parallel if _parallel(x) else _bn_forward_serial
    kernel(np.ascontiguousarray(x), gamma, beta, eps, momentum, unbiased, running_mean,
           running_var, z, mean, inv_std)
    return z, mean, inv_std


def bn_backward(d, x, gamma, mean, inv_std, dgamma, dbeta, out=None):
    """Fused backward; adds into ``dgamma``/``dbeta`` and returns ``dx`` (in ``out`` if given)."""
    dx = np.empty_like(d) if out is None else out
    kernel = _bn_backward_parallel if _parallel(d) else _bn_backward_serial
    kernel(np.ascontiguousarray(d), np.ascontiguousarray(x), gamma, mean, inv_std, dx,
           dgamma, dbeta)
    return dx


# --- ReLU ----------------------------------------------------------------------------------
@numba.njit(cache=True)
def _relu_forward(x, y):
    for i in range(x.shape[0]):
        for k in range(x.shape[1]):
            y[i, k] = max(x[i, k], 0)


@numba.njit(cache=True)
def _relu_backward(dy, y, dx):
    for i in range(dy.shape[0]):
        for k in range(dy.shape[1]):
            dx[i, k] = dy[i, k] if y[i, k] > 0 else 0


def relu_forward(x):
    """max(x, 0) in one pass; the output doubles as the backward's mask (y > 0 iff x > 0)."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    _relu_forward(x, y)
    return y


def relu_backward(dy, y):
    dx = np.empty_like(y)
    _relu_backward(np.ascontiguousarray(dy), y, dx)
    return dx
