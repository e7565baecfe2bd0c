r"""Weight initializers, named and defined as in ``torch.nn.init``.

nnopt stores a fully connected weight as ``W`` of shape ``(n_in, n_out)`` (the
textbook's layout, ``x @ W``), the transpose of PyTorch's ``(out, in)``. So here
``fan_in = shape[0]`` and ``fan_out = shape[1]``; the formulas are PyTorch's:

========================  ==============================================================
``zeros``                 :math:`W = 0` (breaks nothing but symmetry: see the zero-init demo)
``normal``                :math:`W \sim N(\text{mean}, \text{std}^2)` (textbook: N(0, 1))
``xavier_uniform``        :math:`U(-a, a),\ a = \text{gain}\sqrt{6 / (n_{in} + n_{out})}`
``xavier_normal``         :math:`N(0, \sigma^2),\ \sigma = \text{gain}\sqrt{2 / (n_{in} + n_{out})}`
``kaiming_normal``        :math:`N(0, \sigma^2),\ \sigma = \text{gain} / \sqrt{\text{fan}}` (MSRA/He)
``kaiming_uniform``       :math:`U(-b, b),\ b = \text{gain}\sqrt{3 / \text{fan}}`
========================  ==============================================================

``fan`` is ``fan_in`` by default (He et al., torch); ``mode="fan_out"`` gives the course
code's variant. Kaiming's gain defaults to ``calculate_gain("relu") = sqrt(2)``.

Every initializer is ``init(shape, rng) -> numpy.ndarray`` (float64, on the host):
draws happen with NumPy's generator so one seed gives the same network on any device.
"""
from __future__ import annotations

import inspect
import math
from functools import partial

import numpy as np

from .errors import InputError, check_finite_number, check_int, unknown_name


def calculate_gain(nonlinearity: str = "relu", param: float | None = None) -> float:
    """The recommended gain for a nonlinearity (``torch.nn.init.calculate_gain``)."""
    gains = {"linear": 1.0, "identity": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3,
             "relu": math.sqrt(2.0), "selu": 3.0 / 4}
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else check_finite_number("leaky_relu slope", param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity not in gains:
        raise unknown_name("nonlinearity", nonlinearity, list(gains) + ["leaky_relu"])
    return gains[nonlinearity]


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of shape ``(n_in, n_out)``; a vector has fan n."""
    shape = tuple(check_int("weight size", s) for s in shape)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise InputError(f"cannot initialize a weight of shape {shape}: every size must be >= 1")
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[0] * receptive, shape[1] * receptive


def _fan(shape, mode):
    fan_in, fan_out = fans(shape)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise unknown_name("mode", mode, ["fan_in", "fan_out"])


def zeros(shape, rng=None):
    fans(shape)
    return np.zeros(shape)


def constant(shape, rng=None, value: float = 0.0):
    value = check_finite_number("constant value", value)
    fans(shape)
    return np.full(shape, float(value))


def normal(shape, rng, mean: float = 0.0, std: float = 1.0):
    check_finite_number("normal mean", mean)
    check_finite_number("normal std", std, low=0)
    fans(shape)
    return rng.normal(mean, std, size=shape)


def uniform(shape, rng, low: float = 0.0, high: float = 1.0):
    low = check_finite_number("uniform low", low)
    high = check_finite_number("uniform high", high)
    if high < low:
        raise InputError(f"uniform needs low <= high, got low={low!r}, high={high!r}")
    fans(shape)
    return rng.uniform(low, high, size=shape)


def xavier_uniform(shape, rng, gain: float = 1.0):
    gain = check_finite_number("xavier_uniform gain", gain, low=0)
    fan_in, fan_out = fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def xavier_normal(shape, rng, gain: float = 1.0):
    gain = check_finite_number("xavier_normal gain", gain, low=0)
    fan_in, fan_out = fans(shape)
    return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), size=shape)


def kaiming_normal(shape, rng, mode: str = "fan_in", nonlinearity: str = "relu",
                   a: float = 0.0):
    """MSRA/He: N(0, gain^2 / fan) with fan the layer's ``mode`` fan. ``a``: a leaky ReLU's
    negative slope (torch's ``a``, default 0 as there, so ``"leaky_relu"`` alone gets
    ReLU's gain sqrt(2); ``calculate_gain("leaky_relu")`` alone assumes 0.01, as torch's)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(shape, mode))
    return rng.normal(0.0, std, size=shape)


def kaiming_uniform(shape, rng, mode: str = "fan_in", nonlinearity: str = "relu",
                    a: float = 0.0):
    """MSRA/He: U(-bound, bound), bound = gain * sqrt(3 / fan); ``a`` as in kaiming_normal."""
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(shape, mode))
    return rng.uniform(-bound, bound, size=shape)


INITIALIZERS = {
    "zeros": zeros, "zero": zeros, "constant": constant,
    "normal": normal, "uniform": uniform,
    "xavier": xavier_uniform, "xavier_uniform": xavier_uniform, "glorot": xavier_uniform,
    "glorot_uniform": xavier_uniform, "xavier_normal": xavier_normal, "glorot_normal": xavier_normal,
    "msra": kaiming_normal, "he": kaiming_normal, "kaiming": kaiming_normal,
    "kaiming_normal": kaiming_normal, "he_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform, "he_uniform": kaiming_uniform,
}


def get_initializer(init="msra", **options):
    """Resolve a name (``"msra"``, ``"xavier"``, ``"normal"``, ...) or callable to
    ``init(shape, rng)``; ``options`` are bound (``std=0.01``, ``mode="fan_out"``, ...)."""
    if callable(init):
        return partial(init, **options) if options else init
    if not isinstance(init, str) or init.lower() not in INITIALIZERS:
        raise unknown_name("initializer", init, INITIALIZERS)
    fn = INITIALIZERS[init.lower()]
    takes = [name for name in inspect.signature(fn).parameters if name not in ("shape", "rng")]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise InputError(f"initializer {init!r} has no option {unknown[0]!r}; it takes: "
                         f"{', '.join(takes) or 'none'}")
    return partial(fn, **options) if options else fn
