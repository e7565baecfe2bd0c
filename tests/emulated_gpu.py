"""An emulated CUDA device, so the CPU tests can run nnopt.fast.gpu itself, launchers and all.

Just enough of CuPy for nnopt's launchers: NumPy arrays stand in for device arrays, and
``RawModule(code)`` compiles the very source CuPy would hand to NVRTC with the host's C++
compiler, CUDA's features emulated by tests/host_cuda.h. A launch then

* checks every argument against the kernel's C signature (parsed from the preprocessed
  source): count, NumPy scalar type for each scalar (``int`` takes numpy.int32 only,
  ``long long`` numpy.int64, ``float``/``double`` numpy.float32/float64), and for each
  pointer a C-contiguous array of the pointee's dtype. A mismatch, which on a GPU would
  silently garble memory, is a :class:`LaunchError` naming the kernel and argument;
* runs every thread of the grid: one after the other, or, for kernels that call
  ``__syncthreads``, each block's threads as fibers switched at every barrier (one block
  at a time, so ``__shared__`` can be a single static copy, filled with NaN bytes as each
  block starts: a read of shared memory this block never wrote shows);
* in the order ``$NNOPT_EMULATED_ORDER`` names (:func:`schedule_order`): threads and
  blocks as numbered, reversed, or shuffled. A GPU promises no order, so a kernel whose
  results differ between orders has a race (a barrier missing or misplaced); CI runs the
  GPU tests forward and reversed;
* checks, for every array the stand-in allocated (``cupy.empty`` and friends: what the
  launchers allocate), that the kernel wrote nothing in the guard bytes either side of it:
  an out-of-bounds write is a :class:`LaunchError`; the guard bytes read as NaN
  (GUARD_PATTERN), so an out-of-bounds read spoils the result;
* fills those arrays with NaN (-1 as ints) until written, so a read of memory nobody wrote
  shows in the results, as cupy.empty's garbage would on a GPU (only less quietly);
* checks every 16-byte vector load and store (kernels/vectors.cuh) for an address that is
  a multiple of 16: on a GPU a misaligned one faults.

CUDA graphs are emulated at the level nnopt uses them (nnopt.graph.CapturedStep): while a
stand-in stream captures, kernel launches (and the two array operations a captured step
makes besides, zero_grad's fill and the device step counters' increment) are recorded
instead of run, and ``Graph.launch`` runs them again on the arrays they were given. Outside a capture, streams are one queue (everything runs at once, in program
order). A captured graph's replays take turns among three orders its streams' events
allow (:class:`Graph`): as captured, side streams as late as possible, side streams as
early as possible; a race between streams (a read the capture never made wait for its
write) then changes a result. cuBLAS calls are captured on their handle's stream.

What it cannot show: speed, array operations inside a captured graph besides the two above
(they run once, at capture), memory-model races beyond ``__syncthreads`` (a fence missing
between blocks; warps' lockstep), races that no thread order of one block shows, races between
streams outside captured graphs or inside one kernel's interleaving, cuBLAS itself. Those
need the GPU (bench/gpu_check.sh).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnopt import cublas

TESTS = Path(__file__).resolve().parent
SCALARS = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}
POINTEES = {"int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}
CTYPES = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong, np.float32: ctypes.c_float,
          np.float64: ctypes.c_double}
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="nnopt-emulated-gpu-"))
atexit.register(shutil.rmtree, _BUILD_DIR, ignore_errors=True)
_LIBRARIES: dict = {}
#: The bytes either side of a stand-in allocation, 0xFFF5A5A5FFA5A5A5 repeated from the
#: array's edge: as float64 a signaling NaN, as float32 a signaling NaN then a quiet one,
#: as int32 about -6e6 and -7e5. A kernel reading past an array's end gets a value no
#: result survives; one writing there changes the guard, even by arithmetic on what it
#: read (a signaling NaN becomes a quiet one: other bits), except in a float32 array's odd
#: slots past its end.
GUARD_BYTES = 256
GUARD_PATTERN = np.array([0xA5, 0xA5, 0xA5, 0xFF, 0xA5, 0xA5, 0xF5, 0xFF], np.uint8)
UNINITIALIZED = 0xFF  # every byte of a fresh stand-in allocation: a quiet NaN, read as any float
_GUARDED = weakref.WeakValueDictionary()  # the stand-in's allocations, by id


class LaunchError(TypeError):
    """A kernel launched with arguments its C signature does not take."""


class NotEmulated(NotImplementedError):
    """A CuPy feature this emulation does not have (it needs a real GPU)."""


def compiler():
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str        # "float", "double", "int", "long long"
    pointer: bool

    def check(self, kernel, index, value):
        """The ctypes value for ``value``, or LaunchError."""
        where = f"{kernel}: argument {index} ({self.name})"
        if self.pointer:
            want = POINTEES[self.ctype]
            if not isinstance(value, np.ndarray):
                raise LaunchError(f"{where} is a {self.ctype}*, got {type(value).__name__}")
            if value.dtype != want:
                raise LaunchError(f"{where} is a {self.ctype}*, got an array of {value.dtype}")
            if not value.flags.c_contiguous:
                raise LaunchError(f"{where}: a non-contiguous array (shape {value.shape}, "
                                  f"strides {value.strides}): the kernel would read it as "
                                  "contiguous")
            return ctypes.c_void_p(value.ctypes.data)
        want = SCALARS[self.ctype]
        if type(value) is not want:
            raise LaunchError(f"{where} is a {self.ctype}: pass numpy.{want.__name__}, got "
                              f"{type(value).__name__}")
        return CTYPES[want](value)


def _parse_param(text):
    words = text.replace("*", " * ").replace("const", " ").replace("__restrict__", " ").split()
    pointer = "*" in words
    words = [w for w in words if w != "*"]
    return Param(name=words[-1], ctype=" ".join(words[:-1]), pointer=pointer)


def _body(text, start):
    """The text of the brace-balanced block opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    raise ValueError("unbalanced braces in kernel source")


