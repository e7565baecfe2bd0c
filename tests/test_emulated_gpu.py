"""nnopt.fast.gpu's launchers on an emulated CUDA device (tests/emulated_gpu.py): the exact
Python that runs on a GPU, launching the exact kernel sources (compiled for the host),
every launch's arguments checked against the kernel's C signature. What a GPU session
would otherwise find first (an argument out of order, a float64 scalar for a float, a
transposed view passed as contiguous, a kernel name that does not exist) fails here."""

import itertools

import numpy as np
import pytest

import nnopt
from nnopt import kernels, optim
from nnopt.fast import capture_mode
from nnopt.layers import ACTIVATIONS
from nnopt.params import FlatParameters
from tests import emulated_gpu
from tests.test_kernels import CASES, RULE_CASES, block_reference

pytestmark = pytest.mark.skipif(emulated_gpu.compiler() is None,
                                reason="no C++ compiler to build the emulated kernels")
ACTIVATION_NAMES = ["identity", *sorted(ACTIVATIONS)]


@pytest.fixture(scope="module")
def cupy_stand_in():
    return emulated_gpu.emulated_cupy(multiprocessors=2)


@pytest.fixture(scope="module")
def gpu(cupy_stand_in):
    return emulated_gpu.load_gpu_module(cupy_stand_in)


def tol(dtype):
    return 2e-5 if np.dtype(dtype) == np.float32 else 1e-12


def close(got, want, rtol):
    scale = max(float(np.max(np.abs(want))), 1.0)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) <= rtol * scale


# --- the emulation's own checks ---------------------------------------------------------------
def test_launch_arguments_are_checked_against_the_signature(cupy_stand_in):
    sgd = cupy_stand_in.RawModule(code=kernels.source("optimizers.cu")).get_function("sgd_f32")
    p, g = np.zeros(8, np.float32), np.ones(8, np.float32)
    no_decay = (np.float32(0), np.float32(1))  # decay, shrink
    sgd((1,), (4,), (p, g, np.float32(0.5), *no_decay, np.int64(8)))
    assert np.all(p == -0.5)
    wrong = {"a Python float for float lr": (p, g, 0.5, *no_decay, np.int64(8)),
             "double for float": (p, g, np.float64(0.5), *no_decay, np.int64(8)),
             "int32 for long long": (p, g, np.float32(0.5), *no_decay, np.int32(8)),
             "float64 array for float*": (p, g.astype(np.float64), np.float32(0.5), *no_decay,
                                          np.int64(8)),
             "strided view": (p, np.ones(16, np.float32)[::2], np.float32(0.5), *no_decay,
                              np.int64(8)),
             "missing argument": (p, g, np.float32(0.5), *no_decay)}
    for what, args in wrong.items():
        with pytest.raises(emulated_gpu.LaunchError):
            sgd((1,), (4,), args)
        assert np.all(p == -0.5), what
    for grid, block in (((1, 65536), (8,)), ((1,), (8, 2048))):
        with pytest.raises(emulated_gpu.LaunchError, match="beyond CUDA's limits"):
            sgd(grid, block, (p, g, np.float32(0.5), np.float32(0), np.float32(1), np.int64(6)))
    with pytest.raises(emulated_gpu.LaunchError, match="no kernel 'sgd_f16'"):
        cupy_stand_in.RawModule(code=kernels.source("optimizers.cu")).get_function("sgd_f16")


def test_writes_outside_an_allocation_are_caught(cupy_stand_in):
    sgd = cupy_stand_in.RawModule(code=kernels.source("optimizers.cu")).get_function("sgd_f64")
    p, g = cupy_stand_in.zeros(6, np.float64), cupy_stand_in.zeros(9, np.float64)
    g[...] = 1
    sgd((1,), (8,), (p, g, np.float64(0.5), np.float64(0), np.float64(1), np.int64(6)))
    assert np.all(p == -0.5)
    with pytest.raises(emulated_gpu.LaunchError, match="wrote outside argument 0"):
        sgd((1,), (8,), (p, g, np.float64(0.5), np.float64(0), np.float64(1),
             np.int64(7)))  # one element too many


def test_reading_what_nobody_wrote_shows_as_nan(cupy_stand_in):
    """cupy.empty's memory holds garbage on a GPU; the stand-in's holds NaN (-1 as an int),
    so a kernel that reads it before writing it gives NaN, not a plausible number."""
    sgd = cupy_stand_in.RawModule(code=kernels.source("optimizers.cu")).get_function("sgd_f32")
    p, never_written = cupy_stand_in.zeros(8, np.float32), cupy_stand_in.empty(8, np.float32)
    assert np.all(np.isnan(never_written)) and np.all(cupy_stand_in.empty(3, np.int32) == -1)
    sgd((1,), (8,), (p, never_written, np.float32(0.5), np.float32(0), np.float32(1), np.int64(8)))
    assert np.all(np.isnan(p))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reading_past_the_end_shows_as_nan(cupy_stand_in, dtype):
    """The guard bytes past an array read as NaN in either float type, so a kernel that
    reads beyond its input's end (n too large for g) cannot give a plausible result."""
    suffix = "f32" if dtype == np.float32 else "f64"
    sgd = cupy_stand_in.RawModule(code=kernels.source("optimizers.cu")).get_function(f"sgd_{suffix}")
    p, g = cupy_stand_in.zeros(8, dtype), cupy_stand_in.zeros(5, dtype)
    sgd((1,), (8,), (p, g, dtype(0.5), dtype(0), dtype(1), np.int64(8)))
    assert not np.isnan(p[:5]).any() and np.isnan(p[5:]).all()


