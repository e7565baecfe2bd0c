"""What the numba and the CUDA paths share, without importing either: the activation codes
their kernels take, the reusable output buffers of a fused block, and the scalars of the
CUDA optimizer kernels' weight decay."""
from __future__ import annotations

import sys

import numpy as np

# Codes, not functions: numba compiles one kernel for all of them (the branch on a
# loop-invariant code is hoisted out of the loop), and kernels/rules.cuh has the same
# numbers (NNOPT_RELU, ...).
IDENTITY, RELU, SIGMOID, TANH = 0, 1, 2, 3
ACTIVATION_CODES = {"identity": IDENTITY, "relu": RELU, "sigmoid": SIGMOID, "tanh": TANH}


class Scratch:
    """Output buffers handed out again, but only once nobody else holds them (CPython's
    reference count says so): a fresh multi-megabyte array per step costs more in page
    faults than the kernel that fills it. Up to ``KEEP`` buffers per name: in a training
    step the next layer still holds this layer's previous output when this layer writes
    its next one, so two alternate and nothing is allocated after the first steps."""

    KEEP = 2
    empty = staticmethod(np.empty)  # the array library's (nnopt.fast.gpu.Scratch: CuPy's)

    def __init__(self):
        self.arrays = {}

    def get(self, name, like=None, shape=None, dtype=None):
        """A free buffer of ``like``'s shape and dtype (or of ``shape`` and ``dtype``)."""
        if like is not None:
            shape, dtype = like.shape, like.dtype
        kept = self.arrays.get(name)
        if kept is None:
            kept = self.arrays[name] = []
        for array in kept:
            # References: the list, the loop variable, getrefcount's argument; more = in use.
            if array.shape == shape and array.dtype == dtype and sys.getrefcount(array) <= 3:
                return array
        array = self.empty(tuple(shape), np.dtype(dtype))
        if len(kept) >= self.KEEP:  # sizes changed, or callers keep outputs: start afresh
            kept.clear()
        kept.append(array)
        return array


def weight_decay_scalars(cls, hp):
    """(decay, shrink) of the kernels' weight decay (optimizers.cu, NNOPT_ELEMENT): the rule
    sees g + decay p, and p becomes shrink p before it; what Optimizer._apply_weight_decay
    does in separate passes, in the GPU step's one pass."""
    decay = hp["weight_decay"]  # every group has one (Optimizer.common_defaults)
    if cls.decoupled_weight_decay:
        return 0.0, 1.0 - hp["lr"] * decay
    return decay, 1.0
