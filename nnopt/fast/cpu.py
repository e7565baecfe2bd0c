"""Numba kernels: one loop per optimizer step and per BN pass, no temporaries.

Each mirrors a reference formula (``nnopt.optim.*.update``, ``nnopt.batchnorm``'s factored
form); the tests hold them to it. Scalars are cast to the buffers' dtype before the loop, so float32
buffers are updated in float32 arithmetic (as PyTorch and the float32 reference do) and
the loop vectorizes. The optimizer loops are ``prange`` loops (numba vectorizes those,
not its plain serial loops); below ``PARALLEL_MIN`` elements they run on the calling
thread alone, so they neither pay for waking the pool nor fight BLAS's threads for the
two cores in a training step.
"""
from __future__ import annotations

import math
import sys
import types
from functools import lru_cache

import numba
import numpy as np
from numba import prange

from .. import batchnorm as reference_batchnorm
from ..optim import OPTIMIZERS
from ..optim.adaptive import adam_kernel_scalars as adam_kernel_scalars_py

PARALLEL_MIN = 1 << 18  # elements; smaller work stays on one thread
jit = numba.njit(cache=True, parallel=True)


def launch(kernel, parallel, *args):
    """Run a prange kernel: on numba's threads when ``parallel``, else on this thread alone."""
    if parallel:
        return kernel(*args)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


# --- update rules, one element at a time ---------------------------------------------------
# Each ``<name>_rule`` is the reference formula of nnopt.optim for one element, returning the
# new parameter and state. Its arguments: the element of p and g, the elements of the state
# (the optimizer's ``state_names`` order), then ``Optimizer.kernel_scalars(group, t)``, in
# order; kernels/rules.cuh has the same rules with the same arguments. The flat-buffer
# kernels below and the batched experiments (nnopt.experiments.curvefit) both call them, so
# each formula exists once in numba. (Not numba's ``inline="always"``: that refuses the
# ``*scalars`` call below; LLVM inlines these small functions anyway.)
rule = numba.njit(cache=True)


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


#: Adam.kernel_scalars's arithmetic, compiled (the batched experiments call it per step)
adam_kernel_scalars = rule(adam_kernel_scalars_py)

RULES = {name[:-len("_rule")]: f for name, f in list(globals().items())
         if name.endswith("_rule") and isinstance(f, numba.core.registry.CPUDispatcher)}


# --- optimizer steps over flat buffers -------------------------------------------------
# One loop per number of state arrays; ``update`` is the rule, bound as a global of each
# rule's own copy (flat_kernel). Not a closure: numba keys a closure's disk cache on its
# pickled cells, and a pickled dispatcher differs per process, so every process would
# compile every optimizer kernel again.
update = None


def _loop_0(p, g, scalars):
    for i in prange(p.shape[0]):
        p[i] = update(p[i], g[i], *scalars)


def _loop_1(p, g, s, scalars):
    for i in prange(p.shape[0]):
        p[i], s[i] = update(p[i], g[i], s[i], *scalars)


def _loop_2(p, g, s1, s2, scalars):
    for i in prange(p.shape[0]):
        p[i], s1[i], s2[i] = update(p[i], g[i], s1[i], s2[i], *scalars)


LOOPS = (_loop_0, _loop_1, _loop_2)


@lru_cache(maxsize=None)
def flat_kernel(rule_name, n_state):
    """The prange loop of rule ``rule_name`` (with ``n_state`` state arrays) over flat
    buffers, compiled (and cached on disk) under the name ``<rule>_kernel``."""
    loop = LOOPS[n_state]
    name = f"{rule_name}_kernel"
    kernel = types.FunctionType(loop.__code__, {**loop.__globals__, "update": RULES[rule_name]},
                                name)
    kernel.__qualname__ = name  # numba names the cache index after it: one per rule
    return jit(kernel)


def optimizer_step(cls):
    """The fused ``step(p, g, state, hp, t)`` of optimizer class ``cls``: its rule over the
    flat buffers, with its kernel scalars cast to the buffers' dtype."""
    def step(p, g, state, hp, t):
        kernel = flat_kernel(cls.rule_name(hp), len(cls.state_names))
        cast = p.dtype.type
        scalars = tuple(cast(v) for v in cls.kernel_scalars(hp, t))
        launch(kernel, p.shape[0] >= PARALLEL_MIN, p, g,
               *(state[name] for name in cls.state_names), scalars)
    step.__name__ = step.__qualname__ = f"{cls.__name__.lower()}_step"
    return step


OPTIMIZER_STEPS = {cls.__name__: optimizer_step(cls) for cls in OPTIMIZERS.values()}


# --- Batch Normalization ---------------------------------------------------------------
# Translations of nnopt.batchnorm's factored form (its docstring has the derivation): the
# same steps under the same names, per feature, in float64. Per-feature sums are taken
# about the first row (one read of x, without the cancellation of E[x^2] - E[x]^2). Rows
# are split into ``chunks`` contiguous runs (streaming reads), each with its own partial
# sums, combined once: CHUNKS runs on numba's threads for large batches, one run on the
# calling thread for small ones (the same kernel).
CHUNKS = 16
BN_PARALLEL_MIN = 1 << 18