def test_a_misaligned_16_byte_access_is_caught(cupy_stand_in):
    """A GPU faults on a float4 load from an address that is not a multiple of 16; the host
    would not care, so the emulation checks every vector access (kernels/vectors.cuh)."""
    partial_sums = cupy_stand_in.RawModule(code=kernels.source("batchnorm.cu")).get_function(
        "bn_partial_forward_f32x4")
    m, n = 8, 16
    base = cupy_stand_in.zeros(m * n + 4, np.float32)
    partial = cupy_stand_in.zeros((1, 2, n), np.float64)
    args = lambda x: (x, partial, np.int32(m), np.int32(n), np.int32(m))  # noqa: E731
    partial_sums((1, 1), (4,), args(base[4:].reshape(m, n)))  # 16 bytes in: aligned
    with pytest.raises(emulated_gpu.LaunchError, match="misaligned address"):
        partial_sums((1, 1), (4,), args(base[1:1 + m * n].reshape(m, n)))


def test_synchronization_through_a_device_function_is_seen(cupy_stand_in):
    """A kernel whose __syncthreads sits in a function it calls runs its threads together;
    one the emulation ran one after the other would be a LaunchError, not a wrong result."""
    code = """
__device__ __forceinline__ void wait_all() { __syncthreads(); }
template <typename T> __device__ void reverse(T* a) {
    __shared__ T copy[64];
    copy[threadIdx.x] = a[threadIdx.x];
    wait_all();
    a[threadIdx.x] = copy[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void reverse_f64(double* a) { reverse<double>(a); }
"""
    assert emulated_gpu.kernel_signatures(code)["reverse_f64"][1]
    a = np.arange(64.0)
    cupy_stand_in.RawModule(code=code).get_function("reverse_f64")((1,), (64,), (a,))
    assert np.array_equal(a, np.arange(64.0)[::-1])
    hidden = code.replace("wait_all();", "void (*wait)() = wait_all; wait();")  # not seen
    assert not emulated_gpu.kernel_signatures(hidden)["reverse_f64"][1]
    with pytest.raises(emulated_gpu.LaunchError, match="missed that it synchronizes"):
        cupy_stand_in.RawModule(code=hidden).get_function("reverse_f64")((1,), (64,), (a,))


BROADCAST = """
extern "C" __global__ void broadcast_f64(const double* a, double* out) {
    __shared__ double first;
    if (threadIdx.x == 0) first = a[blockIdx.x];
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = first;
}
"""
RACES = {"the barrier": BROADCAST.replace("__syncthreads();", ""),
         "a barrier in the wrong place": BROADCAST.replace(
             "if (threadIdx.x == 0) first = a[blockIdx.x];\n    __syncthreads();",
             "__syncthreads();\n    if (threadIdx.x == 0) first = a[blockIdx.x];")}


def broadcast(stand_in, code, order):
    a, out = np.arange(1.0, 4.0), stand_in.zeros(3 * 32, np.float64)
    with emulated_gpu.scheduled(order):
        stand_in.RawModule(code=code).get_function("broadcast_f64")((3,), (32,), (a, out))
    return out.reshape(3, 32)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle", "shuffle:12345"])
def test_a_synchronized_kernel_gives_the_same_result_in_every_order(cupy_stand_in, order):
    out = broadcast(cupy_stand_in, BROADCAST, order)
    assert np.array_equal(out, np.repeat(np.arange(1.0, 4.0)[:, None], 32, axis=1))


@pytest.mark.parametrize("missing", sorted(RACES))
def test_a_race_on_shared_memory_shows_in_another_order(cupy_stand_in, missing):
    """Without its barrier (or with it before the write), thread 0's write and the other
    threads' reads race. Threads in order hide that (thread 0 runs first); reversed or
    shuffled, a thread reads before thread 0 writes, and finds the 0xFF bytes every
    block's shared memory starts as (NaN), not the previous block's value. CI runs the GPU
    tests in the other orders (.ci/run)."""
    code = RACES[missing]
    assert np.array_equal(broadcast(cupy_stand_in, code, "forward"),
                          broadcast(cupy_stand_in, BROADCAST, "forward"))
    for order in ("reverse", "shuffle:1"):
        out = broadcast(cupy_stand_in, code, order)
        assert np.isnan(out).any(axis=1).all(), order  # in every block, not just the first


def test_each_block_starts_with_fresh_shared_memory(cupy_stand_in):
    """A read of shared memory that no thread of this block wrote is NaN in every block, as
    garbage would be on a GPU, not what the block before left there."""
    code = """
extern "C" __global__ void stale_f64(double* out) {
    __shared__ double kept[2], also;
    out[blockIdx.x] = kept[0] + also;
    kept[0] = also = 1.0;
}
"""
    assert "nnopt_fresh_shared(&kept" in emulated_gpu.fresh_shared(code)
    assert "nnopt_fresh_shared(&also" in emulated_gpu.fresh_shared(code)
    out = cupy_stand_in.zeros(4, np.float64)
    cupy_stand_in.RawModule(code=code).get_function("stale_f64")((4,), (1,), (out,))
    assert np.isnan(out).all()


@pytest.mark.parametrize("text", ["backwards", "reverse:3", "shuffle:-1", "shuffle:x"])
def test_an_unknown_order_is_refused(text):
    with pytest.raises(ValueError, match="use forward, reverse, shuffle or shuffle:SEED"):
        emulated_gpu.schedule_order(text)