def _synchronizing_functions(text):
    """Names of the functions of ``text`` that call __syncthreads, themselves or through
    other functions of ``text``."""
    bodies = {}
    for match in re.finditer(r"\b(\w+)\s*(?:<[^<>;{}]*>)?\s*\([^;{}]*\)\s*\{", text):
        if match.group(1) not in ("if", "for", "while", "switch"):
            bodies.setdefault(match.group(1), _body(text, match.end() - 1))
    found = {name for name, body in bodies.items() if "__syncthreads" in body}
    while True:
        more = {name for name, body in bodies.items() if name not in found and any(
            re.search(rf"\b{re.escape(f)}\s*[<(]", body) for f in found)}
        if not more:
            return found
        found |= more


def kernel_signatures(code):
    """{kernel name: (params, synchronizes)} of every ``extern "C" __global__`` function of
    ``code``, after the preprocessor (the kernels are macro expansions); ``synchronizes``:
    it calls __syncthreads, itself or through a device function."""
    text = subprocess.run([compiler(), "-E", "-P", "-x", "c++", "-"], input=code,
                          capture_output=True, text=True, check=True, timeout=120).stdout
    synchronizing = _synchronizing_functions(text)
    out = {}
    for match in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{',
                             text):
        params = tuple(_parse_param(p) for p in match.group(2).split(",") if p.strip())
        out[match.group(1)] = (params, match.group(1) in synchronizing)
    return out


#: bits of the launchers' return value (tests/host_cuda.h's nnopt_take_misuse)
UNSYNCHRONIZED, MISALIGNED = 1, 2

_LAUNCHER = """
extern "C" int nnopt_launch_{name}(unsigned gx, unsigned gy, unsigned bx, unsigned by{params}) {{
    for (const size_t block : nnopt_schedule((size_t)gx * gy)) {{
        const unsigned block_x = (unsigned)(block % gx), block_y = (unsigned)(block / gx);
        nnopt_next_block();
        auto thread = [&](unsigned tx, unsigned ty) {{
            nnopt_set_thread(gx, gy, bx, by, block_x, block_y, tx, ty);
            {name}({args});
        }};
        if ({synchronizes}) nnopt_run_block(bx, by, thread);
        else
            for (const size_t t : nnopt_schedule((size_t)bx * by)) thread(t % bx, t / bx);
    }}
    return nnopt_take_misuse();
}}
"""


