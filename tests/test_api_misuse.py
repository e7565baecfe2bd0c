"""The Python API used as a hurried user uses it: every mistake is one nnopt error naming
the fix (never a traceback from inside NumPy), and nothing is silently ignored."""
import json

import numpy as np
import pytest

import nnopt
from nnopt import optim
from nnopt.batchnorm import BatchNorm
from nnopt.block import Block
from nnopt.errors import CallOrderError, InputError, InputTypeError, NnoptError
from nnopt.layers import Linear, ReLU
from nnopt.losses import MSELoss


def data(n=16, features=4, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, features), dtype=np.float32), np.arange(n) % classes


def test_assigning_data_or_grad_writes_what_the_optimizer_updates():
    model = nnopt.mlp([4, 8, 2], seed=0)
    weight = model.layers[0].W
    weight.data = np.full((4, 8), 0.1)  # a hand-made init: into the flat buffer
    assert np.all(model.flat.data[:32] == np.float32(0.1))
    assert np.all(model.state_dict()["fc1.W"] == np.float32(0.1))
    x, y = data()
    opt = optim.SGD(model, lr=0.5)
    for _ in range(3):
        model.zero_grad()
        model.loss_and_backward(x, y, nnopt.SoftmaxCrossEntropy())
        for p in model.parameters():  # gradient clipping by assignment
            p.grad = np.clip(p.grad, -1e-3, 1e-3)
        opt.step()
    moved = np.abs(weight.data - np.float32(0.1)).max()
    assert 0 < moved <= 3 * 0.5 * 1e-3 * (1 + 1e-5)  # trained, and the clipped steps taken
    assert weight.data.base is not None and np.shares_memory(weight.data, model.flat.data)
    with pytest.raises(InputError, match=r"'fc1.W' has shape \(4, 8\); a value of shape \(8, 4\)"):
        weight.data = np.ones((8, 4))
    with pytest.raises(InputError, match="cannot be None; zero it with model.zero_grad"):
        weight.grad = None
    with pytest.raises(InputTypeError, match="must be an array of numbers, got str"):
        weight.data = "abc"


def test_a_block_checks_its_layers():
    with pytest.raises(InputError, match=r"BatchNorm\(2\) cannot follow Linear\(4, 3\): give it "
                                         "n_features=3"):
        Block(Linear(4, 3), BatchNorm(2), ReLU())
    with pytest.raises(InputTypeError, match="an activation goes third"):
        Block(Linear(4, 3), ReLU())
    with pytest.raises(InputTypeError, match="starts with a Linear layer"):
        Block(ReLU())
    with pytest.raises(InputTypeError, match="third layer is an activation"):
        Block(Linear(4, 3), None, Linear(3, 3))


def test_labels_in_a_memmap_are_checked(tmp_path):
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1, 0, 7]))
    labels = np.load(tmp_path / "y.npy", mmap_mode="r")
    logits = np.zeros((6, 2), np.float32)
    loss = nnopt.SoftmaxCrossEntropy()
    for call in (loss.forward, loss.forward_backward):
        with pytest.raises(InputError, match="class label 7 is out of range for 2 classes"):
            call(logits, labels)
    np.save(tmp_path / "rows.npy", np.full((6, 2), 1.5, np.float32))
    with pytest.raises(InputError, match="sums to 3"):
        loss.forward(logits, np.load(tmp_path / "rows.npy", mmap_mode="r"))


def test_modes_are_booleans_not_any_truthy_value():
    model = nnopt.mlp([4, 3, 2], batchnorm=True, fused=False)
    assert model.train("false").training is False and model.train(np.True_).training is True
    with pytest.raises(InputError, match="train mode must be true or false"):
        model.train("nope")
    bn = model.layers[1]
    before = np.array(bn.buffers["running_mean"])
    model.forward(data()[0], train="no")  # inference: the running mean stays
    assert np.array_equal(bn.buffers["running_mean"], before)


def test_schedulers_name_their_misuse():
    model = nnopt.mlp([4, 2])
    opt = optim.SGD(model, lr=0.1)
    for make in (lambda: optim.StepLR(model, 10), lambda: optim.ReduceLROnPlateau(model)):
        with pytest.raises(InputTypeError, match="pass the optimizer"):
            make()
    with pytest.raises(InputTypeError, match=r"a schedule is a function \(epoch, base_lr\)"):
        optim.LRScheduler(opt, 0.5)
    backwards = optim.LRScheduler(opt, lambda epoch, base: -base)
    with pytest.raises(InputError, match="negative learning rate -0.1 at epoch 1"):
        backwards.step()
    assert opt.param_groups[0]["lr"] == 0.1
    step = optim.StepLR(opt, 10)
    with pytest.raises(InputError, match="StepLR state has no 'epoch'"):
        step.load_state_dict({})
    with pytest.raises(InputError, match="epoch must be an integer"):
        step.load_state_dict({"epoch": 2.7, "base_lrs": [0.1]})
    with pytest.raises(InputError, match="ReduceLROnPlateau state has no 'bad_epochs'"):
        optim.ReduceLROnPlateau(opt).load_state_dict({"epoch": 1, "best": None})


