"""Numba kernels: one loop per optimizer step and per BN pass, no temporaries.

Each mirrors a reference formula (``nnopt.optim.*.update``, ``nnopt.batchnorm``'s factored
form); the tests hold them to it. Scalars are cast to the buffers' dtype before the loop, so float32
buffers are updated in float32 arithmetic (as PyTorch and the float32 reference do) and
the loop vectorizes. The loops are ``prange`` loops, compiled twice (:class:`Kernel`):
large arrays run on numba's threads; below ``PARALLEL_MIN`` elements (and BN's small
batches) the plain-loop twin runs on the calling thread alone, so it neither pays for
numba's parallel runtime nor fights BLAS's threads for the two cores in a training step.
"""
from __future__ import annotations

import math
import types
from functools import lru_cache

import numba
import numpy as np
from numba import prange
from numba.extending import overload

from .. import batchnorm as reference_batchnorm
from ..optim import OPTIMIZERS
from ..optim.adaptive import adam_kernel_scalars as adam_kernel_scalars_py
from . import numba_cache  # noqa: F401  (before any kernel: the cache keys of nnopt's functions)
from .shared import ACTIVATION_CODES, IDENTITY, RELU, SIGMOID, TANH, Scratch  # noqa: F401
from .threads import product  # noqa: F401  (a block's products: nnopt.block)

ON_GPU = False  # a block's CPU path (nnopt.block): no products inside kernels, no streams

PARALLEL_MIN = 1 << 18  # elements; smaller work stays on one thread
# error_model="numpy": a division by zero gives inf/nan as NumPy (and the reference) does,
# instead of a Python-style check before every division, which keeps LLVM from
# vectorizing the loops (measured: Adam at 1e7 float32 elements 19.3 ms -> 10.2 ms).
OPTIONS = {"cache": True, "error_model": "numpy"}


#: The activation code a kernel's twin is compiled for (:class:`Kernel`); -1: any, the code
#: the kernel is passed.
ACTIVATION = -1


class Kernel:
    """A kernel with ``prange`` loops, compiled twice: on numba's threads (for large
    arrays), and as plain loops on the calling thread (prange is range there) for the small
    arrays of a training step. The second skips numba's parallel runtime, which costs a few
    microseconds per prange loop even on one thread: about 40 us of a 0.7 ms step at batch
    64 (eight BN passes, two loops each). Kernels calling kernels get the same twin.

    A kernel that takes an activation code starts with ``activation = activation if
    ACTIVATION < 0 else ACTIVATION``. Launched with ``activation=code``, its twins, and the
    twins of the kernels it calls, are compiled for that code alone (``for_activation``
    fixes a callee's code instead). The code is then a constant, so LLVM drops the branch
    on it inside the loops and can vectorize them."""

    def __init__(self, func, activation=-1):
        self.func = func
        self.activation = activation
        self.twins = {}

    def for_activation(self, activation):
        """This kernel, always compiled for ``activation``."""
        return Kernel(self.func, activation)

    def compiled(self, parallel, activation=-1):
        activation = activation if self.activation < 0 else self.activation
        key = (parallel, activation)
        if key not in self.twins:
            func = self.func
            # Each twin sees the other kernels as its own kind; a copy of the function,
            # not a closure, so that numba's disk cache finds it again (see flat_kernel).
            names = {name: func.__globals__[name].compiled(parallel, activation)
                     for name in func.__code__.co_names
                     if isinstance(func.__globals__.get(name), Kernel)}
            name = (func.__name__ + ("" if parallel else "_serial")
                    + ("" if activation < 0 else f"_activation{activation}"))
            twin = types.FunctionType(func.__code__,
                                      {**func.__globals__, **names, "ACTIVATION": activation},
                                      name)
            twin.__qualname__ = twin.__name__
            twin.__doc__ = func.__doc__
            self.twins[key] = numba.njit(parallel=parallel, **OPTIONS)(twin)
        return self.twins[key]

    def __call__(self, *args):
        return self.compiled(True)(*args)


def launch(kernel, parallel, *args, activation=-1):
    """Run ``kernel`` on numba's threads when ``parallel``, else on this thread alone;
    ``activation``: on this thread, its twin compiled for that code (Kernel). The threaded
    twins stay general: large arrays are memory-bound, and each twin is compiled anew."""
    return kernel.compiled(parallel, -1 if parallel else activation)(*args)