def _launchers(signatures):
    """C++ entry points that run a whole grid of each kernel (tests/host_cuda.h)."""
    out = []
    for name, (params, synchronizes) in signatures.items():
        decl = "".join(f", {'void*' if p.pointer else p.ctype} a{i}" for i, p in enumerate(params))
        args = ", ".join(f"({p.ctype}*)a{i}" if p.pointer else f"a{i}"
                         for i, p in enumerate(params))
        out.append(_LAUNCHER.format(name=name, params=decl, args=args,
                                    synchronizes=int(synchronizes)))
    return "".join(out)


_DECLARATOR = r"\w+(?:\s*\[[^\]]*\])*"
_SHARED_DECLARATION = re.compile(rf"__shared__\s+\w+\s+({_DECLARATOR}(?:\s*,\s*{_DECLARATOR})*)\s*;")


def fresh_shared(code):
    """``code`` with a call to tests/host_cuda.h's nnopt_fresh_shared after each
    ``__shared__`` declaration, for each name it declares: so each block's shared memory
    starts as 0xFF bytes (NaN), not as the previous block's values."""
    def fill(match):
        names = [re.match(r"\s*(\w+)", d).group(1) for d in match.group(1).split(",")]
        return match.group(0) + "".join(f" nnopt_fresh_shared(&{n}, sizeof({n}));"
                                        for n in names)
    return _SHARED_DECLARATION.sub(fill, code)


#: The order the emulated threads and blocks run in (tests/host_cuda.h's nnopt_set_order),
#: from $NNOPT_EMULATED_ORDER: "forward" (the default: as numbered), "reverse", or
#: "shuffle" or "shuffle:SEED" (a fresh permutation at each barrier and launch, drawn from
#: SEED, 0 by default). A kernel whose results change with the order has a race.
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}


def schedule_order(text=None):
    """(order, seed) for nnopt_set_order, parsed from ``text`` ($NNOPT_EMULATED_ORDER)."""
    text = os.environ.get("NNOPT_EMULATED_ORDER", "forward") if text is None else text
    name, _, seed = text.strip().partition(":")
    if name not in ORDERS or (seed and (name != "shuffle" or not seed.isdigit())):
        raise ValueError(f"NNOPT_EMULATED_ORDER={text!r}: use forward, reverse, shuffle or "
                         "shuffle:SEED (SEED a non-negative integer)")
    return ORDERS[name], int(seed or 0)


def _set_order(library, order):
    library.nnopt_set_order(ctypes.c_int(order[0]), ctypes.c_ulonglong(order[1]))


def _use_order(order):
    """``order`` for every library loaded and to come."""
    global _ORDER
    _ORDER = order
    for library, _ in _LIBRARIES.values():
        _set_order(library, order)


@contextlib.contextmanager
def scheduled(text):
    """Every emulated kernel, loaded or not yet, runs in the order ``text`` names (as
    $NNOPT_EMULATED_ORDER) inside the block; $NNOPT_EMULATED_ORDER's order after it."""
    _use_order(schedule_order(text))
    try:
        yield
    finally:
        _use_order(schedule_order())


_ORDER = schedule_order()


def _library(code):
    """``code`` compiled for the host with tests/host_cuda.h and a grid launcher per kernel
    (cached per source text), and its kernels' signatures; its threads and blocks run in
    the order of $NNOPT_EMULATED_ORDER."""
    key = hashlib.sha256(code.encode()).hexdigest()[:16]
    if key not in _LIBRARIES:
        signatures = kernel_signatures(code)
        source, lib = _BUILD_DIR / f"{key}.cpp", _BUILD_DIR / f"lib{key}.so"
        source.write_text(fresh_shared(code) + _launchers(signatures))
        subprocess.run([compiler(), "-O1", "-std=c++14", "-shared", "-fPIC", "-pthread",
                        "-Wno-unknown-pragmas", "-include", str(TESTS / "host_cuda.h"),
                        str(source), "-o", str(lib)], check=True, timeout=600)
        library = ctypes.CDLL(str(lib))
        _set_order(library, _ORDER)
        _LIBRARIES[key] = (library, signatures)
    return _LIBRARIES[key]


#: CUDA's limits on a launch's dimensions (x, y, z): beyond them a GPU refuses the launch
#: ("invalid configuration argument")
GRID_LIMITS, BLOCK_LIMITS = (2**31 - 1, 65535, 65535), (1024, 1024, 64)


