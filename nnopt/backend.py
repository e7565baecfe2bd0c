"""The one seam between nnopt and array libraries.

A *device name* picks an array namespace: ``cpu`` (NumPy) or ``gpu`` (CuPy). Tests
also name backends directly: ``numpy``, ``strict`` (array-api-strict, which rejects
anything outside the standard), ``torch`` (PyTorch through array-api-compat) and
``cupy``. Every other module takes its namespace from its arrays with
:func:`namespace_of` and uses only the standard's functions.

Random draws happen on the host with NumPy's generator, then move to the device, so
one seed gives the same network on every backend.
"""
from __future__ import annotations

import numpy as np
import array_api_compat

from .errors import InputError, InputTypeError, NnoptError, check_int

DEVICE_ALIASES = {"cpu": "numpy", "gpu": "cupy", "cuda": "cupy"}
BACKENDS = ("numpy", "strict", "torch", "cupy")


class BackendUnavailable(NnoptError, RuntimeError):
    """The requested backend cannot run here (library or device missing)."""


def _load_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(
            "device 'gpu' needs CuPy, which is not installed: "
            "pip install 'nnopt[gpu]' (or cupy-cuda12x / cupy-cuda13x to match your CUDA)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver
        raise BackendUnavailable(
            f"device 'gpu': CuPy is installed but no CUDA device is usable ({exc}); "
            "use --device cpu, or check the NVIDIA driver with nvidia-smi"
        ) from exc
    if count == 0:
        raise BackendUnavailable(
            "device 'gpu': CuPy is installed but it sees no CUDA device; use --device cpu"
        )
    import array_api_compat.cupy as xp
    return xp


def get_namespace(name: str = "cpu"):
    """Return the array namespace for a device or backend name.

    >>> get_namespace("cpu").__name__
    'array_api_compat.numpy'
    """
    if not isinstance(name, str):
        raise InputTypeError(f"device must be a string such as 'cpu' or 'gpu', got {name!r}")
    key = DEVICE_ALIASES.get(name.lower(), name.lower())
    if key == "numpy":
        import array_api_compat.numpy as xp
        return xp
    if key == "cupy":
        return _load_cupy()
    if key == "strict":
        try:
            import array_api_strict as xp
        except ImportError as exc:
            raise BackendUnavailable("backend 'strict' needs: pip install array-api-strict") from exc
        return xp
    if key == "torch":
        try:
            import array_api_compat.torch as xp
        except ImportError as exc:
            raise BackendUnavailable("backend 'torch' needs: pip install torch") from exc
        return xp
    known = ", ".join(sorted(set(DEVICE_ALIASES) | set(BACKENDS)))
    raise InputError(f"unknown device or backend {name!r}; choose one of: {known}")


_NAMESPACE_OF_TYPE = {}


def namespace_of(*arrays):
    """The array namespace shared by ``arrays`` (array_api_compat.array_namespace),
    remembered per array type: it is asked a dozen times per training step."""
    kind = type(arrays[0])
    if all(type(a) is kind for a in arrays[1:]):
        xp = _NAMESPACE_OF_TYPE.get(kind)
        if xp is None:
            xp = _NAMESPACE_OF_TYPE[kind] = array_api_compat.array_namespace(arrays[0])
        return xp
    return array_api_compat.array_namespace(*arrays)


def backend_name(xp) -> str:
    """Short name of a namespace: numpy, strict, torch or cupy."""
    name = xp.__name__
    for key in BACKENDS:
        if key in name:
            return key
    return name


def is_numpy(x) -> bool:
    """A NumPy ndarray itself (not a subclass such as a masked array)."""
    return type(x) is np.ndarray


def is_cupy(x) -> bool:
    return array_api_compat.is_cupy_array(x)


def asarray(host, xp, dtype=None):
    """Copy a host (NumPy) array, or a Python number, into namespace ``xp``."""
    if dtype is None and isinstance(host, np.ndarray) and host.dtype.kind == "f":
        dtype = getattr(xp, host.dtype.name)
    return xp.asarray(host, dtype=dtype) if dtype is not None else xp.asarray(host)


def to_numpy(x) -> np.ndarray:
    """Copy any supported array to a host NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.from_dlpack(x)


def synchronize(xp) -> None:
    """Wait for queued device work (for honest timing); a no-op on the host."""
    if backend_name(xp) == "cupy":
        import cupy
        cupy.cuda.get_current_stream().synchronize()
    elif backend_name(xp) == "torch":
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def rng(seed=None) -> np.random.Generator:
    """The host random generator every draw in nnopt comes from. ``seed``: None (fresh
    entropy), an integer >= 0, or a Generator (returned as it is)."""
    if seed is None or isinstance(seed, np.random.Generator):
        return np.random.default_rng(seed)
    return np.random.default_rng(check_int("seed", seed, low=0))


FLOAT_DTYPES = ("float32", "float64")


def float_dtype(xp, name):
    """Resolve 'float32'/'float64', or a float32/float64 dtype of any library (np.float32,
    xp.float64, ...), to ``xp``'s dtype; anything else is a clear error."""
    key = name if isinstance(name, str) else getattr(name, "__name__", None) or str(name)
    key = key.rsplit(".", 1)[-1]
    if key not in FLOAT_DTYPES:
        raise InputError(f"dtype must be 'float32' or 'float64', got {name!r}; parameters "
                         "and their gradients need a float type of at least 32 bits")
    return getattr(xp, key)
