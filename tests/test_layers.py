"""Finite-difference checks (float64) of every layer, loss and a whole network."""
import numpy as np
import pytest

import nnopt
from nnopt import BatchNorm, Linear, ReLU, Sequential, Sigmoid, Tanh
from nnopt.batchnorm import (batchnorm_backward, batchnorm_backward_factored, batchnorm_forward,
                             batchnorm_forward_factored)
from nnopt.losses import MSELoss, SoftmaxCrossEntropy
from tests.helpers import dev, host, numeric_grad, numeric_param_grad, rel_err


def check_layer(xp, layers, x_host, train=True, tol=1e-6):
    """J = sum(out * R): compare backward's dJ/dx and dJ/dparams with central differences."""
    model = Sequential(layers, device=xp, dtype="float64")
    model.layers[0].needs_input_grad = True
    rng = np.random.default_rng(1)
    out = model.forward(dev(xp, x_host), train)
    weights = rng.normal(size=tuple(out.shape))

    def objective_x(xh):
        return float(np.sum(host(model.forward(dev(xp, xh), train)) * weights))

    def objective_params():
        return float(np.sum(host(model.forward(dev(xp, x_host), train)) * weights))

    model.zero_grad()
    model.forward(dev(xp, x_host), train)
    dx = host(model.backward(dev(xp, weights)))
    dparams = host(model.flat.grad)
    num_dx = numeric_grad(objective_x, x_host.copy())
    assert rel_err(dx, num_dx) < tol
    if model.flat.size:
        num_dp = numeric_param_grad(objective_params, model.flat)
        assert rel_err(dparams, num_dp) < tol


@pytest.mark.parametrize("batch", [1, 4])
def test_linear_gradients(xp, rng, batch):
    check_layer(xp, [Linear(5, 3, "normal", rng)], rng.normal(size=(batch, 5)))


@pytest.mark.parametrize("activation", [Sigmoid, Tanh, ReLU])
def test_activation_gradients(xp, rng, activation):
    x = rng.normal(size=(6, 4))
    x[np.abs(x) < 1e-3] = 0.5  # ReLU's kink is not differentiable
    check_layer(xp, [Linear(4, 4, "normal", rng), activation()], x)


@pytest.mark.parametrize("batch", [2, 3, 7, 16])
def test_batchnorm_training_gradients(xp, rng, batch):
    bn = BatchNorm(5)
    bn.gamma.data = rng.uniform(0.5, 2.0, 5)
    bn.beta.data = rng.normal(size=5)
    check_layer(xp, [Linear(3, 5, "normal", rng), bn], rng.normal(size=(batch, 3)) * 3 + 1)


@pytest.mark.parametrize("batch", [1, 5])
def test_batchnorm_inference_gradients(xp, rng, batch):
    bn = BatchNorm(4)
    bn.gamma.data = rng.uniform(0.5, 2.0, 4)
    bn.buffers = {"running_mean": rng.normal(size=4), "running_var": rng.uniform(0.5, 2, 4)}
    check_layer(xp, [bn], rng.normal(size=(batch, 4)), train=False)


