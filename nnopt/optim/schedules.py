r"""Learning-rate schedules.

A schedule is a pure function ``(epoch, base_lr) -> lr`` (Optax style);
:class:`LRScheduler` applies one to every group of an optimizer, each from its own base
rate, PyTorch style: call ``scheduler.step()`` once per epoch.

* ``step_decay(step_size, gamma)``: :math:`\eta_0\,\gamma^{\lfloor e / s \rfloor}`
* ``multistep_decay(milestones, gamma)``: :math:`\eta_0\,\gamma^{\#\{m \le e\}}`
* ``exponential_decay(gamma)``: :math:`\eta_0\,\gamma^e`
* ``cosine_decay(t_max, eta_min)``: :math:`\eta_{min} + (\eta_0 - \eta_{min})\frac{1 + \cos(\pi e/T)}{2}`
  (past T it rises again, as PyTorch's CosineAnnealingLR does)

:class:`ReduceLROnPlateau` is not a function of the epoch: it watches a metric.

Closed form, unlike PyTorch's chained schedulers: each step sets the rate from the base
rate and the epoch alone. So a rate set by hand lasts until the next ``step()``, and two
schedulers on one optimizer do not multiply (the last to step wins); PyTorch's scale the
current rate. Untouched runs give the same rates (tests/test_optim_torch.py).
``step(metric)`` takes a metric, so that one loop can step any scheduler; it is not
PyTorch's deprecated ``step(epoch)``.
"""
from __future__ import annotations

import inspect
import math

from ..errors import InputError, InputTypeError, check_finite_number, check_int, unknown_name