# --- update rules, one element at a time ---------------------------------------------------
# Each ``<name>_rule`` is the reference formula of nnopt.optim for one element, returning the
# new parameter and state. Its arguments: the element of p and g, the elements of the state
# (the optimizer's ``state_names`` order), then ``Optimizer.kernel_scalars(group, t)``, in
# order; kernels/rules.cuh has the same rules with the same arguments. The flat-buffer
# kernels below and the batched experiments (nnopt.experiments.curvefit) both call them, so
# each formula exists once in numba. (Not numba's ``inline="always"``: that refuses the
# ``*scalars`` call below; LLVM inlines these small functions anyway.)
rule = numba.njit(**OPTIONS)


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
    return Kernel(kernel)


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


# --- element-wise activations, by code ------------------------------------------------------
# The fused passes of BN and of nnopt.block apply the activation as they write their output,
# and its derivative as they read the incoming gradient; both from the activation's output
# y alone (ReLU: y > 0; sigmoid: y (1 - y); tanh: 1 - y^2), so a block keeps one array, not
# two. The codes (IDENTITY, RELU, ...) are nnopt.fast.shared's, shared with the CUDA kernels.


def typed_one(v):
    """1 in the type of the number ``v``: numba types ``1 - y`` and ``max(v, 0)`` as float64
    for a float32 y or v, and a rule that returns float64 for float32 arrays makes its
    kernel's loop mixed-precision (measured: BN's backward pass over 64x128 float32 in
    7.4 us instead of 5.4 us). Python: 1.0."""
    return 1.0


@overload(typed_one)
def _typed_one(v):
    one = numba.np.numpy_support.as_dtype(v).type(1)
    return lambda v: one


@rule
def activate(v, code):
    """nnopt.layers' ReLU/Sigmoid/Tanh forward of one element, in v's precision."""
    one = typed_one(v)
    if code == RELU:
        return max(v, one - one)  # v unless 0 > v: NaN passes on, as in the layer and torch.relu
    if code == SIGMOID:
        return one / (one + math.exp(-v))
    if code == TANH:
        return math.tanh(v)
    return v


@rule
def activation_grad(d, y, code):
    """The gradient through the activation, from its output ``y``: nnopt.layers' backward,
    in d's precision."""
    one = typed_one(y)
    if code == RELU:
        # A product, not a choice, which LLVM vectorizes. NaN or inf in d still gives NaN
        # where y <= 0, as 0 * d did.
        return d * (y > 0)
    if code == SIGMOID:
        return d * y * (one - y)
    if code == TANH:
        return d * (one - y * y)
    return d


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
batchnorm_scale = rule(reference_batchnorm.batchnorm_scale)
batchnorm_apply = rule(reference_batchnorm.batchnorm_apply)
batchnorm_backward_coefficients = rule(reference_batchnorm.batchnorm_backward_coefficients)


@Kernel
def _paired_sums(u, u_shift, x, x_center, chunks, y, activation):
    """Per feature, sum(v - u_shift) and sum((v - u_shift) (x - x_center)) in float64, with
    v = activation_grad(u, y, activation), each of ``chunks`` runs of rows on its own thread:
    batchnorm_shifted_sums (u = x, both shifts the first row, IDENTITY) and
    batchnorm_backward_sums (u = d unshifted, x_center = mean; y: the block's activated output)."""
    activation = activation if ACTIVATION < 0 else ACTIVATION
    m, n = u.shape
    sums = np.zeros((chunks, n))
    products = np.zeros((chunks, n))
    rows = (m + chunks - 1) // chunks
    for chunk in prange(chunks):
        for i in range(chunk * rows, min(m, (chunk + 1) * rows)):
            for k in range(n):
                dev = activation_grad(u[i, k], y[i, k], activation) - u_shift[k]
                sums[chunk, k] += dev
                products[chunk, k] += dev * (x[i, k] - x_center[k])
    if chunks == 1:  # a training step's small batches: no combined copies to allocate
        return sums[0], products[0]
    return sums.sum(axis=0), products.sum(axis=0)


_shifted_sums = _paired_sums.for_activation(IDENTITY)  # BN's statistics: of x itself