# use_fast_path=False: the reference's own running update (on NumPy the numba kernels
# would otherwise stand in for it; array-api-strict and torch run it either way)
@pytest.mark.parametrize("use_fast_path", [True, False])
def test_batchnorm_forward_normalizes_and_tracks_running_stats(xp, rng, use_fast_path):
    bn = BatchNorm(3, momentum=0.9, eps=1e-5, use_fast_path=use_fast_path)
    model = Sequential([bn], device=xp, dtype="float64")
    x = rng.normal(size=(50, 3)) * [1.0, 4.0, 0.1] + [2.0, -1.0, 5.0]
    z = host(model.forward(dev(xp, x)))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.var(axis=0), x.var(axis=0) / (x.var(axis=0) + 1e-5), rtol=1e-10)
    np.testing.assert_allclose(host(bn.buffers["running_mean"]), 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(host(bn.buffers["running_var"]), 0.9 + 0.1 * x.var(axis=0),
                               rtol=1e-12)
    # Inference uses the running statistics, not the batch's.
    expected = (x - host(bn.buffers["running_mean"])) / np.sqrt(
        host(bn.buffers["running_var"]) + 1e-5)
    np.testing.assert_allclose(host(model.forward(dev(xp, x), train=False)), expected, rtol=1e-10)


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_batchnorm_unbiased_running_var(xp, rng, use_fast_path):
    bn = BatchNorm(2, momentum=0.0, unbiased_running_var=True, use_fast_path=use_fast_path)
    model = Sequential([bn], device=xp, dtype="float64")
    x = rng.normal(size=(8, 2))
    model.forward(dev(xp, x))
    np.testing.assert_allclose(host(bn.buffers["running_var"]), x.var(axis=0, ddof=1), rtol=1e-12)


def test_batchnorm_rejects_batch_of_one(xp):
    model = Sequential([BatchNorm(3)], device=xp, dtype="float64")
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.forward(dev(xp, np.ones((1, 3))))
    model.forward(dev(xp, np.ones((1, 3))), train=False)  # inference is fine


@pytest.mark.parametrize("one_hot", [True, False])
def test_softmax_cross_entropy(xp, rng, one_hot):
    logits = rng.normal(size=(7, 5)) * 3
    labels = rng.integers(0, 5, 7)
    target = np.eye(5)[labels] if one_hot else labels
    loss = SoftmaxCrossEntropy()
    value = float(loss.forward(dev(xp, logits), dev(xp, target)))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert value == pytest.approx(-np.mean(np.log(p[np.arange(7), labels])), rel=1e-12)
    grad = host(loss.backward())
    num = numeric_grad(lambda z: float(SoftmaxCrossEntropy().forward(dev(xp, z), dev(xp, target))),
                       logits.copy())
    assert rel_err(grad, num) < 1e-7


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_of_huge_logits_is_finite(xp, monkeypatch, fused, dtype):
    """Logits far past exp's range (softmax is shift-invariant: the largest is subtracted
    first): the loss, the probabilities and the gradient are exact, not inf or NaN."""
    if not fused:
        monkeypatch.setattr(nnopt.losses, "fast_for", lambda *arrays: None)
    logits = np.array([[1000.0, 0.0, -1000.0], [5000.0, 5000.0, 0.0]])
    labels = np.array([0, 0])
    loss = SoftmaxCrossEntropy()
    value, grad = loss.forward_backward(dev(xp, logits, getattr(xp, dtype)), dev(xp, labels))
    # row 1: p = (1, 0, 0), loss 0; row 2: p = (1/2, 1/2, 0), loss log 2
    want_prob = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    tol = 1e-6 if dtype == "float32" else 1e-12
    assert float(value) == pytest.approx(np.log(2.0) / 2, rel=tol)
    np.testing.assert_allclose(host(loss.prob), want_prob, atol=tol)
    np.testing.assert_allclose(host(grad), (want_prob - np.eye(3)[labels]) / 2, atol=tol)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("one_hot", [True, False])
def test_cross_entropy_with_a_masked_logit_is_finite(xp, monkeypatch, fused, one_hot):
    """A -inf logit off the label (a masked class) has probability 0: the loss and its
    gradient stay finite, and equal torch's cross_entropy (-log p of the label)."""
    if not fused:
        monkeypatch.setattr(nnopt.losses, "fast_for", lambda *arrays: None)
    logits = np.array([[1.0, -np.inf, 0.5], [0.2, 0.1, -np.inf]])
    labels = np.array([0, 1])
    target = np.eye(3)[labels] if one_hot else labels
    value, grad = SoftmaxCrossEntropy().forward_backward(dev(xp, logits), dev(xp, target))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert float(value) == pytest.approx(-np.mean(np.log(p[[0, 1], labels])), rel=1e-12)
    np.testing.assert_allclose(host(grad), (p - np.eye(3)[labels]) / 2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fused", [True, False])
def test_relu_passes_nan_on(xp, monkeypatch, fused):
    """As torch.relu: a NaN reaching ReLU stays NaN (set to 0 it would hide a blow-up);
    the fused path and the reference agree."""
    if not fused:
        monkeypatch.setattr(nnopt.layers, "fast_for", lambda *arrays: None)
    x = np.array([[np.nan, np.inf, -np.inf, 0.0, -1.5, 2.5]])
    y = host(ReLU().forward(dev(xp, x, xp.float64)))
    np.testing.assert_array_equal(y, [[np.nan, np.inf, 0.0, 0.0, 0.0, 2.5]])


@pytest.mark.parametrize("fused", [True, False])
def test_relu_backward_keeps_a_non_finite_gradient_visible(xp, monkeypatch, fused):
    """Where the unit is off the gradient is 0 * dy: a NaN or inf arriving there stays NaN
    (hidden as 0, a blow-up upstream would go unnoticed); the fused paths and the
    reference agree."""
    if not fused:
        monkeypatch.setattr(nnopt.layers, "fast_for", lambda *arrays: None)
    layer = ReLU()
    layer.forward(dev(xp, np.array([[0.0, -1.0, 2.0, np.nan]]), xp.float64))
    with np.errstate(invalid="ignore"):  # 0 * inf: the NaN this test asks for
        dx = host(layer.backward(dev(xp, np.array([[np.nan, np.inf, np.inf, 1.0]]), xp.float64)))
    np.testing.assert_array_equal(dx, [[np.nan, np.nan, np.inf, 0.0]])


@pytest.mark.parametrize("order", ["<", ">"])
def test_either_byte_order_and_bool_labels(order):
    """Big-endian arrays (read from a file as they are stored) take the reference path,
    which reads them; the fused kernels cannot (numba's TypingError, a KeyError before).
    Bool labels are the classes 0 and 1 (an error from inside array-api-compat before)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 3)).astype(f"{order}f8")
    labels = np.array([0, 2, 1, 2], dtype=f"{order}i8")
    value, grad = SoftmaxCrossEntropy().forward_backward(logits, labels)
    want = SoftmaxCrossEntropy().forward(logits.astype(np.float64), labels.astype(np.int64))
    assert float(value) == pytest.approx(float(want), rel=1e-14)
    y = ReLU().forward(logits)
    np.testing.assert_array_equal(y, np.maximum(logits.astype(np.float64), 0))
    value = SoftmaxCrossEntropy().forward(logits, np.array([True, False, False, True]))
    want = SoftmaxCrossEntropy().forward(logits, np.array([1, 0, 0, 1]))
    assert float(value) == float(want)
    value, _ = SoftmaxCrossEntropy().forward_backward(logits, np.array([True, False, False, True]))
    assert float(value) == pytest.approx(float(want), rel=1e-14)


def test_mse_loss(xp, rng):
    a, y = rng.normal(size=(9, 1)), rng.normal(size=(9, 1))
    loss = MSELoss()
    assert float(loss.forward(dev(xp, a), dev(xp, y))) == pytest.approx(np.sum((a - y) ** 2) / 18)
    num = numeric_grad(lambda z: float(MSELoss().forward(dev(xp, z), dev(xp, y))), a.copy())
    assert rel_err(host(loss.backward()), num) < 1e-7


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_whole_network_gradient(xp, rng, batchnorm, activation):
    model = nnopt.mlp([6, 5, 4, 3], activation, batchnorm=batchnorm, init="xavier",
                      seed=int(rng.integers(1 << 30)), device=xp, dtype="float64")
    for p in model.parameters():
        if p.name.endswith(".b"):  # a zero bias after a dead ReLU layer sits on the kink
            p.data[...] = dev(xp, rng.uniform(0.1, 0.5, p.shape))
    x, labels = dev(xp, rng.normal(size=(8, 6))), dev(xp, rng.integers(0, 3, 8))
    loss = SoftmaxCrossEntropy()
    model.zero_grad()
    model.loss_and_backward(x, labels, loss)
    analytic = host(model.flat.grad)

    def objective():
        # Training-mode output does not read the running statistics it updates.
        return float(loss.forward(model.forward(x), labels))

    assert rel_err(analytic, numeric_param_grad(objective, model.flat)) < 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_eval_mode_loss_and_backward_is_the_frozen_bn_gradient(xp, rng, fused):
    """After model.eval(), as in PyTorch: BN normalizes with its running statistics and
    leaves them alone, and the gradient is that network's (finite differences); train()
    switches back to the batch's statistics."""
    model = nnopt.mlp([6, 5, 4, 3], "tanh", batchnorm=True, init="xavier", fused=fused,
                      seed=int(rng.integers(1 << 30)), device=xp, dtype="float64")
    x, labels = dev(xp, rng.normal(size=(8, 6))), dev(xp, rng.integers(0, 3, 8))
    loss = SoftmaxCrossEntropy()
    for _ in range(3):  # running statistics of their own, not the initial 0 and 1
        model.forward(dev(xp, rng.normal(size=(8, 6)) * 2 + 1), train=True)
    buffers = {name: host(b[key]).copy() for name, b, key in model.named_buffers()}
    model.eval()
    model.zero_grad()
    value = float(model.loss_and_backward(x, labels, loss))
    assert value == pytest.approx(float(loss.forward(model.forward(x), labels)), rel=1e-12)
    for name, b, key in model.named_buffers():
        np.testing.assert_array_equal(host(b[key]), buffers[name])
    analytic = host(model.flat.grad)
    numeric = numeric_param_grad(lambda: float(loss.forward(model.forward(x), labels)), model.flat)
    assert rel_err(analytic, numeric) < 1e-6
    model.train()
    model.zero_grad()
    model.loss_and_backward(x, labels, loss)
    assert rel_err(host(model.flat.grad), analytic) > 1e-3  # the batch's statistics again


def test_gradients_accumulate_until_zero_grad(xp, rng):
    model = nnopt.mlp([3, 4, 2], seed=0, device=xp, dtype="float64")
    x, y = dev(xp, rng.normal(size=(5, 3))), dev(xp, rng.integers(0, 2, 5))
    loss = SoftmaxCrossEntropy()
    model.loss_and_backward(x, y, loss)
    once = host(model.flat.grad)
    model.loss_and_backward(x, y, loss)
    np.testing.assert_allclose(host(model.flat.grad), 2 * once, rtol=1e-12)
    model.zero_grad()
    assert not np.any(host(model.flat.grad))


def test_bad_inputs_get_clear_errors(xp, rng):
    model = nnopt.mlp([4, 3, 2], seed=0, device=xp, dtype="float64")
    with pytest.raises(ValueError, match="expects 4 features"):
        model.forward(dev(xp, np.ones((2, 5))))
    with pytest.raises(ValueError, match="2-D batch"):
        model.forward(dev(xp, np.ones((2, 2, 2))))
    with pytest.raises(TypeError, match="does not match the parameters"):
        model.forward(dev(xp, np.ones((2, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="predictions but 3 targets"):
        SoftmaxCrossEntropy().forward(dev(xp, np.ones((2, 2))), dev(xp, np.array([0, 1, 1])))
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        nnopt.mlp([4, 2], activation="relu6")
    with pytest.raises(ValueError, match="dtype must be"):
        nnopt.mlp([4, 2], dtype="float16")


def test_model_state_dict_round_trip_and_mismatch(xp):
    a = nnopt.mlp([4, 3, 2], batchnorm=True, seed=1, device=xp, dtype="float64")
    b = nnopt.mlp([4, 3, 2], batchnorm=True, seed=2, device=xp, dtype="float64")
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
    with pytest.raises(ValueError, match="different layer sizes"):
        nnopt.mlp([4, 5, 2], batchnorm=True, device=xp).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        nnopt.mlp([4, 3, 2], device=xp).load_state_dict(a.state_dict())


def test_same_seed_same_network_on_every_backend(xp):
    on_backend = nnopt.mlp([5, 4, 2], seed=7, device=xp, dtype="float64").state_dict()
    on_numpy = nnopt.mlp([5, 4, 2], seed=7, device="cpu", dtype="float64").state_dict()
    for key in on_numpy:
        np.testing.assert_array_equal(on_backend[key], on_numpy[key])


@pytest.mark.parametrize("make", [lambda: Linear(3, 2, rng=0), Sigmoid, Tanh, ReLU])
def test_backward_before_forward_is_a_clear_error(make):
    layer = make()
    with pytest.raises(RuntimeError, match="call forward"):
        layer.backward(np.ones((2, 2)))


def test_layers_do_not_share_buffers():
    a, b = ReLU(), Sigmoid()
    assert a.buffers is not b.buffers
    a.buffers["x"] = 1
    assert "x" not in b.buffers and "x" not in ReLU().buffers


def test_linear_takes_a_seed_or_a_generator():
    same = [Linear(4, 3, rng=7).W.data for _ in range(2)]
    np.testing.assert_array_equal(*same)
    gen = Linear(4, 3, rng=np.random.default_rng(7)).W.data
    np.testing.assert_array_equal(same[0], gen)
    assert not np.array_equal(Linear(4, 3).W.data, Linear(4, 3).W.data)


@pytest.mark.parametrize("shape", [(2, 3), (37, 29), (256, 5)])
def test_batchnorm_factored_form_is_the_textbook_one(xp, rng, shape):
    """The shifted-sum forward and the dx = a d - b (x - mean) - c backward of the fast
    paths, in array-API code, against the textbook formulas (float64, fresh inputs)."""
    m, n = shape
    x = rng.normal(size=shape) * rng.uniform(0.1, 5, n) + rng.normal(size=n) * 100
    gamma, beta, d = rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=shape)
    x_, gamma_, beta_, d_ = (dev(xp, a, xp.float64) for a in (x, gamma, beta, d))
    z_ref, mean_ref, var_ref, cache = batchnorm_forward(x_, gamma_, beta_, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = batchnorm_backward(d_, cache)
    z, mean, var, inv_std = batchnorm_forward_factored(x_, gamma_, beta_, 1e-5)
    dx, dgamma, dbeta = batchnorm_backward_factored(d_, x_, gamma_, mean, inv_std)
    for got, want in ((z, z_ref), (mean, mean_ref), (var, var_ref),
                      (inv_std, 1 / np.sqrt(host(var_ref) + 1e-5)), (dx, dx_ref),
                      (dgamma, dgamma_ref), (dbeta, dbeta_ref)):
        assert rel_err(host(got), host(want)) < 1e-10


def test_batchnorm_backward_before_forward_is_a_clear_error(xp):
    bn = nnopt.Sequential([BatchNorm(3)], device=xp, dtype="float64").layers[0]
    with pytest.raises(RuntimeError, match=r"call forward\(x\) before backward"):
        bn.backward(dev(xp, np.ones((2, 3)), xp.float64))