def step_decay(step_size: int, gamma: float = 0.1):
    step_size = check_int("step_size", step_size, low=1)
    gamma = check_finite_number("gamma", gamma, low=0)
    return lambda epoch, base: base * gamma ** (epoch // step_size)


def multistep_decay(milestones, gamma: float = 0.1):
    if isinstance(milestones, (int, float)):
        milestones = [milestones]
    milestones = sorted(check_int("milestone", m, low=1) for m in milestones)
    gamma = check_finite_number("gamma", gamma, low=0)
    return lambda epoch, base: base * gamma ** sum(m <= epoch for m in milestones)


def exponential_decay(gamma: float):
    gamma = check_finite_number("gamma", gamma, low=0)
    return lambda epoch, base: base * gamma ** epoch


def cosine_decay(t_max: int, eta_min: float = 0.0):
    t_max = check_int("t_max", t_max, low=1)
    eta_min = check_finite_number("eta_min", eta_min, low=0)
    return lambda epoch, base: eta_min + (base - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2


class LRScheduler:
    """Sets ``group["lr"] = schedule(epoch, base_lr)`` for every group of ``optimizer``.
    ``schedule``: one function for every group, or a list of one per group.

    A group added later (``optimizer.add_param_group``) goes on from the rate it was added
    with: its base rate is the one the schedule maps to that rate at the epoch it joined
    (so StepLR, MultiStepLR and ExponentialLR scale it from there, as PyTorch's do)."""

    def __init__(self, optimizer, schedule):
        groups = optimizer_groups(type(self).__name__, optimizer)
        self.shared = None if isinstance(schedule, (list, tuple)) else schedule
        per_group = list(schedule) if self.shared is None else [schedule] * len(groups)
        if len(per_group) != len(groups):
            raise InputError(f"got {len(per_group)} schedules for {len(groups)} parameter groups")
        for one in per_group:
            if not callable(one):
                raise InputTypeError(f"a schedule is a function (epoch, base_lr) -> lr, got "
                                     f"{one!r}")
        self.optimizer, self.schedules = optimizer, per_group
        self.base_lrs = [g["lr"] for g in groups]
        self.epoch = 0

    def step(self, metric=None):
        """One epoch done (``metric`` is for :class:`ReduceLROnPlateau`; ignored here)."""
        self._join_new_groups()
        self.epoch += 1
        rates = []
        for base, schedule in zip(self.base_lrs, self.schedules):
            try:
                rates.append(float(schedule(self.epoch, base)))
            except OverflowError:
                rates.append(math.inf)
            if not math.isfinite(rates[-1]):
                raise InputError(f"{type(self).__name__}: the learning rate from base rate "
                                 f"{base:g} overflows at epoch {self.epoch}; choose a schedule "
                                 "whose rate stays finite (a gamma <= 1)")
            if rates[-1] < 0:  # a step up the gradient, never what a schedule means
                raise InputError(f"{type(self).__name__}: the schedule gives the negative "
                                 f"learning rate {rates[-1]:g} at epoch {self.epoch}; a "
                                 "schedule's rates are 0 or more")
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate

    def _join_new_groups(self):
        groups = self.optimizer.param_groups
        if len(self.base_lrs) > len(groups):
            raise InputError(f"the scheduler holds base rates for {len(self.base_lrs)} parameter "
                             f"groups, but its optimizer has {len(groups)}: load a scheduler "
                             "state saved with this optimizer's groups")
        for group in groups[len(self.base_lrs):]:
            if self.shared is None:
                raise InputError(f"a parameter group was added after this scheduler was built "
                                 f"with one schedule per group ({len(self.schedules)}): build "
                                 "the scheduler after add_param_group, with a schedule for "
                                 "every group")
            # every schedule here is affine in the base rate: lr = a + base * b at an epoch
            lr, low = group["lr"], self.shared(self.epoch, 0.0)
            slope = self.shared(self.epoch, 1.0) - low
            base = (lr - low) / slope if slope else math.nan
            if not math.isfinite(base) or not math.isclose(self.shared(self.epoch, base), lr,
                                                           rel_tol=1e-9, abs_tol=1e-15):
                raise InputError(f"a parameter group added at epoch {self.epoch} with lr {lr} "
                                 "cannot be scheduled from there (the schedule maps no base "
                                 "rate to that rate at this epoch): build the scheduler after "
                                 "add_param_group")
            self.base_lrs.append(base)
            self.schedules.append(self.shared)

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"epoch": self.epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        epoch, base_lrs = saved_entries(self, state, "epoch", "base_lrs")
        epoch = check_int("scheduler state epoch", epoch, low=0)
        base_lrs = [check_finite_number("scheduler state base rate", b, low=0) for b in base_lrs]
        if self.shared is None and len(base_lrs) != len(self.schedules):
            raise InputError(f"this scheduler state has base rates for {len(base_lrs)} "
                             f"parameter groups, but the scheduler has {len(self.schedules)} "
                             "schedules: load it into a scheduler built as the saved one was")
        self.epoch, self.base_lrs = epoch, base_lrs
        if self.shared is not None:
            self.schedules = [self.shared] * len(base_lrs)


class StepLR(LRScheduler):
    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        super().__init__(optimizer, step_decay(step_size, gamma))


class MultiStepLR(LRScheduler):
    def __init__(self, optimizer, milestones, gamma: float = 0.1):
        super().__init__(optimizer, multistep_decay(milestones, gamma))


class ExponentialLR(LRScheduler):
    def __init__(self, optimizer, gamma: float):
        super().__init__(optimizer, exponential_decay(gamma))


class CosineAnnealingLR(LRScheduler):
    """Every group anneals from its own base rate to the same absolute ``eta_min``."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0):
        super().__init__(optimizer, cosine_decay(T_max, eta_min))


class ReduceLROnPlateau:
    r"""Multiply every group's lr by ``factor`` when ``metric`` has not improved for more
    than ``patience`` epochs; never below ``min_lr``, and a cut of ``eps`` or less is not
    made. After a cut, ``cooldown`` epochs pass before bad epochs count again. As
    ``torch.optim.lr_scheduler.ReduceLROnPlateau``: a NaN or infinite metric is an epoch
    without improvement, as there.

    An improvement on the best metric so far, :math:`b`, with threshold :math:`t`:

    ============  ==========================  ==========================
    mode          threshold_mode "rel"        threshold_mode "abs"
    ============  ==========================  ==========================
    "min" (loss)  :math:`m < b\,(1 - t)`      :math:`m < b - t`
    "max"         :math:`m > b\,(1 + t)`      :math:`m > b + t`
    ============  ==========================  ==========================
    """

    def __init__(self, optimizer, factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, min_lr: float = 0.0, eps: float = 1e-8,
                 mode: str = "min", threshold_mode: str = "rel", cooldown: int = 0):
        optimizer_groups(type(self).__name__, optimizer)
        self.optimizer = optimizer
        self.factor = check_finite_number("factor", factor, low=0, high=1, low_open=True, high_open=True)
        self.patience = check_int("patience", patience, low=0)
        self.threshold = check_finite_number("threshold", threshold, low=0)
        self.min_lr = check_finite_number("min_lr", min_lr, low=0)
        self.eps = check_finite_number("eps", eps, low=0)
        if mode not in ("min", "max"):
            raise unknown_name("ReduceLROnPlateau mode", mode, ("min", "max"))
        if threshold_mode not in ("rel", "abs"):
            raise unknown_name("ReduceLROnPlateau threshold_mode", threshold_mode, ("rel", "abs"))
        self.mode, self.threshold_mode = mode, threshold_mode
        self.cooldown = check_int("cooldown", cooldown, low=0)
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_epochs, self.cooldown_left, self.epoch = 0, 0, 0

    def improves(self, metric: float) -> bool:
        best, t = self.best, self.threshold
        if self.mode == "min":
            return metric < (best * (1 - t) if self.threshold_mode == "rel" else best - t)
        return metric > (best * (1 + t) if self.threshold_mode == "rel" else best + t)

    def step(self, metric=None):
        self.epoch += 1
        if metric is None:
            return
        try:
            metric = float(metric)
        except (TypeError, ValueError):
            raise InputError(f"ReduceLROnPlateau.step takes the epoch's metric (a number: the "
                             f"validation loss, in mode 'min'), got {metric!r}") from None
        if self.improves(metric):
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            for group in self.optimizer.param_groups:
                lowered = max(group["lr"] * self.factor, self.min_lr)
                if group["lr"] - lowered > self.eps:
                    group["lr"] = lowered
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        # strict JSON has no infinity: +inf (nothing seen yet) is None, -inf the text "-inf"
        best = None if self.best == math.inf else "-inf" if self.best == -math.inf else self.best
        return {"epoch": self.epoch, "best": best, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state):
        epoch, bad_epochs, best = saved_entries(self, state, "epoch", "bad_epochs", "best")
        self.epoch = check_int("scheduler state epoch", epoch, low=0)
        self.bad_epochs = check_int("scheduler state bad_epochs", bad_epochs, low=0)
        self.best = math.inf if best is None else float(best)
        # (states saved before cooldown existed have none left)
        self.cooldown_left = check_int("scheduler state cooldown_left",
                                       state.get("cooldown_left", 0), low=0)


def optimizer_groups(who: str, optimizer):
    """The optimizer's parameter groups; a clear error for anything else (the model)."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        raise InputTypeError(f"{who} schedules an optimizer's learning rate: pass the "
                             f"optimizer (e.g. optim.SGD(model, lr=0.1)), not {optimizer!r}")
    return groups


def saved_entries(scheduler, state, *keys):
    """``state[key]`` for each key, or an error naming the one missing."""
    if not isinstance(state, dict):
        raise InputTypeError(f"{type(scheduler).__name__}.load_state_dict takes the dict its "
                             f"state_dict() gave, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise InputError(f"{type(scheduler).__name__} state has no {missing[0]!r}: load a "
                         f"state saved by {type(scheduler).__name__}.state_dict()")
    return [state[k] for k in keys]


#: Names for the command line (``--schedule``), with the parameters each takes.
SCHEDULES = {"step": (StepLR, ("step_size", "gamma")),
             "multistep": (MultiStepLR, ("milestones", "gamma")),
             "exponential": (ExponentialLR, ("gamma",)),
             "cosine": (CosineAnnealingLR, ("t_max", "eta_min")),
             # (no "mode": the training loop's metric is the validation loss, mode "min")
             "plateau": (ReduceLROnPlateau, ("factor", "patience", "threshold", "min_lr",
                                             "threshold_mode", "cooldown"))}
_ARG_NAMES = {"t_max": "T_max"}


def check_spec(spec: dict) -> None:
    if isinstance(spec, str) and spec in SCHEDULES:
        raise InputError(f"a schedule is a dict of its name and parameters, such as "
                         f"{{\"name\": \"step\", \"step_size\": 10}}, got {spec!r}")
    if not isinstance(spec, dict) or spec.get("name") not in SCHEDULES:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise unknown_name("schedule", name, SCHEDULES)
    allowed = SCHEDULES[spec["name"]][1]
    unknown = sorted(set(spec) - {"name"} - set(allowed))
    if unknown:
        raise InputError(f"schedule {spec['name']!r} has no parameter {unknown[0]!r}; it takes: "
                         f"{', '.join(allowed)}")


def from_spec(spec: dict, optimizer):
    """A scheduler from ``{"name": "step", "step_size": 10, "gamma": 0.5}``."""
    check_spec(spec)
    cls, _ = SCHEDULES[spec["name"]]
    options = {_ARG_NAMES.get(k, k): v for k, v in spec.items() if k != "name"}
    required = [name for name, p in list(inspect.signature(cls).parameters.items())[1:]
                if p.default is p.empty and name not in options]
    if required:
        name = {v: k for k, v in _ARG_NAMES.items()}.get(required[0], required[0])
        raise InputError(f"schedule {spec['name']!r} needs {name}: give it with "
                         f"--schedule-opt {name}=VALUE (it takes: "
                         f"{', '.join(SCHEDULES[spec['name']][1])})")
    try:
        return cls(optimizer, **options)
    except TypeError as exc:
        raise InputError(f"schedule {spec['name']!r}: {exc}") from None
