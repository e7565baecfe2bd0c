"""cuBLAS through ctypes, for matrix products inside captured CUDA graphs.

CuPy refuses every cuBLAS call while a stream is capturing (``NotImplementedError: calling
cuBLAS API during stream capture is currently unsupported``), but cuBLAS itself supports
capture. So nnopt keeps a cuBLAS handle of its own, on the libcublas that CuPy loads:
its stream and a preallocated workspace are set **before** ``begin_capture`` (cuBLAS must
not allocate while capturing), then ``cublas<S|D>gemm_v2`` is captured like any kernel.

Where the library is looked for, in this order (:func:`candidates`):

1. ``$NNOPT_CUBLAS``: a path to the library file (or a folder holding it); ``0`` or
   ``off`` turns cuBLAS off (captured graphs then use the tiled GEMM);
2. a libcublas already mapped into this process (``/proc/self/maps``): the one CuPy
   loaded, after ``cupy_backends.cuda.libs.cublas`` is imported;
3. the NVIDIA wheels in site-packages: ``nvidia/cu13/lib``, ``nvidia/cublas/lib``;
4. the CUDA toolkit: ``$CUDA_PATH``, ``$CUDA_HOME``, ``/usr/local/cuda`` (``lib64``, ``lib``);
5. the dynamic loader's own search: ``libcublas.so.13``, ``.so.12``, ``.so.11``, ``.so``.

Nothing here imports CuPy: the caller passes device pointers (ints), the stream (an int)
and, for the workspace, a function that allocates device memory. :class:`CublasUnavailable`
says, in one line, why no usable cuBLAS was found; the caller then falls back on nnopt's
tiled GEMM kernel.
"""
from __future__ import annotations

import ctypes
import os
import site
import sys
import weakref
from pathlib import Path

WORKSPACE_BYTES = 32 * 2**20
LIB_NAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so")
WHEEL_DIRS = ("nvidia/cu13/lib", "nvidia/cublas/lib")
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
REQUIRED = ("cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2",
            "cublasSetWorkspace_v2", "cublasSgemm_v2", "cublasDgemm_v2")
STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
          3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
          8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
          13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
          15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}


class CublasUnavailable(RuntimeError):
    """No usable libcublas: the message says what was tried."""


class CublasError(RuntimeError):
    """A cuBLAS call returned an error status."""