def test_captures_follow_cudas_stream_rules():
    """While a stream captures, a launch on a stream that has not joined the capture (by
    waiting for an event recorded on a member) is a LaunchError (on a GPU it would run at
    once, outside the graph), and so is ending the capture before the capturing stream
    waited for a member's work (cudaErrorStreamCaptureUnjoined). Joined both ways, the
    side stream's launch is part of the graph."""
    cp = emulated_gpu.emulated_cupy()
    sgd = cp.RawModule(code=kernels.source("optimizers.cu")).get_function("sgd_f64")
    p, g = cp.zeros(4, np.float64), cp.zeros(4, np.float64)
    g[...] = 1
    args = (p, g, np.float64(1), np.float64(0), np.float64(1), np.int64(4))
    main, side = cp.cuda.Stream(), cp.cuda.Stream()
    for joined_back in (None, False, True):
        with main:
            main.begin_capture()
            if joined_back is None:  # never joined
                with side, pytest.raises(emulated_gpu.LaunchError, match="outside the capture"):
                    sgd((1,), (4,), args)
                main.end_capture()
                continue
            side.wait_event(main.record())
            with side:
                sgd((1,), (4,), args)
            if joined_back:
                main.wait_event(side.record())
                graph = main.end_capture()
            else:
                with pytest.raises(emulated_gpu.LaunchError, match="never waited"):
                    main.end_capture()
    assert np.all(p == 0)  # recorded, not run
    graph.launch(main)
    assert np.all(p == -1)


@pytest.mark.parametrize("waits_before_reading", [True, False])
def test_replays_run_the_streams_in_every_order_their_events_allow(waits_before_reading):
    """A side stream adds 1 to g; the capturing stream then takes g from p. Waiting for the
    side stream before reading g, every replay order gives what three eager steps give;
    reading g without waiting is a race, which the replay that runs the side stream late
    (Graph.ORDERS) turns into a different p."""
    cp = emulated_gpu.emulated_cupy()
    sgd = cp.RawModule(code=kernels.source("optimizers.cu")).get_function("sgd_f64")
    p, g, ones = cp.zeros(4, np.float64), cp.zeros(4, np.float64), cp.zeros(4, np.float64)
    ones[...] = 1
    step = lambda a, b, lr: sgd((1,), (4,), (a, b, np.float64(lr), np.float64(0),  # noqa: E731
                                             np.float64(1), np.int64(4)))
    main, side = cp.cuda.Stream(), cp.cuda.Stream()
    with main:
        main.begin_capture()
        side.wait_event(main.record())
        with side:
            step(g, ones, -1)  # g += 1
        if waits_before_reading:
            main.wait_event(side.record())
        step(p, g, 1)  # p -= g
        main.wait_event(side.record())
        graph = main.end_capture()
    for _ in graph.ORDERS:
        graph.launch(main)
    assert np.all(g == 3)
    # eager: p = -(1 + 2 + 3); the racy replays read g before the side stream's add once
    assert bool(np.all(p == -6)) is waits_before_reading


def test_a_cublas_call_is_captured_on_its_handles_stream():
    """cuBLAS runs on the stream its handle was given (cublasSetStream), whichever stream
    CuPy has current: so the emulation records it there."""
    from nnopt import cublas
    cp = emulated_gpu.emulated_cupy()
    main, side = cp.cuda.Stream(), cp.cuda.Stream()
    handle = cublas.Handle(emulated_gpu.FakeCublas(run=cp.launches.run),
                           emulated_gpu.host_allocate, workspace_bytes=0)
    a, c = cp.zeros((2, 2), np.float32), cp.zeros((2, 2), np.float32)
    handle.set_stream(side.ptr)
    with main:
        main.begin_capture()
        side.wait_event(main.record())
        handle.gemm(False, a.ctypes.data, a.ctypes.data, c.ctypes.data, 2, 2, 2)
        main.wait_event(side.record())
        graph = main.end_capture()
    assert [captured.stream for captured in graph.work] == [side]


def test_signatures_are_parsed_from_the_macro_expansions():
    signatures = emulated_gpu.kernel_signatures(kernels.source("batchnorm.cu"))
    params, synchronizes = signatures["bn_forward_f32"]
    assert synchronizes and not signatures["bn_apply_forward_f64"][1]
    assert [(p.name, p.ctype, p.pointer) for p in params[:5]] == [
        ("x", "float", True), ("gamma", "float", True), ("beta", "float", True),
        ("eps", "float", False), ("momentum", "float", False)]
    assert signatures["bias_activation_f64"][0][5] == emulated_gpu.Param("total", "long long",
                                                                         False)