@Kernel
def _bn_forward(x, gamma_beta, eps, momentum, unbiased, running_mean, running_var, z, stats,
                chunks, bias, activation):
    """z = activate(BN(x)); the running mean is that of x + bias (see bn_forward).
    gamma_beta: rows gamma and beta; stats: rows mean and inv_std, written (one array each,
    not two: numba takes each array argument apart at every call, ~0.3 us)."""
    activation = activation if ACTIVATION < 0 else ACTIVATION
    gamma, beta = gamma_beta[0], gamma_beta[1]
    mean_out, inv_std_out = stats[0], stats[1]
    m, n = x.shape
    shift = x[0].astype(np.float64)
    if chunks == 1:
        # A training step's small batch: _paired_sums' loop, here, where LLVM sees the
        # sums freshly allocated (they alias no input) and vectorizes it. With the twins
        # for one activation (Kernel), BN's passes over the textbook network's four
        # hidden widths at batch 64 took 37 us instead of 45 us.
        sum_dev_total, sum_sq_dev_total = np.zeros(n), np.zeros(n)
        for i in range(m):
            for k in range(n):
                dev = x[i, k] - shift[k]
                sum_dev_total[k] += dev
                sum_sq_dev_total[k] += dev * dev
    else:
        sum_dev_total, sum_sq_dev_total = _shifted_sums(x, shift, x, shift, chunks, x, IDENTITY)
    scale = np.empty(n, dtype=gamma.dtype)
    for k in range(n):
        mean, var, inv_std = batchnorm_statistics(sum_dev_total[k], sum_sq_dev_total[k],
                                                  shift[k], m, eps)
        mean_out[k] = mean
        inv_std_out[k] = inv_std
        # BatchNorm._update_running
        stored_var = var * m / (m - 1) if unbiased else var
        running_mean[k] = momentum * running_mean[k] + (1.0 - momentum) * (mean + bias[k])
        running_var[k] = momentum * running_var[k] + (1.0 - momentum) * stored_var
        scale[k] = batchnorm_scale(gamma[k], inv_std)
    for i in prange(m):
        for k in range(n):
            z[i, k] = activate(batchnorm_apply(x[i, k], mean_out[k], scale[k], beta[k]),
                               activation)


@Kernel
def _bn_backward(d, x, gamma_beta, stats, dx, grads, chunks, y, activation):
    """BN's backward of d' = activation_grad(d, y): the block's gradient through its
    activation and BN in one pair of passes. gamma_beta: gamma in its first row; stats:
    rows mean and inv_std; grads: rows dgamma and dbeta, added into."""
    activation = activation if ACTIVATION < 0 else ACTIVATION
    gamma, mean, inv_std = gamma_beta[0], stats[0], stats[1]
    dgamma, dbeta = grads[0], grads[1]
    m, n = d.shape
    if chunks == 1:  # _paired_sums' loop, here: see _bn_forward
        sum_d_total, sum_dc_total = np.zeros(n), np.zeros(n)
        for i in range(m):
            for k in range(n):
                g = activation_grad(d[i, k], y[i, k], activation)
                sum_d_total[k] += g
                sum_dc_total[k] += g * (x[i, k] - mean[k])
    else:
        sum_d_total, sum_dc_total = _paired_sums(d, np.zeros(n), x, mean, chunks, y, activation)
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
            dx[i, k] = (a[k] * activation_grad(d[i, k], y[i, k], activation)
                        - b[k] * (x[i, k] - mean[k]) - c[k])


def bn_chunks(a):
    """CHUNKS for big arrays, else 1 (one thread): in a training step BLAS's threads run
    between these kernels. With numba's pool waiting passively (nnopt.fast sets
    OMP_WAIT_POLICY) the two pools coexist; if another library made OpenMP spin first,
    they fight (README)."""
    return CHUNKS if a.size >= BN_PARALLEL_MIN and a.shape[0] >= 2 * CHUNKS else 1


def rows(a, b):
    """1-D arrays ``a`` and ``b`` as the rows of a new (2, n) array (np.stack took 11 us for
    two short rows here, this 3 us)."""
    both = np.empty((2, a.shape[0]), dtype=a.dtype)
    both[0], both[1] = a, b
    return both


def bn_forward(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var, out=None,
               bias=None, activation=IDENTITY):
    """Fused training-mode forward; returns ``(z, mean, inv_std)`` and updates the running
    statistics in place. ``out``: an array to write z into.

    A block (nnopt.block) passes the product x W without its Linear bias, and the bias
    here: BN subtracts the batch mean, so the bias changes nothing in z (nor in mean and
    inv_std, returned for x as given), only the running mean, which is kept as the
    unfused layers keep it (that of x + bias). ``activation``: a code of ACTIVATION_CODES
    applied to z as it is written."""
    n = x.shape[1]
    z = np.empty_like(x) if out is None else out
    stats = np.empty((2, n), dtype=x.dtype)
    bias = np.zeros(n, dtype=x.dtype) if bias is None else bias
    chunks = bn_chunks(x)
    launch(_bn_forward, chunks > 1, np.ascontiguousarray(x), rows(gamma, beta), eps,
           momentum, unbiased, running_mean, running_var, z, stats, chunks, bias, activation,
           activation=activation)
    return z, stats[0], stats[1]


