"""CuPy launchers of the CUDA kernels in ``nnopt.kernels`` (compiled once by NVRTC, cached
on disk by CuPy): every optimizer step, BN forward/backward, ReLU, and a small GEMM used
inside captured CUDA graphs where cuBLAS cannot load (``graph_gemm`` prefers cuBLAS on
nnopt's own handle: nnopt.cublas). Launch shapes: nnopt.fast.plan.

Same interface as :mod:`nnopt.fast.cpu`: ``OPTIMIZER_STEPS[name](p, g, state, hp, t)``,
``bn_forward``, ``bn_backward``, ``relu_forward``, ``relu_backward``,
``softmax_cross_entropy``, and what a fused block (nnopt.block) takes:
``ACTIVATION_CODES``, ``activation_forward``, ``activation_backward``, ``product`` and
``Scratch``.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import cupy
import numpy as np

from .. import cublas, kernels
from ..optim import OPTIMIZERS
from . import capturing
from .shared import ACTIVATION_CODES, IDENTITY, RELU  # noqa: F401  (a block looks them up here)
from .shared import Scratch as HostScratch
from .shared import weight_decay_scalars
from . import plan
from .plan import (CE_MAX_BLOCKS, CE_THREADS, THREADS, bn_lanes, bn_plan, bn_split_grid,
                   elementwise_blocks, feature_tile_grid, fused_slices, fuses_loss,
                   fuses_product)

ON_GPU = True  # a block's GPU path (nnopt.block): products in kernels, a side stream


@lru_cache(maxsize=None)
def module(name: str):
    return cupy.RawModule(code=kernels.source(name), options=("--std=c++14",))


@lru_cache(maxsize=None)
def function(source: str, name: str):
    return module(source).get_function(name)


@lru_cache(maxsize=None)
def _sms(device_id):
    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def sms():
    return _sms(cupy.cuda.Device().id)


def _suffix(a):
    return "f32" if a.dtype == cupy.float32 else "f64"


def _launch(name, n, p, *args, source="optimizers.cu"):
    """An optimizers.cu kernel over n elements: 16-byte vectors (4 float32, 2 float64)."""
    blocks = elementwise_blocks(n, 16 // p.itemsize, sms())
    function(source, name)((blocks,), (THREADS,), (p, *args, np.int64(n)))


def _s(p, *values):
    cast = np.float32 if p.dtype == cupy.float32 else np.float64
    return tuple(cast(v) for v in values)


# --- graph capture ----------------------------------------------------------------------------
def _gemm_operands(a, b, trans_a, trans_b, out):
    """Contiguous a and b, the output (``out`` itself where it is a C-contiguous (m, n)
    array of their dtype, so the product is written in place) and m, n, k."""
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(f"gemm: inner sizes differ ({k} vs {k2})")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: dtypes differ ({a.dtype} vs {b.dtype})")
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != a.dtype):
        raise ValueError(f"gemm: out is {tuple(out.shape)} {out.dtype}, the product "
                         f"({m}, {n}) {a.dtype}")
    direct = out is not None and out.flags.c_contiguous
    c = out if direct else cupy.empty((m, n), dtype=a.dtype)
    return a, b, c, m, n, k


def _into(out, c):
    """The result: ``c``, copied into ``out`` where the kernel could not write there."""
    if out is None or out is c:
        return c
    out[...] = c
    return out


def _warn(message):
    warnings.warn(message, RuntimeWarning, stacklevel=4)


HANDLES = cublas.HandleCache(_warn)


def _make_handle():
    try:  # CuPy's cuBLAS bindings load its libcublas: nnopt then finds that one first
        from cupy_backends.cuda.libs import cublas as _cupy_cublas  # noqa: F401
    except ImportError:
        pass
    lib, path = cublas.load()

    def allocate(nbytes):  # straight cudaMalloc: no memory pool may ever reuse it
        memory = cupy.cuda.memory.Memory(nbytes)
        return memory, memory.ptr
    configured = cublas.workspace_bytes()
    return cublas.Handle(lib, allocate, path=path, workspace_bytes=cublas.WORKSPACE_BYTES
                         if configured is None else configured)


def cublas_handle():
    """This device's nnopt cuBLAS handle, or None (warned once) where cuBLAS is unusable."""
    return HANDLES.get(cupy.cuda.Device().id, _make_handle)


