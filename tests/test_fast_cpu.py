"""The fused numba paths against the reference math (float64), on odd sizes."""
import numpy as np
import pytest

import nnopt
from nnopt import optim
from nnopt.batchnorm import BatchNorm, batchnorm_backward, batchnorm_forward
from nnopt.fast import cpu_kernels
from nnopt.params import FlatParameters
from tests.helpers import rel_err

fast = cpu_kernels()
pytestmark = pytest.mark.skipif(fast is None, reason="numba is not installed")

# fast.PARALLEL_MIN + 1: the threaded loops (test_large_inputs_take_the_threaded_paths)
SIZES = [1, 7, 1013, 70001, fast.PARALLEL_MIN + 1] if fast is not None else []
TOL = {"float32": 2e-5, "float64": 1e-12}
VARIANTS = {
    "sgd": {}, "momentum": {}, "momentum-torch": {"buffer": "torch"}, "nag": {},
    "nag-torch": {"buffer": "torch"}, "adagrad": {}, "adadelta": {},
    "adadelta-lr": {"lr_scales_step": True, "lr": 0.5}, "rmsprop": {},
    "rmsprop-torch": {"eps_inside_root": False}, "adam": {"betas": (0.8, 0.95)},
}


def make(name, n, dtype, use_fast_path, start):
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), dtype, w=start)
    kind = name.split("-")[0]
    options = {"lr": 0.05, **VARIANTS[name]}
    return storage, optim.create(kind, storage, use_fast_path=use_fast_path, **options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_step_matches_reference(rng, name, n, dtype):
    start = rng.normal(size=n)
    fast_store, fast_opt = make(name, n, dtype, True, start)
    ref_store, ref_opt = make(name, n, "float64", False, start)
    assert fast_opt.fast_path(fast_store.data) is not None
    for _ in range(4):
        g = rng.normal(size=n) * rng.uniform(0.1, 10)
        fast_store.grad[...] = g
        ref_store.grad[...] = g
        fast_opt.step()
        ref_opt.step()
    scale = np.max(np.abs(ref_store.data))
    assert np.max(np.abs(fast_store.data - ref_store.data)) / scale < TOL[dtype]
    for key, ref_state in ref_opt.state[0].items():
        if key != "step":
            got = fast_opt.state[0][key]
            assert np.max(np.abs(got - ref_state)) <= TOL[dtype] * max(np.max(np.abs(ref_state)), 1e-30)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 3), (7, 33), (64, 128), (300, 301), (600, 512)])