def _dims(shape, what, kernel):
    shape = tuple(int(v) for v in shape)
    if not 1 <= len(shape) <= 3 or any(v < 1 for v in shape) or shape[2:] not in ((), (1,)):
        raise LaunchError(f"{kernel}: {what} {shape} (the emulation takes 1 or 2 dimensions, "
                          "each >= 1)")
    limits = GRID_LIMITS if what == "grid" else BLOCK_LIMITS
    if any(v > limit for v, limit in zip(shape, limits)):
        raise LaunchError(f"{kernel}: {what} {shape} is beyond CUDA's limits {limits[:len(shape)]}")
    return (shape + (1,))[:2]


class Function:
    """One kernel of an emulated RawModule; ``launches`` records (name, grid, block,
    scalar arguments, array addresses)."""

    def __init__(self, lib, name, params, synchronizes, launches):
        self.lib, self.name, self.params = lib, name, params
        self.synchronizes, self.launches = synchronizes, launches
        self.grid = getattr(lib, f"nnopt_launch_{name}")
        self.grid.restype = ctypes.c_int

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self.params):
            raise LaunchError(f"{self.name} takes {len(self.params)} arguments "
                              f"({', '.join(p.name for p in self.params)}), got {len(args)}")
        values = [p.check(self.name, i, a) for i, (p, a) in enumerate(zip(self.params, args))]
        (gx, gy), (bx, by) = _dims(grid, "grid", self.name), _dims(block, "block", self.name)
        if bx * by > 1024:
            raise LaunchError(f"{self.name}: {bx * by} threads per block (CUDA allows 1024)")
        scalars = tuple(a.item() for a in args if not isinstance(a, np.ndarray))
        addresses = tuple(a.ctypes.data for a in args if isinstance(a, np.ndarray))
        self.launches.append((self.name, (gx, gy), (bx, by), scalars, addresses))

        def run():
            misuse = self.grid(*(ctypes.c_uint(v) for v in (gx, gy, bx, by)), *values)
            if misuse & UNSYNCHRONIZED:
                raise LaunchError(f"{self.name} called __syncthreads while its threads ran "
                                  "one after the other: the emulation missed that it "
                                  "synchronizes")
            if misuse & MISALIGNED:
                raise LaunchError(f"{self.name}: a 16-byte load or store at an address that "
                                  "is not a multiple of 16 (a GPU faults: misaligned address)")
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray) and not _guards_intact(a):
                    raise LaunchError(f"{self.name}: wrote outside argument {i} "
                                      f"({self.params[i].name}, shape {a.shape})")
        self.launches.run(run)


class RawModule:
    def __init__(self, code, options=(), launches=None):
        self.code, self.options = code, options
        self.lib, self.signatures = _library(code)
        self.launches = [] if launches is None else launches

    def get_function(self, name):
        if name not in self.signatures:
            raise LaunchError(f"the module has no kernel {name!r} (it has: "
                              f"{', '.join(sorted(self.signatures))})")
        params, synchronizes = self.signatures[name]
        return Function(self.lib, name, params, synchronizes, self.launches)


