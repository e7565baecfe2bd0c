r"""Losses. Each returns the mean loss over the batch and keeps what ``backward`` needs.

* :class:`SoftmaxCrossEntropy`: :math:`J = -\frac{1}{m}\sum_i \sum_k y_{ik}\log a_{ik}`,
  :math:`a = \mathrm{softmax}(z)`; :math:`\partial J/\partial z = (a - y)/m`.
* :class:`MSELoss`: :math:`J = \frac{1}{2m}\sum_i (a_i - y_i)^2`;
  :math:`\partial J/\partial a = (a - y)/m`.
"""
from __future__ import annotations

import numpy as np

from .backend import namespace_of
from .block import DeferredOutput, materialized
from .errors import CallOrderError, InputError, InputTypeError
from .fast import fast_for


def one_hot(labels, n_classes, dtype):
    """Integer labels (m,) to a one-hot matrix (m, n_classes) of ``dtype``."""
    xp = namespace_of(labels)
    return xp.astype(labels[:, None] == xp.arange(n_classes, dtype=labels.dtype)[None, :], dtype)


def _check_pair(name, a, y):
    if not hasattr(a, "shape") or len(a.shape) == 0:
        raise InputTypeError(f"{name}: predictions must be an array with one row per sample "
                             f"(the network's output), got {type(a).__name__}"
                             + (" of shape ()" if hasattr(a, "shape") else ""))
    if not hasattr(y, "shape") or len(y.shape) == 0:
        raise InputTypeError(f"{name}: targets must be an array with one row per sample "
                             f"(xp.asarray(labels)), got {type(y).__name__}"
                             + (" of shape ()" if hasattr(y, "shape") else ""))
    if y.shape[0] != a.shape[0]:
        raise InputError(f"{name}: {a.shape[0]} predictions but {y.shape[0]} targets")
    try:
        namespace_of(a, y)
    except TypeError:
        raise InputTypeError(f"{name}: predictions are {type(a).__module__}."
                             f"{type(a).__name__} but targets {type(y).__module__}."
                             f"{type(y).__name__}; give targets of the predictions' kind "
                             "(e.g. labels.numpy() for a torch tensor, cupy.asarray(labels) on "
                             "the GPU)") from None


def _as_prediction_dtype(name, target, prediction):
    """Targets in the prediction's dtype: float64 targets against float32 logits would make
    a float64 gradient that the float32 network cannot take back."""
    xp = namespace_of(prediction)
    if not (xp.isdtype(target.dtype, ("real floating", "integral")) or target.dtype == xp.bool):
        raise InputTypeError(f"{name}: targets must be real numbers, got {target.dtype}")
    return target if target.dtype == prediction.dtype else xp.astype(target, prediction.dtype)


def check_distributions(target):
    """One-hot (or smoothed) target rows must be probabilities: no negative or non-finite
    entry, each row summing to 1. Anything else gives a finite, meaningless loss. Checked on
    host arrays only, as :func:`check_labels`."""
    if not isinstance(target, np.ndarray) or target.size == 0:  # (memmaps too)
        return
    rows = np.asarray(target, dtype=np.float64)
    if not np.isfinite(rows).all() or (rows < 0).any():
        bad = int(np.argmax(~np.isfinite(rows).all(axis=1) | (rows < 0).any(axis=1)))
        raise InputError(f"SoftmaxCrossEntropy: target row {bad} has a negative or non-finite "
                         "entry; one-hot rows hold probabilities (0..1, each row summing to 1)")
    sums = rows.sum(axis=1)
    off = np.abs(sums - 1) > 1e-3
    if off.any():
        bad = int(np.argmax(off))
        raise InputError(f"SoftmaxCrossEntropy: target row {bad} sums to {sums[bad]:.6g}, not "
                         "1; one-hot rows hold probabilities (pass integer labels, or "
                         "normalize each row)")


def check_labels(labels, n_classes):
    """Class labels outside [0, n_classes) would one-hot to a zero row and give a finite,
    meaningless loss. Checked on host arrays only: on a GPU the check would cost a
    synchronisation per step (the training CLI checks its data sets once instead)."""
    if not isinstance(labels, np.ndarray) or labels.size == 0:  # (memmaps too)
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise InputError(f"class label {bad} is out of range for {n_classes} classes (labels "
                         f"must be 0..{n_classes - 1}); check the labels or the network's "
                         "output size")


class Loss:
    """``forward(prediction, target)`` returns the loss, ``backward()`` its gradient with
    respect to the prediction; ``forward_backward`` both, in one call where it can."""

    def forward_backward(self, prediction, target):
        """``(loss, gradient)``; the gradient may be a buffer the next call reuses.
        ``prediction`` may be a :class:`nnopt.block.DeferredOutput` (computed here)."""
        value = self.forward(materialized(prediction), target)
        return value, self.backward()


