r"""Batch Normalization: the textbook's reference forward and backward.

Forward over a batch of m samples (per feature):

.. math::
    \mu = \frac1m\sum x,\quad \sigma^2 = \frac1m\sum (x-\mu)^2,\quad
    n = \frac{x-\mu}{\sqrt{\sigma^2+\epsilon}},\quad z = \gamma n + \beta

Backward, with :math:`d = \partial J/\partial z`:

.. math::
    d\gamma = \sum d\,n,\quad d\beta = \sum d,\quad dn = d\,\gamma,\\
    d\sigma^2 = -\tfrac12(\sigma^2+\epsilon)^{-3/2}\sum dn\,(x-\mu),\\
    d\mu = -\frac{\sum dn}{\sqrt{\sigma^2+\epsilon}} - \frac2m d\sigma^2\sum(x-\mu),\\
    dx = \frac{dn}{\sqrt{\sigma^2+\epsilon}} + d\sigma^2\frac{2(x-\mu)}{m} + \frac{d\mu}{m}

These two functions are the reference every fast path (numba, CUDA) is tested against;
on NumPy float arrays the layer uses the fused numba kernels of ``nnopt.fast.cpu``.

The fast paths compute the same thing in a factored form that reads x once per pass
(below: :func:`batchnorm_forward_factored`, :func:`batchnorm_backward_factored` and their
steps, in the names and order the numba and CUDA code use).

Forward. With a per-feature shift :math:`s` (the first row: near the mean, so the sums
do not cancel as :math:`E[x^2] - E[x]^2` does),

.. math::
    S_1 = \sum (x - s),\quad S_2 = \sum (x - s)^2,\quad
    \mu = s + S_1/m,\quad \sigma^2 = \max(S_2/m - (S_1/m)^2, 0),\quad
    r = 1/\sqrt{\sigma^2+\epsilon}

(variance is shift-invariant), and :math:`z = \gamma (x-\mu) r + \beta = x\,\mathrm{scale}
+ \mathrm{offset}` with :math:`\mathrm{scale} = \gamma r`, :math:`\mathrm{offset} = \beta
- \mu\gamma r`.

Backward. Substituting :math:`dn = \gamma d`, :math:`\sum(x-\mu) = 0` (so the second term
of :math:`d\mu` vanishes) and :math:`(\sigma^2+\epsilon)^{-3/2} = r^3` into the textbook's dx:

.. math::
    dx = \gamma r\, d - \gamma r^3 \frac{\sum d (x-\mu)}{m} (x - \mu)
         - \gamma r \frac{\sum d}{m}
       = a\, d - b\,(x - \mu) - c,

with :math:`a = \gamma r`, :math:`b = a\, r\, d\gamma / m`, :math:`c = a\, d\beta / m`,
where :math:`d\gamma = r \sum d (x-\mu)` (:math:`= \sum d\,n`) and :math:`d\beta = \sum d`:
two per-feature sums in one pass, then one pass for dx.
"""
from __future__ import annotations

import numbers

import numpy as np

from .backend import namespace_of
from .errors import CallOrderError, InputError, check_bool, check_finite_number, check_int
from .fast import fast_for
from .layers import Layer, check_dtype, check_grads_bound, check_input, check_output_grad
from .params import Parameter
from . import sync_batchnorm


def batchnorm_forward(x, gamma, beta, eps):
    """Training-mode forward. Returns ``(z, mean, var, cache)``."""
    xp = namespace_of(x)
    m = x.shape[0]
    mean = xp.sum(x, axis=0) / m
    centered = x - mean
    var = xp.sum(centered * centered, axis=0) / m
    std = xp.sqrt(var + eps)
    normed = centered / std
    return gamma * normed + beta, mean, var, (centered, normed, var, std, gamma, eps)


def batchnorm_backward(d, cache):
    """Returns ``(dx, dgamma, dbeta)`` for the cache of :func:`batchnorm_forward`."""
    xp = namespace_of(d)
    centered, normed, var, std, gamma, eps = cache
    m = d.shape[0]
    dgamma = xp.sum(d * normed, axis=0)
    dbeta = xp.sum(d, axis=0)
    dn = d * gamma
    dvar = -0.5 * (var + eps) ** -1.5 * xp.sum(dn * centered, axis=0)
    dmu = -xp.sum(dn, axis=0) / std - (2.0 / m) * dvar * xp.sum(centered, axis=0)
    dx = dn / std + dvar * 2.0 * centered / m + dmu / m
    return dx, dgamma, dbeta


