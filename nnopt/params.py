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
from .errors import InputError, InputTypeError


class Parameter:
    """A named array with its gradient. Before binding, ``data`` is a host array; once
    bound, ``data`` and ``grad`` are views into the flat buffers, and assigning to them
    copies into those views (what the optimizer updates), as ``p.data[...] = value`` does."""

    def __init__(self, value, name: str = "param"):
        self.storage: FlatParameters | None = None
        self.offset = 0
        self.name = name
        self._data, self._grad = value, None

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        if self.storage is None:
            self._data = value
        else:
            self._copy_into(self._data, value, "data")

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        if self.storage is None:
            self._grad = value
        elif value is None:
            raise InputError(f"parameter {self.name!r}: its gradient is a view into the model's "
                             "flat gradient buffer and cannot be None; zero it with "
                             "model.zero_grad() (or p.grad[...] = 0)")
        else:
            self._copy_into(self._grad, value, "grad")

    def _copy_into(self, view, value, what):
        if not hasattr(value, "shape"):
            try:
                value = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputTypeError(f"parameter {self.name!r}: {what} must be an array of "
                                     f"numbers, got {type(value).__name__}") from None
        if tuple(value.shape) != self.shape:
            raise InputError(f"parameter {self.name!r} has shape {self.shape}; a value of "
                             f"shape {tuple(value.shape)} cannot be its {what} (give an array "
                             f"of shape {self.shape})")
        xp, dtype = self.storage.xp, self.storage.dtype
        if not isinstance(value, np.ndarray):
            try:
                view[...] = xp.asarray(value, dtype=dtype)
                return
            except (TypeError, ValueError):  # an array of another namespace: via the host
                value = to_numpy(value)
        view[...] = asarray(value, xp, dtype=dtype)

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
            raise InputError(f"parameter names must be unique, repeated: {duplicates}; give "
                             "each layer its own name (e.g. Linear(4, 3, name='fc1'))")
        bound = [p.name for p in self.params if p.storage is not None]
        if bound:  # checked before any is bound, so a failed model leaves its layers free
            raise InputError(f"parameter {bound[0]!r} is already bound to another flat "
                             "storage (another model's): give each model layers of its own")
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
            value = p.data if isinstance(p.data, np.ndarray) else to_numpy(p.data)
            n = p.size
            p._data = xp.reshape(self.data[offset:offset + n], p.shape)
            p._data[...] = asarray(np.asarray(value, dtype=np.float64), xp, dtype=self.dtype)
            p._grad = xp.reshape(self.grad[offset:offset + n], p.shape)
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