class ElementwiseKernel:
    """cupy.ElementwiseKernel for same-shape arrays: the operation compiled for the host in
    a loop over the elements (one type parameter T, taken from the first input)."""

    def __init__(self, in_params, out_params, operation, name="kernel", **options):
        parse = lambda text: [p.split() for p in text.split(",") if p.strip()]  # noqa: E731
        self.inputs, self.outputs = parse(in_params), parse(out_params)
        self.operation, self.name = operation, name

    def _entry(self, ctype):
        reads = "".join(f"const T {n} = in_{n}[i]; " for _, n in self.inputs)
        slots = "".join(f"T& {n} = out_{n}[i]; " for _, n in self.outputs)
        params = ", ".join([f"const T* in_{n}" for _, n in self.inputs]
                           + [f"T* out_{n}" for _, n in self.outputs] + ["long long size"])
        code = (f"typedef {ctype} T;\nextern \"C\" void run({params}) {{\n"
                f"    for (long long i = 0; i < size; ++i) {{ {reads}{slots}{self.operation}; }}\n}}\n")
        lib, _ = _library(code)
        lib.run.restype = None
        return lib.run

    def __call__(self, *args):
        inputs, outputs = list(args[:len(self.inputs)]), list(args[len(self.inputs):])
        first = inputs[0]
        if any(a.shape != first.shape or a.dtype != first.dtype for a in inputs + outputs):
            raise NotEmulated(f"{self.name}: the emulation takes same-shape, same-dtype arrays")
        outputs += [_guarded_empty(first.shape, first.dtype)
                    for _ in self.outputs[len(outputs):]]
        ctype = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[first.dtype]
        arrays = [np.ascontiguousarray(a) for a in inputs] + outputs
        if not all(a.flags.c_contiguous for a in outputs):
            raise NotEmulated(f"{self.name}: non-contiguous output")
        self._entry(ctype)(*(ctypes.c_void_p(a.ctypes.data) for a in arrays),
                           ctypes.c_longlong(first.size))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class FakeCublas:
    """A libcublas for nnopt.cublas: column-major BLAS semantics on host pointers, every
    call logged; ``run`` runs (or, while a stand-in stream captures, records) each GEMM."""

    def __init__(self, missing=(), run=None):
        self.calls, self.run = [], run
        self.stream = 0  # the stream the handle runs on (cublasSetStream), by pointer
        for name in cublas.REQUIRED:
            if name not in missing:
                setattr(self, name, self._make(name))

    def _make(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "cublasSetStream_v2":
                self.stream = args[1].value or 0
            if name.endswith("gemm_v2"):
                dtype = np.float64 if name == "cublasDgemm_v2" else np.float32
                if self.run is None:
                    self._gemm(dtype, *args)
                else:
                    self.run(lambda: self._gemm(dtype, *args), self.stream)
            return 0
        return call

    @staticmethod
    def _gemm(dtype, handle, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        def matrix(ptr, rows, cols, ld, trans):  # stored column-major: (ld, cols) Fortran
            stored = (cols, rows) if trans else (rows, cols)
            ptr = ptr.value
            flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))),
                                         shape=(ld * stored[1],))
            mat = flat.reshape(stored[1], ld).T[:stored[0], :]
            return mat.T if trans else mat
        A = matrix(a, m, k, lda, op_a == cublas.CUBLAS_OP_T)
        B = matrix(b, k, n, ldb, op_b == cublas.CUBLAS_OP_T)
        out = np.ctypeslib.as_array(ctypes.cast(c.value, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))),
                                    shape=(ldc * n,)).reshape(n, ldc).T
        product = alpha._obj.value * (A @ B)  # BLAS: beta = 0 never reads C
        out[:m, :] = product if beta._obj.value == 0 else product + beta._obj.value * out[:m, :]


def host_allocate(nbytes):
    """Host memory standing in for a cuBLAS workspace: (owner, address)."""
    buf = np.empty(nbytes, np.uint8)
    return buf, buf.ctypes.data


class _Unavailable:
    def __init__(self, what):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise NotEmulated(f"{self.what} is not emulated: it needs a real GPU")

    def __getattr__(self, name):
        return _Unavailable(f"{self.what}.{name}")


def _guarded_empty(shape, dtype=float):
    """An uninitialized array between two guard areas (see _guards_intact). Its bytes are
    UNINITIALIZED: NaN in a float (-1 in an int), so a kernel or launcher that reads what
    nobody wrote yet (cupy.empty's garbage on a GPU) shows in its results."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw, guard = np.empty(size + 2 * GUARD_BYTES, np.uint8), _guard()
    raw[:GUARD_BYTES] = raw[GUARD_BYTES + size:] = guard  # each in phase with the array
    raw[GUARD_BYTES:GUARD_BYTES + size] = UNINITIALIZED
    _GUARDED[id(raw)] = raw
    return raw[GUARD_BYTES:GUARD_BYTES + size].view(dtype).reshape(shape)


def _guards_intact(a):
    """False where ``a`` lies in a guarded allocation whose guard bytes changed."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if _GUARDED.get(id(root)) is not root:
        return True
    guard = _guard()
    return bool(np.array_equal(root[:GUARD_BYTES], guard)
                and np.array_equal(root[-GUARD_BYTES:], guard))


def _guard():
    return np.resize(GUARD_PATTERN, GUARD_BYTES)