# --- nnopt.fast.gpu, launcher by launcher -----------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("name, options", RULE_CASES)
def test_optimizer_steps_match_reference(gpu, rng, name, options, offset, dtype):
    """Every rule through OPTIMIZER_STEPS (offset 1: buffers that start one element into
    their allocation, the kernels' scalar path); Adam also with its step count in device
    memory, as inside a captured graph."""
    n = 1013
    start = rng.normal(size=n)
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), "float64", w=start)
    reference = optim.create(name, storage, use_fast_path=False, **options)
    cls, group = type(reference), reference.param_groups[0]
    step = gpu.OPTIMIZER_STEPS[cls.__name__]
    buffers = [np.zeros(n + offset, dtype) for _ in range(2 + len(cls.state_names))]
    p, g, *state = (b[offset:] for b in buffers)
    p[...] = start
    device_step = np.zeros(1, np.int32)
    for t in range(1, 5):
        g[...] = rng.normal(size=n) * rng.uniform(0.1, 5)
        storage.grad[...] = g
        reference.step()
        device_step += 1
        on_device = cls.step_scalars is not None and t % 2 == 0
        step(p, g, dict(zip(cls.state_names, state)), group, device_step if on_device else t)
    assert close(p, storage.data, 2 * tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, n", [(37, 33), (600, 24), (600, 30)])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_batchnorm_launchers_match_reference(gpu, cupy_stand_in, rng, m, n, dtype,
                                             activation, with_bias):
    """bn_forward/bn_backward with a block's bias and activation: (37, 33) the one-launch
    kernels (shared memory, __syncthreads), (600, 24) the split path with 16-byte loads,
    (600, 30) with 16-byte loads in float64 only."""
    from nnopt.fast.plan import bn_plan
    x = rng.normal(size=(m, n)) * rng.uniform(0.2, 4, n) + rng.normal(size=n) * 2
    gamma, beta, d = rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=(m, n))
    bias = rng.normal(size=n) if with_bias else np.zeros(n)
    y_ref, batch_mean, var_ref, dx_ref, dgamma_ref, dbeta_ref = block_reference(
        x, gamma, beta, bias, d, activation)
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    code = gpu.ACTIVATION_CODES[activation]
    run_mean, run_var = c(np.zeros(n)), c(np.ones(n))
    start = len(cupy_stand_in.launches)
    y, mean, inv_std = gpu.bn_forward(c(x), c(gamma), c(beta), 1e-5, 0.9, False, run_mean,
                                      run_var, bias=c(bias) if with_bias else None,
                                      activation=code)
    dgamma, dbeta = c(np.zeros(n)), c(np.zeros(n))
    dx = gpu.bn_backward(c(d), c(x), c(gamma), mean, inv_std, dgamma, dbeta, y=y,
                         activation=code)
    names = [launch[0] for launch in cupy_stand_in.launches[start:]]
    assert (bn_plan(m, n, 2)[0] > 1) == ("bn_forward_f32" not in names and
                                         "bn_forward_f64" not in names)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in ((y, y_ref), (dx, dx_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref),
                      (run_mean, 0.1 * batch_mean), (run_var, 0.9 + 0.1 * var_ref)):
        assert close(got, want, rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n, offset", [(24, 0), (30, 0), (24, 1)])
def test_split_path_takes_16_byte_loads_where_it_can(gpu, cupy_stand_in, monkeypatch, rng, n,
                                                     offset, dtype):
    """The split path's row walks load 16 bytes at a time (kernels *_f32x4 / *_f64x2) where
    n is a multiple of 4 (float32) or 2 (float64) and every array is 16-byte aligned, and
    one element at a time otherwise (n = 30 in float32; offset 1: the arrays are views
    starting one element into their buffers). Each feature's sums run in the same order
    either way: the results are the same bits."""
    from nnopt.fast import plan
    m, lanes = 600, 16 // np.dtype(dtype).itemsize

    def placed(a):  # a copy of ``a`` starting ``offset`` elements into its buffer
        buffer = np.empty(a.size + offset, dtype=dtype)
        view = buffer[offset:].reshape(a.shape)
        view[...] = a
        return view
    x = placed(rng.normal(size=(m, n)) * 3 + 1)
    d = placed(rng.normal(size=(m, n)))
    gamma, beta, bias = (rng.normal(size=n).astype(dtype) for _ in range(3))
    results = {}
    for vectors in (True, False):
        monkeypatch.setattr(plan, "BN_VECTORS", vectors)
        start = len(cupy_stand_in.launches)
        run_mean, run_var = np.zeros(n, dtype), np.ones(n, dtype)
        y, mean, inv_std = gpu.bn_forward(x, gamma, beta, 1e-5, 0.9, False, run_mean, run_var,
                                          out=placed(np.zeros((m, n))), bias=bias,
                                          activation=gpu.ACTIVATION_CODES["relu"])
        dgamma, dbeta = np.zeros(n, dtype), np.zeros(n, dtype)
        dx = gpu.bn_backward(d, x, gamma, mean, inv_std, dgamma, dbeta,
                             out=placed(np.zeros((m, n))), y=y,
                             activation=gpu.ACTIVATION_CODES["relu"])
        dbias = np.zeros(n, dtype)
        dh = gpu.activation_backward(d, y, gpu.ACTIVATION_CODES["tanh"], dbias=dbias,
                                     out=placed(np.zeros((m, n))))
        names = [launch[0] for launch in cupy_stand_in.launches[start:]]
        results[vectors] = (names, [np.array(a) for a in (y, run_mean, run_var, dx, dgamma,
                                                          dbeta, dh, dbias)])
    names, got = results[True]
    scalar_names, want = results[False]
    expect_vectors = n % lanes == 0 and offset == 0
    walks = [name for name in names if "partial" in name or "apply" in name or "split" in name]
    assert len(walks) == 5 and all(name.endswith(f"x{lanes}") == expect_vectors
                                   for name in walks), names
    assert not any(name.endswith(f"x{lanes}") for name in scalar_names)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def fused_product_cases():
    """Every combination on the two smaller shapes (k = 300 is sliced too, on 132 SMs); the
    textbook's first layer (64 x 784 x 128, a minute and a half of emulation in all) with
    its ReLU only: the activations' code paths are the same at every shape."""
    shapes = [(64, 784, 128, 64), (37, 300, 33, 70), (2, 5, 3, 1)]
    return [(weights, batchnorm, activation, sms, *shape, dtype)
            for weights, batchnorm, activation, sms, shape, dtype in itertools.product(
                [None, "write", "add"], [False, True], ["identity", "relu", "sigmoid"], [2, 132],
                shapes, [np.float32, np.float64])
            if shape[1] != 784 or activation == "relu"]


@pytest.mark.parametrize("weights, batchnorm, activation, sms, m, k, n, k_next, dtype",
                         fused_product_cases())
def test_fused_product_launchers_match_reference(gpu, cupy_stand_in, monkeypatch, rng, m, k, n,
                                                 k_next, sms, activation, batchnorm, weights,
                                                 dtype):
    """linear_*_forward: h = x @ w and the block's pass in one launch; linear_*_backward:
    dy = g @ w_next^T (the next block's deferred input gradient) and the block's backward
    pass in one, and (weights) the weight gradient x^T dh written or added, each block
    of the launch taking 32 of its rows. With 132 multiprocessors a long k is cut into
    slices whose sums the last block of each feature tile adds in order
    (plan.fused_slices): the same bits on every launch, and the tiles' counters back at
    zero after each."""
    from nnopt.fast import plan
    from nnopt.fast.shared import Scratch
    monkeypatch.setattr(gpu, "sms", lambda: sms)
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    x, w = c(rng.normal(size=(m, k))), c(rng.normal(size=(k, n)) / np.sqrt(k))
    g, w_next = c(rng.normal(size=(m, k_next))), c(rng.normal(size=(n, k_next)))
    gamma, beta, bias = c(rng.uniform(0.5, 2, n)), c(rng.normal(size=n)), c(rng.normal(size=n))
    code, scratch = gpu.ACTIVATION_CODES[activation], Scratch()
    h_ref, dy_ref = x.astype(np.float64) @ w, g.astype(np.float64) @ w_next.T.astype(np.float64)
    assert gpu.fuses_weight_grad(n, k_next)  # k_next short enough: one slice
    dw0 = c(rng.normal(size=(k, n)))

    def weight_grad():  # (x, dw, accumulate) for the backward launchers, or None
        if weights is None:
            return None
        dw = dw0.copy()
        return x, dw, weights == "add"
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    runs = []
    for _ in range(2):
        if batchnorm:
            run_mean, run_var = c(np.zeros(n)), c(np.ones(n))
            h = c(np.full((m, n), np.nan))
            y, mean, inv_std = gpu.linear_bn_forward(x, w, gamma, beta, 1e-5, 0.9, False,
                                                     run_mean, run_var, scratch, h=h, bias=bias,
                                                     activation=code)
            dgamma, dbeta = c(np.zeros(n)), c(np.zeros(n))
            wg = weight_grad()
            dh = gpu.linear_bn_backward(g, w_next, h, y, gamma, mean, inv_std, dgamma, dbeta,
                                        scratch, activation=code, weight_grad=wg)
            y_ref, batch_mean, var_ref, dh_ref, dgamma_ref, dbeta_ref = block_reference(
                h_ref, gamma, beta, bias, dy_ref, activation)
            pairs = [(h, h_ref), (y, y_ref), (dh, dh_ref), (dgamma, dgamma_ref),
                     (dbeta, dbeta_ref), (run_mean, 0.1 * batch_mean),
                     (run_var, 0.9 + 0.1 * var_ref)]
        else:
            layer = ACTIVATIONS[activation]() if activation != "identity" else None
            y_ref = layer.forward(h_ref + bias) if layer else h_ref + bias
            y = gpu.linear_activation_forward(x, w, bias, code, scratch)
            dbias = c(np.ones(n))
            wg = weight_grad()
            dh = gpu.linear_activation_backward(g, w_next, y, code, scratch, dbias=dbias,
                                                weight_grad=wg)
            dh_ref = layer.backward(dy_ref) if layer else dy_ref
            pairs = [(y, y_ref), (dh, dh_ref), (dbias, 1 + dh_ref.sum(axis=0))]
        if wg is not None:  # x^T dh, written or added to what was there
            pairs.append((wg[1], (dw0 if wg[2] else 0) + x.astype(np.float64).T @ dh_ref))
        for got, want in pairs:
            assert close(got, want, 10 * rtol)
        runs.append([np.array(got) for got, _ in pairs])
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first, second)
    slices = plan.fused_slices(n, k, sms)[0]
    assert (slices > 1) == (sms == 132 and k > plan.FUSED_MIN_SLICE)
    if slices > 1:
        (partial,) = scratch.arrays["linear_forward_partial"]  # the sliced launch's sums
        assert partial.shape == (slices, m, n)
        assert not np.any(scratch.arrays["counters"][0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("m, n", [(23, 9), (600, 9), (600, 12)])
def test_activation_launchers_match_the_layers(gpu, cupy_stand_in, rng, dtype, activation, m,
                                               n):
    """600 rows: the backward's split path (chunks of rows, then their bias sums in order;
    n = 12: with 16-byte loads)."""
    from nnopt.fast.plan import bn_plan
    h, d, bias = rng.normal(size=(m, n)) * 3, rng.normal(size=(m, n)), rng.normal(size=n)
    layer = ACTIVATIONS[activation]() if activation != "identity" else None
    y_ref = layer.forward(h + bias) if layer else h + bias
    dh_ref = layer.backward(d) if layer else d
    code = gpu.ACTIVATION_CODES[activation]
    hs = h.astype(dtype)
    y = gpu.activation_forward(hs, bias.astype(dtype), code, out=hs)  # in place, as a block does
    dbias = np.ones(n, dtype)
    dh = gpu.activation_backward(d.astype(dtype), y, code, dbias=dbias)
    assert y is hs
    split = "bias_grad_finalize" in cupy_stand_in.launches[-1][0]
    assert split == (bn_plan(m, n, 2)[0] > 1)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert close(y, y_ref, rtol) and close(dh, dh_ref, rtol)
    assert close(dbias, 1 + dh_ref.sum(axis=0), 10 * rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_tiled_gemm_matches_numpy(gpu, rng, dtype, trans_a, trans_b):
    """The GEMM captured graphs fall back on (16x16 tiles, shared memory): sizes that are
    not multiples of the tile."""
    m, k, n = 19, 35, 17
    a, b = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    a_in = (a.T if trans_a else a).astype(dtype)
    b_in = (b.T if trans_b else b).astype(dtype)
    c = gpu.gemm(np.ascontiguousarray(a_in), np.ascontiguousarray(b_in), trans_a, trans_b)
    assert c.shape == (m, n) and close(c, a @ b, 1e-5 if dtype == np.float32 else 1e-12)


def test_gemm_writes_into_out(gpu, cupy_stand_in, rng):
    """Into a contiguous ``out`` directly (one graph node, no copy); a strided ``out`` gets
    a copy; a wrong shape is an error."""
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(7, 3))
    out = np.zeros((5, 3))
    assert gpu.gemm(a, b, out=out) is out and close(out, a @ b, 1e-12)
    assert cupy_stand_in.launches[-1][4][2] == out.ctypes.data
    wide = np.zeros((5, 6))
    assert gpu.gemm(a, b, out=wide[:, ::2]) is not None and close(wide[:, ::2], a @ b, 1e-12)
    assert np.all(wide[:, 1::2] == 0)
    with pytest.raises(ValueError, match=r"out is \(3, 5\)"):
        gpu.gemm(a, b, out=np.zeros((3, 5)))
    assert gpu.gemm(np.zeros((0, 7)), b).shape == (0, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, c", [(1, 1), (64, 10), (300, 37), (1100, 10)])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64, np.uint8])
def test_softmax_cross_entropy_matches_the_layer(gpu, cupy_stand_in, rng, m, c, dtype,
                                                 label_dtype):
    """One launch for loss, softmax and gradient up to 256 rows; beyond, the blocks' sums
    added by a second (300 and 1,100 rows)."""
    from nnopt.losses import SoftmaxCrossEntropy
    logits = rng.normal(size=(m, c)) * 4
    labels = rng.integers(0, c, size=m)
    layer = SoftmaxCrossEntropy()
    want = layer.forward(logits, labels)
    want_grad = layer.backward()
    prob, grad = np.full((m, c), np.nan, dtype), np.full((m, c), np.nan, dtype)
    start = len(cupy_stand_in.launches)
    value, n_bad = gpu.softmax_cross_entropy(logits.astype(dtype), labels.astype(label_dtype),
                                             prob, grad)
    assert n_bad == 0 and value.shape == () and value.dtype == dtype
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert close(value, want, rtol) and close(prob, layer.prob, rtol)
    assert close(grad, want_grad, rtol)
    kind = "i32" if label_dtype == np.int32 else "i64"  # other integer labels: made int64
    names = [launch[0] for launch in cupy_stand_in.launches[start:]]
    if m <= 256:
        assert len(names) == 1 and names[0].endswith(kind)
    else:  # the blocks' sums, added in order by a second launch
        assert len(names) == 2 and names[0].endswith(kind) and "finalize" in names[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(1, 5, 1), (37, 100, 10), (64, 16, 10), (64, 40, 32)])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_linear_cross_entropy_matches_the_layers(gpu, cupy_stand_in, rng, m, k, n, dtype,
                                                 label_dtype):
    """The last block's logits x @ w + b and softmax cross-entropy in one launch: logits,
    softmax, gradient and mean loss against the layers; a label outside the classes makes
    the loss NaN and is counted."""
    from nnopt.losses import SoftmaxCrossEntropy
    x, w, b = rng.normal(size=(m, k)), rng.normal(size=(k, n)), rng.normal(size=n)
    labels = rng.integers(0, n, size=m)
    logits_ref = x @ w + b
    layer = SoftmaxCrossEntropy()
    want = layer.forward(logits_ref, labels)
    want_grad = layer.backward()
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    logits, prob, grad = (np.full((m, n), np.nan, dtype) for _ in range(3))
    start = len(cupy_stand_in.launches)
    value, n_bad = gpu.linear_cross_entropy(c(x), c(w), c(b), labels.astype(label_dtype),
                                            logits, prob, grad)
    names = [launch[0] for launch in cupy_stand_in.launches[start:]]
    kind = "i32" if label_dtype == np.int32 else "i64"
    assert names == [f"linear_cross_entropy_{'f32' if dtype == np.float32 else 'f64'}_{kind}"]
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    assert n_bad == 0 and value.shape == () and close(value, want, rtol)
    for got, ref in ((logits, logits_ref), (prob, layer.prob), (grad, want_grad)):
        assert close(got, ref, rtol)
    labels[-1] = n  # out of range
    value, _ = gpu.linear_cross_entropy(c(x), c(w), c(b), labels.astype(label_dtype), logits,
                                        prob, grad)
    assert np.isnan(value)


def test_other_losses_compute_a_deferred_output(gpu, monkeypatch):
    """Sequential.forward_to_loss leaves the last block's output to the loss: softmax
    cross-entropy against one-hot rows (not labels) and MSE compute it first
    (materialize). The step equals the CPU's."""
    from nnopt.losses import MSELoss, SoftmaxCrossEntropy

    def step(model, loss):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(16, 12))
        target = np.eye(5)[rng.integers(0, 5, size=16)]
        model.zero_grad()
        value = float(model.loss_and_backward(x, target, loss))
        return value, {p.name: np.array(p.grad) for p in model.parameters()}
    for make_loss in (SoftmaxCrossEntropy, MSELoss):
        want = step(nnopt.mlp([12, 8, 5], seed=1, dtype="float64"), make_loss())
        with monkeypatch.context() as patch:
            for module in emulated_gpu.FAST_PATH_USERS:
                patch.setattr(__import__(module, fromlist=["_"]), "fast_for",
                              emulated_gpu.fast_for_emulated(gpu))
            model = nnopt.mlp([12, 8, 5], seed=1, dtype="float64")
            from nnopt.block import DeferredOutput
            assert isinstance(model.forward_to_loss(np.zeros((16, 12))), DeferredOutput)
            got = step(model, make_loss())
        assert got[0] == pytest.approx(want[0], rel=1e-12), make_loss.__name__
        for name in want[1]:
            assert close(got[1][name], want[1][name], 1e-10), name


@pytest.mark.parametrize("m", [6, 600])
def test_softmax_cross_entropy_with_a_bad_label_is_nan(gpu, rng, m):
    """Out of range (in the last block, for 600 rows): NaN loss (the GPU cannot raise
    without a synchronization); the other rows' gradients as usual."""
    logits, labels = rng.normal(size=(m, 4)), rng.integers(0, 4, size=m)
    labels[0], labels[m - 2] = 0, 4
    prob, grad = np.empty((m, 4)), np.empty((m, 4))
    value, _ = gpu.softmax_cross_entropy(logits, labels, prob, grad)
    assert np.isnan(value)
    assert close(grad[m - 2], prob[m - 2] / m, 1e-15)
    assert close(grad[0, 0], (prob[0, 0] - 1) / m, 1e-15)


# --- a fused block on the emulated device -----------------------------------------------------
def run_block(gpu, monkeypatch, shape, batchnorm, activation, dtype, seed, captured=False):
    """(fused on the emulated GPU, layered on NumPy in float64) results of one forward and
    backward."""
    import nnopt.block
    from tests.test_block import as_reference, fused_and_layered
    monkeypatch.setattr(nnopt.block, "fast_for", lambda *arrays: gpu)
    m, n_in, n_out = shape
    fused, layered = fused_and_layered(n_in, n_out, batchnorm, activation, dtype, seed=seed)
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(m, n_in)) * 2 + 1).astype(dtype)
    d = rng.normal(size=(m, n_out)).astype(dtype)
    results = []
    for model in (fused, layered):
        model.zero_grad()
        xm, dm = as_reference(model, fused, x, d)
        with capture_mode() if captured and model is fused else _nothing():
            y = model.forward(xm).copy()
            dx = model.backward(dm).copy()
        results.append((y, dx, model.state_dict(),
                        {p.name: p.grad.copy() for p in model.parameters()},
                        model.layers[0].W.grad.ctypes.data))
    assert fused.steps[0].saved is not None, "the block ran its layers, not the GPU kernels"
    return results


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_block_results_agree(results, batchnorm, dtype):
    (y, dx, state, grads, _), (y_ref, dx_ref, state_ref, grads_ref, _) = results
    rtol = 2e-4 if dtype == "float32" else 1e-10
    assert close(y, y_ref, rtol) and close(dx, dx_ref, rtol)
    for name in state_ref:
        assert close(state[name], state_ref[name], rtol), name
    for name, want in grads_ref.items():
        if batchnorm and name == "fc1.b":
            assert np.all(grads[name] == 0)  # zero by construction (nnopt.block)
        else:
            assert close(grads[name], want, rtol), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 3, 1), (37, 20, 33), (600, 40, 24)])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
