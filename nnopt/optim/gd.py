r"""Gradient descent with and without momentum.

:math:`g` is the gradient, :math:`\eta` the learning rate, :math:`\theta` a parameter.
"""
from __future__ import annotations

from ..errors import unknown_name
from .base import Optimizer

BUFFER_FORMS = ("textbook", "torch")


class SGD(Optimizer):
    r"""Plain stochastic gradient descent: :math:`\theta \leftarrow \theta - \eta g`."""

    defaults = {"lr": 0.1}
    rule_names = ("sgd",)

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

    def validate(self, group):
        super().validate(group)
        self.check_rate(group, "momentum", type(self).__name__)
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