def bn_backward(d, x, gamma, mean, inv_std, dgamma, dbeta, out=None, y=None,
                activation=IDENTITY):
    """Fused backward; adds into ``dgamma``/``dbeta`` and returns ``dx`` (in ``out`` if given).
    With an ``activation`` code, ``d`` is the gradient of the activated output ``y`` of
    :func:`bn_forward`, and dx that of its input."""
    dx = np.empty_like(d) if out is None else out
    chunks = bn_chunks(d)
    d = np.ascontiguousarray(d)
    grads = rows(dgamma, dbeta)
    launch(_bn_backward, chunks > 1, d, np.ascontiguousarray(x), gamma.reshape(1, -1),
           rows(mean, inv_std), dx, grads, chunks, d if y is None else y, activation,
           activation=activation)
    dgamma[...], dbeta[...] = grads
    return dx


class BoundBatchNorm:
    """BN's passes with everything but the per-step arrays gathered once: the kernel twins
    for its shape and activation; gamma and beta, and their gradients, as the rows of one
    view each into the model's flat storage, where they lie side by side; the bias (a
    block's Linear bias, or zeros); the array BN's mean and inv_std go into (a forward's
    replace the last forward's, as its saved values do). At a batch of 64, gathering them
    anew in every call (as bn_forward and bn_backward do) cost as much as BN's arithmetic:
    in a training step, 6 us per block forward against 4 us for the passes. A block
    (nnopt.block) and the BatchNorm layer of a model each keep one.

    For a BatchNorm whose parameters are bound to a model's flat storage (:meth:`takes`),
    whose arrays never change (nnopt.params). BN's eps, momentum and running buffers are
    read at each call, since they may be set between steps. :meth:`fits` says whether it
    serves an input."""

    def __init__(self, batchnorm, bias, h, activation=IDENTITY):
        if not self.takes(batchnorm):
            raise ValueError("BoundBatchNorm takes a BatchNorm of a model's flat storage")
        n = h.shape[1]
        gamma = batchnorm.gamma
        storage, start = gamma.storage, gamma.offset
        self.batchnorm, self.shape, self.dtype = batchnorm, h.shape, h.dtype
        self.gamma_beta = storage.data[start:start + 2 * n].reshape(2, n)
        self.grads = storage.grad[start:start + 2 * n].reshape(2, n)
        self.bias = np.zeros(n, dtype=h.dtype) if bias is None else bias
        self.stats = np.empty((2, n), h.dtype)
        self.mean, self.inv_std = self.stats
        self.chunks = bn_chunks(h)
        parallel = self.chunks > 1
        self.forward_kernel = _bn_forward.compiled(parallel, -1 if parallel else activation)
        self.backward_kernel = _bn_backward.compiled(parallel, -1 if parallel else activation)
        self.activation = activation

    @staticmethod
    def takes(batchnorm):
        """Whether gamma and beta lie side by side in a model's flat storage."""
        gamma, beta = batchnorm.gamma, batchnorm.beta
        return (gamma.storage is not None and beta.storage is gamma.storage
                and beta.offset == gamma.offset + gamma.size)

    def fits(self, h):
        return h.shape == self.shape and h.dtype == self.dtype

    def forward(self, h, out):
        """out = activate(BN(h)) (h contiguous: a product's output); updates the running
        statistics as bn_forward does."""
        bn = self.batchnorm
        buffers = bn.buffers
        self.forward_kernel(h, self.gamma_beta, bn.eps, bn.momentum, bn.unbiased,
                            buffers["running_mean"], buffers["running_var"], out, self.stats,
                            self.chunks, self.bias, self.activation)
        return out

    def backward(self, dy, h, y, out):
        """bn_backward of the last forward's h and output y (None: no activation): out =
        dh; adds into the gradients of gamma and beta."""
        dy = np.ascontiguousarray(dy)
        self.backward_kernel(dy, h, self.gamma_beta, self.stats, out, self.grads,
                             self.chunks, dy if y is None else y, self.activation)
        return out


