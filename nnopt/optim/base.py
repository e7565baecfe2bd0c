"""The optimizer machinery shared by every update rule.

An optimizer owns ``param_groups`` (each a dict of hyper-parameters plus its
``params``) and, per group, flat state arrays the size of the group. When a group's
parameters are contiguous in their :class:`~nnopt.params.FlatParameters` (the usual
case: a whole model) the step is one call of the rule over three flat views.

A subclass is one algorithm: ``defaults``, ``state_names``, ``validate`` for its
hyper-parameters and ``update(p, g, state, hp, t)``, the readable reference formula in
the array API. The fused kernels (``nnopt.fast``: numba on NumPy arrays, CUDA on CuPy
arrays; the batched curve-fitting engine) replace it where they apply; the reference
stays the fallback and the tests' oracle. What they run is named by the class too:

* ``rule_names``: the per-element rule variants of the algorithm; ``rule_name(group)``
  picks one (``sgd_rule`` in ``nnopt.fast.cpu``, ``sgd_rule`` in ``kernels/rules.cuh``,
  the ``sgd_f32``/``sgd_f64`` CUDA kernels);
* ``kernel_scalars(group, t)``: the scalars every one of those rules takes, in order,
  after the element ``p, g`` and the state named by ``state_names``. It is the only place
  where hyper-parameters become kernel arguments (Adam's bias corrections included).
"""
from __future__ import annotations

import numpy as np

from ..backend import asarray, namespace_of, to_numpy
from ..errors import (InputError, InputTypeError, NonFiniteGradient, check_bool,
                      check_finite_number, check_int, unknown_name)
from ..fast import fast_for
from ..params import Parameter

NONFINITE_POLICIES = ("ignore", "raise", "skip")
HYPER_SKIP = ("params",)


def _finite(x) -> bool:
    xp = namespace_of(x)
    return bool(xp.all(xp.isfinite(x)))


class Segment:
    """A flat run of parameters with its gradient and slices of the group's state."""

    def __init__(self, data, grad, start, stop):
        self.data, self.grad, self.start, self.stop = data, grad, start, stop


def _segments(params):
    """One segment when ``params`` are contiguous in one storage, else one per parameter."""
    first = params[0]
    contiguous = all(p.storage is first.storage for p in params) and all(
        b.offset == a.offset + a.size for a, b in zip(params, params[1:]))
    if contiguous:
        start, stop = first.offset, params[-1].offset + params[-1].size
        storage = first.storage
        return [Segment(storage.data[start:stop], storage.grad[start:stop], 0, stop - start)]
    segments, pos = [], 0
    for p in params:
        s = p.storage
        segments.append(Segment(s.data[p.offset:p.offset + p.size],
                                s.grad[p.offset:p.offset + p.size], pos, pos + p.size))
        pos += p.size
    return segments


