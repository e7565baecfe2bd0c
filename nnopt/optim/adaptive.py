r"""Optimizers with per-parameter adaptive learning rates.

:math:`g` is the gradient, :math:`\eta` the learning rate; squares and roots are
element-wise.
"""
from __future__ import annotations

from ..backend import namespace_of as namespace
from ..errors import InputError, check_finite_number
from .base import Optimizer


class AdaGrad(Optimizer):
    r"""AdaGrad: :math:`r \leftarrow r + g^2,\ \theta \leftarrow \theta - \eta\,g / (\epsilon + \sqrt r)`.

    Textbook eps 1e-6, outside the root (as ``torch.optim.Adagrad``, whose default is 1e-10).
    """

    defaults = {"lr": 0.01, "eps": 1e-6}
    epsilons = ("eps",)
    state_names = squared_states = ("sum_sq",)
    rule_names = ("adagrad",)

    @classmethod
    def kernel_scalars(cls, group, t):
        return (group["lr"], group["eps"])

    def update(self, p, g, state, hp, t):
        r = state["sum_sq"]
        r += g * g
        p -= hp["lr"] * g / (hp["eps"] + namespace(r).sqrt(r))


class AdaDelta(Optimizer):
    r"""AdaDelta (Zeiler 2012):

    .. math::
        s \leftarrow \rho s + (1-\rho) g^2,\quad
        \Delta\theta = \sqrt{\frac{r + \epsilon}{s + \epsilon}}\, g,\quad
        \theta \leftarrow \theta - \Delta\theta,\quad
        r \leftarrow \rho r + (1-\rho) \Delta\theta^2

    The textbook's AdaDelta has no learning rate (rho 0.9, eps 1e-5): ``lr`` is accepted
    and ignored, which is what its experiment shows. ``lr_scales_step=True`` gives
    PyTorch's variant, :math:`\theta \leftarrow \theta - \eta\,\Delta\theta` (torch: lr 1.0,
    rho 0.9, eps 1e-6).
    """

    defaults = {"lr": 1.0, "rho": 0.9, "eps": 1e-5, "lr_scales_step": False}
    rates, epsilons, switches = ("rho",), ("eps",), ("lr_scales_step",)
    state_names = squared_states = ("sq_avg", "delta_sq_avg")
    rule_names = ("adadelta",)

    @classmethod
    def kernel_scalars(cls, group, t):
        """``(rho, 1 - rho, eps, scale)``; scale multiplies the step: 1, or lr in PyTorch's form."""
        scale = group["lr"] if group["lr_scales_step"] else 1.0
        return (group["rho"], 1.0 - group["rho"], group["eps"], scale)

    def update(self, p, g, state, hp, t):
        xp = namespace(p)
        s, r, rho, eps = state["sq_avg"], state["delta_sq_avg"], hp["rho"], hp["eps"]
        s[...] = rho * s + (1 - rho) * g * g
        delta = xp.sqrt((r + eps) / (s + eps)) * g
        p -= hp["lr"] * delta if hp["lr_scales_step"] else delta
        r[...] = rho * r + (1 - rho) * delta * delta


class RMSProp(Optimizer):
    r"""RMSProp: :math:`r \leftarrow \alpha r + (1-\alpha) g^2,\
    \theta \leftarrow \theta - \eta\, g / \sqrt{r + \epsilon}`.

    Textbook: alpha 0.9, eps 1e-6 inside the root. ``eps_inside_root=False`` gives
    PyTorch's :math:`\eta\, g / (\sqrt r + \epsilon)` (torch: alpha 0.99, eps 1e-8).
    """

    defaults = {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "eps_inside_root": True}
    rates, epsilons, switches = ("alpha",), ("eps",), ("eps_inside_root",)
    state_names = squared_states = ("sq_avg",)
    rule_names = ("rmsprop", "rmsprop_torch")

    @classmethod
    def rule_name(cls, group):
        return cls.rule_names[not group["eps_inside_root"]]

    @classmethod
    def kernel_scalars(cls, group, t):
        return (group["lr"], group["alpha"], 1.0 - group["alpha"], group["eps"])

    def update(self, p, g, state, hp, t):
        xp = namespace(p)
        r, alpha, eps = state["sq_avg"], hp["alpha"], hp["eps"]
        r[...] = alpha * r + (1 - alpha) * g * g
        denom = xp.sqrt(r + eps) if hp["eps_inside_root"] else xp.sqrt(r) + eps
        p -= hp["lr"] * g / denom


def adam_kernel_scalars(lr, b1, b2, eps, t):
    r"""Adam's kernel scalars at step t: ``(step, b1, 1 - b1, b2, 1 - b2, inv_correction2,
    eps)`` with :math:`step = \eta / (1-\beta_1^t)` and :math:`inv\_correction2 =
    1 / (1-\beta_2^t)`, so that the rule is
    :math:`\theta \leftarrow \theta - step\, m / (\epsilon + \sqrt{v\, inv\_correction2})`,
    the update below with the bias corrections folded into two scalars.

    Plain arithmetic on purpose: numba compiles this very function (``nnopt.fast.cpu``,
    the curve-fitting engine) and ``adam_kernel_scalars`` in kernels/rules.cuh is its
    line-by-line translation, for a step count that lives on the GPU.
    """
    return (lr / (1.0 - b1 ** t), b1, 1.0 - b1, b2, 1.0 - b2, 1.0 / (1.0 - b2 ** t), eps)


class Adam(Optimizer):
    r"""Adam (Kingma & Ba), identical to ``torch.optim.Adam``:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\\
        \hat m = m / (1-\beta_1^t),\quad \hat v = v / (1-\beta_2^t),\quad
        \theta \leftarrow \theta - \eta\, \hat m / (\epsilon + \sqrt{\hat v})

    Defaults lr 0.001, betas (0.9, 0.999), eps 1e-8.
    """

    defaults = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8}
    epsilons = ("eps",)
    state_names = ("exp_avg", "exp_avg_sq")
    squared_states = ("exp_avg_sq",)
    rule_names = ("adam",)
    step_scalars = staticmethod(adam_kernel_scalars)

    def validate(self, group):
        super().validate(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InputError(f"Adam betas must be a pair (beta1, beta2), got {betas!r}")
        group["betas"] = tuple(check_finite_number(f"Adam beta{i + 1}", b, low=0, high=1,
                                                   high_open=True) for i, b in enumerate(betas))

    @classmethod
    def step_scalar_inputs(cls, group):
        b1, b2 = group["betas"]
        return (group["lr"], b1, b2, group["eps"])

    @classmethod
    def kernel_scalars(cls, group, t):
        return adam_kernel_scalars(*cls.step_scalar_inputs(group), t)

    def update(self, p, g, state, hp, t):
        xp = namespace(p)
        m, v, (b1, b2) = state["exp_avg"], state["exp_avg_sq"], hp["betas"]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p -= hp["lr"] * m_hat / (hp["eps"] + xp.sqrt(v_hat))



class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter), identical to ``torch.optim.AdamW``: weight decay
    decoupled from the gradient,

    .. math::
        \theta \leftarrow \theta (1 - \eta\lambda),\ \text{then Adam's step on } g

    (Adam's ``weight_decay`` adds :math:`\lambda\theta` to :math:`g` instead, which the
    adaptive denominator then rescales). Defaults as torch: lr 0.001, weight_decay 0.01.
    """

    defaults = {**Adam.defaults, "weight_decay": 0.01}
    decoupled_weight_decay = True