def _stand_in_allocators(cp):
    def empty(shape, dtype=float):
        return cp.launches.keep(_guarded_empty(shape, dtype))

    def zeros(shape, dtype=float):
        a = empty(shape, dtype)
        a[...] = 0
        return a

    def empty_like(a, dtype=None):
        return empty(a.shape, a.dtype if dtype is None else dtype)

    def ascontiguousarray(a, dtype=None):
        a = np.asarray(a, dtype=dtype)
        if a.flags.c_contiguous:
            return a
        out = empty_like(a)
        out[...] = a
        return out
    cp.empty, cp.zeros, cp.empty_like = empty, zeros, empty_like
    cp.ascontiguousarray = ascontiguousarray
    cp.zeros_like = lambda a, dtype=None: zeros(a.shape, a.dtype if dtype is None else dtype)


@dataclass
class Captured:
    """One piece of captured work: its stream, what it waits for ({other stream: how many
    of its launches}, from the events its stream waited for) and the work itself."""
    stream: object
    needs: dict
    work: object


class Launches(list):
    """Every launch, as (name, grid, block, scalars, addresses); while a stream captures,
    ``recording`` collects the work (:class:`Captured`) instead of running it, and ``kept``
    the arrays the graph owns (allocated while capturing, or handed to cuBLAS by address),
    as a graph's memory pool keeps them on a GPU. ``members``: the streams in the capture
    (the origin, and those that waited for an event recorded on a member), each with its
    count of launches: a launch on any other stream would run at once on a GPU, outside the
    graph, and a member's work the origin never waited for fails the capture's end
    (cudaErrorStreamCaptureUnjoined); both are LaunchErrors. ``waits``: for each member,
    how many launches of each other member it waited for so far."""
    recording = kept = members = origin = waits = None
    streams = None  # the stand-in's streams, the current one last
    by_pointer = None  # the stand-in's streams by their ``ptr`` (cuBLAS names its stream so)

    def run(self, work, stream_ptr=None):
        """Run ``work`` now, or record it on the current stream (or the stream of
        ``stream_ptr``: a cuBLAS call runs on its handle's stream) while one captures."""
        if self.recording is None:
            work()
            return
        stream = self.streams[-1] if stream_ptr is None else self.by_pointer[stream_ptr]
        if stream not in self.members:
            raise LaunchError("a launch on a stream outside the capture (it would run at once "
                              "on a GPU, not in the graph): make the stream wait for an event "
                              "recorded on a capturing stream first")
        self.recording.append(Captured(stream, dict(self.waits.get(stream, {})), work))
        self.members[stream] += 1

    def keep(self, array):
        if self.kept is not None:
            self.kept.append(array)
        return array


class Graph:
    """A captured graph. A GPU may run its branches in any order their dependencies allow,
    so each replay takes another of ORDERS: the order of capture; the capturing stream's
    work first and the other streams' only when it waits for them ("side streams late":
    a read of a side stream's result the capture never waited for sees the old value);
    the other streams' work first ("side streams early": a side stream that overwrites
    what the capturing stream still reads, or reads what it has not written yet). A race
    between the streams then shows as a result that differs from the eager step's."""
    ORDERS = ("capture", "side streams late", "side streams early")

    def __init__(self, work, kept, origin=None):
        self.work, self.kept, self.origin = work, kept, origin
        self.replays = 0

    def launch(self, stream=None):
        if self.origin is not None:
            self.origin.cp.stream_log.append(("replay", getattr(stream, "ptr", None)))
        order = self.ORDERS[self.replays % len(self.ORDERS)]
        self.replays += 1
        for captured in schedule(self.work, self.origin, order):
            captured.work()


def schedule(work, origin, order):
    """``work`` (a capture's :class:`Captured` list) in one of Graph.ORDERS: every stream's
    own work in its order, each piece after what its stream waited for."""
    if order == "capture":
        return list(work)
    queues = {}
    for captured in work:
        queues.setdefault(captured.stream, collections.deque()).append(captured)
    done = dict.fromkeys(queues, 0)

    def ready(stream):
        queue = queues[stream]
        return bool(queue) and all(done.get(other, 0) >= count
                                   for other, count in queue[0].needs.items())
    out = []
    while any(queues.values()):
        streams = [stream for stream in queues if ready(stream)]
        if not streams:
            raise LaunchError("the captured streams wait for each other in a cycle")
        side = [stream for stream in streams if stream is not origin]
        if order == "side streams late":
            pick = origin if origin in streams else side[0]
        else:
            pick = side[0] if side else origin
        out.append(queues[pick].popleft())
        done[pick] += 1
    return out