def test_fused_block_on_the_emulated_gpu_matches_its_layers(gpu, monkeypatch, rng, shape,
                                                            dtype, batchnorm, activation):
    """nnopt.block's fused passes through nnopt.fast.gpu: the same check as
    tests/test_gpu.py's on a real GPU."""
    results = run_block(gpu, monkeypatch, shape, batchnorm, activation, dtype,
                        seed=int(rng.integers(1000)))
    assert_block_results_agree(results, batchnorm, dtype)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_fused_block_inside_a_capture_takes_the_capturable_gemm(cupy_stand_in, monkeypatch,
                                                                rng, batchnorm):
    """While capturing, a block's products (unfused: plan.FUSED_PRODUCTS off) go through
    graph_gemm, transposed views as transpose flags; without cuBLAS (turned off here),
    nnopt's tiled kernel."""
    from nnopt.fast import plan
    monkeypatch.setattr(plan, "FUSED_PRODUCTS", False)
    monkeypatch.setenv("NNOPT_CUBLAS", "off")
    gpu = emulated_gpu.load_gpu_module(cupy_stand_in)  # its own handle cache: warns once
    start = len(cupy_stand_in.launches)
    with pytest.warns(RuntimeWarning, match="NNOPT_CUBLAS"):
        results = run_block(gpu, monkeypatch, (21, 18, 17), batchnorm, "relu", "float64",
                            seed=int(rng.integers(1000)), captured=True)
    gemms = [launch for launch in cupy_stand_in.launches[start:] if launch[0] == "gemm_f64"]
    # h = x W, dW = x^T dh, dx = dh W^T: the transposed views passed as flags, not copied,
    # and each product written straight into the block's buffer (W.grad for dW)
    assert sorted(launch[3][-2:] for launch in gemms) == [(0, 0), (0, 1), (1, 0)]
    assert results[0][4] in [launch[4][2] for launch in gemms]
    assert_block_results_agree(results, batchnorm, "float64")


