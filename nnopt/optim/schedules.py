r"""Learning-rate schedules.

A schedule is a pure function ``epoch -> multiplier of the base lr`` (Optax style);
:class:`LRScheduler` applies one to every group of an optimizer, PyTorch style:
call ``scheduler.step()`` once per epoch.

* ``step_decay(step_size, gamma)``: :math:`\gamma^{\lfloor e / s \rfloor}`
* ``exponential_decay(gamma)``: :math:`\gamma^e`
* ``cosine_decay(t_max, eta_min_ratio)``: :math:`r + (1-r)\frac{1 + \cos(\pi e/T)}{2}`
  (past T it rises again, as PyTorch's CosineAnnealingLR does)
"""
from __future__ import annotations

import math

from ..errors import check_finite_number


def step_decay(step_size: int, gamma: float = 0.1):
    if int(step_size) < 1:
        raise ValueError(f"step_size must be an integer >= 1, got {step_size!r}")
    gamma = check_finite_number("gamma", gamma, low=0)
    return lambda epoch: gamma ** (epoch // int(step_size))


def exponential_decay(gamma: float):
    gamma = check_finite_number("gamma", gamma, low=0)
    return lambda epoch: gamma ** epoch


def cosine_decay(t_max: int, eta_min_ratio: float = 0.0):
    if int(t_max) < 1:
        raise ValueError(f"t_max must be an integer >= 1, got {t_max!r}")
    r = check_finite_number("eta_min_ratio", eta_min_ratio, low=0, high=1)
    return lambda epoch: r + (1 - r) * (1 + math.cos(math.pi * epoch / t_max)) / 2


class LRScheduler:
    """Sets ``group["lr"] = base_lr * schedule(epoch)`` for every group of ``optimizer``.
    ``schedule``: one function for every group, or a list of one per group."""

    def __init__(self, optimizer, schedule):
        groups = optimizer.param_groups
        schedules = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule] * len(groups)
        if len(schedules) != len(groups):
            raise ValueError(f"got {len(schedules)} schedules for {len(groups)} parameter groups")
        self.optimizer, self.schedules = optimizer, schedules
        self.base_lrs = [g["lr"] for g in groups]
        self.epoch = 0

    def step(self):
        self.epoch += 1
        for group, base, schedule in zip(self.optimizer.param_groups, self.base_lrs,
                                         self.schedules):
            group["lr"] = base * schedule(self.epoch)

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"epoch": self.epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.epoch, self.base_lrs = int(state["epoch"]), list(state["base_lrs"])


class StepLR(LRScheduler):
    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        super().__init__(optimizer, step_decay(step_size, gamma))


class ExponentialLR(LRScheduler):
    def __init__(self, optimizer, gamma: float):
        super().__init__(optimizer, exponential_decay(gamma))


class CosineAnnealingLR(LRScheduler):
    """``eta_min`` is the same absolute floor for every group (as in PyTorch): each group's
    schedule has its own ratio eta_min / base_lr."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0):
        ratios = [min(eta_min / g["lr"], 1.0) if g["lr"] > 0 else 0.0
                  for g in optimizer.param_groups]
        super().__init__(optimizer, [cosine_decay(T_max, r) for r in ratios])