def test_fused_batchnorm_matches_reference(rng, shape, dtype):
    x = rng.normal(size=shape) * rng.uniform(0.1, 5, shape[1]) + rng.normal(size=shape[1]) * 3
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.normal(size=shape[1])
    d = rng.normal(size=shape)
    z_ref, mean_ref, var_ref, cache = batchnorm_forward(x, gamma, beta, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = batchnorm_backward(d, cache)
    cast = lambda a: np.asarray(a, dtype=dtype)  # noqa: E731
    run_mean, run_var = cast(np.zeros(shape[1])), cast(np.ones(shape[1]))
    z, mean, inv_std = fast.bn_forward(cast(x), cast(gamma), cast(beta), 1e-5, 0.9, True,
                                       run_mean, run_var)
    dgamma, dbeta = cast(np.zeros(shape[1])), cast(np.zeros(shape[1]))
    dx = fast.bn_backward(cast(d), cast(x), cast(gamma), mean, inv_std, dgamma, dbeta)
    tol = 1e-4 if dtype == "float32" else 1e-10
    m = shape[0]
    for got, want in ((z, z_ref), (mean, mean_ref), (dx, dx_ref), (dgamma, dgamma_ref),
                      (dbeta, dbeta_ref), (run_mean, 0.1 * mean_ref),
                      (run_var, 0.9 + 0.1 * var_ref * m / (m - 1))):
        assert np.max(np.abs(got - want)) <= tol * max(np.max(np.abs(want)), 1.0)


def test_large_inputs_take_the_threaded_paths(monkeypatch, rng):
    """The sizes above use numba's threads: the parallel flag reaches ``launch``."""
    calls = []
    original = fast.launch
    monkeypatch.setattr(fast, "launch", lambda kernel, parallel, *a, **k: (
        calls.append(parallel), original(kernel, parallel, *a, **k))[1])
    n = fast.PARALLEL_MIN + 1
    storage, opt = make("adam", n, "float32", True, rng.normal(size=n))
    storage.grad[...] = 1.0
    opt.step()
    x = rng.normal(size=(600, 512))
    assert x.size >= fast.BN_PARALLEL_MIN and fast.bn_chunks(x) == fast.CHUNKS
    z, mean, inv_std = fast.bn_forward(x, np.ones(512), np.zeros(512), 1e-5, 0.9, False,
                                       np.zeros(512), np.ones(512))
    fast.bn_backward(x, x, np.ones(512), mean, inv_std, np.zeros(512), np.zeros(512))
    assert calls == [True, True, True]  # Adam's step, BN forward, BN backward


def test_fast_paths_are_used_by_default_on_numpy(monkeypatch):
    calls = []
    original_step, original_bn = fast.OPTIMIZER_STEPS["Adam"], fast.BoundBatchNorm.forward
    monkeypatch.setitem(fast.OPTIMIZER_STEPS, "Adam",
                        lambda *a: (calls.append("adam"), original_step(*a)))
    monkeypatch.setattr(fast.BoundBatchNorm, "forward",
                        lambda *a: (calls.append("bn"), original_bn(*a))[1])
    model = nnopt.mlp([6, 5, 3], batchnorm=True, seed=0)  # float32, CPU: the defaults
    opt = optim.Adam(model)
    x, y = np.random.default_rng(0).random((4, 6), dtype=np.float32), np.array([0, 1, 2, 0])
    model.loss_and_backward(x, y, nnopt.SoftmaxCrossEntropy())
    opt.step()
    assert calls == ["bn", "adam"]
    assert isinstance(model.layers[1], BatchNorm) and model.steps[0].saved is not None  # fused block


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_relu_matches_reference(rng, dtype):
    from nnopt.layers import ReLU
    x = rng.normal(size=(33, 17)).astype(dtype)
    d = rng.normal(size=(33, 17)).astype(dtype)
    layer = ReLU()
    y = layer.forward(x)
    assert layer.fast is not None
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    np.testing.assert_array_equal(layer.backward(d), np.where(x > 0, d, 0))


def test_batchnorm_reuses_its_output_only_when_nobody_holds_it(rng):
    model = nnopt.Sequential([BatchNorm(5)], dtype="float64")
    x = rng.normal(size=(8, 5))
    first = model.forward(x)
    kept = first.copy()
    second = model.forward(x * 2)  # `first` is still held here: a new array
    assert second is not first
    np.testing.assert_array_equal(first, kept)
    del first, second
    third = model.forward(x)
    third_address = third.__array_interface__["data"][0]
    buffers = len(model.layers[0].scratch.arrays["z"])
    fourth_input = x + 1
    del third
    fourth = model.forward(fourth_input)  # nobody held the previous output: reused
    assert fourth.__array_interface__["data"][0] == third_address
    assert len(model.layers[0].scratch.arrays["z"]) == buffers
    z_ref, _, _, _ = batchnorm_forward(fourth_input, np.ones(5), np.zeros(5), 1e-5)
    np.testing.assert_allclose(fourth, z_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", [64, 50_000])  # one thread; the threaded chunks
@pytest.mark.parametrize("level", [255.0, 1e4, 1e6])
def test_a_constant_feature_comes_out_as_beta(dtype, m, level):
    """A feature constant over the batch normalizes to 0, so BN gives exactly beta: z is
    centred before it is scaled. (As x scale + (beta - mean scale) the fused kernel
    cancelled: scale = gamma / sqrt(eps) ~ 316 gamma, and 1e6 gave -32, not 0.7.)"""
    x = np.full((m, 3), level, dtype)
    x[:, 1] = np.linspace(-1, 1, m)  # a varying feature beside it
    gamma, beta = np.array([1.3, 1.0, 2.0], dtype), np.array([0.7, 0.0, -0.25], dtype)
    fast = cpu_kernels()
    z, mean, _ = fast.bn_forward(x, gamma, beta, 1e-5, 0.9, False, np.zeros(3, dtype),
                                 np.ones(3, dtype))
    assert np.all(z[:, 0] == beta[0]) and np.all(z[:, 2] == beta[2]) and mean[0] == level
    z_ref = batchnorm_forward(x.astype(np.float64), gamma, beta, 1e-5)[0]
    np.testing.assert_allclose(z[:, 1], z_ref[:, 1], rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_rules_keep_the_elements_precision(dtype):
    """numba types ``1 - y`` and ``max(v, 0)`` as float64 for float32 y and v: rules that
    returned float64 made every float32 kernel calling them mixed-precision (and slower:
    BN's backward over 64x128 took 7.4 us a pass instead of 5.4 us)."""
    import numba
    from nnopt.fast import cpu

    @numba.njit
    def both(d, y, code):
        return cpu.activation_grad(d[0], y[0], code), cpu.activate(d[0], code)
    d = np.array([0.3, -1.0], dtype=dtype)
    both(d, d, cpu.RELU)  # numba returns Python floats: its signature says what it computed in
    element = numba.from_dtype(dtype)
    assert both.nopython_signatures[0].return_type == numba.types.UniTuple(element, 2)
    nan, negative = both(np.array([np.nan], dtype), np.array([-1.0], dtype), cpu.RELU)
    assert np.isnan(nan) and both(np.array([-3.0], dtype), d, cpu.RELU)[1] == 0


def test_a_block_gathers_its_bn_arguments_once_and_anew_when_they_may_change(rng):
    """A block's BN passes keep their arguments between steps (BoundBatchNorm), but not
    past a new batch size; eps and momentum are read at each step. A BN block outside a
    model, whose parameters may be given new arrays, runs its layers."""
    from nnopt.batchnorm import BatchNorm as BN
    from nnopt.block import Block
    from nnopt.layers import Linear, ReLU
    model = nnopt.mlp([8, 6, 3], "relu", batchnorm=True, seed=0)
    block, loss = model.steps[0], nnopt.SoftmaxCrossEntropy()
    x, y = rng.random((16, 8)).astype(np.float32), np.arange(16) % 3
    model.loss_and_backward(x, y, loss)
    kernels = block.bn_kernels
    model.loss_and_backward(x, y, loss)
    assert block.bn_kernels is kernels
    model.loss_and_backward(x[:12], y[:12], loss)
    assert block.bn_kernels is not kernels and block.bn_kernels.shape == (12, 6)
    bn = block.batchnorm
    bn.momentum, before = 0.5, bn.buffers["running_mean"].copy()
    assert model.forward(x).shape == (16, 3)
    assert np.allclose(bn.buffers["running_mean"], 0.5 * before + 0.5 * block.saved[5]
                       + 0.5 * block.linear.b.data, rtol=1e-5)

    loose = Block(Linear(8, 6, rng=0), BN(6), ReLU())  # parameters of no model's storage
    xf = x.astype(np.float64)
    loose.forward(xf)
    loose.batchnorm.gamma.data = np.full(6, 2.0)
    loose.batchnorm.beta.data = np.full(6, -0.5)
    out_loose = loose.forward(xf)
    assert loose.saved is None and loose.bn_kernels is None
    reference = xf
    for layer in loose.layers:
        reference = layer.forward(reference)
    assert np.allclose(out_loose, reference) and np.any(out_loose == 0) and out_loose.max() > 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_models_batchnorm_layer_binds_its_passes_to_the_storage(rng, dtype):
    """The BatchNorm layer of a model (the textbook's layer-by-layer view) gathers its
    kernels' arguments once, as a block does (BoundBatchNorm), and still computes the
    reference: over optimizer steps that change gamma and beta in the storage, a gamma set
    by hand, a new batch size and a non-contiguous input, its outputs, gradients and
    running statistics match the reference layer's (float64)."""
    tol = TOL[dtype] * 10
    layers = [BatchNorm(7, use_fast_path=fast_path) for fast_path in (True, False)]
    models = [nnopt.Sequential([layer], dtype="float64" if not fast_path else dtype)
              for layer, fast_path in zip(layers, (True, False))]
    optimizers = [optim.SGD(model, lr=0.5) for model in models]
    fused = layers[0]
    for step, rows in enumerate([16, 16, 9, 16]):
        x = rng.normal(2.0, 3.0, (rows, 14))[:, ::2]  # non-contiguous
        d = rng.normal(size=(rows, 7))
        if step == 2:
            for layer in layers:
                layer.gamma.data = np.linspace(-1.0, 2.0, 7)
        outputs = []
        for layer, model, opt in zip(layers, models, optimizers):
            model.zero_grad()
            dt = layer.gamma.data.dtype
            outputs.append((layer.forward(x.astype(dt)), layer.backward(d.astype(dt))))
            opt.step()
        (z, dx), (z_ref, dx_ref) = outputs
        assert rel_err(z, z_ref) < tol and rel_err(dx, dx_ref) < tol, step
        assert rel_err(models[0].flat.data, models[1].flat.data) < tol, step
        for name in ("running_mean", "running_var"):
            assert rel_err(fused.buffers[name], layers[1].buffers[name]) < tol, (step, name)
        if step:  # kept for the same batch size, made anew for another
            assert (fused.kernels is kernels) == (rows == previous_rows), step
        kernels, previous_rows = fused.kernels, rows
        assert fused.fused[4] is kernels
    loose = BatchNorm(7)  # in no storage: the copies of bn_forward / bn_backward
    loose.forward(rng.normal(size=(16, 7)))
    assert loose.kernels is None and loose.fused[4] is None


def test_a_block_keeps_its_bn_statistics_arrays_between_steps(rng):
    model = nnopt.mlp([8, 6, 3], "relu", batchnorm=True, seed=0)
    x, y = rng.random((16, 8)).astype(np.float32), np.arange(16) % 3
    block = model.steps[0]
    loss = nnopt.SoftmaxCrossEntropy()
    model.loss_and_backward(x, y, loss)
    first = block.saved[5]
    first_values = first.copy()
    model.loss_and_backward(x[::-1].copy() * 2, y, loss)
    assert block.saved[5] is first and not np.array_equal(first, first_values)
    reference = nnopt.mlp([8, 6, 3], "relu", batchnorm=True, seed=0, fused=False)
    reference.loss_and_backward(x, y, loss)
    reference.loss_and_backward(x[::-1].copy() * 2, y, loss)
    assert np.allclose(model.flat.grad, reference.flat.grad, rtol=1e-4, atol=1e-6)


def test_a_training_step_formats_no_layer_names(monkeypatch, rng):
    """The backward checks name their layer only in an error: formatting a block's repr
    for each call cost ~3 us, five times a step."""
    from nnopt.batchnorm import BatchNorm as BN
    from nnopt.block import Block
    from nnopt.layers import Linear, ReLU
    model = nnopt.mlp([8, 6, 3], "relu", batchnorm=True, seed=0)
    layered = nnopt.mlp([8, 6, 3], "relu", batchnorm=True, seed=0, fused=False)

    def refuse(self):
        raise AssertionError(f"{type(self).__name__} formatted during a step")
    for cls in (Block, Linear, BN, ReLU):
        monkeypatch.setattr(cls, "__repr__", refuse)
    x, y = rng.random((16, 8)).astype(np.float32), np.arange(16) % 3
    for each in (model, layered):
        each.loss_and_backward(x, y, nnopt.SoftmaxCrossEntropy())