def batchnorm_shifted_sums(x, shift):
    r"""Per-feature :math:`S_1 = \sum(x - s)` and :math:`S_2 = \sum(x - s)^2`."""
    xp = namespace_of(x)
    dev = x - shift
    return xp.sum(dev, axis=0), xp.sum(dev * dev, axis=0)


def batchnorm_statistics(sum_dev, sum_sq_dev, shift, m, eps):
    """Mean, biased variance and inverse standard deviation from the shifted sums."""
    xp = namespace_of(sum_dev)
    mu_shifted = sum_dev / m
    var = xp.maximum(sum_sq_dev / m - mu_shifted * mu_shifted, 0.0)
    mean = shift + mu_shifted
    inv_std = 1.0 / xp.sqrt(var + eps)
    return mean, var, inv_std


def batchnorm_scale(gamma, inv_std):
    """``scale`` of :func:`batchnorm_apply`: gamma / sqrt(var + eps)."""
    return gamma * inv_std


def batchnorm_apply(x, mean, scale, beta):
    """z = (x - mean) scale + beta. Centred before it is scaled: a feature constant over
    the batch comes out as exactly beta. (As x scale + (beta - mean scale), it cancelled:
    there scale is gamma / sqrt(eps), about 316 gamma, and a constant 1e6 came out as -32
    instead of beta = 0.7 in float32.)"""
    return (x - mean) * scale + beta


def batchnorm_forward_factored(x, gamma, beta, eps):
    """:func:`batchnorm_forward` the fast paths' way. Returns ``(z, mean, var, inv_std)``."""
    m = x.shape[0]
    shift = x[0, :]
    sum_dev, sum_sq_dev = batchnorm_shifted_sums(x, shift)
    mean, var, inv_std = batchnorm_statistics(sum_dev, sum_sq_dev, shift, m, eps)
    z = batchnorm_apply(x, mean, batchnorm_scale(gamma, inv_std), beta)
    return z, mean, var, inv_std


def batchnorm_backward_sums(d, x, mean):
    r"""Per-feature :math:`\sum d` and :math:`\sum d (x - \mu)`."""
    xp = namespace_of(d)
    return xp.sum(d, axis=0), xp.sum(d * (x - mean), axis=0)


def batchnorm_backward_coefficients(sum_d, sum_dc, m, gamma, inv_std):
    """``(a, b, c, dgamma, dbeta)`` with dx = a d - b (x - mean) - c."""
    dgamma = sum_dc * inv_std
    dbeta = sum_d
    a = gamma * inv_std
    b = a * dgamma * inv_std / m
    c = a * dbeta / m
    return a, b, c, dgamma, dbeta


def batchnorm_backward_factored(d, x, gamma, mean, inv_std):
    """:func:`batchnorm_backward` the fast paths' way. Returns ``(dx, dgamma, dbeta)``."""
    m = d.shape[0]
    sum_d, sum_dc = batchnorm_backward_sums(d, x, mean)
    a, b, c, dgamma, dbeta = batchnorm_backward_coefficients(sum_d, sum_dc, m, gamma, inv_std)
    return a * d - b * (x - mean) - c, dgamma, dbeta


