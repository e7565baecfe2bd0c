r"""Layers with explicit forward and backward passes, as in the textbook.

Each layer caches what its backward needs during ``forward(x, train)``;
``backward(dy)`` adds the parameter gradients into ``param.grad`` (accumulating,
as PyTorch does; ``zero_grad`` clears them) and returns :math:`\partial J/\partial x`.
"""
from __future__ import annotations

from types import MappingProxyType

import numpy as np

from .backend import namespace_of, rng as make_rng
from .errors import CallOrderError, InputError, InputTypeError, check_int
from .fast import fast_for, matmul
from .init import get_initializer
from .params import Parameter


class Layer:
    """``params``: this layer's :class:`Parameter` objects; ``buffers``: named state arrays
    that are not trained (BN's running statistics). The class-level values are immutable
    defaults for layers that set none; ``__init__`` gives each instance its own."""

    params: tuple = ()
    buffers = MappingProxyType({})
    needs_input_grad = True

    def __init__(self):
        self.params = ()
        self.buffers = {}
        self.needs_input_grad = True

    def forward(self, x, train: bool = True):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __repr__(self):
        return type(self).__name__ + "()"


def check_input(layer, x, n_features):
    """Raise a clear error for a wrongly shaped or typed batch."""
    if not hasattr(x, "shape") or len(x.shape) != 2:
        shape = getattr(x, "shape", type(x).__name__)
        raise InputError(f"{layer!r} expects a 2-D batch (batch, features), got {shape}; "
                         "reshape images to (batch, 784)")
    if x.shape[0] == 0:
        raise InputError(f"{layer!r} got an empty batch (shape {tuple(x.shape)}); give it at "
                         "least one sample")
    if n_features is not None and x.shape[1] != n_features:
        raise InputError(f"{layer!r} expects {n_features} features per sample, "
                         f"got a batch of shape {tuple(x.shape)}")


def check_grads_bound(layer):
    """A layer's gradients are views into its model's flat gradient buffer: a layer outside
    a model has none to add to."""
    if any(p.grad is None for p in layer.params):
        raise InputError(f"{layer!r} has no gradient storage: its backward adds to the "
                         "gradients of a model; put it in one (nnopt.Sequential([layer])) "
                         "and call the model's backward")


def check_output_grad(who, dy, shape, dtype):
    """``dy``, the gradient of the last forward's output, must have that output's shape and
    dtype: the fused kernels index it by the output's shape (any other would read and write
    out of bounds), and broadcasting it would be a different gradient. ``who``: the
    backward being called, for the message: its name, or the layer whose backward it is
    (named only for an error: a block's repr costs 3 us, five times a step)."""
    shape = tuple(shape)
    if (not hasattr(dy, "shape") or not hasattr(dy, "dtype") or tuple(dy.shape) != shape
            or dy.dtype != dtype):
        _refuse_output_grad(who if isinstance(who, str) else f"{who!r}.backward", dy, shape,
                            dtype)


def _refuse_output_grad(who, dy, shape, dtype):
    if not hasattr(dy, "shape") or not hasattr(dy, "dtype"):
        raise InputTypeError(f"{who} expects the gradient of the last forward's output "
                             f"as an array of shape {shape}, got {type(dy).__name__}")
    if tuple(dy.shape) != shape:
        raise InputError(f"{who} expects the gradient of the last forward's output, of "
                         f"shape {shape}, got {tuple(dy.shape)}")
    if dy.dtype != dtype:
        raise InputTypeError(f"{who} expects the gradient in the output's dtype {dtype}, "
                             f"got {dy.dtype}; convert it (xp.astype(dy, xp.{dtype}))")


def check_forward_ran(layer, cached):
    if cached is None:
        raise CallOrderError(f"{layer!r}: backward needs the values of a forward pass; call "
                           "forward(x) (or model.loss_and_backward) before backward")


def check_dtype(layer, x, param):
    if x.dtype != param.data.dtype:
        raise InputTypeError(f"{layer!r}: input dtype {x.dtype} does not match the parameters' "
                        f"{param.data.dtype}; convert the input (xp.astype(x, xp.{param.data.dtype}))"
                        " or build the model with that dtype")


def drawn_weights(draw, shape, rng, init):
    """``draw(shape, rng)``, checked: a user's initializer may return another layout."""
    try:
        weights = np.asarray(draw(shape, rng), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"init {init!r} did not return an array of numbers ({exc})") from None
    if weights.shape != shape:
        raise InputError(f"init {init!r} returned weights of shape {weights.shape}; Linear "
                         f"takes W of shape (n_in, n_out) = {shape} (transpose PyTorch's "
                         "(out, in) layout)")
    if not np.isfinite(weights).all():
        raise InputError(f"init {init!r} returned non-finite weights; every weight must be "
                         "a finite number")
    return weights