class SoftmaxCrossEntropy(Loss):
    """Softmax over the last axis and cross-entropy against one-hot or integer labels.

    ``prob``: the softmax of the last batch (training reads its accuracy from it)."""

    def __init__(self):
        self.prob = self.target = None
        self.scratch = None  # the fused path's reusable prob and gradient buffers

    def forward_backward(self, logits, target):
        """With float logits and integer labels on NumPy or CuPy: softmax, loss and
        gradient in one pass (numba, or one CUDA launch; no one-hot matrix, no
        temporaries); else forward, then backward. On the GPU the loss stays a 0-d device
        array, and a label outside the classes makes it NaN (raising would need a
        synchronization each step). ``logits`` may be a :class:`nnopt.block.DeferredOutput`
        (the last block's product, left to this loss): on the GPU it is computed inside
        the same launch (``fast.linear_cross_entropy``)."""
        deferred = logits if isinstance(logits, DeferredOutput) else None
        data = deferred.out if deferred is not None else logits
        fast = fast_for(data) if len(data.shape) == 2 else None
        if (fast is None or not hasattr(fast, "softmax_cross_entropy")
                or type(target) is not type(data) or len(target.shape) != 1
                or target.dtype.kind not in "iu" or not target.dtype.isnative
                or target.shape[0] != data.shape[0]):
            return super().forward_backward(logits, target)
        if self.scratch is None:
            self.scratch = fast.Scratch()
        prob, grad = self.scratch.get("prob", data), self.scratch.get("grad", data)
        if deferred is not None and deferred.fast is fast:
            value, n_bad = fast.linear_cross_entropy(deferred.x, deferred.weight, deferred.bias,
                                                     target, deferred.out, prob, grad)
        else:
            value, n_bad = fast.softmax_cross_entropy(materialized(logits), target, prob, grad)
        if n_bad:
            check_labels(target, logits.shape[1])  # raises, with the offending label
        self.prob, self.target = prob, None
        # numba's is a Python float; the GPU's a 0-d device array, left on the device
        return (value if hasattr(value, "shape") else data.dtype.type(value)), grad

    def forward(self, logits, target):
        xp = namespace_of(logits)
        if len(logits.shape) != 2:
            raise InputError(f"SoftmaxCrossEntropy expects logits of shape (batch, classes), "
                             f"got {tuple(logits.shape)}")
        _check_pair("SoftmaxCrossEntropy", logits, target)
        if len(target.shape) == 1:
            if xp.isdtype(target.dtype, "real floating"):
                raise InputTypeError("SoftmaxCrossEntropy: 1-D targets must be integer class labels, "
                                f"got {target.dtype}; pass one-hot rows or xp.astype(y, xp.int64)")
            if target.dtype == xp.bool:  # False/True as the classes 0 and 1
                target = xp.astype(target, xp.int64)
            check_labels(target, logits.shape[1])
            target = one_hot(target, logits.shape[1], logits.dtype)
        elif tuple(target.shape) != tuple(logits.shape):
            raise InputError(f"SoftmaxCrossEntropy: one-hot targets {tuple(target.shape)} do not "
                             f"match logits {tuple(logits.shape)}")
        else:
            target = _as_prediction_dtype("SoftmaxCrossEntropy", target, logits)
            check_distributions(target)
        shifted = logits - xp.max(logits, axis=1, keepdims=True)
        log_sum = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        log_prob = shifted - log_sum
        self.prob, self.target = xp.exp(log_prob), target
        # 0 * log(0) counts 0: a masked (-inf) logit off the label leaves the loss finite,
        # as in the fused paths and torch's cross_entropy
        return -xp.sum(target * xp.where(target == 0, 0.0, log_prob)) / logits.shape[0]

    __call__ = forward

    def backward(self):
        if self.target is None:
            raise CallOrderError("SoftmaxCrossEntropy.backward needs a forward() first "
                               "(forward_backward returned its gradient already)")
        return (self.prob - self.target) / self.prob.shape[0]


class MSELoss(Loss):
    """Half the mean squared error, the textbook's regression loss."""

    diff = None  # prediction - target of the last forward

    def forward(self, prediction, target):
        _check_pair("MSELoss", prediction, target)
        if tuple(target.shape) != tuple(prediction.shape):
            raise InputError(f"MSELoss: target shape {tuple(target.shape)} does not match "
                             f"prediction shape {tuple(prediction.shape)}")
        target = _as_prediction_dtype("MSELoss", target, prediction)
        xp = namespace_of(prediction)
        self.diff = prediction - target
        return xp.sum(self.diff * self.diff) / (2 * prediction.shape[0])

    __call__ = forward

    def backward(self):
        if self.diff is None:
            raise CallOrderError("MSELoss.backward needs a forward() first")
        return self.diff / self.diff.shape[0]

