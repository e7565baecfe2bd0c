r"""Optimizers with per-parameter adaptive learning rates.

:math:`g` is the gradient, :math:`\eta` the learning rate; squares and roots are
element-wise.
"""
from __future__ import annotations

from ..backend import namespace_of as namespace
from ..errors import check_finite_number
from .base import Optimizer


class AdaGrad(Optimizer):
    r"""AdaGrad: :math:`r \leftarrow r + g^2,\ \theta \leftarrow \theta - \eta\,g / (\epsilon + \sqrt r)`.

    Textbook eps 1e-6, outside the root (as ``torch.optim.Adagrad``, whose default is 1e-10).
    """

    defaults = {"lr": 0.01, "eps": 1e-6}
    state_names = ("sum_sq",)

    def validate(self, group):
        super().validate(group)
        self.check_eps(group, "eps", "AdaGrad")

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
    state_names = ("sq_avg", "delta_sq_avg")

    def validate(self, group):
        super().validate(group)
        self.check_rate(group, "rho", "AdaDelta")
        self.check_eps(group, "eps", "AdaDelta")
        group["lr_scales_step"] = bool(group["lr_scales_step"])

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
    state_names = ("sq_avg",)

    def validate(self, group):
        super().validate(group)
        self.check_rate(group, "alpha", "RMSProp")
        self.check_eps(group, "eps", "RMSProp")
        group["eps_inside_root"] = bool(group["eps_inside_root"])

    def update(self, p, g, state, hp, t):
        xp = namespace(p)
        r, alpha, eps = state["sq_avg"], hp["alpha"], hp["eps"]
        r[...] = alpha * r + (1 - alpha) * g * g
        denom = xp.sqrt(r + eps) if hp["eps_inside_root"] else xp.sqrt(r) + eps
        p -= hp["lr"] * g / denom


class Adam(Optimizer):
    r"""Adam (Kingma & Ba), identical to ``torch.optim.Adam``:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\\
        \hat m = m / (1-\beta_1^t),\quad \hat v = v / (1-\beta_2^t),\quad
        \theta \leftarrow \theta - \eta\, \hat m / (\epsilon + \sqrt{\hat v})

    Defaults lr 0.001, betas (0.9, 0.999), eps 1e-8.
    """

    defaults = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8}
    state_names = ("exp_avg", "exp_avg_sq")

    def validate(self, group):
        super().validate(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam betas must be a pair (beta1, beta2), got {betas!r}")
        group["betas"] = tuple(check_finite_number(f"Adam beta{i + 1}", b, low=0, high=1,
                                                   high_open=True) for i, b in enumerate(betas))
        self.check_eps(group, "eps", "Adam")

    def update(self, p, g, state, hp, t):
        xp = namespace(p)
        m, v, (b1, b2) = state["exp_avg"], state["exp_avg_sq"], hp["betas"]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p -= hp["lr"] * m_hat / (hp["eps"] + xp.sqrt(v_hat))