class Linear(Layer):
    r"""Fully connected: :math:`z = xW + b`, W of shape (n_in, n_out).

    Backward: :math:`dW = x^T dz,\ db = \sum_{batch} dz,\ dx = dz W^T`.

    ``rng``: a NumPy Generator or a seed for the weights' draw (default: a fresh seed).
    """

    def __init__(self, n_in: int, n_out: int, init="msra", rng=None, name="fc",
                 init_options=None):
        super().__init__()
        self.n_in = check_int("Linear n_in", n_in, low=1)
        self.n_out = check_int("Linear n_out", n_out, low=1)
        rng = rng if isinstance(rng, np.random.Generator) else make_rng(rng)
        self.x = None
        if init_options is not None and not isinstance(init_options, dict):
            raise InputTypeError(f"init_options must be a dict of the initializer's options, "
                                 f"such as {{'std': 0.01}}, got {init_options!r}")
        draw = get_initializer(init, **(init_options or {}))
        self.W = Parameter(drawn_weights(draw, (self.n_in, self.n_out), rng, init), f"{name}.W")
        self.b = Parameter(np.zeros(self.n_out), f"{name}.b")
        self.params = (self.W, self.b)

    def forward(self, x, train=True):
        check_input(self, x, self.n_in)
        check_dtype(self, x, self.W)
        self.x = x
        z = matmul(x, self.W.data)
        z += self.b.data
        return z

    def backward(self, dy):
        check_forward_ran(self, self.x)
        check_output_grad(self, dy, (self.x.shape[0], self.n_out), self.x.dtype)
        check_grads_bound(self)
        xp = namespace_of(dy)
        self.W.grad += matmul(self.x, dy, trans_a=True)
        self.b.grad += xp.sum(dy, axis=0)
        return matmul(dy, self.W.data, trans_b=True) if self.needs_input_grad else None

    def __repr__(self):
        return f"Linear({self.n_in}, {self.n_out})"


class Activation(Layer):
    """An element-wise activation; ``y`` is its last output, which its backward needs."""

    def __init__(self):
        super().__init__()
        self.y = None


class Sigmoid(Activation):
    r""":math:`a = 1 / (1 + e^{-z})`, :math:`da/dz = a (1 - a)`."""

    def forward(self, x, train=True):
        xp = namespace_of(x)
        self.y = 1.0 / (1.0 + xp.exp(-x))
        return self.y

    def backward(self, dy):
        check_forward_ran(self, self.y)
        check_output_grad(self, dy, self.y.shape, self.y.dtype)
        return dy * self.y * (1.0 - self.y)


class Tanh(Activation):
    r""":math:`a = \tanh z`, :math:`da/dz = 1 - a^2`."""

    def forward(self, x, train=True):
        self.y = namespace_of(x).tanh(x)
        return self.y

    def backward(self, dy):
        check_forward_ran(self, self.y)
        check_output_grad(self, dy, self.y.shape, self.y.dtype)
        return dy * (1.0 - self.y * self.y)


class ReLU(Activation):
    r""":math:`a = \max(z, 0)`, :math:`da/dz = [z > 0]`."""

    def __init__(self):
        super().__init__()
        self.fast = self.mask = None

    def forward(self, x, train=True):
        self.fast = fast_for(x) if len(x.shape) == 2 else None
        if self.fast is not None:
            self.y = self.fast.relu_forward(x)
            return self.y
        xp = namespace_of(x)
        self.mask = x > 0
        # NaN passes on (as torch.relu and the fused paths): a NaN set to 0 would hide it
        self.y = xp.where(x <= 0, 0.0, x)
        return self.y

    def backward(self, dy):
        check_forward_ran(self, self.y)
        check_output_grad(self, dy, self.y.shape, self.y.dtype)
        if self.fast is not None:
            return self.fast.relu_backward(dy, self.y)
        # a product, as the fused paths: a NaN or inf gradient stays NaN where the unit is
        # off (0 * NaN), so a blow-up upstream is never hidden (torch gives 0 there)
        xp = namespace_of(dy)
        return dy * xp.astype(self.mask, dy.dtype)


ACTIVATIONS = {"sigmoid": Sigmoid, "tanh": Tanh, "relu": ReLU}