# --- whole training steps on the emulated device ----------------------------------------------
def train_steps(monkeypatch, fast_for, name, options, batchnorm, fused, dtype, steps=3):
    """Parameters and BN buffers of a small textbook-shaped net after ``steps`` steps, every
    layer's and the optimizer's fast path looked up through ``fast_for``."""
    import importlib
    for module in emulated_gpu.FAST_PATH_USERS:
        monkeypatch.setattr(importlib.import_module(module), "fast_for", fast_for)
    model = nnopt.mlp([30, 24, 16, 10], "relu", batchnorm=batchnorm, seed=3, dtype=dtype,
                      fused=fused)
    opt = optim.create(name, model.flat, **options)
    loss = nnopt.SoftmaxCrossEntropy()
    rng = np.random.default_rng(7)
    for _ in range(steps):
        x = rng.normal(size=(40, 30)).astype(dtype)
        y = rng.integers(0, 10, size=40)
        model.zero_grad()
        model.loss_and_backward(x, y, loss)
        opt.step()
    return {k: np.array(v, dtype=np.float64) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("batchnorm, fused, fused_products", [
    (True, True, True), (True, True, False), (True, False, True), (False, True, True),
    (False, True, False)])
@pytest.mark.parametrize("name, options", CASES)
def test_training_steps_on_the_emulated_gpu_match_the_reference(gpu, cupy_stand_in, monkeypatch,
                                                                name, options, batchnorm, fused,
                                                                fused_products):
    """The eager GPU training step of nnopt.train --device gpu (blocks or layers, BN layer
    kernels, ReLU, every optimizer's launcher on the flat buffers), in float64, against the
    reference math. Blocks at this batch of 40 fuse their products into their passes
    (linear_forward, and linear_backward taking the next block's deferred input gradient),
    unless plan.FUSED_PRODUCTS is off."""
    from nnopt.fast import plan
    monkeypatch.setattr(plan, "FUSED_PRODUCTS", fused_products)
    want = train_steps(monkeypatch, lambda *arrays: None, name, options, batchnorm, fused,
                       "float64")
    start = len(cupy_stand_in.launches)
    got = train_steps(monkeypatch, emulated_gpu.fast_for_emulated(gpu), name, options,
                      batchnorm, fused, "float64")
    launched = {launch[0] for launch in cupy_stand_in.launches[start:]}
    rule = optim.create(name, FlatParameters.from_arrays(nnopt.get_namespace("cpu"), "float64",
                                                         w=np.zeros(1)), **options)
    assert f"{rule.rule_name(rule.param_groups[0])}_f64" in launched
    products_fused = fused and fused_products
    assert ("bn_forward_f64" in launched) == (batchnorm and not products_fused)
    assert ("linear_forward_f64" in launched) == ("linear_backward_f64" in launched) == products_fused
    assert ("activation_backward_f64" in launched) == fused  # the last FC: a block too
    # the last block's product inside the loss's launch where products are fused
    assert ("linear_cross_entropy_f64_i64" in launched) == products_fused
    assert ("softmax_cross_entropy_f64_i64" in launched) == (not products_fused)
    assert want.keys() == got.keys()
    for key in want:
        assert close(got[key], want[key], 1e-9), key


def test_a_deferred_input_gradient_reaches_a_block_that_runs_its_layers(gpu, monkeypatch):
    """A block whose BN asks for the reference math (use_fast_path=False) runs its layers:
    the next block's deferred input gradient reaches it as a DeferredInputGrad, which it
    computes (materialize) before its layers' backward. The step equals the CPU's."""
    from nnopt.block import DeferredInputGrad

    def step(model):
        model.steps[0].batchnorm.use_fast_path = False
        rng = np.random.default_rng(2)
        x, y = rng.normal(size=(16, 12)), rng.integers(0, 5, size=16)
        model.zero_grad()
        model.loss_and_backward(x, y, nnopt.SoftmaxCrossEntropy())
        return {p.name: np.array(p.grad) for p in model.parameters()}
    want = step(nnopt.mlp([12, 8, 6, 5], batchnorm=True, seed=1, dtype="float64"))
    for module in emulated_gpu.FAST_PATH_USERS:
        monkeypatch.setattr(__import__(module, fromlist=["_"]), "fast_for",
                            emulated_gpu.fast_for_emulated(gpu))
    model = nnopt.mlp([12, 8, 6, 5], batchnorm=True, seed=1, dtype="float64")
    received = []
    backward = type(model.steps[0]).backward
    monkeypatch.setattr(model.steps[0], "backward",
                        lambda dy: received.append(type(dy)) or backward(model.steps[0], dy))
    got = step(model)
    assert received == [DeferredInputGrad] and model.steps[0].saved is None
    for name in want:
        assert close(got[name], want[name], 1e-10), name


# --- a training run, as python -m nnopt.train --device gpu ------------------------------------
def test_a_replay_is_ordered_after_the_callers_work_and_before_its_next(monkeypatch):
    """CapturedStep.step called on another stream (the one the batch was made on): the
    graph's stream waits for that stream's work before it copies the batch in and replays,
    and the caller's stream waits for the replay before whatever it queues next (reading
    the loss, the next batch). Called on the graph's own stream, nothing waits. On a GPU a
    missing wait is a race that reads half-written batches now and then; the emulator runs
    eager work at once, so its log of waits and replays is what shows it."""
    import sys

    from nnopt.graph import CapturedStep
    emulated_gpu.install(monkeypatch)
    cp = sys.modules["cupy"]
    model = nnopt.mlp([784, 24, 10], batchnorm=True, seed=0, device="cpu")
    captured = CapturedStep(model, optim.SGD(model, 0.1), nnopt.SoftmaxCrossEntropy(),
                            (32, 784), (32,))
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 784), dtype=np.float32), rng.integers(0, 10, 32)
    graph = captured.stream
    for caller in (cp.cuda.get_current_stream(), cp.cuda.Stream(non_blocking=True)):
        del cp.stream_log[:]
        with caller:
            captured.step(x, y)
        assert cp.stream_log == [("wait", graph.ptr, caller.ptr), ("replay", graph.ptr),
                                 ("wait", caller.ptr, graph.ptr)]
    del cp.stream_log[:]
    with graph:
        captured.step(x, y)
    assert cp.stream_log == [("replay", graph.ptr)]


