"""The CUDA kernels without a GPU: every source compiles with nvcc, and the per-element
math of kernels/rules.cuh, compiled for the host, matches nnopt's reference formulas."""
import ctypes
import ctypes.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nnopt
from nnopt import kernels, optim
from nnopt.batchnorm import batchnorm_backward, batchnorm_forward
from nnopt.fast import cpu_kernels
from nnopt.fast.shared import weight_decay_scalars
from nnopt.params import FlatParameters

ROOT = Path(__file__).resolve().parent.parent
KERNELS = Path(kernels.__file__).parent


def test_sources_ship_with_the_package():
    for name in kernels.SOURCES:
        text = kernels.source(name)
        assert '#include "rules.cuh"' not in text and "__global__" in text
    assert "adam_rule" in kernels.source("optimizers.cu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("name", kernels.SOURCES)
def test_kernel_source_compiles_with_nvcc(tmp_path, name):
    proc = subprocess.run(["nvcc", "-arch=sm_80", "--cubin", "-I", str(KERNELS),
                           str(KERNELS / name), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 1000


def nvrtc_library():
    """libnvrtc (the compiler CuPy hands nnopt's kernels to), from the NVIDIA wheel that the
    test extra installs, a CUDA toolkit, or the loader's path; None if there is none."""
    from nnopt.cublas import _site_dirs
    files = [Path(d) / sub for d in _site_dirs() for sub in
             ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")]
    files += [Path(root) / "lib64" / "libnvrtc.so" for root in
              (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda") if root]
    for path in [str(f) for f in files if f.exists()] + [ctypes.util.find_library("nvrtc")]:
        if path:
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def nvrtc_compile(lib, code, options):
    """(status, log) of compiling ``code`` with NVRTC."""
    program = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"nnopt.cu", 0, None,
                                  None) == 0
    try:
        flags = [o.encode() for o in options]
        status = lib.nvrtcCompileProgram(program, len(flags), (ctypes.c_char_p * len(flags))(*flags))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        return status, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", kernels.SOURCES)
def test_kernel_source_compiles_with_nvrtc(name, arch):
    """What CuPy does on the GPU (nnopt.fast.gpu.module: the shipped source, --std=c++14),
    for the A100 and H100/H200 architectures: no warning, every kernel an entry of the
    binary, no register spills."""
    from tests.emulated_gpu import compiler, kernel_signatures
    lib = nvrtc_library()
    if lib is None:
        pytest.skip("no libnvrtc (pip install nvidia-cuda-nvrtc, part of nnopt's test extra)")
    code = kernels.source(name)
    status, log = nvrtc_compile(lib, code, ["--std=c++14", f"--gpu-architecture={arch}",
                                            "--ptxas-options=-v"])
    assert status == 0, log
    assert "warning" not in log.lower(), log
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert entries, log
    if compiler() is not None:  # the signatures come from the C preprocessor
        assert entries == set(kernel_signatures(code)), log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), log


def build_host_library(tmp_path_factory, source):
    """tests/<source> compiled for the host (kernels/ on the include path), loaded."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the host version of the kernels")
    lib = tmp_path_factory.mktemp("host") / f"lib{Path(source).stem}.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-I",
                    str(KERNELS), str(ROOT / "tests" / source), "-o", str(lib)], check=True,
                   timeout=300)
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return build_host_library(tmp_path_factory, "host_rules.cpp")


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def scalar(dtype):
    return ctypes.c_float if dtype == np.float32 else ctypes.c_double


def host_step(lib, opt, p, g, state, t):
    """One step of ``opt``'s host-compiled CUDA kernel on float arrays p, g, state (in place),
    with the scalars of ``opt.kernel_scalars`` (the path the GPU launchers take)."""
    group = opt.param_groups[0]
    dtype = p.dtype.type
    suffix, s = ("f32" if dtype == np.float32 else "f64"), scalar(dtype)
    kernel = getattr(lib, f"{opt.rule_name(group)}_{suffix}")
    kernel(ptr(p), ptr(g), *(ptr(a) for a in state[:len(opt.state_names)]),
           *(s(v) for v in opt.kernel_scalars(group, t)),
           *(s(v) for v in weight_decay_scalars(type(opt), group)), ctypes.c_longlong(p.size))


CASES = [("sgd", {"lr": 0.1}), ("momentum", {"lr": 0.05}), ("momentum", {"lr": 0.05, "buffer": "torch"}),
         ("nag", {"lr": 0.05}), ("nag", {"lr": 0.05, "buffer": "torch"}), ("adagrad", {"lr": 0.3}),
         ("adadelta", {"lr": 0.1}), ("adadelta", {"lr": 0.5, "lr_scales_step": True}),
         ("rmsprop", {"lr": 0.01}), ("rmsprop", {"lr": 0.01, "eps_inside_root": False}),
         ("adam", {"lr": 0.01, "betas": (0.8, 0.99)}),
         # weight decay, in the kernel's pass: L2 (the rule sees g + lambda p), decoupled (AdamW)
         ("sgd", {"lr": 0.1, "weight_decay": 0.3}), ("momentum", {"lr": 0.05, "weight_decay": 0.1}),
         ("adamw", {"lr": 0.01, "weight_decay": 0.5})]
# L2 decay into Adam: only on its own (the training tests take CASES): a parameter whose
# gradient is zero by construction (a bias before BN) gets lambda p of its rounding noise,
# which Adam's normalization turns into steps of size lr on one side and not the other.
RULE_CASES = CASES + [("adam", {"lr": 0.01, "weight_decay": 0.2})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, options", RULE_CASES)
def test_host_compiled_rules_match_reference(host, rng, name, options, dtype):
    n = 1013
    start = rng.normal(size=n)
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), "float64", w=start)
    reference = optim.create(name, storage, use_fast_path=False, **options)
    p = start.astype(dtype)
    state = [np.zeros(n, dtype), np.zeros(n, dtype)]
    for t in range(1, 5):
        g = rng.normal(size=n) * rng.uniform(0.1, 5)
        storage.grad[...] = g
        reference.step()
        host_step(host, reference, p, g.astype(dtype), state, t)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert np.max(np.abs(p - storage.data)) <= tol * np.max(np.abs(storage.data))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_compiled_adam_device_step_matches_reference(host, rng, dtype):
    """The captured-graph kernel: Adam's scalars computed from a step count in memory,
    from the hyper-parameters as doubles: the very steps of the eager kernel, whose scalars
    the host computes (in float32 too: the scalars are rounded once, not twice)."""
    n, options = 513, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.1}
    start = rng.normal(size=n)
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), "float64", w=start)
    reference = optim.Adam(storage, use_fast_path=False, **options)
    suffix, s = ("f32" if dtype == np.float32 else "f64"), scalar(dtype)
    p, m, v = start.astype(dtype), np.zeros(n, dtype), np.zeros(n, dtype)
    eager = [p.copy(), m.copy(), v.copy()]
    step = ctypes.c_int(0)
    inputs = optim.Adam.step_scalar_inputs(reference.param_groups[0])
    decay = weight_decay_scalars(optim.Adam, reference.param_groups[0])
    for t in range(1, 5):
        g = rng.normal(size=n)
        storage.grad[...] = g
        reference.step()
        step.value += 1
        getattr(host, f"adam_device_step_{suffix}")(
            ptr(p), ptr(g.astype(dtype)), ptr(m), ptr(v), ctypes.byref(step),
            *map(ctypes.c_double, inputs), *map(s, decay), ctypes.c_longlong(n))
        host_step(host, reference, eager[0], g.astype(dtype), eager[1:], t)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert np.max(np.abs(p - storage.data)) <= tol * np.max(np.abs(storage.data))
    for graph, eager_value in zip((p, m, v), eager):
        np.testing.assert_array_equal(graph, eager_value)


@pytest.mark.parametrize("t", [1, 2, 17, 5000])
def test_cuda_adam_kernel_scalars_are_the_python_ones(host, t):
    group = {"lr": 0.003, "betas": (0.85, 0.995), "eps": 1e-8}
    out = np.empty(7)
    host.adam_kernel_scalars_host(*map(ctypes.c_double, optim.Adam.step_scalar_inputs(group)),
                                  t, ptr(out))
    np.testing.assert_allclose(out, optim.Adam.kernel_scalars(group, t), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3), (37, 29)])
def test_host_compiled_batchnorm_matches_reference(host, rng, shape, dtype):
    m, n = shape
    x = rng.normal(size=shape) * rng.uniform(0.2, 4, n) + rng.normal(size=n) * 2
    gamma, beta, d = rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=shape)
    z_ref, mean_ref, var_ref, cache = batchnorm_forward(x, gamma, beta, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = batchnorm_backward(d, cache)
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    s = scalar(dtype)
    suffix = "f32" if dtype == np.float32 else "f64"
    xs, gs, bs, ds = c(x), c(gamma), c(beta), c(d)
    run_mean, run_var = c(np.zeros(n)), c(np.ones(n))
    z, mean, inv_std = (c(np.full(k, np.nan)) for k in (shape, n, n))  # unwritten: NaN
    getattr(host, f"bn_forward_{suffix}")(ptr(xs), ptr(gs), ptr(bs), s(1e-5), s(0.9), 0,
                                          ptr(run_mean), ptr(run_var), ptr(z), ptr(mean),
                                          ptr(inv_std), m, n)
    dx, dgamma, dbeta = c(np.full(shape, np.nan)), c(np.zeros(n)), c(np.zeros(n))
    getattr(host, f"bn_backward_{suffix}")(ptr(ds), ptr(xs), ptr(gs), ptr(mean), ptr(inv_std),
                                           ptr(dx), ptr(dgamma), ptr(dbeta), m, n)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in ((z, z_ref), (mean, mean_ref), (dx, dx_ref), (dgamma, dgamma_ref),
                      (dbeta, dbeta_ref), (run_mean, 0.1 * mean_ref), (run_var, 0.9 + 0.1 * var_ref)):
        assert np.max(np.abs(got - want)) <= tol * max(np.max(np.abs(want)), 1.0)


def cuda_rule_arguments():
    """``{rule name: [argument names]}`` of the ``*_rule`` functions of kernels/rules.cuh."""
    text = (KERNELS / "rules.cuh").read_text()
    rules = {}
    for name, args in re.findall(r"NNOPT_DEVICE void (\w+)_rule\(([^)]*)\)", text):
        rules[name] = [arg.split()[-1].lstrip("&*") for arg in args.split(",")]
    return rules


def make_optimizer(name, options):
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), "float64", w=np.zeros(3))
    return optim.create(name, storage, use_fast_path=False, **options)


def rule_of(opt):
    return opt.rule_name(opt.param_groups[0])


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_has_every_path(name):
    """Reference update, numba rule, CUDA rule and kernels, host-rule test: each rule variant
    of each optimizer has all of them, and the numba and CUDA rules take the same
    arguments in the same order (the element arrays, then kernel_scalars)."""
    cls = optim.OPTIMIZERS[name]
    assert cls.update is not optim.Optimizer.update, f"{cls.__name__} has no reference update"
    assert cls.rule_names, f"{cls.__name__} names no rule"
    cpu = cpu_kernels()
    cuda_rules = cuda_rule_arguments()
    kernels_source = (KERNELS / "optimizers.cu").read_text()
    host_tested = {rule_of(make_optimizer(case, options)) for case, options in CASES}
    for rule in cls.rule_names:
        assert rule in cuda_rules, f"kernels/rules.cuh has no {rule}_rule"
        if cpu is not None:
            assert rule in cpu.RULES, f"nnopt.fast.cpu has no {rule}_rule"
            numba_args = list(inspect.signature(cpu.RULES[rule].py_func).parameters)
            assert numba_args == cuda_rules[rule], rule
        assert re.search(rf"__global__ void {rule}_##S\(", kernels_source), rule
        assert rule in host_tested, f"no host-rule test case runs {rule}"
    if cls.step_scalars is not None:
        assert re.search(rf"__global__ void {cls.rule_names[0]}_device_step_##S\(",
                         kernels_source)
    opt = make_optimizer(name, {})
    n_args = len(cuda_rules[rule_of(opt)])
    assert len(opt.kernel_scalars(opt.param_groups[0], 1)) == n_args - 2 - len(cls.state_names)


# --- the grid-shaped kernels, run on the CPU thread by thread (tests/host_grid.cpp) ---------
@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return build_host_library(tmp_path_factory, "host_grid.cpp")


@pytest.fixture(scope="module")
def emulated_batchnorm():
    """kernels/batchnorm.cu on the emulated device (tests/emulated_gpu.py), for the kernels
    whose blocks synchronize."""
    from tests import emulated_gpu
    if emulated_gpu.compiler() is None:
        pytest.skip("no C++ compiler to build the emulated kernels")
    return emulated_gpu.emulated_cupy().RawModule(code=kernels.source("batchnorm.cu"))


def run_grid(lib, kernel, grid_shape, block, *args):
    """Every thread of a (grid_x, grid_y) x block launch, one after the other."""
    gx, gy = grid_shape
    for by in range(gy):
        for bx in range(gx):
            for tx in range(block):
                lib.nnopt_set_thread(gx, gy, block, 1, bx, by, tx, 0)
                kernel(*args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 7, 1013])
@pytest.mark.parametrize("name, options", [CASES[0], CASES[2], CASES[6], CASES[10]])
def test_vectorized_optimizer_kernels_match_the_plain_loop(host, grid, rng, name, options, n,
                                                           offset, dtype):
    """16-byte vector loads, the scalar tail, and the scalar loop taken by a misaligned
    view (offset 1: every buffer starts one element into its allocation)."""
    opt = make_optimizer(name, options)
    group = opt.param_groups[0]
    suffix, s = ("f32" if dtype == np.float32 else "f64"), scalar(dtype)
    arrays = [rng.normal(size=n + 1).astype(dtype) for _ in range(4)]
    arrays[2] = np.abs(arrays[2])
    arrays[3] = np.abs(arrays[3])
    plain = [a[offset:].copy() for a in arrays]
    views = [a[offset:] for a in arrays]
    scalars = [s(v) for v in (*opt.kernel_scalars(group, 3), *weight_decay_scalars(type(opt), group))]
    k = 2 + len(opt.state_names)
    getattr(host, f"{rule_of(opt)}_{suffix}")(*(ptr(a) for a in plain[:k]), *scalars,
                                             ctypes.c_longlong(n))
    run_grid(grid, getattr(grid, f"{rule_of(opt)}_{suffix}"), (3, 1), 4,
             *(ptr(a) for a in views[:k]), *scalars, ctypes.c_longlong(n))
    for got, want in zip(views[:k], plain[:k]):
        np.testing.assert_array_equal(got, want)


def block_reference(x, gamma, beta, bias, d, activation):
    """The unfused block in float64: BN of x (whose running mean is that of x + bias), the
    activation layer, and back; ``d`` is the gradient of the activation's output."""
    from nnopt.layers import ACTIVATIONS
    z, mean, var, cache = batchnorm_forward(x, gamma, beta, 1e-5)
    if activation == "identity":
        y, dz = z, d
    else:
        layer = ACTIVATIONS[activation]()
        y = layer.forward(z)
        dz = layer.backward(d)
    dx, dgamma, dbeta = batchnorm_backward(dz, cache)
    return y, mean + bias, var, dx, dgamma, dbeta


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, rows, vectors", [
    ((37, 29), 5, False), ((64, 3), 16, False), ((40, 40), 40, False), ((97, 35), 3, False),
    ((40, 40), 40, True), ((97, 36), 3, True), ((64, 4), 16, True)])
@pytest.mark.parametrize("activation", ["identity", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_batchnorm_kernels_match_reference(grid, emulated_batchnorm, rng, shape, rows,
                                                 vectors, dtype, activation, with_bias):
    """The split path's kernels, with 4- or 8-byte loads and (vectors: entry points
    *_f32x4 / *_f64x2, a thread per 16 bytes of a row) 16-byte ones."""
    from nnopt.fast.cpu import ACTIVATION_CODES
    from nnopt.fast.plan import feature_tile_grid, bn_lanes, bn_split_grid
    m, n = shape
    lanes = bn_lanes(n, np.dtype(dtype).itemsize) if vectors else 1
    assert lanes > 1 or not vectors
    chunks = -(-m // rows)
    x = rng.normal(size=shape) * rng.uniform(0.2, 4, n) + rng.normal(size=n) * 2
    gamma, beta, d = rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=shape)
    bias = rng.normal(size=n) if with_bias else np.zeros(n)
    y_ref, run_mean_batch, var_ref, dx_ref, dgamma_ref, dbeta_ref = block_reference(
        x, gamma, beta, bias, d, activation)
    code = ACTIVATION_CODES[activation]
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    s, suffix = scalar(dtype), ("f32" if dtype == np.float32 else "f64")
    rows_suffix = suffix + (f"x{lanes}" if lanes > 1 else "")
    k = lambda name: getattr(grid, f"bn_{name}_{rows_suffix}")  # noqa: E731
    xs, gs, bs, ds, biases = c(x), c(gamma), c(beta), c(d), c(bias)
    run_mean, run_var = c(np.zeros(n)), c(np.ones(n))
    z, mean, inv_std, scale, center = c(np.zeros(shape)), *(c(np.zeros(n)) for _ in range(4))
    partial = np.full((chunks, 2, n), np.nan)
    (gx, gy), (block,) = bn_split_grid(n, chunks, lanes)
    run_grid(grid, k("partial_forward"), (gx, gy), block, ptr(xs), ptr(partial), m, n, rows)
    # the finalize kernels synchronize their block: they run on the emulated device
    finalize = emulated_batchnorm.get_function
    t, i32 = np.dtype(dtype).type, np.int32
    finalize(f"bn_finalize_forward_{suffix}")(
        *feature_tile_grid(n), (partial, i32(chunks), xs, gs, bs, t(1e-5), t(0.9), i32(0),
                               run_mean, run_var, mean, inv_std, scale, center, i32(m), i32(n),
                               biases, i32(with_bias)))
    run_grid(grid, k("apply_forward"), (gx, gy), block, ptr(xs), ptr(scale), ptr(center), ptr(bs),
             ptr(z), m, n, rows, code)
    dx, coef, dgamma, dbeta = c(np.zeros(shape)), c(np.zeros((3, n))), c(np.zeros(n)), c(np.zeros(n))
    partial[...] = np.nan
    run_grid(grid, k("partial_backward"), (gx, gy), block, ptr(ds), ptr(xs), ptr(mean),
             ptr(partial), m, n, rows, ptr(z), code)
    finalize(f"bn_finalize_backward_{suffix}")(
        *feature_tile_grid(n), (partial, i32(chunks), gs, inv_std, coef, dgamma, dbeta, i32(m),
                               i32(n)))
    run_grid(grid, k("apply_backward"), (gx, gy), block, ptr(ds), ptr(xs), ptr(mean), ptr(coef),
             ptr(dx), m, n, rows, ptr(z), code)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in ((z, y_ref), (dx, dx_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref),
                      (run_mean, 0.1 * run_mean_batch), (run_var, 0.9 + 0.1 * var_ref)):
        assert np.max(np.abs(got - want)) <= tol * max(np.max(np.abs(want)), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["identity", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_activation_kernels_match_the_layers(grid, emulated_batchnorm, rng, dtype, activation,
                                                  with_bias):
    """A block without BN on the GPU: y = act(h + b), then dh and the bias gradient."""
    from nnopt.fast.cpu import ACTIVATION_CODES
    from nnopt.fast.plan import feature_tile_grid
    from nnopt.layers import ACTIVATIONS
    m, n = 23, 41
    h, d = rng.normal(size=(m, n)) * 3, rng.normal(size=(m, n))
    bias = rng.normal(size=n) if with_bias else np.zeros(n)
    layer = ACTIVATIONS[activation]() if activation != "identity" else None
    y_ref = layer.forward(h + bias) if layer else h + bias
    dh_ref = layer.backward(d) if layer else d
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    suffix = "f32" if dtype == np.float32 else "f64"
    code = ACTIVATION_CODES[activation]
    hs, ds, biases = c(h), c(d), c(bias)
    y, dh, dbias = c(np.zeros((m, n))), c(np.zeros((m, n))), c(np.ones(n))
    run_grid(grid, getattr(grid, f"bias_activation_{suffix}"), (2, 1), 16, ptr(hs), ptr(biases),
             int(with_bias), code, ptr(y), ctypes.c_longlong(m * n), n)
    i32 = np.int32  # activation_backward synchronizes its block: on the emulated device
    emulated_batchnorm.get_function(f"activation_backward_{suffix}")(
        *feature_tile_grid(n), (ds, y, i32(code), dh, dbias, i32(with_bias), i32(m), i32(n)))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.max(np.abs(y - y_ref)) <= tol * max(np.max(np.abs(y_ref)), 1.0)
    assert np.max(np.abs(dh - dh_ref)) <= tol * max(np.max(np.abs(dh_ref)), 1.0)
    want_dbias = 1 + dh_ref.sum(axis=0) if with_bias else np.ones(n)
    assert np.max(np.abs(dbias - want_dbias)) <= 10 * tol * max(np.max(np.abs(want_dbias)), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_activations_match_the_numba_ones(host, rng, dtype):
    from nnopt.fast import cpu
    suffix = "f32" if dtype == np.float32 else "f64"
    v, d = (rng.normal(size=1000) * 4).astype(dtype), rng.normal(size=1000).astype(dtype)
    v[:5] = np.nan, np.inf, -np.inf, 0.0, -0.0  # NaN passes on through every activation
    for name, code in cpu.ACTIVATION_CODES.items():
        out = np.empty_like(v)
        getattr(host, f"activate_{suffix}")(ptr(v), ptr(out), code, v.size)
        want = np.array([cpu.activate(e, code) for e in v], dtype=dtype)
        np.testing.assert_allclose(out, want, rtol=1e-6 if dtype == np.float32 else 1e-14,
                                   err_msg=name)
        assert np.isnan(out[0]) and np.isnan(want[0]), name
        y = want
        getattr(host, f"activation_grad_{suffix}")(ptr(d), ptr(y), ptr(out), code, v.size)
        want = np.array([cpu.activation_grad(a, b, code) for a, b in zip(d, y)], dtype=dtype)
        np.testing.assert_allclose(out, want, rtol=1e-6 if dtype == np.float32 else 1e-14,
                                   err_msg=name)
    # The codes are the same numbers on both sides.
    source = (KERNELS / "rules.cuh").read_text()
    for name, code in cpu.ACTIVATION_CODES.items():
        assert re.search(rf"#define NNOPT_{name.upper()} {code}\b", source), name


@pytest.mark.parametrize("sms", [1, 108, 132])
@pytest.mark.parametrize("m, n", [(2, 3), (64, 16), (256, 256), (511, 4096), (512, 1), (1024, 16),
                                  (1024, 1024), (4096, 4096), (8192, 128), (65536, 10), (300001, 7)])
def test_bn_plan_covers_every_row_once(sms, m, n):
    from nnopt.fast import plan
    chunks, rows = plan.bn_plan(m, n, sms)
    if m < plan.BN_SPLIT_MIN_ROWS or n >= sms * plan.THREADS_PER_SM:
        assert (chunks, rows) == (1, m)  # a small batch, or features enough for every SM
    if chunks == 1:  # the one-launch kernel: small batch, or enough features to fill the GPU
        assert rows == m and (m < plan.BN_SPLIT_MIN_ROWS or n >= sms * plan.THREADS_PER_SM // 2)
        return
    assert chunks >= 2 and (chunks - 1) * rows < m <= chunks * rows
    assert rows >= plan.BN_MIN_ROWS and chunks <= plan.BN_MAX_CHUNKS
    (gx, gy), (block,) = plan.bn_split_grid(n, chunks)
    assert gy == chunks and gx * block >= n > (gx - 1) * block and block % 32 == 0
    if m >= 4096 and n >= 4096:  # the shape that left the GPU idle: every SM busy now
        assert n * chunks >= sms * plan.THREADS_PER_SM


@pytest.mark.parametrize("n, itemsize, aligned, lanes", [
    (4096, 4, True, 4), (4096, 8, True, 2), (30, 4, True, 1), (30, 8, True, 2), (7, 8, True, 1),
    (4096, 4, False, 1)])
def test_bn_lanes_and_their_grid(monkeypatch, n, itemsize, aligned, lanes):
    """16-byte row walks only where every thread's features fill one aligned vector; their
    grid covers the n / lanes threads once."""
    from nnopt.fast import plan
    assert plan.bn_lanes(n, itemsize, aligned) == lanes
    (gx, gy), (block,) = plan.bn_split_grid(n, 66, lanes)
    threads = n // lanes
    assert gy == 66 and gx * block >= threads > (gx - 1) * block and block % 32 == 0
    monkeypatch.setattr(plan, "BN_VECTORS", False)
    assert plan.bn_lanes(n, itemsize, aligned) == 1


def test_elementwise_blocks():
    from nnopt.fast.plan import THREADS, elementwise_blocks
    assert elementwise_blocks(0, 4, 132) == elementwise_blocks(1, 4, 132) == 1
    assert elementwise_blocks(4 * THREADS * 10, 4, 132) == 10
    assert elementwise_blocks(10**8, 4, 132) == 132 * 8 * 4


def test_gpu_launchers_need_no_numba():
    """nnopt.fast.gpu (here with a stand-in CuPy) imports where numba does not: the GPU
    path must not fail for want of the CPU kernels' compiler."""
    code = """
import builtins, sys, types
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "numba" or name.startswith("numba."):
        raise ImportError("numba is not installed")
    return real_import(name, *args, **kwargs)
class Anything:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return Anything()
    def __getattr__(self, name): return Anything()
cupy = types.ModuleType("cupy")
cupy.ElementwiseKernel = cupy.RawModule = Anything
cupy.float32, cupy.float64, cupy.cuda = "float32", "float64", Anything()
sys.modules["cupy"] = cupy
builtins.__import__ = guarded
from nnopt.fast import gpu
for name in ("activation_forward", "activation_backward", "product", "Scratch", "bn_forward"):
    assert hasattr(gpu, name), name
assert "numba" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
