"""The CUDA kernels without a GPU: every source compiles with nvcc, and the per-element
math of kernels/rules.cuh, compiled for the host, matches nnopt's reference formulas."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import nnopt
from nnopt import kernels, optim
from nnopt.batchnorm import batchnorm_backward, batchnorm_forward
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


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the host version of the kernels' math")
    lib = tmp_path_factory.mktemp("host") / "libnnopt_rules.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-I", str(KERNELS),
                    str(ROOT / "tests" / "host_rules.cpp"), "-o", str(lib)], check=True,
                   timeout=300)
    return ctypes.CDLL(str(lib))


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def scalar(dtype):
    return ctypes.c_float if dtype == np.float32 else ctypes.c_double


def host_step(lib, name, options, p, g, state, t):
    """One step of the host-compiled rule ``name`` on float arrays p, g, state (in place)."""
    dtype = p.dtype.type
    suffix, s, n = ("f32" if dtype == np.float32 else "f64"), scalar(dtype), ctypes.c_longlong(p.size)
    lr = s(options.get("lr", 0.0))
    if name == "sgd":
        getattr(lib, f"sgd_{suffix}")(ptr(p), ptr(g), lr, n)
    elif name in ("momentum", "nag"):
        kind = (0 if name == "momentum" else 2) + (options.get("buffer") == "torch")
        getattr(lib, f"velocity_{suffix}")(kind, ptr(p), ptr(g), ptr(state[0]), lr,
                                           s(options.get("momentum", 0.9)), n)
    elif name == "adagrad":
        getattr(lib, f"adagrad_{suffix}")(ptr(p), ptr(g), ptr(state[0]), lr, s(options.get("eps", 1e-6)), n)
    elif name == "adadelta":
        scale = options["lr"] if options.get("lr_scales_step") else 1.0
        getattr(lib, f"adadelta_{suffix}")(ptr(p), ptr(g), ptr(state[0]), ptr(state[1]),
                                           s(options.get("rho", 0.9)), s(options.get("eps", 1e-5)),
                                           s(scale), n)
    elif name == "rmsprop":
        getattr(lib, f"rmsprop_{suffix}")(int(not options.get("eps_inside_root", True)), ptr(p), ptr(g),
                                          ptr(state[0]), lr, s(options.get("alpha", 0.9)),
                                          s(options.get("eps", 1e-6)), n)
    else:
        b1, b2 = options.get("betas", (0.9, 0.999))
        getattr(lib, f"adam_{suffix}")(ptr(p), ptr(g), ptr(state[0]), ptr(state[1]), t, lr,
                                       s(b1), s(b2), s(options.get("eps", 1e-8)), n)


CASES = [("sgd", {"lr": 0.1}), ("momentum", {"lr": 0.05}), ("momentum", {"lr": 0.05, "buffer": "torch"}),
         ("nag", {"lr": 0.05}), ("nag", {"lr": 0.05, "buffer": "torch"}), ("adagrad", {"lr": 0.3}),
         ("adadelta", {"lr": 0.1}), ("adadelta", {"lr": 0.5, "lr_scales_step": True}),
         ("rmsprop", {"lr": 0.01}), ("rmsprop", {"lr": 0.01, "eps_inside_root": False}),
         ("adam", {"lr": 0.01, "betas": (0.8, 0.99)})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, options", CASES)
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
        host_step(host, name, options, p, g.astype(dtype), state, t)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert np.max(np.abs(p - storage.data)) <= tol * np.max(np.abs(storage.data))


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
    z, mean, inv_std = c(np.empty(shape)), c(np.empty(n)), c(np.empty(n))
    getattr(host, f"bn_forward_{suffix}")(ptr(xs), ptr(gs), ptr(bs), s(1e-5), s(0.9), 0,
                                          ptr(run_mean), ptr(run_var), ptr(z), ptr(mean),
                                          ptr(inv_std), m, n)
    dx, dgamma, dbeta = c(np.empty(shape)), c(np.zeros(n)), c(np.zeros(n))
    getattr(host, f"bn_backward_{suffix}")(ptr(ds), ptr(xs), ptr(gs), ptr(mean), ptr(inv_std),
                                           ptr(dx), ptr(dgamma), ptr(dbeta), m, n)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in ((z, z_ref), (mean, mean_ref), (dx, dx_ref), (dgamma, dgamma_ref),
                      (dbeta, dbeta_ref), (run_mean, 0.1 * mean_ref), (run_var, 0.9 + 0.1 * var_ref)):
        assert np.max(np.abs(got - want)) <= tol * max(np.max(np.abs(want)), 1.0)
