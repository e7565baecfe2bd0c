"""Parameters and the flat storage they live in.

Every parameter of a model is a view into one contiguous ``data`` buffer and its
gradient a view into one ``grad`` buffer, so an optimizer step over a whole model is
a single pass over two flat arrays (where the fused kernels plug in), and zeroing all
gradients is one fill.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import asarray, float_dtype, to_numpy
from .errors import InputError


class Parameter:
    """A named array with its gradient. Before binding, ``data`` is a host array."""

    def __init__(self, value, name: str = "param"):
        self.data = value
        self.grad = None
        self.name = name
        self.storage: FlatParameters | None = None
        self.offset = 0

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self):
        where = "unbound" if self.storage is None else f"offset {self.offset}"
        return f"Parameter({self.name!r}, shape={self.shape}, {where})"


class FlatParameters:
    """One contiguous buffer for many parameters (and one for their gradients).

    >>> import numpy as np, nnopt.backend as B
    >>> w, b = Parameter(np.ones((2, 3)), "W"), Parameter(np.zeros(3), "b")
    >>> flat = FlatParameters([w, b], B.get_namespace("cpu"), "float64")
    >>> flat.data.shape, w.data.shape
    ((9,), (2, 3))
    """

    def __init__(self, params, xp, dtype="float32"):
        self.params = list(params)
        names = [p.name for p in self.params]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(f"parameter names must be unique, repeated: {duplicates}")
        self.xp = xp
        self.dtype = float_dtype(xp, dtype)
        self.size = sum(p.size for p in self.params)
        self.data = xp.zeros((self.size,), dtype=self.dtype)
        self.grad = xp.zeros((self.size,), dtype=self.dtype)
        # How many times zero_grad ran: a layer that finds it changed since it last wrote
        # its gradients may write them instead of adding to zeros (nnopt.block). Gradients
        # set by hand between zero_grad and backward are therefore not accumulated into.
        self.zero_count = 0
        offset = 0
        for p in self.params:
            if p.storage is not None:
                raise InputError(f"parameter {p.name!r} is already bound to another flat storage")
            value = p.data if isinstance(p.data, np.ndarray) else to_numpy(p.data)
            n = p.size
            p.data = xp.reshape(self.data[offset:offset + n], p.shape)
            p.data[...] = asarray(np.asarray(value, dtype=np.float64), xp, dtype=self.dtype)
            p.grad = xp.reshape(self.grad[offset:offset + n], p.shape)
            p.storage, p.offset = self, offset
            offset += n

    @classmethod
    def from_arrays(cls, xp, dtype="float64", **arrays):
        """Bind plain arrays as named parameters: ``FlatParameters.from_arrays(xp, xy=[-7, 2])``."""
        return cls([Parameter(np.asarray(v, dtype=np.float64), k) for k, v in arrays.items()],
                   xp, dtype)

    def __iter__(self):
        return iter(self.params)

    def __len__(self):
        return len(self.params)

    def zero_grad(self):
        self.grad[...] = 0
        self.zero_count += 1