def test_unnamed_layers_are_numbered_and_named_duplicates_say_the_fix():
    model = nnopt.Sequential([Linear(4, 3), BatchNorm(3), ReLU(), Linear(3, 2)])
    assert [name for name, _ in model.named_parameters()] == [
        "fc1.W", "fc1.b", "bn.gamma", "bn.beta", "fc2.W", "fc2.b"]  # one BN keeps its name
    two_bn = nnopt.Sequential([Linear(4, 3, name="a"), BatchNorm(3), Linear(3, 3, name="b"),
                               BatchNorm(3)])
    assert "bn2.running_var" in two_bn.state_dict() and "a.W" in two_bn.state_dict()
    with pytest.raises(InputError, match=r"repeated: \['a.W', 'a.b'\]; give each layer its own "
                                         "name"):
        nnopt.Sequential([Linear(4, 3, name="a"), ReLU(), Linear(3, 2, name="a")])


@pytest.mark.parametrize("init, message", [
    (lambda shape, rng: rng.normal(size=shape[::-1]), r"shape \(3, 4\); Linear takes W of shape "
                                                      r"\(n_in, n_out\) = \(4, 3\)"),
    (lambda shape, rng: np.ones(3), r"shape \(3,\)"),
    (lambda shape, rng: np.full(shape, np.nan), "non-finite weights"),
    (lambda shape, rng: "abc", "did not return an array of numbers"),
])
def test_a_callable_init_is_checked(init, message):
    with pytest.raises(InputError, match=message):
        nnopt.mlp([4, 3, 2], init=init)


def test_optimizer_state_goes_only_to_the_parameters_it_was_saved_for():
    model = nnopt.mlp([3, 3, 3, 2])  # fc1 and fc2 have the same sizes
    named = dict(model.named_parameters())

    def groups(*layers):
        return [{"params": [named[f"{layer}.W"], named[f"{layer}.b"]]} for layer in layers]

    saved = optim.Adam(groups("fc1", "fc2")).state_dict()
    with pytest.raises(InputError, match=r"saved for parameters \['fc1.W', 'fc1.b'\], but this "
                                         r"optimizer's group 0 holds \['fc2.W', 'fc2.b'\]"):
        optim.Adam(groups("fc2", "fc1")).load_state_dict(saved)
    optim.Adam(groups("fc1", "fc2")).load_state_dict(json.loads(json.dumps(
        saved, default=lambda a: a.tolist())))  # (through JSON, as a checkpoint keeps it)


def test_losses_name_their_misuse():
    torch = pytest.importorskip("torch")
    model = nnopt.mlp([4, 2])
    x, y = data()
    with pytest.raises(InputTypeError, match="predictions are numpy.ndarray but targets "
                                             "torch.Tensor; give targets of the predictions' kind"):
        model.loss_and_backward(x, torch.from_numpy(y), nnopt.SoftmaxCrossEntropy())
    with pytest.raises(CallOrderError, match="needs a forward"):
        MSELoss().backward()
    with pytest.raises(InputTypeError, match="predictions must be an array"):
        MSELoss()([1.0, 2.0], np.ones(2))
    with pytest.raises(InputTypeError, match="of shape \\(\\)"):
        MSELoss()(np.float32(1), np.ones(1))


def test_errors_raised_on_purpose_are_nnopt_errors():
    """A program tells a user's mistake from a bug by NnoptError; the built-in kinds stay."""
    with pytest.raises(CallOrderError) as caught:
        Linear(4, 3).backward(np.ones((2, 3)))
    assert isinstance(caught.value, RuntimeError)
    with pytest.raises(CallOrderError):
        BatchNorm(3).backward(np.ones((2, 3)))
    model = nnopt.mlp([4, 2])
    model.zero_grad()
    model.flat.grad[0] = np.nan
    with pytest.raises(FloatingPointError) as caught:
        optim.SGD(model, lr=0.1, nonfinite="raise").step()
    assert isinstance(caught.value, NnoptError)
    with pytest.raises(InputTypeError, match="a parameter group is a dict"):
        optim.SGD(model, lr=0.1).add_param_group([model.parameters()[0]])


def test_a_model_refused_for_a_bound_layer_leaves_its_other_layers_free():
    shared, fresh = Linear(4, 3, name="a"), Linear(4, 3, name="c")
    nnopt.Sequential([shared, Linear(3, 2, name="b")])
    with pytest.raises(InputError, match="'a.W' is already bound .* give each model layers of"):
        nnopt.Sequential([fresh, shared])
    assert nnopt.Sequential([fresh]).n_params == 15  # the layer was not taken by the failure


def test_a_state_saved_with_numpy_loads_back(tmp_path):
    model = nnopt.mlp([4, 3, 2], batchnorm=True, seed=0)
    np.savez(tmp_path / "state.npz", **model.state_dict())
    other = nnopt.mlp([4, 3, 2], batchnorm=True, seed=1)
    with np.load(tmp_path / "state.npz") as saved:
        other.load_state_dict(saved)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[name], value)