# --- bias and activation (a block without BN; the ReLU layer) ------------------------------
# Rows are split into ``chunks`` runs as in BN: the bias gradient's column sums are partial
# sums per run, combined once.
@Kernel
def _activation_forward(h, bias, activation, y, chunks):
    """y = activate(h + bias); ``bias`` of length 0: none."""
    activation = activation if ACTIVATION < 0 else ACTIVATION
    m, n = h.shape
    has_bias = bias.shape[0] > 0
    rows = (m + chunks - 1) // chunks
    for chunk in prange(chunks):
        for i in range(chunk * rows, min(m, (chunk + 1) * rows)):
            for k in range(n):
                v = h[i, k] + bias[k] if has_bias else h[i, k]
                y[i, k] = activate(v, activation)


@Kernel
def _activation_backward(dy, y, activation, dh, dbias, chunks):
    """dh = activation_grad(dy, y); dbias += column sums of dh (``dbias`` of length 0: none)."""
    activation = activation if ACTIVATION < 0 else ACTIVATION
    m, n = dy.shape
    has_bias = dbias.shape[0] > 0
    sums = np.zeros((chunks, n if has_bias else 0))
    rows = (m + chunks - 1) // chunks
    for chunk in prange(chunks):
        for i in range(chunk * rows, min(m, (chunk + 1) * rows)):
            for k in range(n):
                g = activation_grad(dy[i, k], y[i, k], activation)
                dh[i, k] = g
                if has_bias:
                    sums[chunk, k] += g
    if has_bias:
        for k in range(n):
            total = 0.0  # in float64, then one rounding into dbias
            for chunk in range(chunks):
                total += sums[chunk, k]
            dbias[k] += total


NO_BIAS = {np.dtype(np.float32): np.zeros(0, np.float32), np.dtype(np.float64): np.zeros(0)}


def activation_forward(h, bias=None, activation=RELU, out=None):
    """activate(h + bias) in one pass (``out`` may be ``h`` itself)."""
    h = np.ascontiguousarray(h)
    y = np.empty_like(h) if out is None else out
    chunks = bn_chunks(h)
    launch(_activation_forward, chunks > 1, h, NO_BIAS[h.dtype] if bias is None else bias,
           activation, y, chunks, activation=activation)
    return y


def activation_backward(dy, y, activation=RELU, dbias=None, out=None):
    """The gradient of the activation's input from its output ``y``; adds the column sums
    into ``dbias`` (the gradient of a bias added before the activation) if given."""
    dh = np.empty_like(y) if out is None else out
    chunks = bn_chunks(y)
    launch(_activation_backward, chunks > 1, np.ascontiguousarray(dy), y, activation, dh,
           NO_BIAS[y.dtype] if dbias is None else dbias, chunks, activation=activation)
    return dh


def relu_forward(x):
    """max(x, 0) in one pass; the output doubles as the backward's mask (y > 0 iff x > 0)."""
    return activation_forward(x, None, RELU)


def relu_backward(dy, y):
    return activation_backward(dy, y, RELU)


# --- softmax cross-entropy -------------------------------------------------------------------
@numba.njit(cache=True)
def _softmax_cross_entropy(logits, labels, prob, grad):
    """nnopt.losses.SoftmaxCrossEntropy's forward and backward for integer labels, one row
    at a time: prob = softmax, grad = (prob - onehot) / m, returns (mean loss, number of
    labels outside [0, classes)). Row sums and the loss in float64."""
    m, c = logits.shape
    total = 0.0
    bad = 0
    for i in range(m):
        top = logits[i, 0]
        for k in range(1, c):
            top = max(top, logits[i, k])
        sum_exp = 0.0
        for k in range(c):
            e = math.exp(logits[i, k] - top)
            prob[i, k] = e
            sum_exp += e
        log_sum = math.log(sum_exp)
        label = labels[i]
        if label < 0 or label >= c:
            bad += 1
            label = -1
        else:
            total -= logits[i, label] - top - log_sum
        inv_sum = 1.0 / sum_exp
        for k in range(c):
            p = prob[i, k] * inv_sum
            prob[i, k] = p
            grad[i, k] = (p - (1.0 if k == label else 0.0)) / m
    return total / m, bad


def softmax_cross_entropy(logits, labels, prob, grad):
    """Fills ``prob`` and ``grad``; returns (loss, count of out-of-range labels)."""
    return _softmax_cross_entropy(np.ascontiguousarray(logits), labels, prob, grad)