class Stream:
    """A stand-in stream: a context that makes it current, and the capture of a graph."""

    def __init__(self, cp, non_blocking=False, ptr=None):
        self.cp, self.ptr = cp, (id(self) if ptr is None else ptr)
        cp.launches.by_pointer[self.ptr] = self

    def __enter__(self):
        self.cp.streams.append(self)
        return self

    def __exit__(self, *exc):
        self.cp.streams.pop()
        return False

    def begin_capture(self, mode=None):
        launches = self.cp.launches
        if launches.recording is not None:
            raise NotEmulated("a capture inside a capture")
        launches.recording, launches.kept, launches.waits = [], [], {}
        launches.members, launches.origin = {self: 0}, self

    def end_capture(self):
        launches = self.cp.launches
        joined = launches.waits.get(self, {})
        unjoined = [s for s, done in launches.members.items()
                    if s is not self and done != joined.get(s, 0)]
        graph = Graph(launches.recording, launches.kept, self)
        launches.recording = launches.kept = launches.members = launches.origin = None
        launches.waits = None
        if unjoined:
            raise LaunchError(f"end_capture: {len(unjoined)} stream(s) of the capture ran work "
                              "the capturing stream never waited for (on a GPU: "
                              "cudaErrorStreamCaptureUnjoined)")
        return graph

    def synchronize(self):
        pass

    def record(self, event=None):
        members = self.cp.launches.members
        return Event(self, members[self] if members and self in members else None)

    def wait_event(self, event):
        members = self.cp.launches.members
        if not members and isinstance(event, Event):
            self.cp.stream_log.append(("wait", self.ptr, getattr(event.stream, "ptr", None)))
        if not members or not isinstance(event, Event) or event.stream not in members:
            return
        members.setdefault(self, 0)  # the stream joins the capture
        if event.launches is not None:
            needs = self.cp.launches.waits.setdefault(self, {})
            needs[event.stream] = max(needs.get(event.stream, 0), event.launches)


@dataclass
class Event:
    """A recorded point of a stand-in stream: how many of its launches in the capture came
    before it (None outside a capture)."""
    stream: object
    launches: object


def emulated_cupy(multiprocessors=2):
    """A module that stands in for ``cupy``; ``.launches`` lists every kernel launch."""
    cp = types.ModuleType("cupy")
    cp.launches = Launches()
    cp.synchronizations = 0  # of the whole device (Device().synchronize)
    # Outside a capture, work runs as it is launched, so a stream that forgets to wait for
    # another's work computes the right numbers here: the order of the streams' waits and
    # graph replays, ("wait", waiting stream, stream of the event) and ("replay", stream),
    # each stream by its ptr (the log keeps no stream alive), is what a test can hold to
    # CUDA's rules instead.
    cp.stream_log = []
    cp.ndarray, cp.float32, cp.float64 = np.ndarray, np.float32, np.float64
    cp.int32, cp.int64 = np.int32, np.int64
    cp.matmul = np.matmul
    _stand_in_allocators(cp)
    cp.RawModule = lambda code, options=(): RawModule(code, options, cp.launches)
    cp.ElementwiseKernel = ElementwiseKernel

    class DeviceArray(np.ndarray):
        """cupy.asarray's arrays: ``+=`` is a kernel, recorded while a stream captures
        (the device step counters of a captured step)."""

        def __iadd__(self, other):
            plain = self.view(np.ndarray)
            cp.launches.run(lambda: np.add(plain, other, out=plain))
            return self

    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype).view(DeviceArray)

    class Device:
        def __init__(self, device_id=0):
            self.id = device_id
            self.attributes = {"MultiProcessorCount": multiprocessors}

        def synchronize(self):  # work runs as it is launched: nothing is ever in flight
            if cp.launches.recording is not None:
                raise LaunchError("a device synchronization while a stream captures (on a "
                                  "GPU: the capture is invalidated)")
            cp.synchronizations += 1

    cp.launches.by_pointer = weakref.WeakValueDictionary()
    cp.streams = [Stream(cp, ptr=0)]  # the current stream last; 0: the NULL stream
    cp.launches.streams = cp.streams
    cp.cuda = types.SimpleNamespace(
        Device=Device, Stream=lambda non_blocking=False: Stream(cp, non_blocking),
        get_current_stream=lambda: cp.streams[-1],
        # (a stream's record() returns the point recorded, whatever event it is given)
        Event=lambda block=False, disable_timing=False, interprocess=False: Event(None, None),
        MemoryPool=lambda: types.SimpleNamespace(malloc=None),
        using_allocator=lambda malloc=None: contextlib.nullcontext(),
        memory=_Unavailable("cupy.cuda.memory"))
    return cp


