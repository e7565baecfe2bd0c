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
from ..errors import check_finite_number, unknown_name
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
    """Base class: param groups, ``step``, ``zero_grad``, ``state_dict``.

    ``params`` is a model, a list of :class:`Parameter`, or a list of dicts
    ``{"params": [...], "lr": ...}`` (param groups with their own hyper-parameters).
    ``nonfinite`` decides what a NaN/inf gradient does: ``"ignore"`` (fastest),
    ``"raise"`` (FloatingPointError naming the group) or ``"skip"`` (the step is not
    taken; ``skipped_steps`` counts them).
    """

    defaults: dict = {}
    state_names: tuple = ()
    #: the rule variants of this algorithm, as named in nnopt.fast.cpu and kernels/rules.cuh
    rule_names: tuple = ()
    #: for an algorithm whose kernel scalars depend on the step count t: a function of
    #: ``(*step_scalar_inputs(group), t)`` returning ``kernel_scalars(group, t)``, plain
    #: arithmetic that numba compiles and kernels/rules.cuh translates (the step count can
    #: live on the device, in captured CUDA graphs). None when the scalars ignore t.
    step_scalars = None

    def __init__(self, params, nonfinite: str = "ignore", use_fast_path: bool = True, **hyper):
        if nonfinite not in NONFINITE_POLICIES:
            raise unknown_name("nonfinite policy", nonfinite, NONFINITE_POLICIES)
        unknown = sorted(set(hyper) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no hyper-parameter {unknown[0]!r}; "
                            f"it takes: {', '.join(self.defaults)}")
        self.nonfinite = nonfinite
        self.use_fast_path = use_fast_path
        #: per-group device step counters, set while a CUDA graph of the step is captured
        self.device_steps = None
        self.skipped_steps = 0
        self.defaults = {**type(self).defaults, **hyper}
        self.param_groups, self.state, self._segments = [], [], []
        for group in self._as_groups(params):
            self.add_param_group(group)

    # --- construction -------------------------------------------------------------
    @staticmethod
    def _as_groups(params):
        if hasattr(params, "parameters") and callable(params.parameters):
            params = params.parameters()
        if isinstance(params, Parameter):
            params = [params]
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if all(isinstance(g, dict) for g in params):
            return params
        return [{"params": params}]

    def add_param_group(self, group: dict):
        group = dict(group)
        params = group.get("params")
        if hasattr(params, "parameters"):
            params = params.parameters()
        params = [params] if isinstance(params, Parameter) else list(params or [])
        if not params:
            raise ValueError("a parameter group needs a non-empty 'params' list")
        for p in params:
            if not isinstance(p, Parameter) or p.storage is None:
                raise TypeError(f"{p!r} is not a parameter bound to flat storage; build it "
                                "with nnopt.Sequential, nnopt.mlp or FlatParameters.from_arrays")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("a parameter appears in more than one parameter group")
        unknown = sorted(set(group) - set(self.defaults) - set(HYPER_SKIP))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no hyper-parameter {unknown[0]!r}; "
                            f"it takes: {', '.join(self.defaults)}")
        group = {**self.defaults, **group, "params": params}
        self.validate(group)
        storage = params[0].storage
        xp, dtype, size = storage.xp, storage.dtype, sum(p.size for p in params)
        self.param_groups.append(group)
        self.state.append({"step": 0, **{name: self.init_state(name, xp, size, dtype)
                                         for name in self.state_names}})
        self._segments.append(_segments(params))

    def init_state(self, name, xp, size, dtype):
        return xp.zeros((size,), dtype=dtype)

    def validate(self, group: dict) -> None:
        """Check a group's hyper-parameters; subclasses extend this."""
        group["lr"] = check_finite_number(f"{type(self).__name__} lr", group["lr"], low=0)

    @staticmethod
    def check_rate(group, key, owner):
        group[key] = check_finite_number(f"{owner} {key}", group[key], low=0, high=1,
                                         high_open=True)

    @staticmethod
    def check_eps(group, key, owner):
        group[key] = check_finite_number(f"{owner} {key}", group[key], low=0, low_open=True)

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
                raise FloatingPointError(
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
                if fast is not None:
                    fast(seg.data, seg.grad, seg_state, group, t)
                else:
                    self.update(seg.data, seg.grad, seg_state, group, t)
        return True

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
        kind = state_dict.get("optimizer") if isinstance(state_dict, dict) else None
        if kind != type(self).__name__:
            raise ValueError(f"this state_dict belongs to optimizer {kind!r}, not "
                             f"{type(self).__name__}; create a {kind} to load it")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, this optimizer "
                             f"has {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            sizes = [p.size for p in group["params"]]
            if list(saved["sizes"]) != sizes:
                raise ValueError(f"parameter group {i}: saved parameter sizes {saved['sizes']} "
                                 f"do not match this model's {sizes}: another model's optimizer")
        for saved_group, group, saved, state in zip(groups, self.param_groups,
                                                    state_dict["state"], self.state):
            hyper = {k: v for k, v in saved_group.items() if k not in ("params", "sizes")}
            candidate = {**group, **hyper}
            self.validate(candidate)
            group.update(candidate)
            state["step"] = int(saved["step"])
            for name in self.state_names:
                target = state[name]
                target[...] = asarray(np.asarray(saved[name]), namespace_of(target),
                                      dtype=target.dtype)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def __repr__(self):
        hp = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}({hp})"
