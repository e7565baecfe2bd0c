"""GPU only (pytest --backend cupy): the CUDA kernels against the reference math, and the
captured CUDA-graph training step against the eager one.

``pytest --backend emulated tests/test_gpu.py`` runs the same tests without a GPU, on the
emulated device of tests/emulated_gpu.py (NumPy arrays, the kernel sources compiled for
the host; graphs recorded and replayed; nnopt's cuBLAS handle on a libcublas that computes
on the host)."""
import numpy as np
import pytest

import nnopt
from nnopt import optim
from nnopt.backend import backend_name, to_numpy
from nnopt.batchnorm import batchnorm_backward, batchnorm_forward
from nnopt.params import FlatParameters
from tests.helpers import dev, host


@pytest.fixture
def gpu(xp, backend, monkeypatch):
    if backend == "emulated":
        from tests import emulated_gpu
        if emulated_gpu.compiler() is None:
            pytest.skip("no C++ compiler to build the emulated kernels")
        return emulated_gpu.install(monkeypatch)
    if backend_name(xp) != "cupy":
        pytest.skip("GPU kernels: run with --backend cupy on a machine with a GPU")
    from nnopt.fast import gpu_kernels
    kernels = gpu_kernels()
    assert kernels is not None, "the CUDA kernels failed to load"
    return kernels




VARIANTS = [("sgd", {}), ("momentum", {}), ("momentum", {"buffer": "torch"}), ("nag", {}),
            ("nag", {"buffer": "torch"}), ("adagrad", {}), ("adadelta", {}),
            ("adadelta", {"lr_scales_step": True, "lr": 0.5}), ("rmsprop", {}),
            ("rmsprop", {"eps_inside_root": False}), ("adam", {"betas": (0.8, 0.95)}),
            # weight decay inside the kernels' one pass: L2 and decoupled (AdamW)
            ("sgd", {"weight_decay": 0.1}), ("adam", {"weight_decay": 0.1}),
            ("adamw", {"weight_decay": 0.2})]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 1013, 1_000_003])
@pytest.mark.parametrize("name, options", VARIANTS)
def test_gpu_step_matches_reference(xp, gpu, rng, name, options, n, dtype):
    start = rng.normal(size=n)
    fast_store = FlatParameters.from_arrays(xp, dtype, w=start)
    ref_store = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), "float64", w=start)
    hyper = {"lr": 0.05, **options}
    fast = optim.create(name, fast_store, **hyper)
    ref = optim.create(name, ref_store, use_fast_path=False, **hyper)
    assert fast.fast_path(fast_store.data) is gpu.OPTIMIZER_STEPS[type(fast).__name__]
    for _ in range(4):
        g = rng.normal(size=n)
        fast_store.grad[...] = dev(xp, g)
        ref_store.grad[...] = g
        fast.step()
        ref.step()
    tol = 2e-5 if dtype == "float32" else 1e-12
    got = host(fast_store.data)
    assert np.max(np.abs(got - ref_store.data)) <= tol * np.max(np.abs(ref_store.data))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 3), (64, 128), (301, 77), (1024, 30), (4096, 256)])
