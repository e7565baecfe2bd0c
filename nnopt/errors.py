"""Small helpers that turn bad input into errors that name the problem and the fix."""
from __future__ import annotations

import difflib
import math


def unknown_name(kind: str, name, known) -> ValueError:
    known = sorted(known)
    hint = difflib.get_close_matches(str(name), known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ValueError(f"unknown {kind} {name!r}{did_you_mean}; choose one of: {', '.join(known)}")


def check_finite_number(what: str, value, *, low=None, high=None, low_open=False,
                        high_open=False) -> float:
    """Return ``value`` as a float, or raise ValueError saying why it is not acceptable."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    lo_bad = low is not None and (number <= low if low_open else number < low)
    hi_bad = high is not None and (number >= high if high_open else number > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"{lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{what} must be in {rng}, got {value!r}")
    return number