def test_training_run_on_the_emulated_gpu_follows_the_cpu_run(monkeypatch, tmp_path):
    """The GPU training loop (a captured step replayed for full batches, the last partial
    batch eager, a learning-rate schedule that captures the graph again each epoch) on the
    emulated device, against the same run on the CPU kernels."""
    import json

    import nnopt.graph
    import nnopt.train
    import nnopt.train_loop
    # 1,400 training images (the rest held out): 10 full batches and a partial one per epoch
    args = ["--epochs", "2", "--sizes", "784,24,16,10", "--val-size", "6600", "--batch-size",
            "128", "--schedule", "step", "--schedule-opt", "step_size=1", "--quiet"]
    assert nnopt.train.main(args + ["--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0

    emulated_gpu.install(monkeypatch)
    numpy_namespace = nnopt.get_namespace("cpu")
    monkeypatch.setattr(nnopt.train, "get_namespace", lambda device: numpy_namespace)
    monkeypatch.setattr(nnopt.train_loop, "backend_name", lambda xp: "cupy")
    captures = []
    capture = nnopt.graph.CapturedStep._capture
    monkeypatch.setattr(nnopt.graph.CapturedStep, "_capture",
                        lambda self: captures.append(1) or capture(self))
    assert nnopt.train.main(args + ["--device", "gpu", "--out", str(tmp_path / "gpu")]) == 0

    cpu, gpu = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("cpu", "gpu"))
    assert len(captures) == 2  # the first epoch's graph, then one with the scheduled rate
    assert gpu["iterations"] == cpu["iterations"] == 22
    assert abs(gpu["test_loss"] - cpu["test_loss"]) < 1e-3 * cpu["test_loss"], (gpu, cpu)
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 0.005, (gpu, cpu)
