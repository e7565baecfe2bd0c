"""CuPy launchers of the CUDA kernels in ``nnopt.kernels`` (compiled once by NVRTC, cached
on disk by CuPy): every optimizer step, BN forward/backward, ReLU, and a small GEMM used
inside captured CUDA graphs (where CuPy refuses cuBLAS calls).

Same interface as :mod:`nnopt.fast.cpu`: ``OPTIMIZER_STEPS[name](p, g, state, hp, t)``,
``bn_forward``, ``bn_backward``, ``relu_forward``, ``relu_backward``.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import cupy
import numpy as np

from .. import cublas, kernels
from ..optim import OPTIMIZERS

THREADS = 256


@lru_cache(maxsize=None)
def module(name: str):
    return cupy.RawModule(code=kernels.source(name), options=("--std=c++14",))


@lru_cache(maxsize=None)
def function(source: str, name: str):
    return module(source).get_function(name)


@lru_cache(maxsize=None)
def _max_blocks():
    device = cupy.cuda.Device()
    return device.attributes["MultiProcessorCount"] * 32


def _suffix(a):
    return "f32" if a.dtype == cupy.float32 else "f64"


def _launch(name, n, *args, source="optimizers.cu"):
    blocks = max(1, min((n + THREADS - 1) // THREADS, _max_blocks()))
    function(source, name)((blocks,), (THREADS,), (*args, np.int64(n)))


def _s(p, *values):
    cast = np.float32 if p.dtype == cupy.float32 else np.float64
    return tuple(cast(v) for v in values)


# --- graph capture ----------------------------------------------------------------------------
def _gemm_operands(a, b, trans_a, trans_b):
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(f"gemm: inner sizes differ ({k} vs {k2})")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: dtypes differ ({a.dtype} vs {b.dtype})")
    return a, b, m, n, k


def _warn(message):
    warnings.warn(message, RuntimeWarning, stacklevel=4)


HANDLES = cublas.HandleCache(_warn)


def _make_handle():
    try:  # CuPy's cuBLAS bindings load its libcublas: nnopt then finds that one first
        import cupy_backends.cuda.libs.cublas  # noqa: F401
    except ImportError:
        pass
    lib, path = cublas.load()

    def allocate(nbytes):  # straight cudaMalloc: no memory pool may ever reuse it
        memory = cupy.cuda.memory.Memory(nbytes)
        return memory, memory.ptr
    return cublas.Handle(lib, allocate, path=path)


def cublas_handle():
    """This device's nnopt cuBLAS handle, or None (warned once) where cuBLAS is unusable."""
    return HANDLES.get(cupy.cuda.Device().id, _make_handle)


def prepare_capture(stream):
    """Before ``stream.begin_capture()``: the handle made, its workspace set and bound to
    ``stream`` (cuBLAS must neither allocate nor change streams while capturing).
    Returns the GEMM route the capture will take."""
    handle = cublas_handle()
    if handle is not None:
        handle.set_stream(stream.ptr)
    return HANDLES.route(cupy.cuda.Device().id)


def graph_gemm(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b), capturable: cuBLAS through nnopt's own handle, or (where it cannot
    load) nnopt's tiled kernel."""
    handle = cublas_handle()
    if handle is None:
        return gemm(a, b, trans_a, trans_b)
    a, b, m, n, k = _gemm_operands(a, b, trans_a, trans_b)
    if k == 0:
        return cupy.zeros((m, n), dtype=a.dtype)
    c = cupy.empty((m, n), dtype=a.dtype)
    if m and n:
        handle.set_stream(cupy.cuda.get_current_stream().ptr)
        handle.gemm(a.dtype == cupy.float64, a.data.ptr, b.data.ptr, c.data.ptr, m, n, k,
                    trans_a, trans_b)
    return c


def gemm(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) with nnopt's own tiled kernel: the fallback where cuBLAS cannot load."""
    a, b, m, n, k = _gemm_operands(a, b, trans_a, trans_b)
    c = cupy.empty((m, n), dtype=a.dtype)
    function("gemm.cu", f"gemm_{_suffix(a)}")(((n + 15) // 16, (m + 15) // 16), (16, 16),
                                             (a, b, c, np.int32(m), np.int32(n), np.int32(k),
                                              np.int32(trans_a), np.int32(trans_b)))
    return c


# --- optimizer steps --------------------------------------------------------------------------
def optimizer_step(cls):
    """The fused ``step(p, g, state, hp, t)`` of optimizer class ``cls``: kernel
    ``<rule>_<f32|f64>`` of optimizers.cu over the flat buffers, with ``cls.kernel_scalars``.
    ``t`` is the step count: an int, or (inside a captured CUDA graph) a device int32
    array, which kernel ``<rule>_device_step_*`` reads for the optimizers whose scalars
    depend on it (Adam), from ``cls.step_scalar_inputs``."""
    def step(p, g, state, hp, t):
        rule = cls.rule_name(hp)
        arrays = (p, g, *(state[name] for name in cls.state_names))
        if cls.step_scalars is not None and isinstance(t, cupy.ndarray):
            _launch(f"{rule}_device_step_{_suffix(p)}", p.size, *arrays, t,
                    *_s(p, *cls.step_scalar_inputs(hp)))
        else:
            _launch(f"{rule}_{_suffix(p)}", p.size, *arrays, *_s(p, *cls.kernel_scalars(hp, t)))
    step.__name__ = step.__qualname__ = f"{cls.__name__.lower()}_step"
    return step


OPTIMIZER_STEPS = {cls.__name__: optimizer_step(cls) for cls in OPTIMIZERS.values()}


# --- Batch Normalization and ReLU -------------------------------------------------------------
def bn_forward(x, gamma, beta, eps, momentum, unbiased, running_mean, running_var, out=None):
    x = cupy.ascontiguousarray(x)
    m, n = x.shape
    z = cupy.empty_like(x) if out is None else out
    mean, inv_std = cupy.empty(n, dtype=x.dtype), cupy.empty(n, dtype=x.dtype)
    s = _s(x, eps, momentum)
    function("batchnorm.cu", f"bn_forward_{_suffix(x)}")(
        ((n + 31) // 32,), (32, 8),
        (x, gamma, beta, s[0], s[1], np.int32(unbiased), running_mean, running_var, z, mean,
         inv_std, np.int32(m), np.int32(n)))
    return z, mean, inv_std


def bn_backward(d, x, gamma, mean, inv_std, dgamma, dbeta, out=None):
    d = cupy.ascontiguousarray(d)
    m, n = d.shape
    dx = cupy.empty_like(d) if out is None else out
    function("batchnorm.cu", f"bn_backward_{_suffix(d)}")(
        ((n + 31) // 32,), (32, 8),
        (d, cupy.ascontiguousarray(x), gamma, mean, inv_std, dx, dgamma, dbeta, np.int32(m),
         np.int32(n)))
    return dx


_relu = cupy.ElementwiseKernel("T x", "T y", "y = x > 0 ? x : (T)0", "nnopt_relu")
_relu_grad = cupy.ElementwiseKernel("T dy, T y", "T dx", "dx = y > 0 ? dy : (T)0", "nnopt_relu_grad")


def relu_forward(x):
    return _relu(x)


def relu_backward(dy, y):
    return _relu_grad(dy, y)
