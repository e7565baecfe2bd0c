"""A sequential container over flat parameter storage, and the MLP builder."""
from __future__ import annotations

import numpy as np

from .backend import asarray, float_dtype, get_namespace, rng as make_rng, to_numpy
from .batchnorm import BatchNorm
from .errors import unknown_name
from .layers import ACTIVATIONS, Layer, Linear
from .params import FlatParameters


class Sequential:
    """Layers applied in order; all their parameters share one :class:`FlatParameters`.

    ``device`` is a name (``"cpu"``, ``"gpu"``, ``"strict"``, ...) or a namespace.
    """

    def __init__(self, layers, device="cpu", dtype="float32"):
        self.layers = list(layers)
        bad = [layer for layer in self.layers if not isinstance(layer, Layer)]
        if bad:
            raise TypeError(f"Sequential takes nnopt layers, got {bad[0]!r}")
        self.xp = get_namespace(device) if isinstance(device, str) else device
        self.flat = FlatParameters([p for layer in self.layers for p in layer.params],
                                   self.xp, dtype)
        self.dtype = self.flat.dtype
        for layer in self.layers:
            for key, value in layer.buffers.items():
                layer.buffers[key] = asarray(np.asarray(value, dtype=np.float64), self.xp,
                                             dtype=self.dtype)
        if self.layers:
            # Nobody needs dJ/dx of the input data: skip that matmul.
            self.layers[0].needs_input_grad = False

    def forward(self, x, train: bool = True):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    __call__ = forward

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def loss_and_backward(self, x, target, loss):
        """Forward in training mode, the loss, backward; returns the loss (a 0-d array)."""
        value = loss.forward(self.forward(x, train=True), target)
        self.backward(loss.backward())
        return value

    def parameters(self):
        return list(self.flat.params)

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
        targets = {p.name: p.data for p in self.flat.params}
        targets.update({name: holder[key] for name, holder, key in self.named_buffers()})
        missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        if missing or unexpected:
            raise ValueError("state_dict does not belong to this model: "
                             f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}")
        for name, target in targets.items():
            value = np.asarray(state[name])
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, "
                                 f"this model's is {tuple(target.shape)}: different layer sizes")
        for name, target in targets.items():
            target[...] = asarray(np.asarray(state[name], dtype=np.float64), self.xp,
                                  dtype=self.dtype)

    def __repr__(self):
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential({inner}; {self.n_params} parameters)"


def mlp(sizes, activation="relu", batchnorm=False, init="msra", seed=0, device="cpu",
        dtype="float32", init_options=None, bn_options=None) -> Sequential:
    """Build ``sizes[0] -> ... -> sizes[-1]``: each hidden layer is FC [-> BN] -> activation,
    the last one a plain FC (its softmax lives in the loss).

    The textbook's MNIST network: ``mlp([784, 128, 64, 32, 16, 10], "relu", batchnorm=True)``.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp needs at least two sizes >= 1, got {sizes}")
    if activation not in ACTIVATIONS:
        raise unknown_name("activation", activation, ACTIVATIONS)
    draws = make_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers.append(Linear(n_in, n_out, init, draws, name=f"fc{i}", init_options=init_options))
        if i < len(sizes) - 1:
            if batchnorm:
                layers.append(BatchNorm(n_out, name=f"bn{i}", **(bn_options or {})))
            layers.append(ACTIVATIONS[activation]())
    float_dtype(np, dtype)
    return Sequential(layers, device=device, dtype=dtype)