def test_gpu_batchnorm_matches_reference(xp, gpu, rng, shape, dtype):
    x = rng.normal(size=shape) * rng.uniform(0.2, 4, shape[1]) + rng.normal(size=shape[1]) * 2
    gamma, beta, d = rng.uniform(0.5, 2, shape[1]), rng.normal(size=shape[1]), rng.normal(size=shape)
    z_ref, mean_ref, var_ref, cache = batchnorm_forward(x, gamma, beta, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = batchnorm_backward(d, cache)
    c = lambda a: dev(xp, np.ascontiguousarray(a), getattr(xp, dtype))  # noqa: E731
    run_mean, run_var = c(np.zeros(shape[1])), c(np.ones(shape[1]))
    z, mean, inv_std = gpu.bn_forward(c(x), c(gamma), c(beta), 1e-5, 0.9, False, run_mean, run_var)
    dgamma, dbeta = c(np.zeros(shape[1])), c(np.zeros(shape[1]))
    dx = gpu.bn_backward(c(d), c(x), c(gamma), mean, inv_std, dgamma, dbeta)
    tol = 1e-4 if dtype == "float32" else 1e-10
    for got, want in ((z, z_ref), (mean, mean_ref), (dx, dx_ref), (dgamma, dgamma_ref),
                      (dbeta, dbeta_ref), (run_mean, 0.1 * mean_ref),
                      (run_var, 0.9 + 0.1 * var_ref), (inv_std, 1 / np.sqrt(var_ref + 1e-5))):
        assert np.max(np.abs(host(got) - want)) <= tol * max(np.max(np.abs(want)), 1.0)


@pytest.mark.parametrize("route", ["gemm", "graph_gemm"])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True)])
def test_gemm_matches_matmul(xp, gpu, rng, trans_a, trans_b, route):
    a = rng.normal(size=(77, 45) if not trans_a else (45, 77))
    b = rng.normal(size=(45, 33) if not trans_b else (33, 45))
    want = (a.T if trans_a else a) @ (b.T if trans_b else b)
    got = host(getattr(gpu, route)(dev(xp, a), dev(xp, b), trans_a, trans_b))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    got32 = host(getattr(gpu, route)(dev(xp, a, xp.float32), dev(xp, b, xp.float32), trans_a, trans_b))
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_a", [False, True])
def test_tiled_gemm_walks_row_tiles_beyond_the_grid(xp, gpu, backend, rng, monkeypatch, trans_a):
    """CUDA caps gridDim.y at 65535 row tiles (1,048,560 rows): each block of the tiled
    GEMM walks down the rows in steps of the grid. Here the cap is lowered to 2 (77 rows:
    5 tiles); on a GPU also one product of 1,048,577 rows at the real cap."""
    monkeypatch.setattr(gpu, "GRID_Y_LIMIT", 2)
    a = rng.normal(size=(45, 77) if trans_a else (77, 45))
    b = rng.normal(size=(45, 33))
    want = (a.T if trans_a else a) @ b
    np.testing.assert_allclose(host(gpu.gemm(dev(xp, a), dev(xp, b), trans_a)), want,
                               rtol=1e-10, atol=1e-10)
    launches = getattr(gpu.cupy, "launches", None)  # (recorded where emulated)
    if launches is not None:
        assert launches[-1][0] == "gemm_f64" and launches[-1][1] == (3, 2)
    if backend == "cupy":
        monkeypatch.undo()
        tall = rng.normal(size=(65535 * 16 + 1, 2)).astype(np.float32)
        got = host(gpu.gemm(dev(xp, tall), dev(xp, b[:2, :3], xp.float32)))
        np.testing.assert_allclose(got, tall @ b[:2, :3].astype(np.float32), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("route", ["gemm", "graph_gemm"])
def test_gemm_writes_into_a_view_of_a_flat_buffer(xp, gpu, rng, route):
    """As a block's dW lands in W.grad, a view into the flat gradient buffer."""
    a, b = rng.normal(size=(45, 77)), rng.normal(size=(45, 33))
    flat = xp.zeros(5 + 77 * 33 + 7, dtype=xp.float64)
    out = xp.reshape(flat[5:5 + 77 * 33], (77, 33))
    assert getattr(gpu, route)(dev(xp, a), dev(xp, b), True, False, out=out) is out
    np.testing.assert_allclose(host(out), a.T @ b, rtol=1e-10, atol=1e-10)
    assert np.all(host(flat[:5]) == 0) and np.all(host(flat[5 + 77 * 33:]) == 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("m, c", [(64, 10), (8192, 10), (300, 37)])
def test_gpu_softmax_cross_entropy_matches_reference(xp, gpu, rng, m, c, dtype):
    from nnopt.losses import SoftmaxCrossEntropy
    logits, labels = rng.normal(size=(m, c)) * 4, rng.integers(0, c, size=m)
    reference = SoftmaxCrossEntropy()
    want = reference.forward(logits, labels)
    want_grad = reference.backward()
    fused = SoftmaxCrossEntropy()
    value, grad = fused.forward_backward(dev(xp, logits, getattr(xp, dtype)), dev(xp, labels))
    assert fused.target is None, "the fused kernel did not run"
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert abs(float(value) - want) <= tol * max(abs(want), 1.0)
    assert np.max(np.abs(host(grad) - want_grad)) <= tol * np.max(np.abs(want_grad))
    assert np.max(np.abs(host(fused.prob) - reference.prob)) <= tol


def test_cublas_loads_and_is_captured(xp, gpu, rng):
    """nnopt's own cuBLAS handle: found, and its GEMM captured and replayed in a graph."""
    import cupy
    assert gpu.cublas_handle() is not None, gpu.HANDLES.route(cupy.cuda.Device().id)
    a = dev(xp, rng.normal(size=(64, 784)), xp.float32)
    b = dev(xp, rng.normal(size=(784, 128)), xp.float32)
    cupy.cuda.get_current_stream().synchronize()  # a and b, copied on this stream, are there
    stream = cupy.cuda.Stream(non_blocking=True)
    assert gpu.prepare_capture(stream).startswith("cublas ")
    with stream:
        stream.begin_capture()
        c = gpu.graph_gemm(a, b)
        graph = stream.end_capture()
        graph.launch(stream)
    stream.synchronize()
    np.testing.assert_allclose(host(c), host(a) @ host(b), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_gpu_step_on_misaligned_views(xp, gpu, rng, name):
    """Buffers starting one element into their allocation take the scalar loop."""
    cls = optim.OPTIMIZERS[name]
    hp = optim.create(name, FlatParameters.from_arrays(xp, "float32", w=np.zeros(3)), lr=0.05).param_groups[0]
    n = 1001
    base = {k: rng.normal(size=n + 1).astype(np.float32) for k in ("p", "g", *cls.state_names)}
    for k in cls.state_names:
        base[k] = np.abs(base[k])
    results = []
    for offset in (0, 1):
        arrays = {k: dev(xp, v.copy())[1:] if offset else dev(xp, v[1:].copy())
                  for k, v in base.items()}
        assert arrays["p"].size == n
        gpu.OPTIMIZER_STEPS[cls.__name__](arrays["p"], arrays["g"], arrays, hp, 3)
        results.append(host(arrays["p"]))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=0)


class EagerAndCaptured:
    """Two copies of one model: one stepped eagerly, one through a captured graph."""

    def __init__(self, xp, sizes, name, lr, batch, seed, fused=True):
        from nnopt.graph import CapturedStep
        make = lambda: nnopt.mlp(sizes, batchnorm=True, seed=seed, device=xp,  # noqa: E731
                                 fused=fused)
        self.xp, self.batch, self.n_in = xp, batch, sizes[0]
        self.eager_model, self.graph_model = make(), make()
        self.eager_opt = optim.create(name, self.eager_model, lr=lr)
        self.graph_opt = optim.create(name, self.graph_model, lr=lr)
        self.loss_fn = nnopt.SoftmaxCrossEntropy()
        self.captured = CapturedStep(self.graph_model, self.graph_opt,
                                     nnopt.SoftmaxCrossEntropy(), (batch, sizes[0]), (batch,))
        # the eager step's products on a stream prepared as the graph's, through the same
        # handle and workspace rule: the same GEMM algorithms on both sides (see step)
        import cupy
        self.eager_stream = cupy.cuda.Stream()
        nnopt.fast.gpu_kernels().prepare_capture(self.eager_stream)

    def step(self, rng):
        """One step of each on the same fresh batch; their losses agree. Returns it."""
        from nnopt.fast import capture_mode
        xp = self.xp
        x = dev(xp, rng.random((self.batch, self.n_in)), xp.float32)
        y = dev(xp, rng.integers(0, 10, self.batch))
        self.eager_model.zero_grad()
        # The same GEMM on both sides (nnopt's cuBLAS handle, as in the graph): Adam's
        # normalized step turns summation-order differences of near-zero gradients (one
        # GEMM against another) into steps of size ~lr, which is not what this compares.
        with self.eager_stream, capture_mode():
            eager_loss = float(self.eager_model.loss_and_backward(x, y, self.loss_fn))
        self.eager_opt.step()
        graph_loss = self.captured.step(x, y)
        self.captured.synchronize()
        assert float(graph_loss) == pytest.approx(eager_loss, rel=1e-4)
        return x, y

    def assert_same_state(self):
        self.captured.release()
        a, b = self.eager_model.state_dict(), self.graph_model.state_dict()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_captured_step_matches_eager(xp, gpu, rng, name):
    pair = EagerAndCaptured(xp, [784, 128, 64, 32, 16, 10], name, lr=0.01, batch=64, seed=1)
    assert pair.captured.gemm_route.startswith("cublas "), pair.captured.gemm_route
    for _ in range(5):
        pair.step(rng)
    pair.assert_same_state()
    assert pair.graph_opt.state[0]["step"] == pair.eager_opt.state[0]["step"] == 5


def test_a_released_graph_is_captured_anew(xp, gpu, rng, monkeypatch):
    """Released, the graph's device step counters are freed: the next step captures a new
    graph (replaying the old one would write through a freed pointer). The warm-up
    launches the kernels the capture will, Adam's device-step one included (loading a
    kernel inside a capture needs a CUDA 12.3+ driver)."""
    from nnopt.graph import CapturedStep
    fetched, fetch = [], gpu.function
    with monkeypatch.context() as patch:
        patch.setattr(CapturedStep, "_capture", lambda self: None)  # the warm-up alone
        patch.setattr(gpu, "function", lambda source, name: fetched.append(name) or
                      fetch(source, name))
        model = nnopt.mlp([784, 64, 10], batchnorm=True, seed=0, device=xp)
        opt = optim.Adam(model, 1e-3)
        CapturedStep(model, opt, nnopt.SoftmaxCrossEntropy(), (32, 784), (32,))
    assert any(name.startswith("adam_device_step_") for name in fetched), fetched
    assert opt.device_steps is None and opt.state[0]["step"] == 0  # the warm-up undone
    pair = EagerAndCaptured(xp, [784, 64, 10], "adam", lr=0.01, batch=32, seed=3)
    for _ in range(2):
        pair.step(rng)
    pair.assert_same_state()  # releases the graph
    assert pair.captured.graph is None
    for _ in range(2):
        pair.step(rng)
    pair.assert_same_state()
    assert pair.graph_opt.state[0]["step"] == pair.eager_opt.state[0]["step"] == 4


def test_captured_layers_step_matches_eager(xp, gpu, backend, rng):
    """The textbook's layer-by-layer model (fused=False) captured too: its bias adds, bias
    gradient sums and BN layers are CuPy array operations inside the graph besides nnopt's
    kernels (bench_gpu times this graph against the blocks' one)."""
    if backend == "emulated":
        pytest.skip("the emulator records kernel launches only: the layers' array "
                    "operations would run once at capture, not at each replay")
    pair = EagerAndCaptured(xp, [784, 128, 64, 32, 16, 10], "sgd", lr=0.01, batch=64,
                            seed=1, fused=False)
    for _ in range(5):
        pair.step(rng)
    pair.assert_same_state()


def test_a_dead_streams_address_passes_nothing_on(xp, gpu, monkeypatch):
    """CUDA gives a destroyed stream's address to the next stream made. nnopt's cuBLAS
    handle keys each stream's workspace on that address, and gpu.side_stream each side
    stream: once the stream has died, the next one at its address gets the workspace size
    it asks for and a side stream of its own."""
    import gc

    class Reborn:  # a new stream at the dead one's address (weakly referable, as CuPy's)
        def __init__(self, ptr):
            self.ptr = ptr
    monkeypatch.setattr(gpu, "_SIDE_STREAMS", {})  # nothing of this test outlives it
    monkeypatch.setenv("NNOPT_CUBLAS_WORKSPACE", str(1 << 16))
    handle = gpu.cublas_handle()
    stream = gpu.cupy.cuda.Stream(non_blocking=True)
    gpu.prepare_capture(stream)
    ptr, side = stream.ptr, gpu.side_stream(stream)
    assert handle.workspaces[ptr][2] == 1 << 16 and gpu.side_stream(stream) is side
    del stream
    gc.collect()
    reborn = Reborn(ptr)
    monkeypatch.setenv("NNOPT_CUBLAS_WORKSPACE", "0")
    gpu.prepare_capture(reborn)
    assert handle.workspaces[ptr][2] == 0 and gpu.side_stream(reborn) is not side
    kept = gpu.side_stream(reborn)
    gpu.prepare_capture(reborn)  # while it lives, it keeps what it got
    assert handle.workspaces[ptr][2] == 0 and gpu.side_stream(reborn) is kept
    handle.set_stream(0)
    handle.forget_stream(ptr)  # (the stand-in's address: no workspace left behind)


def test_captured_steps_one_after_another_keep_no_dead_workspace(xp, gpu, monkeypatch):
    """Captured steps made one after another in one process (a sweep of runs): each new one
    frees the cuBLAS workspaces of the steps that died (their streams' and side streams'),
    after synchronizing the device, outside any capture. Before, every dead step kept its
    two workspaces (64 MiB) for the life of the process."""
    import gc
    from nnopt.graph import CapturedStep
    monkeypatch.setattr(gpu, "_SIDE_STREAMS", {})
    monkeypatch.setenv("NNOPT_CUBLAS_WORKSPACE", str(1 << 12))
    handle = gpu.cublas_handle()
    model = nnopt.mlp([16, 8, 4], batchnorm=True, seed=0, device=xp)
    synchronized = getattr(gpu.cupy, "synchronizations", None)  # (counted where emulated)
    kept, step = [], None
    for _ in range(3):
        step = None
        gc.collect()
        step = CapturedStep(model, optim.SGD(model, lr=0.1), nnopt.SoftmaxCrossEntropy(),
                            (8, 16), (8,))
        live = {step.stream.ptr, gpu.side_stream(step.stream).ptr}
        assert live <= set(handle.workspaces) and handle.retired == []
        kept.append(len(handle.workspaces))
    assert kept[1] == kept[0] and kept[2] == kept[0], kept
    assert len(gpu._SIDE_STREAMS) == 1
    if synchronized is not None:
        assert gpu.cupy.synchronizations >= synchronized + 2  # once per dead step


@pytest.mark.parametrize("configured", [None, "0"])
def test_captured_products_split_k_only_where_it_pays(xp, gpu, monkeypatch, configured):
    """Each captured product gets the stream's cuBLAS workspace (so cuBLAS may split k over
    a GEMM and a reduction kernel) only where plan.split_k_pays says so: on an H100/H200 the
    textbook network's first product at batch 64 (64x784 @ 784x128), none of the others.
    NNOPT_CUBLAS_WORKSPACE=0: no workspace for the stream, so none for any product. (The
    blocks' products as cuBLAS GEMMs: fused into the blocks' kernels, the default at this
    batch, only the weight gradients would reach cuBLAS.)"""
    from nnopt.fast import plan
    from nnopt.graph import CapturedStep
    monkeypatch.setattr(plan, "FUSED_PRODUCTS", False)
    if configured is None:
        monkeypatch.delenv("NNOPT_CUBLAS_WORKSPACE", raising=False)
    else:
        monkeypatch.setenv("NNOPT_CUBLAS_WORKSPACE", configured)
    handle, calls = gpu.cublas_handle(), []
    gemm = handle.gemm

    def recording(double, a, b, c, m, n, k, trans_a=False, trans_b=False, split_k=True):
        gemm(double, a, b, c, m, n, k, trans_a, trans_b, split_k)
        calls.append(((m, n, k), split_k, handle.bound[1]))
    monkeypatch.setattr(handle, "gemm", recording)
    model = nnopt.mlp([784, 128, 64, 32, 16, 10], batchnorm=True, seed=0, device=xp)
    step = CapturedStep(model, optim.SGD(model, lr=0.1), nnopt.SoftmaxCrossEntropy(),
                        (64, 784), (64,))
    workspace = handle.workspaces[step.stream.ptr][2]
    assert calls and workspace == (handle.workspace_bytes if configured is None else 0)
    for shape, split_k, bound in calls:
        wanted = plan.split_k_pays(*shape, gpu.sms()) if configured is None else True
        assert split_k == wanted and bound == (workspace if split_k else 0), (shape, split_k)
    if configured is None and gpu.sms() >= 100:  # the GPUs the rule was measured on
        assert {shape for shape, split_k, _ in calls if split_k} == {(64, 128, 784)}


def test_captured_step_follows_a_changed_learning_rate(xp, gpu, rng):
    """The learning rate is an argument of the captured kernels: changing it (as a
    scheduler does) captures the graph again, and the steps stay those of the eager run;
    a scratch buffer the graph writes into is never handed to an eager step."""
    pair = EagerAndCaptured(xp, [784, 64, 10], "momentum", lr=0.1, batch=32, seed=2)
    first_graph = pair.captured.graph
    for i in range(6):
        if i == 3:
            for opt in (pair.eager_opt, pair.graph_opt):
                opt.param_groups[0]["lr"] = 0.01
        x, y = pair.step(rng)
        # an eager pass of another batch size in between (as a last partial batch is), on
        # both models alike: BN's running statistics see it too
        for model in (pair.eager_model, pair.graph_model):
            model.zero_grad()
            model.loss_and_backward(x[:7], y[:7], nnopt.SoftmaxCrossEntropy())
            model.zero_grad()
    assert pair.captured.graph is not first_graph
    pair.assert_same_state()


def test_train_on_gpu_one_epoch(xp, gpu, backend, monkeypatch, tmp_path):
    from nnopt import train, train_loop
    if backend == "emulated":  # the emulated device's NumPy arrays, taken for CuPy's
        monkeypatch.setattr(train, "get_namespace", lambda device: xp)
        monkeypatch.setattr(train_loop, "backend_name", lambda namespace: "cupy")
    assert train.main(["--device", "gpu", "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_relu_passes_nan_on_as_the_reference(xp, gpu, dtype):
    """The ReLU layer's CUDA kernel and the blocks' activation rule: NaN stays NaN, as in
    the reference layer and torch.relu."""
    x = np.array([[np.nan, np.inf, -np.inf, 0.0, -1.5, 2.5]])
    want = [[np.nan, np.inf, 0.0, 0.0, 0.0, 2.5]]
    layer = nnopt.ReLU()
    np.testing.assert_array_equal(host(layer.forward(dev(xp, x.astype(dtype)))), want)
    assert layer.fast is gpu, "the layer ran the reference, not the kernel"
    y = gpu.activation_forward(dev(xp, x.astype(dtype)), None, gpu.RELU)
    np.testing.assert_array_equal(host(y), want)
    # backward: 0 * dy where the unit is off, so a NaN or inf there stays NaN
    dy = np.array([[1.0, 1.0, np.inf, np.nan, 1.0, np.inf]]).astype(dtype)
    dx = host(layer.backward(dev(xp, dy)))
    np.testing.assert_array_equal(dx, [[0.0, 1.0, np.nan, np.nan, 0.0, np.inf]])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(64, 784, 128), (37, 20, 33), (4096, 16, 600)])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
def test_fused_block_on_gpu_matches_its_layers(xp, gpu, rng, shape, dtype, batchnorm,
                                               activation):
    """The CUDA block (batchnorm.cu with bias and activation; bias_activation and
    activation_backward without BN) against its own layers on the GPU; (4096, 16, 600):
    BN's split path. The layers run in float64, on the block's parameters."""
    from tests.test_block import as_reference, fused_and_layered
    m, n_in, n_out = shape
    fused, layered = fused_and_layered(n_in, n_out, batchnorm, activation, dtype,
                                       seed=int(rng.integers(1000)), device=xp)
    x = dev(xp, (rng.normal(size=(m, n_in)) * 2 + 1).astype(dtype))
    d = dev(xp, rng.normal(size=(m, n_out)).astype(dtype))
    results = []
    for model in (fused, layered):
        model.zero_grad()
        xm, dm = as_reference(model, fused, x, d)
        y = host(model.forward(xm))
        dx = host(model.backward(dm))
        results.append((y, dx, model.state_dict(),
                        {p.name: host(p.grad) for p in model.parameters()}))
    assert fused.steps[0].saved is not None, "the block ran its layers, not its kernels"
    (y, dx, state, grads), (y_ref, dx_ref, state_ref, grads_ref) = results
    tol = 2e-4 if dtype == "float32" else 1e-10
    scale = lambda a: max(float(np.max(np.abs(a))), 1.0)  # noqa: E731
    assert np.max(np.abs(y - y_ref)) <= tol * scale(y_ref)
    assert np.max(np.abs(dx - dx_ref)) <= tol * scale(dx_ref)
    for name in state_ref:
        assert np.max(np.abs(host(state[name]) - host(state_ref[name]))) <= tol * scale(host(state_ref[name])), name
    for name, want in grads_ref.items():
        if not (batchnorm and name == "fc1.b"):  # zero by construction in the block
            assert np.max(np.abs(grads[name] - want)) <= tol * scale(want), name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("sms", [None, 132])
def test_fused_products_match_cublas_products(xp, gpu, rng, monkeypatch, dtype, batchnorm, sms):
    """At batch 64 a chain of blocks fuses each product into its passes: linear_forward,
    and linear_backward computing the next block's deferred input gradient. One training
    step's outputs, running statistics and gradients against the same step with the
    products as separate GEMMs (plan.FUSED_PRODUCTS off); sms=132: the first product's k
    = 784 cut into slices, whatever this GPU's count."""
    from nnopt.fast import plan
    if sms is not None:
        monkeypatch.setattr(gpu, "sms", lambda: sms)
    x = dev(xp, rng.normal(size=(64, 784)).astype(dtype))
    labels = dev(xp, rng.integers(0, 10, 64))
    results = []
    for fused_products in (True, False):
        monkeypatch.setattr(plan, "FUSED_PRODUCTS", fused_products)
        model = nnopt.mlp([784, 128, 64, 32, 16, 10], batchnorm=batchnorm, seed=5, device=xp,
                          dtype=dtype)
        model.zero_grad()
        loss = float(model.loss_and_backward(x, labels, nnopt.SoftmaxCrossEntropy()))
        assert all(step.saved is not None for step in model.steps)
        results.append((loss, {k: host(v) for k, v in model.state_dict().items()},
                        {p.name: host(p.grad) for p in model.parameters()}))
    # and both against the reference math in float64 on the host, from the same
    # (dtype-rounded) weights: no fast path at all
    results.append(reference_step(monkeypatch, [784, 128, 64, 32, 16, 10], batchnorm,
                                  nnopt.mlp([784, 128, 64, 32, 16, 10], batchnorm=batchnorm,
                                            seed=5, device=xp, dtype=dtype).state_dict(),
                                  host(x), to_numpy(labels)))
    tol = 1e-4 if dtype == "float32" else 1e-10
    scale = lambda a: max(float(np.max(np.abs(a))), 1.0)  # noqa: E731
    for (loss, state, grads), (loss_ref, state_ref, grads_ref) in [
            (results[0], results[1]), (results[0], results[2]), (results[1], results[2])]:
        assert loss == pytest.approx(loss_ref, rel=tol)
        for name in state_ref:
            assert np.max(np.abs(state[name] - state_ref[name])) <= tol * scale(state_ref[name]), name
        for name in grads_ref:
            assert np.max(np.abs(grads[name] - grads_ref[name])) <= 10 * tol * scale(grads_ref[name]), name


def reference_step(monkeypatch, sizes, batchnorm, state, x, labels):
    """(loss, state, grads) of one training step of the reference math in float64 on the
    host (every fast path looked up returns none), from ``state``."""
    import importlib

    from tests.emulated_gpu import FAST_PATH_USERS
    with monkeypatch.context() as patch:
        for module in FAST_PATH_USERS:
            patch.setattr(importlib.import_module(module), "fast_for", lambda *arrays: None)
        model = nnopt.mlp(sizes, batchnorm=batchnorm, seed=0, device="cpu", dtype="float64")
        model.load_state_dict({key: to_numpy(value) for key, value in state.items()})
        model.zero_grad()
        loss = float(model.loss_and_backward(x.astype(np.float64), labels,
                                             nnopt.SoftmaxCrossEntropy()))
        return (loss, {k: np.asarray(v) for k, v in model.state_dict().items()},
                {p.name: np.array(p.grad) for p in model.parameters()})



@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("m", [32, 4096])  # the one-launch kernel (and the fused product); the split path
def test_a_constant_feature_comes_out_as_beta_on_gpu(xp, gpu, dtype, m):
    """BN of a feature constant over the batch is exactly beta on the GPU too: every forward
    kernel centres before it scales (x scale + (beta - mean scale) cancelled)."""
    from nnopt.block import Block
    x = np.full((m, 8), 1e4)
    x[:, 1::2] = np.linspace(-1, 1, m)[:, None]
    gamma, beta = np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8) + 0.3
    z, _, _ = gpu.bn_forward(dev(xp, x.astype(dtype)), dev(xp, gamma.astype(dtype)),
                             dev(xp, beta.astype(dtype)), 1e-5, 0.9, False,
                             dev(xp, np.zeros(8, dtype)), dev(xp, np.ones(8, dtype)))
    z = host(z)
    assert np.all(z[:, 0::2] == beta.astype(dtype)[0::2])
    # the fused product's epilogue: identical rows make every feature of h constant
    linear = nnopt.Linear(8, 4, rng=0)
    block = Block(linear, nnopt.BatchNorm(4))
    nnopt.Sequential([block], device=xp, dtype=dtype)
    block.batchnorm.beta.data[...] = dev(xp, np.array([0.7, -0.2, 0.0, 1.5], dtype))
    rows = dev(xp, np.tile(np.linspace(1e3, 2e3, 8), (min(m, 64), 1)).astype(dtype))
    y = host(block.forward(rows))
    assert np.all(y == host(block.batchnorm.beta.data))