@rule
def batchnorm_statistics(sum_dev, sum_sq_dev, shift, m, eps):
    mu_shifted = sum_dev / m
    var = max(sum_sq_dev / m - mu_shifted * mu_shifted, 0.0)
    mean = shift + mu_shifted
    inv_std = 1.0 / math.sqrt(var + eps)
    return mean, var, inv_std


# Plain arithmetic in nnopt.batchnorm: numba compiles the reference functions themselves.
batchnorm_scale_offset = rule(reference_batchnorm.batchnorm_scale_offset)
batchnorm_backward_coefficients = rule(reference_batchnorm.batchnorm_backward_coefficients)


@numba.njit(cache=True, parallel=True)
def _paired_sums(u, u_shift, x, x_center, chunks):
    """Per feature, sum(u - u_shift) and sum((u - u_shift) (x - x_center)) in float64, each
    of ``chunks`` runs of rows on its own thread: batchnorm_shifted_sums (u = x, both
    shifts the first row) and batchnorm_backward_sums (u = d unshifted, x_center = mean)."""
    m, n = u.shape
    sums = np.zeros((chunks, n))
    products = np.zeros((chunks, n))
    rows = (m + chunks - 1) // chunks
    for chunk in prange(chunks):
        for i in range(chunk * rows, min(m, (chunk + 1) * rows)):
            for k in range(n):
                dev = u[i, k] - u_shift[k]
                sums[chunk, k] += dev
                products[chunk, k] += dev * (x[i, k] - x_center[k])
    return sums.sum(axis=0), products.sum(axis=0)


@numba.njit(cache=True, parallel=True)
def _bn_forward(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var, z,
                mean_out, inv_std_out, chunks):
    m, n = x.shape
    shift = x[0].astype(np.float64)
    sum_dev_total, sum_sq_dev_total = _paired_sums(x, shift, x, shift, chunks)
    scale = np.empty(n, dtype=gamma.dtype)
    offset = np.empty(n, dtype=gamma.dtype)
    for k in range(n):
        mean, var, inv_std = batchnorm_statistics(sum_dev_total[k], sum_sq_dev_total[k],
                                                  shift[k], m, eps)
        mean_out[k] = mean
        inv_std_out[k] = inv_std
        # BatchNorm._update_running
        stored_var = var * m / (m - 1) if unbiased else var
        running_mean[k] = momentum * running_mean[k] + (1.0 - momentum) * mean
        running_var[k] = momentum * running_var[k] + (1.0 - momentum) * stored_var
        scale[k], offset[k] = batchnorm_scale_offset(gamma[k], beta[k], mean, inv_std)
    for i in prange(m):
        for k in range(n):
            z[i, k] = x[i, k] * scale[k] + offset[k]


@numba.njit(cache=True, parallel=True)
def _bn_backward(d, x, gamma, mean, inv_std, dx, dgamma, dbeta, chunks):
    m, n = d.shape
    sum_d_total, sum_dc_total = _paired_sums(d, np.zeros(n), x, mean, chunks)
    a = np.empty(n, dtype=gamma.dtype)
    b = np.empty(n, dtype=gamma.dtype)
    c = np.empty(n, dtype=gamma.dtype)
    for k in range(n):
        a[k], b[k], c[k], dgamma_k, dbeta_k = batchnorm_backward_coefficients(
            sum_d_total[k], sum_dc_total[k], m, gamma[k], inv_std[k])
        dgamma[k] += dgamma_k
        dbeta[k] += dbeta_k
    for i in prange(m):
        for k in range(n):
            dx[i, k] = a[k] * d[i, k] - b[k] * (x[i, k] - mean[k]) - c[k]


def bn_chunks(a):
    """CHUNKS for big arrays, else 1 (one thread): in a training step BLAS's threads run
    between these kernels. With numba's pool waiting passively (nnopt.fast sets
    OMP_WAIT_POLICY) the two pools coexist; if another library made OpenMP spin first,
    they fight (README)."""
    return CHUNKS if a.size >= BN_PARALLEL_MIN and a.shape[0] >= 2 * CHUNKS else 1


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
    chunks = bn_chunks(x)
    launch(_bn_forward, chunks > 1, np.ascontiguousarray(x), gamma, beta, eps, momentum,
           unbiased, running_mean, running_var, z, mean, inv_std, chunks)
    return z, mean, inv_std


def bn_backward(d, x, gamma, mean, inv_std, dgamma, dbeta, out=None):
    """Fused backward; adds into ``dgamma``/``dbeta`` and returns ``dx`` (in ``out`` if given)."""
    dx = np.empty_like(d) if out is None else out
    chunks = bn_chunks(d)
    launch(_bn_backward, chunks > 1, np.ascontiguousarray(d), np.ascontiguousarray(x), gamma,
           mean, inv_std, dx, dgamma, dbeta, chunks)
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
