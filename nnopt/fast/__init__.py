"""Fused fast paths beside the reference math.

``nnopt.fast.cpu`` (numba) fuses each optimizer step and BN's forward/backward into one
loop over memory; ``nnopt.fast.gpu`` (CuPy kernels from ``nnopt/kernels``) does the
same on the GPU. The reference array-API code stays the fallback and the tests' oracle.
``NNOPT_FAST=0`` in the environment turns every fast path off.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from functools import lru_cache

import numpy as np

from ..backend import is_cupy, is_numpy
from . import threads

ENABLED = os.environ.get("NNOPT_FAST", "1").lower() not in ("0", "false", "no")
# numba's OpenMP threads spin after each parallel loop by default; in a training step they
# then steal the cores BLAS needs next (measured: BN at batch 4096 went from +5% to +240%).
# Passive waiting, unless the user chose otherwise; read when numba first starts its pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
FAST_DTYPES = (np.float32, np.float64)


_capture = threading.local()


def capturing() -> bool:
    """True while nnopt is capturing a CUDA graph on this thread."""
    return getattr(_capture, "active", False)


@contextlib.contextmanager
def capture_mode():
    """Route matrix products to nnopt's capturable GEMM (cuBLAS on nnopt's own handle, or
    the tiled kernel) while a CUDA graph is captured."""
    _capture.active = True
    try:
        yield
    finally:
        _capture.active = False


@lru_cache(maxsize=None)
def cpu_kernels():
    """The numba module, or None (with one warning) where numba cannot be imported."""
    if not ENABLED:
        return None
    try:
        from . import cpu
    except ImportError as exc:  # numba missing or incompatible with this NumPy
        warnings.warn(f"nnopt: fused CPU kernels unavailable ({exc}); using the reference "
                      "math. pip install numba to get them.", RuntimeWarning, stacklevel=3)
        return None
    return cpu


@lru_cache(maxsize=None)
def gpu_kernels():
    """The CuPy launchers, or None (with one warning) where they cannot load."""
    if not ENABLED:
        return None
    try:
        from . import gpu
    except Exception as exc:  # CuPy missing, or no usable CUDA runtime
        warnings.warn(f"nnopt: fused GPU kernels unavailable ({exc}); using the reference "
                      "math.", RuntimeWarning, stacklevel=3)
        return None
    return gpu


def fast_for(*arrays):
    """The fused kernels for these arrays (numba for NumPy, CUDA for CuPy float32/float64
    arrays, all of one kind), or None: then the reference math runs."""
    first = arrays[0]
    if is_numpy(first):
        kernels = cpu_kernels
    elif is_cupy(first):
        kernels = gpu_kernels
    else:
        return None
    for a in arrays:
        # (a non-native byte order, big-endian data read from a file, the kernels cannot take)
        if type(a) is not type(first) or a.dtype.type not in FAST_DTYPES or not a.dtype.isnative:
            return None
    return kernels()


def matmul(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b); NumPy matrices on the BLAS threads of ``nnopt.fast.threads``. While a
    CUDA graph is captured, ``gpu.graph_gemm``: CuPy refuses cuBLAS calls during capture, so
    cuBLAS runs through nnopt's own handle (nnopt.cublas), or, where it cannot load,
    nnopt's tiled GEMM kernel."""
    if capturing():
        return gpu_kernels().graph_gemm(a, b, trans_a, trans_b)
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    if type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == b.ndim == 2:
        return threads.product(a, b, None)
    return a @ b