#: the modules that look their fused kernels up with nnopt.fast.fast_for
FAST_PATH_USERS = ("nnopt.optim.base", "nnopt.layers", "nnopt.batchnorm", "nnopt.block",
                   "nnopt.losses")
_SESSION: dict = {}


def install(monkeypatch):
    """The emulated nnopt.fast.gpu as the fused kernels of every NumPy float array, and the
    stand-in CuPy as ``cupy`` (streams and graphs for nnopt.graph), and nnopt's cuBLAS
    handle on :class:`FakeCublas`, for one test (``monkeypatch`` undoes it): what
    ``pytest --backend emulated`` runs tests/test_gpu.py with. The device has
    ``$NNOPT_EMULATED_SMS`` multiprocessors (2 by default; 132, an H100's or H200's count,
    gives the launch shapes and plans of those GPUs: CI runs both)."""
    import nnopt.fast
    import nnopt.graph
    import nnopt.params
    if "gpu" not in _SESSION:
        sms = int(os.environ.get("NNOPT_EMULATED_SMS", "2"))
        _SESSION["cupy"] = cp = emulated_cupy(multiprocessors=sms)
        _SESSION["gpu"] = load_gpu_module(cp)
    cp, gpu = _SESSION["cupy"], _SESSION["gpu"]
    for module in FAST_PATH_USERS:
        monkeypatch.setattr(importlib.import_module(module), "fast_for", fast_for_emulated(gpu))
    monkeypatch.setattr(nnopt.fast, "gpu_kernels", lambda: gpu)
    # cuBLAS: nnopt.cublas.Handle itself, on a libcublas that computes on the host
    monkeypatch.setattr(gpu, "_pointer", lambda a: cp.launches.keep(a).ctypes.data)
    monkeypatch.setattr(gpu, "HANDLES", cublas.HandleCache(gpu._warn))
    monkeypatch.setattr(gpu, "_make_handle", lambda: cublas.Handle(
        FakeCublas(run=cp.launches.run), host_allocate, path="(emulated libcublas)"))
    # nnopt.graph.CapturedStep on the stand-in: its `import cupy` and `from .fast import gpu`,
    # a NumPy model taken for a GPU one, and zero_grad's fill recorded like a kernel.
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "nnopt.fast.gpu", gpu)
    monkeypatch.setattr(nnopt.fast, "gpu", gpu, raising=False)
    monkeypatch.setattr(nnopt.graph, "backend_name", lambda xp: "cupy")

    def zero_grad(storage):
        grad = storage.grad
        cp.launches.run(lambda: grad.__setitem__(Ellipsis, 0))
        storage.zero_count += 1
    monkeypatch.setattr(nnopt.params.FlatParameters, "zero_grad", zero_grad)
    return gpu


def fast_for_emulated(gpu):
    """nnopt.fast.fast_for with the emulated GPU kernels for NumPy float32/float64 arrays."""
    def fast_for(*arrays):
        first = arrays[0]
        ok = all(type(a) is np.ndarray and a.dtype == first.dtype for a in arrays)
        return gpu if ok and first.dtype in (np.float32, np.float64) else None
    return fast_for


def load_gpu_module(cupy_module, name="nnopt.fast._emulated_gpu"):
    """A fresh copy of nnopt.fast.gpu bound to ``cupy_module`` (sys.modules left as it was:
    nothing else in the test session sees the stand-in)."""
    import nnopt.fast
    path = Path(nnopt.fast.__file__).parent / "gpu.py"
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = cupy_module
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module._pointer = lambda a: a.ctypes.data  # a stand-in array's address (its alignment)
    finally:
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
    return module