class Optimizer:
    r"""Base class: param groups, ``step``, ``zero_grad``, ``state_dict``.

    ``params`` is a model, a list of :class:`Parameter`, or a list of dicts
    ``{"params": [...], "lr": ...}`` (param groups with their own hyper-parameters).
    ``nonfinite`` decides what a NaN/inf gradient does: ``"ignore"`` (fastest),
    ``"raise"`` (NonFiniteGradient, a FloatingPointError, naming the group) or ``"skip"``
    (the step is not taken; ``skipped_steps`` counts them).

    Every optimizer takes ``weight_decay`` :math:`\lambda` (default 0), L2 regularization
    coupled into the gradient as in ``torch.optim``: the rule sees
    :math:`g + \lambda\theta`. :class:`~nnopt.optim.AdamW` decouples it instead.
    """

    #: hyper-parameters every optimizer takes, beside its own ``defaults``
    common_defaults = {"weight_decay": 0.0}
    #: True: weight decay shrinks the parameters, theta *= 1 - lr lambda, before the rule
    #: sees the plain gradient (AdamW); False: the rule sees g + lambda theta
    decoupled_weight_decay = False
    defaults: dict = {}
    #: hyper-parameters checked by :meth:`validate`: rates in [0, 1), epsilons > 0, and
    #: true/false switches
    rates: tuple = ()
    epsilons: tuple = ()
    switches: tuple = ()
    state_names: tuple = ()
    #: the states that are sums or averages of squares (never negative)
    squared_states: tuple = ()
    #: the rule variants of this algorithm, as named in nnopt.fast.cpu and kernels/rules.cuh
    rule_names: tuple = ()
    #: for an algorithm whose kernel scalars depend on the step count t: a function of
    #: ``(*step_scalar_inputs(group), t)`` returning ``kernel_scalars(group, t)``, plain
    #: arithmetic that numba compiles and kernels/rules.cuh translates (the step count can
    #: live on the device, in captured CUDA graphs). None when the scalars ignore t.
    step_scalars = None

    def __init__(self, params, lr=None, *, nonfinite: str = "ignore",
                 use_fast_path: bool = True, **hyper):
        if lr is not None:  # positional, as in torch.optim: Adam(model, 0.01)
            hyper["lr"] = lr
        if nonfinite not in NONFINITE_POLICIES:
            raise unknown_name("nonfinite policy", nonfinite, NONFINITE_POLICIES)
        self.defaults = {**self.common_defaults, **type(self).defaults}
        unknown = sorted(set(hyper) - set(self.defaults))
        if unknown:
            raise InputTypeError(f"{type(self).__name__} has no hyper-parameter {unknown[0]!r}; "
                                 f"it takes: {', '.join(self.defaults)}")
        self.nonfinite = nonfinite
        self.use_fast_path = check_bool(f"{type(self).__name__} use_fast_path", use_fast_path)
        #: per-group device step counters, set while a CUDA graph of the step is captured
        self.device_steps = None
        self.skipped_steps = 0
        self.defaults = {**self.defaults, **hyper}
        self.param_groups, self.state, self._segments = [], [], []
        self._decayed_grads = []  # per group: a buffer for g + lambda theta, made when needed
        for group in self._as_groups(params):
            self.add_param_group(group)

    # --- construction -------------------------------------------------------------
    @staticmethod
    def _as_groups(params):
        if hasattr(params, "parameters") and callable(params.parameters):
            params = params.parameters()
        if isinstance(params, Parameter):
            params = [params]
        try:
            params = list(params)
        except TypeError:
            raise InputTypeError(f"an optimizer takes a model, its parameters or parameter "
                                 f"groups (optim.SGD(model, lr=0.1)), got {params!r}") from None
        if not params:
            raise InputError("optimizer got an empty parameter list")
        if all(isinstance(g, dict) for g in params):
            return params
        return [{"params": params}]

    def add_param_group(self, group: dict):
        if not isinstance(group, dict):
            raise InputTypeError(f"a parameter group is a dict such as {{'params': [...], "
                                 f"'lr': 0.01}}, got {type(group).__name__}")
        group = dict(group)
        params = group.get("params")
        if hasattr(params, "parameters"):
            params = params.parameters()
        params = [params] if isinstance(params, Parameter) else list(params or [])
        if not params:
            raise InputError("a parameter group needs a non-empty 'params' list")
        for p in params:
            if not isinstance(p, Parameter) or p.storage is None:
                raise InputTypeError(f"{p!r} is not a parameter bound to flat storage; build it "
                                "with nnopt.Sequential, nnopt.mlp or FlatParameters.from_arrays")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise InputError("a parameter appears in more than one parameter group")
        if len({id(p) for p in params}) != len(params):
            twice = next(p.name for i, p in enumerate(params) if any(q is p for q in params[:i]))
            raise InputError(f"parameter {twice!r} appears twice in one parameter group; it "
                             "would be updated twice per step")
        unknown = sorted(set(group) - set(self.defaults) - set(HYPER_SKIP))
        if unknown:
            raise InputTypeError(f"{type(self).__name__} has no hyper-parameter {unknown[0]!r}; "
                            f"it takes: {', '.join(self.defaults)}")
        group = {**self.defaults, **group, "params": params}
        self.validate(group)
        storage = params[0].storage
        xp, dtype, size = storage.xp, storage.dtype, sum(p.size for p in params)
        self.param_groups.append(group)
        self.state.append({"step": 0, **{name: self.init_state(name, xp, size, dtype)
                                         for name in self.state_names}})
        self._segments.append(_segments(params))
        self._decayed_grads.append(None)

    def init_state(self, name, xp, size, dtype):
        return xp.zeros((size,), dtype=dtype)

    def validate(self, group: dict) -> None:
        """Check a group's hyper-parameters (those named in ``rates``, ``epsilons`` and
        ``switches`` too); subclasses extend this for the rest."""
        owner = type(self).__name__
        for key in ("lr", "weight_decay"):
            group[key] = check_finite_number(f"{owner} {key}", group[key], low=0)
        for key in self.rates:
            group[key] = check_finite_number(f"{owner} {key}", group[key], low=0, high=1,
                                             high_open=True)
        for key in self.epsilons:
            group[key] = check_finite_number(f"{owner} {key}", group[key], low=0, low_open=True)
        for key in self.switches:
            group[key] = check_bool(f"{owner} {key}", group[key])

    # --- stepping -----------------------------------------------------------------
    def update(self, p, g, state, hp, t):
        raise NotImplementedError

    @classmethod
    def rule_name(cls, group: dict) -> str:
        """The rule variant the kernels run for ``group`` (one of ``rule_names``)."""
        return cls.rule_names[0]

    @classmethod
    def kernel_scalars(cls, group: dict, t) -> tuple:
        """The scalars, in order, that the rule ``rule_name(group)`` takes after its element
        arrays (``p, g``, then the state in ``state_names`` order) at step ``t`` (1-based):
        the same tuple for the numba rule, the CUDA rule and the curve-fitting engine."""
        raise NotImplementedError

    @classmethod
    def step_scalar_inputs(cls, group: dict) -> tuple:
        """The hyper-parameters ``step_scalars`` takes before ``t``."""
        raise NotImplementedError(f"{cls.__name__}'s kernel scalars do not depend on t")

    def fast_path(self, p):
        """The fused step for array ``p`` (numba for NumPy, CUDA for CuPy), or None."""
        if not self.use_fast_path:
            return None
        kernels = fast_for(p)
        return None if kernels is None else kernels.OPTIMIZER_STEPS.get(type(self).__name__)

    def grads_finite(self) -> bool:
        """True when every gradient of every group is finite (one pass, one sync)."""
        return all(_finite(seg.grad) for segments in self._segments for seg in segments)

    def step(self) -> bool:
        """Apply one update to every group. Returns False when a non-finite gradient
        made the ``"skip"`` policy skip it."""
        if self.nonfinite != "ignore" and not self.grads_finite():
            if self.nonfinite == "raise":
                bad = [p.name for g in self.param_groups for p in g["params"] if not _finite(p.grad)]
                raise NonFiniteGradient(
                    f"non-finite gradient (NaN or inf) in {', '.join(bad[:4])}"
                    f"{', ...' if len(bad) > 4 else ''}; lower the learning rate, check the "
                    "input data, or create the optimizer with nonfinite='skip'")
            self.skipped_steps += 1
            return False
        for i, (group, state, segments) in enumerate(zip(self.param_groups, self.state,
                                                         self._segments)):
            state["step"] += 1
            t = state["step"]
            if self.device_steps is not None:  # a captured CUDA graph reads t on the device
                self.device_steps[i] += 1
                t = self.device_steps[i]
            for seg in segments:
                seg_state = {k: v[seg.start:seg.stop] for k, v in state.items() if k != "step"}
                fast = self.fast_path(seg.data)
                if getattr(fast, "fuses_weight_decay", False):  # the GPU kernels: one pass
                    fast(seg.data, seg.grad, seg_state, group, t)
                    continue
                grad = self._apply_weight_decay(i, group, seg)
                if fast is not None:
                    fast(seg.data, grad, seg_state, group, t)
                else:
                    self.update(seg.data, grad, seg_state, group, t)
        return True

    def _apply_weight_decay(self, i, group, seg):
        """The gradient the rule sees: ``g`` itself, or ``g + lambda theta`` in a buffer of
        the group's (the user's gradient stays as backward left it); decoupled decay
        shrinks the parameters here instead."""
        decay = group["weight_decay"]
        if not decay:
            return seg.grad
        if self.decoupled_weight_decay:
            seg.data *= 1 - group["lr"] * decay
            return seg.grad
        if self._decayed_grads[i] is None:
            storage = group["params"][0].storage
            total = sum(p.size for p in group["params"])
            self._decayed_grads[i] = storage.xp.zeros((total,), dtype=storage.dtype)
        decayed = self._decayed_grads[i][seg.start:seg.stop]
        decayed[...] = seg.grad + decay * seg.data
        return decayed

    def zero_grad(self) -> None:
        storages = {id(p.storage): p.storage for g in self.param_groups for p in g["params"]}
        for storage in storages.values():
            storage.zero_grad()

    # --- persistence --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: hyper-parameters and host copies of
        the state arrays, per group."""
        groups = []
        for group in self.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            hyper["params"] = [p.name for p in group["params"]]
            hyper["sizes"] = [p.size for p in group["params"]]
            groups.append(hyper)
        state = [{k: (v if k == "step" else to_numpy(v).copy()) for k, v in s.items()}
                 for s in self.state]
        return {"optimizer": type(self).__name__, "param_groups": groups, "state": state,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`. Every entry is checked before any is assigned, so a
        bad one (wrong optimizer, sizes, a missing or non-numeric state array, a negative
        step) leaves the optimizer as it was."""
        if not isinstance(state_dict, dict):
            raise InputTypeError(f"load_state_dict expects the dict of optimizer.state_dict(), "
                                 f"got {type(state_dict).__name__}")
        kind = state_dict.get("optimizer")
        if kind != type(self).__name__:
            raise InputError(f"this state_dict belongs to optimizer {kind!r}, not "
                             f"{type(self).__name__}; create a {kind} to load it")
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(states, list) or len(states) != len(groups):
            raise InputError("state_dict lacks matching 'param_groups' and 'state' lists: it "
                             "is not an optimizer's state_dict()")
        if len(groups) != len(self.param_groups):
            raise InputError(f"state_dict has {len(groups)} parameter groups, this optimizer "
                             f"has {len(self.param_groups)}")
        loaded = []
        for i, (saved_group, saved, group) in enumerate(zip(groups, states, self.param_groups)):
            if not isinstance(saved_group, dict) or not isinstance(saved, dict):
                raise InputError(f"parameter group {i}: its settings and state must be dicts, "
                                 "as optimizer.state_dict() writes them")
            sizes = [p.size for p in group["params"]]
            if list(saved_group.get("sizes", [])) != sizes:
                raise InputError(f"parameter group {i}: saved parameter sizes "
                                 f"{saved_group.get('sizes')} do not match this model's {sizes}: "
                                 "another model's optimizer")
            names = [p.name for p in group["params"]]
            if list(saved_group.get("params", names)) != names:
                raise InputError(f"parameter group {i}: saved for parameters "
                                 f"{list(saved_group['params'])}, but this optimizer's group "
                                 f"{i} holds {names}: build the groups as the saved optimizer "
                                 "had them (same parameters, same order)")
            hyper = {k: v for k, v in saved_group.items() if k not in ("params", "sizes")}
            unknown = sorted(set(hyper) - set(group))
            if unknown:
                raise InputError(f"parameter group {i}: {type(self).__name__} has no "
                                 f"hyper-parameter {unknown[0]!r}: another optimizer's state")
            candidate = {**group, **hyper}
            self.validate(candidate)
            step = check_int(f"parameter group {i} step", saved.get("step"), low=0)
            arrays = {}
            for name in self.state_names:
                if name not in saved:
                    raise InputError(f"parameter group {i}: state {name!r} is missing")
                try:
                    value = np.asarray(saved[name], dtype=np.float64)
                except (TypeError, ValueError):
                    raise InputError(f"parameter group {i}: state {name!r} is not "
                                     "numeric") from None
                if value.shape != (sum(sizes),):
                    raise InputError(f"parameter group {i}: state {name!r} has shape "
                                     f"{value.shape}, expected ({sum(sizes)},)")
                if not np.all(np.isfinite(value)):
                    raise InputError(f"parameter group {i}: state {name!r} holds NaN or "
                                     "infinite values (a diverged run's?)")
                if name in self.squared_states and np.any(value < 0):
                    raise InputError(f"parameter group {i}: state {name!r} is a sum of squares "
                                     "and holds negative values: a damaged state")
                arrays[name] = value
            loaded.append((group, candidate, step, arrays))
        skipped = check_int("skipped_steps", state_dict.get("skipped_steps", 0), low=0)
        for (group, candidate, step, arrays), state in zip(loaded, self.state):
            group.update(candidate)
            state["step"] = step
            for name, value in arrays.items():
                target = state[name]
                target[...] = asarray(value, namespace_of(target), dtype=target.dtype)
        self.skipped_steps = skipped

    def __repr__(self):
        hp = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}({hp})"