def prepare_capture(stream):
    """Before anything runs on ``stream`` for a capture (its warm-up included): the handle
    made and given its workspace on ``stream``'s side stream (:func:`beside_main`), then
    bound to ``stream`` with its own (cuBLAS must not allocate while capturing; it may
    change streams then). Returns the GEMM route the capture will take."""
    drop_dead_side_streams()
    handle = cublas_handle()
    if handle is not None:  # the dead steps' workspaces freed, before this one's is made
        handle.sweep()
        handle.free_retired(cupy.cuda.Device().synchronize)
        # $NNOPT_CUBLAS_WORKSPACE, where set, sizes a new stream's
        bind_stream(handle, side_stream(stream), cublas.workspace_bytes())
        bind_stream(handle, stream, cublas.workspace_bytes())
    return HANDLES.route(cupy.cuda.Device().id)


def bind_stream(handle, stream, workspace_bytes=None):
    """``handle.set_stream`` for the stream object ``stream``, which the handle watches:
    once it has died, its address (which CUDA gives to the next stream made) is a new
    stream's, with a workspace of its own."""
    handle.set_stream(stream.ptr, workspace_bytes, owner=stream)


# --- work beside the main stream ---------------------------------------------------------------
# A block's weight gradient x^T dh is needed by nothing until the optimizer step, and its
# input gradient by everything after it: on a side stream the weight-gradient products
# overlap the rest of the backward pass (in a captured graph: parallel branches).
_SIDE_STREAMS = {}  # main stream's pointer -> (main stream, weakly; its side stream)
_JOIN_PENDING = {}  # main stream's pointer -> the side stream it has not waited for yet


def side_stream(main):
    """The side stream of ``main`` (one each, made on first use; a new main stream at a dead
    one's address gets a new side stream, not the dead one's)."""
    known = _SIDE_STREAMS.get(main.ptr)
    if known is None or known[0]() is None:
        _SIDE_STREAMS[main.ptr] = (cublas.watch(main), cupy.cuda.Stream(non_blocking=True))
        _JOIN_PENDING.pop(main.ptr, None)  # a dead stream's join, never made
    return _SIDE_STREAMS[main.ptr][1]


def drop_dead_side_streams():
    """Let go of the side streams whose main stream has died (each with the cuBLAS
    workspace nnopt gave it, which the handle's next sweep retires)."""
    for main_ptr, (main, _) in list(_SIDE_STREAMS.items()):
        if main() is None:
            del _SIDE_STREAMS[main_ptr]
            _JOIN_PENDING.pop(main_ptr, None)


def beside_main(work):
    """Run ``work()`` (launches) on the current stream's side stream, after everything
    queued on the current stream so far; :func:`join_side` makes the current stream wait
    for it. plan.OVERLAP_WEIGHT_GRADS off: on the current stream."""
    if not plan.OVERLAP_WEIGHT_GRADS:
        return work()
    main = cupy.cuda.get_current_stream()
    side = side_stream(main)
    side.wait_event(main.record())
    with side:
        result = work()
    _JOIN_PENDING[main.ptr] = side
    return result


def join_side():
    """The current stream waits for the work :func:`beside_main` put on its side stream."""
    main = cupy.cuda.get_current_stream()
    side = _JOIN_PENDING.pop(main.ptr, None)
    if side is not None:
        main.wait_event(side.record())


def _pointer(a):
    """The device address of a CuPy array's first element."""
    return a.data.ptr


