r"""Layers with explicit forward and backward passes, as in the textbook.

Each layer caches what its backward needs during ``forward(x, train)``;
``backward(dy)`` adds the parameter gradients into ``param.grad`` (accumulating,
as PyTorch does; ``zero_grad`` clears them) and returns :math:`\partial J/\partial x`.
"""
from __future__ import annotations

import numpy as np

from .backend import namespace_of
from .fast import capturing, fast_for, gpu_kernels
from .init import get_initializer
from .params import Parameter


class Layer:
    params: tuple = ()
    buffers: dict = {}
    needs_input_grad = True

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
        raise ValueError(f"{layer!r} expects a 2-D batch (batch, features), got {shape}; "
                         "reshape images to (batch, 784)")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"{layer!r} expects {n_features} features per sample, "
                         f"got a batch of shape {tuple(x.shape)}")


def check_dtype(layer, x, param):
    if x.dtype != param.data.dtype:
        raise TypeError(f"{layer!r}: input dtype {x.dtype} does not match the parameters' "
                        f"{param.data.dtype}; convert the input (xp.astype(x, xp.{param.data.dtype}))"
                        " or build the model with that dtype")


def matmul(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b); inside a captured CUDA graph, nnopt's own GEMM kernel (CuPy refuses
    cuBLAS calls while capturing)."""
    if capturing():
        return gpu_kernels().gemm(a, b, trans_a, trans_b)
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


class Linear(Layer):
    r"""Fully connected: :math:`z = xW + b`, W of shape (n_in, n_out).

    Backward: :math:`dW = x^T dz,\ db = \sum_{batch} dz,\ dx = dz W^T`.
    """

    def __init__(self, n_in: int, n_out: int, init="msra", rng=None, name="fc",
                 init_options=None):
        if int(n_in) < 1 or int(n_out) < 1:
            raise ValueError(f"Linear needs n_in, n_out >= 1, got ({n_in}, {n_out})")
        self.n_in, self.n_out = int(n_in), int(n_out)
        rng = rng if rng is not None else np.random.default_rng()
        draw = get_initializer(init, **(init_options or {}))
        self.W = Parameter(draw((self.n_in, self.n_out), rng), f"{name}.W")
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
        xp = namespace_of(dy)
        self.W.grad += matmul(self.x, dy, trans_a=True)
        self.b.grad += xp.sum(dy, axis=0)
        return matmul(dy, self.W.data, trans_b=True) if self.needs_input_grad else None

    def __repr__(self):
        return f"Linear({self.n_in}, {self.n_out})"


class Sigmoid(Layer):
    r""":math:`a = 1 / (1 + e^{-z})`, :math:`da/dz = a (1 - a)`."""

    def forward(self, x, train=True):
        xp = namespace_of(x)
        self.y = 1.0 / (1.0 + xp.exp(-x))
        return self.y

    def backward(self, dy):
        return dy * self.y * (1.0 - self.y)


class Tanh(Layer):
    r""":math:`a = \tanh z`, :math:`da/dz = 1 - a^2`."""

    def forward(self, x, train=True):
        self.y = namespace_of(x).tanh(x)
        return self.y

    def backward(self, dy):
        return dy * (1.0 - self.y * self.y)


class ReLU(Layer):
    r""":math:`a = \max(z, 0)`, :math:`da/dz = [z > 0]`."""

    def forward(self, x, train=True):
        self.fast = fast_for(x) if len(x.shape) == 2 else None
        if self.fast is not None:
            self.y = self.fast.relu_forward(x)
            return self.y
        xp = namespace_of(x)
        self.mask = x > 0
        return xp.where(self.mask, x, 0.0)

    def backward(self, dy):
        if self.fast is not None:
            return self.fast.relu_backward(dy, self.y)
        return namespace_of(dy).where(self.mask, dy, 0.0)


ACTIVATIONS = {"sigmoid": Sigmoid, "tanh": Tanh, "relu": ReLU}
