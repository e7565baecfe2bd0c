"""A sequential container over flat parameter storage, and the MLP builder."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np

from .backend import asarray, float_dtype, get_namespace, rng as make_rng, to_numpy
from .batchnorm import BatchNorm
from .block import Block, DeferredOutput
from .errors import InputError, InputTypeError, check_bool, check_int, unknown_name
from .layers import ACTIVATIONS, Layer, Linear, check_output_grad
from .params import FlatParameters


class Sequential:
    """Layers applied in order; all their parameters share one :class:`FlatParameters`.

    ``layers`` may hold blocks (:class:`~nnopt.block.Block`: Linear -> BN -> activation as one
    layer with fused passes): the model runs them (``steps``), while ``model.layers`` is
    the textbook's view, every Linear, BatchNorm and activation in order, the blocks'
    own layers included (inspect or call them one by one as before).

    ``device`` is a name (``"cpu"``, ``"gpu"``, ``"strict"``, ...) or a namespace.
    Like a PyTorch module, a model is in training mode until ``eval()`` (``train()``
    switches back): ``model(x)`` and ``forward(x)`` then use BN's running statistics and
    leave them alone. ``forward(x, train=...)`` overrides the mode for one call.
    """

    def __init__(self, layers, device="cpu", dtype="float32"):
        self.steps = list(layers)
        self.layers = [inner for step in self.steps
                       for inner in (step.layers if isinstance(step, Block) else (step,))]
        bad = [layer for layer in self.steps + self.layers if not isinstance(layer, Layer)]
        if bad:
            raise InputTypeError(f"Sequential takes nnopt layers, got {bad[0]!r}")
        if device is None or not (isinstance(device, str) or hasattr(device, "asarray")):
            raise InputTypeError(f"device must be a name such as 'cpu' or 'gpu' (or an array "
                                 f"namespace), got {device!r}")
        number_default_names(self.layers)
        self.training = True
        self.output_spec = None  # (shape, dtype) of the last forward's output
        self.xp = get_namespace(device) if isinstance(device, str) else device
        self.flat = FlatParameters([p for layer in self.layers for p in layer.params],
                                   self.xp, dtype)
        self.dtype = self.flat.dtype
        for layer in self.layers:
            for key, value in layer.buffers.items():
                layer.buffers[key] = asarray(np.asarray(value, dtype=np.float64), self.xp,
                                             dtype=self.dtype)
        if self.steps:
            # Nobody needs dJ/dx of the input data: skip that matmul.
            self.steps[0].needs_input_grad = False
        self.blocks = [step for step in self.steps if isinstance(step, Block)]
        for block in self.blocks:  # joined at the end of backward
            block.weight_grad_beside = True
        for before, step in zip(self.steps, self.steps[1:]):
            # A block may leave its input gradient's product to the block before it, which
            # can fuse it into its own backward pass (nnopt.block.DeferredInputGrad).
            if isinstance(step, Block) and isinstance(before, Block):
                step.defer_input_grad = True

    def forward(self, x, train: bool | None = None):
        """The network's output; ``train`` defaults to the model's mode (``self.training``)."""
        train = self.training if train is None else check_bool("forward train", train)
        for step in self.steps:
            x = step.forward(x, train)
        return self._note_output(x)

    def _note_output(self, out):
        """Remember the shape and dtype of the output, which backward's gradient must have."""
        value = out.out if isinstance(out, DeferredOutput) else out
        self.output_spec = (tuple(value.shape), value.dtype)
        return out

    __call__ = forward

    def train(self, mode: bool = True):
        """Training mode (BN normalizes over the batch and updates its running statistics);
        returns the model, as in PyTorch."""
        self.training = check_bool("train mode", mode)
        return self

    def eval(self):
        """Inference mode: BN uses its running statistics and does not change them."""
        return self.train(False)

    def backward(self, dy):
        self._check_output_grad(dy)
        for step in reversed(self.steps):
            dy = step.backward(dy)
        for block in self.blocks:  # weight gradients computed beside the main stream (GPU)
            if block.joins is not None:
                block.join_weight_grad()
        return dy

    def _check_output_grad(self, dy):
        """The fused kernels index ``dy`` by the saved output's shape: anything else would
        read and write out of bounds."""
        spec = self.output_spec
        if spec is None:
            raise InputError("backward before forward: run model.forward(x) (or "
                             "model.loss_and_backward) first")
        check_output_grad("backward", dy, *spec)

    def forward_to_loss(self, x, train: bool | None = None):
        """Forward (``train`` defaults to the model's mode) for a loss's ``forward_backward``:
        in training mode the last block may leave its output to the loss (a
        :class:`nnopt.block.DeferredOutput`), which on the GPU computes it inside its own
        launch."""
        train = self.training if train is None else check_bool("forward_to_loss train", train)
        for step in self.steps[:-1]:
            x = step.forward(x, train)
        last = self.steps[-1] if self.steps else None
        if isinstance(last, Block) and train:
            return self._note_output(last.forward(x, True, for_loss=True))
        return self._note_output(x if last is None else last.forward(x, train))

    def loss_and_backward(self, x, target, loss):
        """Forward in the model's mode, the loss, backward; returns the loss (a 0-d array).
        As in PyTorch, after ``eval()`` BN normalizes with its running statistics (and
        leaves them alone), so the gradient is the frozen-BN network's (fine-tuning);
        ``train()`` switches back."""
        value, grad = loss.forward_backward(self.forward_to_loss(x), target)
        self.backward(grad)
        return value

    def parameters(self):
        return list(self.flat.params)

    def named_parameters(self):
        """``(name, Parameter)`` pairs, e.g. ``("fc1.W", ...)``, in storage order."""
        return [(p.name, p) for p in self.flat.params]

    def zero_grad(self):
        self.flat.zero_grad()

    @property
    def n_params(self) -> int:
        return self.flat.size

    def named_buffers(self):
        for i, layer in enumerate(self.layers):
            for key, value in layer.buffers.items():
                yield f"{getattr(layer, 'name', i)}.{key}", layer.buffers, key

    def state_dict(self) -> dict:
        """Host copies of every parameter and buffer, by name."""
        state = {p.name: to_numpy(p.data).copy() for p in self.flat.params}
        for name, holder, key in self.named_buffers():
            state[name] = to_numpy(holder[key]).copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy a :meth:`state_dict` in (a dict, or any mapping of names to arrays, such as
        ``np.load("state.npz")``). Every entry is checked before any is assigned, so a bad
        one leaves the model as it was."""
        if not isinstance(state, Mapping):
            raise InputTypeError(f"load_state_dict expects the dict of model.state_dict(), "
                                 f"got {type(state).__name__}")
        state = dict(state.items())  # (an npz file reads each array once)
        targets = {p.name: p.data for p in self.flat.params}
        targets.update({name: holder[key] for name, holder, key in self.named_buffers()})
        missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        if missing or unexpected:
            raise InputError("state_dict does not belong to this model: "
                             f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        values = {}
        dtype_name = "float32" if "32" in str(self.dtype) else "float64"
        largest = float(np.finfo(dtype_name).max)
        for name, target in targets.items():
            raw = state[name]
            if hasattr(raw, "shape") and not isinstance(raw, (np.ndarray, np.generic)):
                raw = to_numpy(raw)  # a device array
            try:
                if np.iscomplexobj(raw):
                    raise TypeError
                value = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"state_dict entry {name!r} is not real numbers "
                                 f"({type(state[name]).__name__}); it is not a model state") from None
            if tuple(value.shape) != tuple(target.shape):
                raise InputError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, "
                                 f"this model's is {tuple(target.shape)}: different layer sizes")
            if not np.all(np.abs(value) <= largest):  # NaN, infinite, or so in this dtype
                raise InputError(f"state_dict entry {name!r} holds NaN or values beyond "
                                 f"{dtype_name}'s range; it is not a trained model's state (a "
                                 "diverged run's?)")
            if name.endswith("running_var") and np.any(value < 0):
                raise InputError(f"state_dict entry {name!r} holds a negative variance; it is "
                                 "not a BN layer's state")
            values[name] = value
        for name, target in targets.items():
            target[...] = asarray(values[name], self.xp, dtype=self.dtype)

    def __repr__(self):
        inner = ", ".join(repr(step) for step in self.steps)
        return f"Sequential({inner}; {self.n_params} parameters)"


def number_default_names(layers):
    """Where two or more Linear (or BatchNorm) layers kept their default name ("fc", "bn"),
    number them in order, fc1, fc2, ... as ``mlp`` names them, so that a model built of
    unnamed layers has unique parameter names (PyTorch numbers its modules too)."""
    for kind, default in ((Linear, "fc"), (BatchNorm, "bn")):
        unnamed = [layer for layer in layers if isinstance(layer, kind)
                   and all(p.storage is None and p.name.split(".")[0] == default
                           for p in layer.params)]
        if len(unnamed) < 2:
            continue
        for i, layer in enumerate(unnamed, start=1):
            for p in layer.params:
                p.name = f"{default}{i}.{p.name.split('.', 1)[1]}"
            if hasattr(layer, "name"):
                layer.name = f"{default}{i}"


def mlp(sizes, activation="relu", batchnorm=False, init="msra", seed=0, device="cpu",
        dtype="float32", init_options=None, bn_options=None, fused=True) -> Sequential:
    """Build ``sizes[0] -> ... -> sizes[-1]``: each hidden layer is FC [-> BN] -> activation,
    the last one a plain FC (its softmax lives in the loss).

    The textbook's MNIST network: ``mlp([784, 128, 64, 32, 16, 10], "relu", batchnorm=True)``.
    ``fused=True``: each FC [-> BN] -> activation (and the last FC) is one
    :class:`~nnopt.block.Block`, with fused passes on NumPy; ``fused=False``: the textbook's
    layer-by-layer model. Both have the same ``model.layers``, parameters, initial values
    and state dict. Synchronized BN (``bn_options={"sync": ...}``) runs layer by layer.
    """
    try:
        sizes = [check_int("layer size", s, low=1) for s in sizes]
    except (InputError, TypeError) as exc:
        raise InputError(f"mlp sizes must be integers >= 1, such as [784, 128, 10], got "
                         f"{sizes!r} ({exc})") from None
    if len(sizes) < 2:
        raise InputError(f"mlp needs at least two sizes (inputs and outputs), got {sizes}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise unknown_name("activation", activation, ACTIVATIONS)
    float_dtype(np, dtype)
    batchnorm = check_bool("mlp batchnorm", batchnorm)
    bn_takes = [name for name in inspect.signature(BatchNorm).parameters
                if name not in ("n_features", "name")]
    if bn_options is not None and (not isinstance(bn_options, dict)
                                   or set(bn_options) - set(bn_takes)):
        raise InputError(f"bn_options must be a dict of BatchNorm's options ({', '.join(bn_takes)}), "
                         f"got {bn_options!r}")
    fused = check_bool("mlp fused", fused) and not (bn_options or {}).get("sync")
    draws = make_rng(seed)
    steps = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        hidden = i < len(sizes) - 1
        linear = Linear(n_in, n_out, init, draws, name=f"fc{i}", init_options=init_options)
        bn = BatchNorm(n_out, name=f"bn{i}", **(bn_options or {})) if hidden and batchnorm else None
        act = ACTIVATIONS[activation]() if hidden else None
        if fused:
            steps.append(Block(linear, bn, act))
        else:
            steps.extend(layer for layer in (linear, bn, act) if layer is not None)
    return Sequential(steps, device=device, dtype=dtype)