def graph_gemm(a, b, trans_a=False, trans_b=False, out=None):
    """op(a) @ op(b) (into ``out`` if given), capturable: cuBLAS through nnopt's own handle,
    or (where it cannot load) nnopt's tiled kernel."""
    handle = cublas_handle()
    if handle is None:
        return gemm(a, b, trans_a, trans_b, out)
    a, b, c, m, n, k = _gemm_operands(a, b, trans_a, trans_b, out)
    if k == 0:
        c[...] = 0
    elif m and n:
        bind_stream(handle, cupy.cuda.get_current_stream())
        configured = cublas.workspace_bytes()
        handle.gemm(a.dtype == cupy.float64, _pointer(a), _pointer(b), _pointer(c), m, n, k,
                    trans_a, trans_b, split_k=(plan.split_k_pays(m, n, k, sms())
                                               if configured is None else True))
    return _into(out, c)


#: CUDA's largest gridDim.y: the tiled GEMM's blocks walk the row tiles beyond it.
GRID_Y_LIMIT = 65535


def gemm(a, b, trans_a=False, trans_b=False, out=None):
    """op(a) @ op(b) (into ``out`` if given) with nnopt's own tiled kernel: the fallback
    where cuBLAS cannot load."""
    a, b, c, m, n, k = _gemm_operands(a, b, trans_a, trans_b, out)
    if m and n:
        function("gemm.cu", f"gemm_{_suffix(a)}")(
            ((n + 15) // 16, min((m + 15) // 16, GRID_Y_LIMIT)), (16, 16),
            (a, b, c, np.int32(m), np.int32(n), np.int32(k), np.int32(trans_a),
             np.int32(trans_b)))
    return _into(out, c)


# --- optimizer steps --------------------------------------------------------------------------
def optimizer_step(cls):
    """The fused ``step(p, g, state, hp, t)`` of optimizer class ``cls``: kernel
    ``<rule>_<f32|f64>`` of optimizers.cu over the flat buffers, with ``cls.kernel_scalars``
    and the weight decay (``step.fuses_weight_decay``: the optimizer passes the gradient
    as backward left it). ``t`` is the step count: an int, or (inside a captured CUDA
    graph) a device int32 array, which kernel ``<rule>_device_step_*`` reads for the
    optimizers whose scalars depend on it (Adam), from ``cls.step_scalar_inputs``."""
    def step(p, g, state, hp, t):
        rule = cls.rule_name(hp)
        arrays = (p, g, *(state[name] for name in cls.state_names))
        decay = _s(p, *weight_decay_scalars(cls, hp))
        if cls.step_scalars is not None and isinstance(t, cupy.ndarray):
            _launch(f"{rule}_device_step_{_suffix(p)}", p.size, *arrays, t,
                    *(np.float64(v) for v in cls.step_scalar_inputs(hp)), *decay)
        else:
            _launch(f"{rule}_{_suffix(p)}", p.size, *arrays, *_s(p, *cls.kernel_scalars(hp, t)),
                    *decay)
    step.__name__ = step.__qualname__ = f"{cls.__name__.lower()}_step"
    step.fuses_weight_decay = True
    return step


OPTIMIZER_STEPS = {cls.__name__: optimizer_step(cls) for cls in OPTIMIZERS.values()}


# --- Batch Normalization and ReLU -------------------------------------------------------------
# ``bias`` and ``activation``: a block's Linear bias (it only shifts the running mean) and
# the activation applied as z is written; backward, ``y`` is that activated output and the
# activation's derivative is taken first (kernels/batchnorm.cu).
def _bias_args(x, bias):
    return (x[:0] if bias is None else bias), np.int32(bias is not None)


def _row_walks(n, chunks, *arrays):
    """The split path's row-walking kernels for these (m, n) arrays: (suffix, grid, block),
    with 16-byte loads (suffix f32x4 / f64x2) where plan.bn_lanes allows them."""
    a = arrays[0]
    lanes = bn_lanes(n, a.itemsize, all(_pointer(b) % 16 == 0 for b in arrays))
    suffix = _suffix(a) + (f"x{lanes}" if lanes > 1 else "")
    return (suffix, *bn_split_grid(n, chunks, lanes))


def bn_forward(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var, out=None,
               bias=None, activation=IDENTITY):
    x = cupy.ascontiguousarray(x)
    m, n = x.shape
    z = cupy.empty_like(x) if out is None else out
    mean, inv_std = cupy.empty(n, dtype=x.dtype), cupy.empty(n, dtype=x.dtype)
    s = _s(x, eps, momentum)
    bias, has_bias = _bias_args(x, bias)
    act = np.int32(activation)
    chunks, rows = bn_plan(m, n, sms())
    if chunks > 1:  # large batch: rows split over chunks (batchnorm.cu, split path)
        rows_suffix, grid, block = _row_walks(n, chunks, x, z)
        partial = cupy.empty((chunks, 2, n), dtype=cupy.float64)
        scale, center = cupy.empty(n, dtype=x.dtype), cupy.empty(n, dtype=x.dtype)
        suffix, i32 = _suffix(x), np.int32
        function("batchnorm.cu", f"bn_partial_forward_{rows_suffix}")(
            grid, block, (x, partial, i32(m), i32(n), i32(rows)))
        function("batchnorm.cu", f"bn_finalize_forward_{suffix}")(
            *feature_tile_grid(n),
            (partial, i32(chunks), x, gamma, beta, s[0], s[1], i32(unbiased), running_mean,
             running_var, mean, inv_std, scale, center, i32(m), i32(n), bias, has_bias))
        function("batchnorm.cu", f"bn_apply_forward_{rows_suffix}")(
            grid, block, (x, scale, center, beta, z, i32(m), i32(n), i32(rows), act))
        return z, mean, inv_std
    function("batchnorm.cu", f"bn_forward_{_suffix(x)}")(
        *feature_tile_grid(n),
        (x, gamma, beta, s[0], s[1], np.int32(unbiased), running_mean, running_var, z, mean,
         inv_std, np.int32(m), np.int32(n), bias, has_bias, act))
    return z, mean, inv_std


def bn_backward(d, x, gamma, mean, inv_std, dgamma, dbeta, out=None, y=None,
                activation=IDENTITY):
    d, x = cupy.ascontiguousarray(d), cupy.ascontiguousarray(x)
    m, n = d.shape
    dx = cupy.empty_like(d) if out is None else out
    y = d if y is None else cupy.ascontiguousarray(y)
    act = np.int32(activation)
    chunks, rows = bn_plan(m, n, sms())
    if chunks > 1:
        rows_suffix, grid, block = _row_walks(n, chunks, d, x, y, dx, mean)
        partial = cupy.empty((chunks, 2, n), dtype=cupy.float64)
        coef = cupy.empty((3, n), dtype=d.dtype)
        suffix, i32 = _suffix(d), np.int32
        function("batchnorm.cu", f"bn_partial_backward_{rows_suffix}")(
            grid, block, (d, x, mean, partial, i32(m), i32(n), i32(rows), y, act))
        function("batchnorm.cu", f"bn_finalize_backward_{suffix}")(
            *feature_tile_grid(n),
            (partial, i32(chunks), gamma, inv_std, coef, dgamma, dbeta, i32(m), i32(n)))
        function("batchnorm.cu", f"bn_apply_backward_{rows_suffix}")(
            grid, block, (d, x, mean, coef, dx, i32(m), i32(n), i32(rows), y, act))
        return dx
    function("batchnorm.cu", f"bn_backward_{_suffix(d)}")(
        *feature_tile_grid(n),
        (d, x, gamma, mean, inv_std, dx, dgamma, dbeta, np.int32(m), np.int32(n), y, act))
    return dx


def activation_forward(h, bias=None, activation=RELU, out=None):
    """activate(h + bias) in one pass (``out`` may be ``h`` itself)."""
    h = cupy.ascontiguousarray(h)
    y = cupy.empty_like(h) if out is None else out
    bias, has_bias = _bias_args(h, bias)
    blocks = elementwise_blocks(h.size, 1, sms())
    function("batchnorm.cu", f"bias_activation_{_suffix(h)}")(
        (blocks,), (THREADS,), (h, bias, has_bias, np.int32(activation), y, np.int64(h.size),
                                np.int32(h.shape[-1])))
    return y


def activation_backward(dy, y, activation=RELU, dbias=None, out=None):
    """The gradient of the activation's input from its output ``y``; adds the column sums
    into ``dbias`` if given (a block per 32 features, 8 rows of threads, as BN's one-launch
    kernel; for large batches, per chunk of rows as BN's split path, then the chunks' sums
    in order)."""
    dy = cupy.ascontiguousarray(dy)
    dh = cupy.empty_like(y) if out is None else out
    dbias, has_bias = _bias_args(y, dbias)
    m, n = y.shape
    i32, act, suffix = np.int32, np.int32(activation), _suffix(y)
    chunks, rows = bn_plan(m, n, sms())
    if chunks > 1:
        rows_suffix, grid, block = _row_walks(n, chunks, dy, y, dh)
        partial = cupy.empty((chunks, n) if has_bias else 0, dtype=cupy.float64)
        function("batchnorm.cu", f"activation_backward_split_{rows_suffix}")(
            grid, block, (dy, y, act, dh, partial, has_bias, i32(m), i32(n), i32(rows)))
        if has_bias:
            function("batchnorm.cu", f"bias_grad_finalize_{suffix}")(
                *feature_tile_grid(n), (partial, i32(chunks), dbias, i32(n)))
        return dh
    function("batchnorm.cu", f"activation_backward_{suffix}")(
        *feature_tile_grid(n),
        (dy, y, act, dh, dbias, has_bias, i32(m), i32(n)))
    return dh


# --- small batches: a block's product fused into its passes (batchnorm.cu, linear_*) -------
# ``fuses_product(m)`` says where (every row of a feature tile in one CUDA block). Forward,
# h = x @ W and the block's epilogue in one launch; backward, the gradient arriving from
# the next block, g @ W_next^T, and this block's BN (or activation) backward in one launch.
@lru_cache(maxsize=None)
def _no_counters_on(device_id):
    return cupy.empty(0, dtype=cupy.int32)


def _no_counters():
    """An empty int32 array of this device: the counters argument of an unsliced launch."""
    return _no_counters_on(cupy.cuda.Device().id)


def _fused_launch(name, a, b, n, scratch, args, weight_rows=0):
    """Launch ``name``_<f32|f64> over n features of the product of a (m, k) and b: k cut
    into slices (plan.fused_slices) whose sums go through scratch's partial buffer and
    per-tile counters (zero between launches: each tile's last block resets its own).
    ``weight_rows``: linear_backward's weight gradient, its rows in chunks of 32 over
    grid.y (k unsliced)."""
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    m, k = a.shape
    slices, slice_ = fused_slices(n, k, sms())
    (tiles,), block = feature_tile_grid(n)
    if weight_rows:
        slices, slice_ = -(-weight_rows // plan.TILE), max(k, 1)
    if weight_rows or slices == 1:  # no partial sums, no counters
        partial, counters = a.reshape(-1)[:0], _no_counters()
    else:
        partial = scratch.get(f"{name}_partial", shape=(slices, m, n), dtype=a.dtype)
        kept = scratch.arrays.get("counters")
        if not kept or kept[0].size < tiles:
            scratch.arrays["counters"] = kept = [cupy.zeros(tiles, dtype=cupy.int32)]
        counters = kept[0]
    i32 = np.int32
    function("batchnorm.cu", f"{name}_{_suffix(a)}")(
        (tiles, slices), block,
        (a, b, partial, counters, i32(slice_), i32(m), i32(n), i32(k), *args))


def linear_activation_forward(x, w, bias, activation, scratch, out=None):
    """act(x @ w + bias) in one launch (a block without BN)."""
    n = w.shape[1]
    y = cupy.empty((x.shape[0], n), dtype=x.dtype) if out is None else out
    none = y.reshape(-1)[:0]
    bias, has_bias = _bias_args(y, bias)
    s = _s(y, 0, 0)
    _fused_launch("linear_forward", x, w, n, scratch,
                  (np.int32(0), none, none, *s, np.int32(0), none, none, none, none, bias,
                   has_bias, np.int32(activation), none, y))
    return y


def linear_bn_forward(x, w, gamma, beta, eps, momentum, unbiased, running_mean, running_var,
                      scratch, h=None, out=None, bias=None, activation=IDENTITY):
    """h = x @ w, then bn_forward(h, ...)'s outputs, in one launch: (y, mean, inv_std); h
    (BN's input, which the backward reads) is written too."""
    m, n = x.shape[0], w.shape[1]
    h = cupy.empty((m, n), dtype=x.dtype) if h is None else h
    y = cupy.empty_like(h) if out is None else out
    mean, inv_std = cupy.empty(n, dtype=x.dtype), cupy.empty(n, dtype=x.dtype)
    bias, has_bias = _bias_args(h, bias)
    _fused_launch("linear_forward", x, w, n, scratch,
                  (np.int32(1), gamma, beta, *_s(h, eps, momentum), np.int32(unbiased),
                   running_mean, running_var, mean, inv_std, bias, has_bias,
                   np.int32(activation), h, y))
    return y, mean, inv_std


def fuses_weight_grad(n, k):
    """Whether linear_backward over n features with the next block's k computes the weight
    gradient too (plan.FUSED_WEIGHT_GRADS, and k short enough to run unsliced)."""
    return plan.FUSED_WEIGHT_GRADS and fused_slices(n, k, sms())[0] == 1


def _weight_args(dh, weight_grad):
    """(x, dw, n_in, accumulate) of linear_backward: weight_grad is None (not fused), or
    (x, dw, accumulate): dw (+)= x^T dh in the same launch."""
    none = dh.reshape(-1)[:0]
    if weight_grad is None:
        return (none, none, np.int32(0), np.int32(0)), 0
    x, dw, accumulate = weight_grad
    x = cupy.ascontiguousarray(x)
    return (x, dw, np.int32(x.shape[1]), np.int32(bool(accumulate))), x.shape[1]


def linear_activation_backward(g, w_next, y, activation, scratch, dbias=None, out=None,
                               weight_grad=None):
    """The gradient of a block's product (without BN) from the next block's: dy = g @
    w_next^T, then activation_backward(dy, y, ...) (the bias gradient added to dbias), in
    one launch; ``weight_grad=(x, dw, accumulate)`` (where :func:`fuses_weight_grad`):
    also dw (+)= x^T dh."""
    dh = cupy.empty_like(y) if out is None else out
    none = dh.reshape(-1)[:0]
    dbias, has_bias = _bias_args(y, dbias)
    weights, rows = _weight_args(dh, weight_grad)
    _fused_launch("linear_backward", g, w_next, y.shape[1], scratch,
                  (np.int32(0), none, y, none, none, none, none, none, dbias, has_bias,
                   np.int32(activation), dh, *weights), weight_rows=rows)
    return dh


def linear_bn_backward(g, w_next, h, y, gamma, mean, inv_std, dgamma, dbeta, scratch,
                       out=None, activation=IDENTITY, weight_grad=None):
    """dy = g @ w_next^T (g: the next block's dh), then bn_backward(dy, h, ..., y=y) in
    one launch; returns dh (dgamma, dbeta accumulated). ``weight_grad=(x, dw,
    accumulate)`` (where :func:`fuses_weight_grad`): also dw (+)= x^T dh."""
    dh = cupy.empty_like(h) if out is None else out
    none = dh.reshape(-1)[:0]
    weights, rows = _weight_args(dh, weight_grad)
    _fused_launch("linear_backward", g, w_next, h.shape[1], scratch,
                  (np.int32(1), h, y, gamma, mean, inv_std, dgamma, dbeta, none, np.int32(0),
                   np.int32(activation), dh, *weights), weight_rows=rows)
    return dh


def product(a, b, out):
    """``a @ b`` into ``out`` (a block's products; either may be a transposed view). While a
    CUDA graph is captured, through :func:`graph_gemm` (CuPy refuses cuBLAS then), written
    straight into ``out``: one graph node per product."""
    if not capturing():
        return cupy.matmul(a, b, out=out)
    # A transposed view goes to cuBLAS as the original with a transpose flag, not a copy.
    trans_a = not a.flags.c_contiguous and a.T.flags.c_contiguous
    trans_b = not b.flags.c_contiguous and b.T.flags.c_contiguous
    return graph_gemm(a.T if trans_a else a, b.T if trans_b else b, trans_a, trans_b, out=out)


# --- softmax cross-entropy --------------------------------------------------------------------
def _labels(labels):
    """The labels as the kernels take them (int32 or int64, contiguous), and their kind."""
    if labels.dtype not in (cupy.int32, cupy.int64):
        labels = labels.astype(cupy.int64)
    labels = cupy.ascontiguousarray(labels)
    return labels, ("i32" if labels.dtype == cupy.int32 else "i64")


def linear_cross_entropy(x, w, bias, labels, logits, prob, grad):
    """The last block's logits x @ w + bias (into ``logits``) and softmax_cross_entropy of
    them, in one launch (where ``fuses_loss``): fills logits, prob and grad; returns (the
    mean loss as a 0-d device array, 0), a label outside the classes making it NaN."""
    x, w = cupy.ascontiguousarray(x), cupy.ascontiguousarray(w)
    labels, kind = _labels(labels)
    (m, k), n = x.shape, w.shape[1]
    loss, bad = cupy.empty(1, dtype=x.dtype), cupy.empty(1, dtype=cupy.int32)
    i32 = np.int32
    function("batchnorm.cu", f"linear_cross_entropy_{_suffix(x)}_{kind}")(
        *feature_tile_grid(n), (x, w, bias, labels, logits, prob, grad, loss, bad, i32(m),
                                i32(n), i32(k)))
    return loss.reshape(()), 0


def softmax_cross_entropy(logits, labels, prob, grad):
    """Fills ``prob`` and ``grad`` (kernels/loss.cu: one launch up to 256 rows, else one
    more to add the blocks' sums in order); returns (the mean loss as a 0-d device array,
    0). A label outside the classes makes the loss NaN instead of being counted here:
    reading a count back would cost a synchronization every step."""
    logits = cupy.ascontiguousarray(logits)
    labels, kind = _labels(labels)
    m, c = logits.shape
    blocks = max(1, min(-(-m // CE_THREADS), CE_MAX_BLOCKS))
    loss, bad = cupy.empty(1, dtype=logits.dtype), cupy.empty(1, dtype=cupy.int32)
    partial = cupy.empty(blocks if blocks > 1 else 0, dtype=cupy.float64)
    partial_bad = cupy.empty(blocks if blocks > 1 else 0, dtype=cupy.int32)
    suffix, i32 = _suffix(logits), np.int32
    function("loss.cu", f"softmax_cross_entropy_{suffix}_{kind}")(
        (blocks,), (CE_THREADS,),
        (logits, labels, prob, grad, loss, bad, partial, partial_bad, i32(m), i32(c)))
    if blocks > 1:
        function("loss.cu", f"softmax_cross_entropy_finalize_{suffix}")(
            (1,), (CE_THREADS,), (partial, partial_bad, i32(blocks), loss, bad, i32(m)))
    return loss.reshape(()), 0


class Scratch(HostScratch):
    """nnopt.fast.cpu.Scratch with CuPy buffers."""

    @staticmethod
    def empty(shape, dtype):
        return cupy.empty(shape, dtype=dtype)


_relu = cupy.ElementwiseKernel("T x", "T y", "y = x <= 0 ? (T)0 : x", "nnopt_relu")
_relu_grad = cupy.ElementwiseKernel("T dy, T y", "T dx", "dx = y > 0 ? dy : (T)0 * dy", "nnopt_relu_grad")


def relu_forward(x):
    return _relu(x)


def relu_backward(dy, y):
    return _relu_grad(dy, y)
