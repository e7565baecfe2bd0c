"""Blocks (Linear -> BN -> activation as one layer) against the layers they fuse."""
import math
import tracemalloc

import numpy as np
import pytest

import nnopt
from nnopt import BatchNorm, Block, Linear, Sequential, optim
from nnopt.fast import cpu_kernels, threads
from nnopt.layers import ACTIVATIONS
from nnopt.losses import SoftmaxCrossEntropy
from tests.helpers import dev, host, numeric_grad, numeric_param_grad, rel_err

fast = cpu_kernels()
needs_numba = pytest.mark.skipif(fast is None, reason="numba is not installed")
ACTIVATION_NAMES = [None, *sorted(ACTIVATIONS)]


def make_block(n_in, n_out, batchnorm, activation, seed):
    """A block with random parameters and running statistics (not the initial ones, so
    that a wrong gamma, beta or bias shows)."""
    rng = np.random.default_rng(seed)
    linear = Linear(n_in, n_out, "xavier", rng, name="fc1")
    linear.b.data = rng.normal(size=n_out)
    bn = None
    if batchnorm:
        bn = BatchNorm(n_out, name="bn1", unbiased_running_var=bool(seed % 2))
        bn.gamma.data, bn.beta.data = rng.uniform(0.5, 2, n_out), rng.normal(size=n_out)
        bn.buffers = {"running_mean": rng.normal(size=n_out), "running_var": rng.uniform(1, 2, n_out)}
    act = ACTIVATIONS[activation]() if activation else None
    return Block(linear, bn, act)


def fused_and_layered(n_in, n_out, batchnorm, activation, dtype, seed=0, device="cpu"):
    """A fused block in ``dtype`` and, as its reference, the same layers in float64 with
    the block's (``dtype``-rounded) parameters and statistics: feed it the same inputs
    with ``.astype(np.float64)``."""
    fused = Sequential([make_block(n_in, n_out, batchnorm, activation, seed)], device=device,
                       dtype=dtype)
    layered = Sequential(list(make_block(n_in, n_out, batchnorm, activation, seed).layers),
                         device=device, dtype="float64")
    layered.load_state_dict(fused.state_dict())
    for model in (fused, layered):
        model.steps[0].needs_input_grad = True
    return fused, layered


def as_reference(model, fused, *arrays):
    """``arrays`` as ``model`` takes them: unchanged for the fused block, float64 for its
    reference."""
    if model is fused:
        return arrays
    return tuple(a.astype(np.float64) if hasattr(a, "astype") else a for a in arrays)


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 3, 1), (64, 784, 128), (37, 20, 33), (600, 40, 512)])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_fused_block_matches_its_layers(rng, shape, dtype, batchnorm, activation):
    """(600, 40, 512): 307,200 outputs, above BN_PARALLEL_MIN, the kernels' threaded path."""
    m, n_in, n_out = shape
    fused, layered = fused_and_layered(n_in, n_out, batchnorm, activation, dtype,
                                       seed=int(rng.integers(1000)))
    x = (rng.normal(size=(m, n_in)) * 2 + 1).astype(dtype)
    d = rng.normal(size=(m, n_out)).astype(dtype)
    outputs = []
    for model in (fused, layered):
        model.zero_grad()
        xm, dm = as_reference(model, fused, x, d)
        y = model.forward(xm).copy()
        dx = model.backward(dm).copy()
        outputs.append((y, dx, model.state_dict(), {p.name: p.grad.copy() for p in model.parameters()}))
    assert fused.steps[0].saved is not None and not isinstance(layered.steps[0], Block)
    (y, dx, state, grads), (y_ref, dx_ref, state_ref, grads_ref) = outputs
    tol = 2e-4 if dtype == "float32" else 1e-10
    assert rel_err(y, y_ref, floor=1.0) < tol
    assert rel_err(dx, dx_ref, floor=1.0) < tol
    for name in state_ref:
        assert rel_err(state[name], state_ref[name], floor=1.0) < tol, name
    for name, want in grads_ref.items():
        if batchnorm and name == "fc1.b":
            # Zero by construction before BN: the block writes none, the layers rounding noise.
            assert np.all(grads[name] == 0) and rel_err(want, 0 * want, floor=1.0) < tol
        else:
            assert rel_err(grads[name], want, floor=1.0) < tol, name
    # Inference mode runs the layers themselves, on the running statistics both kept alike.
    assert rel_err(fused.forward(x, train=False), layered.forward(x.astype(np.float64), train=False),
                   floor=1.0) < tol


@needs_numba
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_fused_block_gradient_by_finite_differences(rng, batchnorm, activation):
    model, _ = fused_and_layered(5, 4, batchnorm, activation, "float64", seed=3)
    x = rng.normal(size=(7, 5))
    weights = rng.normal(size=(7, 4))
    model.zero_grad()
    model.forward(x)
    assert model.steps[0].saved is not None  # the fused passes are what is checked
    dx = model.backward(weights)

    def objective():
        return float(np.sum(model.forward(x) * weights))

    assert rel_err(numeric_param_grad(objective, model.flat), model.flat.grad) < 1e-6
    assert rel_err(numeric_grad(lambda xh: float(np.sum(model.forward(xh) * weights)), x.copy()),
                   dx) < 1e-6


@needs_numba
def test_block_gradients_accumulate_until_zero_grad(rng):
    model, _ = fused_and_layered(6, 5, True, "relu", "float64")
    x, d = rng.normal(size=(8, 6)), rng.normal(size=(8, 5))
    model.zero_grad()
    model.forward(x)
    model.backward(d)
    once = model.flat.grad.copy()
    model.backward(d)  # no zero_grad: PyTorch's accumulation
    np.testing.assert_allclose(model.flat.grad, 2 * once, rtol=1e-12)
    model.zero_grad()
    model.backward(d)
    np.testing.assert_allclose(model.flat.grad, once, rtol=1e-12)