class BatchNorm(Layer):
    r"""Batch Normalization over the features of a (batch, features) input.

    ``momentum`` follows the textbook: ``running = momentum * running + (1 - momentum) *
    batch_value`` (0.9). PyTorch's ``momentum=0.1`` is the same thing as 0.9 here.
    ``unbiased_running_var=True`` stores :math:`\frac{m}{m-1}\sigma^2` in the running
    variance, as PyTorch does; the textbook stores the biased one. ``train=False`` uses
    the running statistics. ``use_fast_path=False`` keeps the fused kernels out.
    ``sync=True`` (or a communicator): training-mode statistics over all ranks of a
    distributed run (:mod:`nnopt.sync_batchnorm`).
    """

    def __init__(self, n_features: int, momentum: float = 0.9, eps: float = 1e-5,
                 unbiased_running_var: bool = False, name: str = "bn", use_fast_path: bool = True,
                 sync=False):
        super().__init__()
        self.n = check_int("BatchNorm n_features", n_features, low=1)
        self.momentum = check_finite_number("BatchNorm momentum", momentum, low=0, high=1)
        self.eps = check_finite_number("BatchNorm eps", eps, low=0, low_open=True)
        self.unbiased = check_bool("BatchNorm unbiased_running_var", unbiased_running_var)
        self.gamma = Parameter(np.ones(self.n), f"{name}.gamma")
        self.beta = Parameter(np.zeros(self.n), f"{name}.beta")
        self.params = (self.gamma, self.beta)
        self.buffers = {"running_mean": np.zeros(self.n), "running_var": np.ones(self.n)}
        self.name = name
        self.use_fast_path = check_bool("BatchNorm use_fast_path", use_fast_path)
        # What forward leaves for backward; None until the first forward.
        self.train_mode = None   # the mode of the last forward
        # (fast, x, mean, inv_std, kernels) of a fused training forward; kernels: the
        # fast.BoundBatchNorm it ran (a model's layer on the CPU), else None
        self.fused = None
        self.kernels = None      # that BoundBatchNorm, made on first use, kept between calls
        self.cache = None        # batchnorm_forward's cache of a reference training forward
        self.std = self.normed = None  # of an inference forward
        self.scratch = None      # the fused kernels' reusable output buffers, made on first use
        # True/False (the words too), or a communicator (nnopt.distributed)
        self.sync = check_bool("BatchNorm sync", sync) if isinstance(
            sync, (bool, str, numbers.Integral)) else sync
        self.sync_cache = None  # synchronized BN: nnopt/sync_batchnorm.py
        self.output_spec = None  # (shape, dtype) of the last forward's output

    def forward(self, x, train=True):
        self.output_spec = None  # (a forward that raises leaves nothing to backward)
        z = self._forward(x, train)
        self.output_spec = (tuple(z.shape), z.dtype)
        return z

    def _forward(self, x, train):
        if self.sync:  # synchronized BN: global batch statistics (nnopt/sync_batchnorm.py)
            self.sync_cache = None
            if train:
                return sync_batchnorm.layer_forward(self, x)
        check_input(self, x, self.n)
        check_dtype(self, x, self.gamma)
        xp = namespace_of(x)
        if not train:
            self.train_mode = False
            self.std = xp.sqrt(self.buffers["running_var"] + self.eps)
            self.normed = (x - self.buffers["running_mean"]) / self.std
            return self.gamma.data * self.normed + self.beta.data
        m = x.shape[0]
        if m < 2:
            raise InputError(f"{self!r} in training mode needs a batch of at least 2 samples, got "
                             f"{m}: one sample has zero variance. Use a larger batch or train=False")
        self.train_mode = True
        fast = fast_for(x, self.gamma.data) if self.use_fast_path else None
        if fast is not None:
            scratch = getattr(fast, "Scratch", None)
            if scratch is not None and self.scratch is None:
                self.scratch = scratch()
            out = self.scratch.get("z", x) if scratch is not None else None
            bound = getattr(fast, "BoundBatchNorm", None)
            if bound is not None and bound.takes(self):  # in a model, on the CPU
                x = np.ascontiguousarray(x)
                kernels = self.kernels
                if kernels is None or not kernels.fits(x):
                    kernels = self.kernels = bound(self, None, x)
                self.fused = (fast, x, kernels.mean, kernels.inv_std, kernels)
                return kernels.forward(x, out)
            z, mean, inv_std = fast.bn_forward(x, self.gamma.data, self.beta.data, self.eps,
                                               self.momentum, self.unbiased,
                                               self.buffers["running_mean"],
                                               self.buffers["running_var"], out=out)
            self.fused = (fast, x, mean, inv_std, None)
            return z
        self.fused = None
        z, mean, var, self.cache = batchnorm_forward(x, self.gamma.data, self.beta.data, self.eps)
        self._update_running(mean, var, m)
        return z

    def _update_running(self, mean, var, m):
        a = self.momentum
        if self.unbiased:
            var = var * (m / (m - 1))
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean[...] = a * running_mean + (1 - a) * mean
        running_var[...] = a * running_var + (1 - a) * var

    def backward(self, d):
        if self.output_spec is None:
            raise CallOrderError(f"{self!r}: call forward(x) before backward")
        check_output_grad(self, d, *self.output_spec)
        if self.sync_cache is not None:  # after a synchronized training-mode forward
            return sync_batchnorm.layer_backward(self, d)
        check_grads_bound(self)
        xp = namespace_of(d)
        if not self.train_mode:
            # Inference mode is an affine map per feature.
            self.gamma.grad += xp.sum(d * self.normed, axis=0)
            self.beta.grad += xp.sum(d, axis=0)
            return d * self.gamma.data / self.std
        if self.fused is not None:
            fast, x, mean, inv_std, kernels = self.fused
            out = self.scratch.get("dx", d) if self.scratch is not None else None
            if kernels is not None:
                return kernels.backward(d, x, None, out)
            return fast.bn_backward(d, x, self.gamma.data, mean, inv_std,
                                    self.gamma.grad, self.beta.grad, out=out)
        dx, dgamma, dbeta = batchnorm_backward(d, self.cache)
        self.gamma.grad += dgamma
        self.beta.grad += dbeta
        return dx

    def __repr__(self):
        return f"BatchNorm({self.n})"