def _loaded_in_process(maps="/proc/self/maps"):
    """Paths of the libcublas files mapped into this process (CuPy's, once it loaded one)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        path = line.split()[-1] if line.split() else ""
        if "/libcublas.so" in path and path not in found:
            found.append(path)
    return found


def _site_dirs():
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    user = getattr(site, "getusersitepackages", lambda: None)()
    dirs += [user] if user else []
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(dirs))


def _files_in(folder):
    folder = Path(folder)
    return [str(folder / name) for name in LIB_NAMES if (folder / name).exists()]


def candidates(env=None, loaded=None, site_dirs=None):
    """Library files (or bare names for the dynamic loader) in the documented order."""
    env = os.environ if env is None else env
    out = []
    chosen = env.get("NNOPT_CUBLAS")
    if chosen:
        out += _files_in(chosen) if Path(chosen).is_dir() else [chosen]
    out += _loaded_in_process() if loaded is None else list(loaded)
    for d in _site_dirs() if site_dirs is None else site_dirs:
        for sub in WHEEL_DIRS:
            out += _files_in(Path(d) / sub)
    for root in (env.get("CUDA_PATH"), env.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            for sub in ("lib64", "lib"):
                out += _files_in(Path(root) / sub)
    out += list(LIB_NAMES)
    return list(dict.fromkeys(out))


def load(paths=None, loader=ctypes.CDLL, env=None):
    """The first candidate that loads and has every function nnopt calls, as (library,
    path), or :class:`CublasUnavailable` listing each failure."""
    env = os.environ if env is None else env
    if env.get("NNOPT_CUBLAS", "").lower() in ("0", "off", "no", "none"):
        raise CublasUnavailable(f"turned off by NNOPT_CUBLAS={env['NNOPT_CUBLAS']}")
    paths = candidates(env) if paths is None else paths
    problems = []
    for path in paths:
        try:
            lib = loader(path)
        except OSError as exc:
            problems.append(f"{path}: {exc}" if os.sep in str(path) else f"{path}: not found")
            continue
        missing = [name for name in REQUIRED if not hasattr(lib, name)]
        if missing:
            problems.append(f"{path}: lacks {', '.join(missing)}")
            continue
        return lib, str(path)
    hint = "" if env.get("NNOPT_CUBLAS") else "; set NNOPT_CUBLAS to the libcublas file CuPy uses"
    raise CublasUnavailable("no usable libcublas (" + "; ".join(problems or ["nothing to try"])
                            + ")" + hint)


def workspace_bytes(env=None):
    """``$NNOPT_CUBLAS_WORKSPACE`` as a number of bytes (0: no workspace, so no split-K
    GEMMs; otherwise cuBLAS chooses for every product), or None where it is unset (nnopt
    then gives each stream WORKSPACE_BYTES, cuBLAS's recommendation for Hopper, and each
    captured product the workspace or none: nnopt.fast.plan.split_k_pays)."""
    env = os.environ if env is None else env
    text = env.get("NNOPT_CUBLAS_WORKSPACE", "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"NNOPT_CUBLAS_WORKSPACE={text!r}: give a number of bytes (0 for no "
                         f"workspace), or unset it to let nnopt choose")
    return int(text)


def gemm_args(m, n, k, trans_a, trans_b):
    """cuBLAS (column-major) arguments for row-major C (m, n) = op(A) (m, k) @ op(B) (k, n):
    C^T = op(B)^T op(A)^T, i.e. cuBLAS gets B first. Returns
    (op_b, op_a, rows, cols, inner, ldb, lda, ldc) for ``gemm(h, op_b, op_a, n, m, k, alpha,
    B, ldb, A, lda, beta, C, ldc)``."""
    op_b, ldb = (CUBLAS_OP_T, k) if trans_b else (CUBLAS_OP_N, n)
    op_a, lda = (CUBLAS_OP_T, m) if trans_a else (CUBLAS_OP_N, k)
    return op_b, op_a, n, m, k, ldb, lda, n


def watch(stream):
    """A weak reference to ``stream`` (call it: None once the stream has died), or, for an
    object that cannot have one, a callable that always returns it (taken for a stream that
    never dies)."""
    try:
        return weakref.ref(stream)
    except TypeError:
        return lambda: stream


def _check(status, what):
    if status != 0:
        raise CublasError(f"{what} failed: {STATUS.get(status, status)}")


class Handle:
    """nnopt's own cuBLAS handle, with a workspace of its own for each stream it runs on
    (``cublasSetStream`` resets the workspace to cuBLAS's default pool, which may allocate:
    so after every stream change nnopt sets that stream's workspace again, as PyTorch does).
    ``set_stream`` before a capture begins; ``gemm`` may then be captured."""

    def __init__(self, lib, allocate, workspace_bytes=WORKSPACE_BYTES, path=""):
        self.lib, self.path = lib, path
        self.allocate, self.workspace_bytes = allocate, workspace_bytes
        self.handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate_v2")
        # The workspace objects are kept: cuBLAS uses their memory for the handle's lifetime.
        self.workspaces = {}
        # The stream objects (weakly) behind the addresses, where set_stream was given them:
        # CUDA gives a destroyed stream's address to the next stream made.
        self.owners = {}
        # Workspaces of streams that have died (forget_stream): kept until free_retired,
        # since work queued on the dead stream (a graph in flight) may still use them.
        self.retired = []
        self.bound = None  # the (pointer, size) cuBLAS was last given
        self.stream = 0  # a new handle runs on the NULL stream
        self._set_workspace(0)

    @property
    def workspace(self):
        return self.workspaces.get(self.stream)

    def _set_workspace(self, stream_ptr, size=None):
        """The stream's workspace, made when the stream is first seen: ``size`` bytes, or the
        handle's ``workspace_bytes``. 0 bytes: none at all, so cuBLAS takes only algorithms
        that need none (no split-K GEMM with a separate reduction kernel; PyTorch's
        CUBLAS_WORKSPACE_CONFIG=:0:0 does the same)."""
        if stream_ptr not in self.workspaces:
            size = self.workspace_bytes if size is None else size
            self.workspaces[stream_ptr] = (*(self.allocate(size) if size else (None, 0)), size)
        _, pointer, size = self.workspaces[stream_ptr]
        self._bind(pointer, size)

    def _bind(self, pointer, size):
        """Give cuBLAS this workspace (a host-side setting of the handle, allowed while
        capturing: nothing is allocated), unless it already has it."""
        if self.bound != (pointer, size):
            _check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(pointer or None),
                                                  ctypes.c_size_t(size)),
                   "cublasSetWorkspace_v2")
            self.bound = (pointer, size)

    def set_stream(self, stream_ptr, workspace_bytes=None, owner=None):
        """Run on ``stream_ptr`` with its own workspace (made on first use, of
        ``workspace_bytes`` or the handle's size: call this before a capture begins, never
        first inside one). ``owner``: the stream object; once it has died, the address is
        taken for a new stream's (its first use again)."""
        known = self.owners.get(stream_ptr)
        if known is not None and known() is None:
            self.forget_stream(stream_ptr)
        if owner is not None and stream_ptr not in self.owners:
            self.owners[stream_ptr] = watch(owner)
        if stream_ptr != self.stream:
            _check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)),
                   "cublasSetStream_v2")
            self.stream, self.bound = stream_ptr, None  # cuBLAS dropped the workspace
            self._set_workspace(stream_ptr, workspace_bytes)

    def forget_stream(self, stream_ptr):
        """``stream_ptr``'s stream is gone: CUDA may give its address to the next stream
        made, which must get a workspace of its own size, not inherit this one."""
        entry = self.workspaces.pop(stream_ptr, None)
        self.owners.pop(stream_ptr, None)
        if entry is not None:
            self.retired.append(entry)
        if self.stream == stream_ptr:
            self.stream, self.bound = None, None  # the next set_stream calls cuBLAS again

    def sweep(self):
        """Retire the workspace of every stream whose owner (set_stream's) has died."""
        for stream_ptr, owner in list(self.owners.items()):
            if owner() is None:
                self.forget_stream(stream_ptr)

    def free_retired(self, synchronize):
        """Free the retired workspaces, after ``synchronize()`` (the whole device's) has
        waited for everything queued, so that no graph still in flight uses one. Never call
        it while a stream captures (a device synchronization ends the capture). Without it a
        process that captures one step after another (a sweep of runs) keeps 64 MiB per
        dead step: its stream's workspace and its side stream's."""
        if self.retired:
            synchronize()
            self.retired.clear()

    def gemm(self, double, a_ptr, b_ptr, c_ptr, m, n, k, trans_a=False, trans_b=False,
             split_k=True):
        """Row-major C (m, n) = op(A) @ op(B) on contiguous device buffers. ``split_k``:
        with the stream's workspace (cuBLAS may then split k over a GEMM and a reduction
        kernel), else with none (one kernel)."""
        if self.stream not in self.workspaces:
            raise CublasError("gemm before set_stream: give the handle its stream first "
                              "(its stream was forgotten, or never set)")
        _, pointer, size = self.workspaces[self.stream]
        self._bind(*((pointer, size) if split_k else (None, 0)))
        op_b, op_a, rows, cols, inner, ldb, lda, ldc = gemm_args(m, n, k, trans_a, trans_b)
        scalar, fn, name = ((ctypes.c_double, self.lib.cublasDgemm_v2, "cublasDgemm_v2") if double
                            else (ctypes.c_float, self.lib.cublasSgemm_v2, "cublasSgemm_v2"))
        one, zero = scalar(1.0), scalar(0.0)
        p = ctypes.c_void_p
        _check(fn(self.handle, op_b, op_a, rows, cols, inner, ctypes.byref(one), p(b_ptr), ldb,
                  p(a_ptr), lda, ctypes.byref(zero), p(c_ptr), ldc), name)


class HandleCache:
    """One :class:`Handle` per device, made on first use by ``make()``; where that fails,
    the failure is remembered and reported once, as one warning naming why, and ``get``
    returns None (the caller falls back on nnopt's tiled GEMM)."""

    def __init__(self, warn):
        self.warn, self.handles, self.reasons = warn, {}, {}

    def get(self, device, make):
        if device in self.handles:
            return self.handles[device]
        if device in self.reasons:
            return None
        try:
            self.handles[device] = handle = make()
            return handle
        except (CublasUnavailable, CublasError) as exc:
            self.reasons[device] = str(exc)
            self.warn(f"nnopt: cuBLAS unusable inside captured CUDA graphs ({exc}); "
                      "using nnopt's tiled GEMM, slow beyond small layers")
            return None

    def route(self, device):
        """'cublas <path>', 'tiled (<why>)' or 'unknown' (nothing tried yet)."""
        if device in self.handles:
            return f"cublas {self.handles[device].path}"
        if device in self.reasons:
            return f"tiled ({self.reasons[device]})"
        return "unknown"