def test_mlp_blocks_and_layers_are_the_same_model(xp):
    sizes = [6, 5, 4, 3]
    fused = nnopt.mlp(sizes, batchnorm=True, seed=4, device=xp, dtype="float64")
    layered = nnopt.mlp(sizes, batchnorm=True, seed=4, device=xp, dtype="float64", fused=False)
    assert [type(s).__name__ for s in fused.steps] == ["Block"] * 3
    assert [repr(a) for a in fused.layers] == [repr(b) for b in layered.layers] == [repr(b) for b in layered.steps]
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in layered.named_parameters()]
    state, state_ref = fused.state_dict(), layered.state_dict()
    assert state.keys() == state_ref.keys()
    assert all(np.array_equal(state[k], state_ref[k]) for k in state)
    x, labels = dev(xp, np.random.default_rng(0).normal(size=(8, 6))), dev(xp, np.arange(8) % 3)
    for model in (fused, layered):
        model.zero_grad()
        model.loss_and_backward(x, labels, SoftmaxCrossEntropy())
    assert rel_err(host(fused.flat.grad), host(layered.flat.grad)) < 1e-10
    # The experiments walk model.layers and call BN layers by name: still there.
    assert [layer.name for layer in fused.layers if isinstance(layer, BatchNorm)] == ["bn1", "bn2"]


@needs_numba
def test_fused_and_layered_models_train_alike(rng):
    """Over steps of an optimizer, which updates gamma and beta in the flat storage: the
    block's BN passes read them there (fast.BoundBatchNorm's views), not a copy."""
    sizes = [6, 5, 4, 3]
    models = [nnopt.mlp(sizes, batchnorm=True, seed=4, dtype="float64", fused=fused)
              for fused in (True, False)]
    optimizers = [optim.Momentum(model, lr=0.3) for model in models]
    for step in range(4):
        x, labels = rng.normal(size=(8, 6)), rng.integers(0, 3, 8)
        for model, opt in zip(models, optimizers):
            model.zero_grad()
            model.loss_and_backward(x, labels, SoftmaxCrossEntropy())
            opt.step()
    fused, layered = models
    assert fused.steps[0].bn_kernels is not None  # the fused passes ran
    assert rel_err(fused.flat.data, layered.flat.data) < 1e-10
    assert not np.allclose(fused.flat.data, nnopt.mlp(sizes, batchnorm=True, seed=4,
                                                      dtype="float64").flat.data)
    state, state_ref = fused.state_dict(), layered.state_dict()
    assert all(rel_err(state[k], state_ref[k], floor=1.0) < 1e-10 for k in state)


def test_synchronized_bn_runs_layer_by_layer():
    model = nnopt.mlp([4, 3, 2], batchnorm=True, bn_options={"sync": True})
    assert not any(isinstance(step, Block) for step in model.steps)


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_loss_matches_forward_then_backward(rng, dtype):
    logits = (rng.normal(size=(13, 10)) * 5).astype(dtype)
    labels = rng.integers(0, 10, 13)
    loss, grad = SoftmaxCrossEntropy().forward_backward(logits, labels)
    reference = SoftmaxCrossEntropy()  # in float64, on the same (rounded) logits
    want = reference.forward(logits.astype(np.float64), labels)
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert abs(float(loss) - float(want)) < tol * abs(float(want))
    assert rel_err(grad, reference.backward()) < tol
    with pytest.raises(nnopt.errors.InputError, match="class label 10 is out of range"):
        SoftmaxCrossEntropy().forward_backward(logits, np.where(labels == 3, 10, labels))


@needs_numba
def test_training_step_allocates_nothing_after_warm_up():
    """The textbook network's step reuses its buffers: what a step allocates (tracemalloc's
    peak above the start) stays far below one batch of the first layer's output."""
    model = nnopt.mlp([784, 128, 64, 32, 16, 10], batchnorm=True, seed=0)
    opt = optim.SGD(model, lr=0.1)
    loss = SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    batches = [(rng.random((64, 784), dtype=np.float32), rng.integers(0, 10, 64)) for _ in range(4)]

    def step(x, y):
        model.zero_grad()
        model.loss_and_backward(x, y, loss)
        opt.step()

    for x, y in batches:  # warm-up: compiles, makes the double buffers
        step(x, y)
    # The BLAS thread policy reads /proc/stat a few times a second, not per step (a buffer
    # of 256 bytes per CPU, freed at once): held off here, or a many-core machine fails.
    sampler = threads.free_cores()
    next_sample, sampler.next_sample = sampler.next_sample, math.inf
    tracemalloc.start()
    try:
        for x, y in batches:
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            step(x, y)
            peak = tracemalloc.get_traced_memory()[1] - start
            assert peak < 8 * 1024, f"a step allocated {peak} bytes"  # 64 x 128 x 4 = 32 KiB
    finally:
        tracemalloc.stop()
        sampler.next_sample = next_sample


def test_training_runs_blocks_by_default_and_layers_on_request():
    from nnopt import train
    blocks = train.build_model(train.make_config())
    layers = train.build_model(train.make_config(fused=False))
    assert all(isinstance(step, Block) for step in blocks.steps)
    assert not any(isinstance(step, Block) for step in layers.steps)
    assert [repr(layer) for layer in blocks.layers] == [repr(layer) for layer in layers.steps]
