r"""Gradient descent with and without momentum.

:math:`g` is the gradient, :math:`\eta` the learning rate, :math:`\theta` a parameter.
"""
from __future__ import annotations

from ..errors import InputError, check_bool, unknown_name
from .base import Optimizer

BUFFER_FORMS = ("textbook", "torch")


class SGD(Optimizer):
    r"""Plain stochastic gradient descent: :math:`\theta \leftarrow \theta - \eta g`.

    Spelled as PyTorch spells it, ``SGD(params, lr, momentum=0.9, nesterov=False,
    weight_decay=0)`` gives what ``torch.optim.SGD`` runs: a :class:`Momentum` (or, with
    ``nesterov=True``, a :class:`NAG`) in PyTorch's buffer form. ``dampening`` is not
    supported (0 only).
    """

    defaults = {"lr": 0.1}
    rule_names = ("sgd",)

    def __new__(cls, params=None, lr=None, *, momentum=0.0, dampening=0.0, nesterov=False,
                **hyper):
        nesterov = check_bool("SGD nesterov", nesterov)
        if dampening:
            raise InputError("SGD dampening is not supported (0 only); use momentum without "
                             "dampening, or Momentum(buffer='torch')")
        if nesterov and not momentum:
            raise InputError("SGD nesterov=True needs a momentum > 0, as in torch.optim.SGD")
        if cls is SGD and momentum:
            variant = NAG if nesterov else Momentum
            if hyper.pop("buffer", "torch") != "torch":
                raise InputError(f"SGD(momentum=...) is torch.optim.SGD's, in PyTorch's buffer "
                                 f"form; for the textbook's form use {variant.__name__}(params, "
                                 "lr, momentum=..., buffer='textbook')")
            return variant(params, lr, momentum=momentum, buffer="torch", **hyper)
        return super().__new__(cls)

    def __init__(self, params, lr=None, *, momentum=0.0, dampening=0.0, nesterov=False,
                 **hyper):
        super().__init__(params, lr, **hyper)

    @classmethod
    def kernel_scalars(cls, group, t):
        return (group["lr"],)

    def update(self, p, g, state, hp, t):
        p -= hp["lr"] * g


class Momentum(Optimizer):
    r"""Momentum (heavy ball).

    Textbook form (``buffer="textbook"``, default):
    :math:`v \leftarrow \alpha v - \eta g,\ \theta \leftarrow \theta + v`.

    PyTorch form (``buffer="torch"``, ``torch.optim.SGD(momentum=...)``):
    :math:`b \leftarrow \alpha b + g,\ \theta \leftarrow \theta - \eta b`.
    The two agree while :math:`\eta` is constant (:math:`v = -\eta b`) and differ under a
    learning-rate schedule: the textbook's velocity remembers old rates.
    """

    defaults = {"lr": 0.1, "momentum": 0.9, "buffer": "textbook"}
    state_names = ("velocity",)
    rule_names = ("momentum", "momentum_torch")

    rates = ("momentum",)

    def validate(self, group):
        super().validate(group)
        if group["buffer"] not in BUFFER_FORMS:
            raise unknown_name("momentum buffer form", group["buffer"], BUFFER_FORMS)

    @classmethod
    def rule_name(cls, group):
        return cls.rule_names[group["buffer"] == "torch"]

    @classmethod
    def kernel_scalars(cls, group, t):
        return (group["lr"], group["momentum"])

    def update(self, p, g, state, hp, t):
        v, alpha, lr = state["velocity"], hp["momentum"], hp["lr"]
        if hp["buffer"] == "textbook":
            v[...] = alpha * v - lr * g
            p += v
        else:
            v[...] = alpha * v + g
            p -= lr * v


class NAG(Momentum):
    r"""Nesterov accelerated gradient.

    The textbook takes the gradient at the look-ahead point:
    :math:`v \leftarrow \alpha v - \eta \nabla J(\theta + \alpha v),\ \theta \leftarrow \theta + v`.
    With ``step()`` the gradient comes at the stored parameters, so nnopt stores the
    look-ahead point :math:`\tilde\theta = \theta + \alpha v` itself; substituting gives

    :math:`v \leftarrow \alpha v - \eta g,\quad \tilde\theta \leftarrow \tilde\theta + \alpha v - \eta g`

    (one look-ahead per step, not the course code's two). PyTorch form
    (``buffer="torch"``, ``SGD(nesterov=True)``):
    :math:`b \leftarrow \alpha b + g,\ \theta \leftarrow \theta - \eta (g + \alpha b)`.
    """

    rule_names = ("nag", "nag_torch")

    def update(self, p, g, state, hp, t):
        v, alpha, lr = state["velocity"], hp["momentum"], hp["lr"]
        if hp["buffer"] == "textbook":
            v[...] = alpha * v - lr * g
            p += alpha * v - lr * g
        else:
            v[...] = alpha * v + g
            p -= lr * (g + alpha * v)
