"""nnopt's error types, and helpers that turn bad input into errors naming the problem
and the fix.

Every error nnopt raises on purpose derives from :class:`NnoptError`, so a program (the
command line, a notebook) can tell a user's mistake from a bug: ``InputError`` is also a
``ValueError`` and ``InputTypeError`` a ``TypeError``, as Python users expect.
"""
from __future__ import annotations

import difflib
import math
import numbers

import numpy as np


class NnoptError(Exception):
    """Base of the errors nnopt raises on purpose."""


class InputError(NnoptError, ValueError):
    """A value nnopt cannot use: the message names it and says what to do."""


class InputTypeError(NnoptError, TypeError):
    """An argument of the wrong type."""


class CallOrderError(NnoptError, RuntimeError):
    """A call out of order, such as backward before any forward."""


class NonFiniteGradient(NnoptError, FloatingPointError):
    """A NaN or infinite gradient met by an optimizer created with ``nonfinite="raise"``."""


def unknown_name(kind: str, name, known) -> InputError:
    known = sorted(known)
    hint = difflib.get_close_matches(str(name), known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return InputError(f"unknown {kind} {name!r}{did_you_mean}; choose one of: {', '.join(known)}")


def check_finite_number(what: str, value, *, low=None, high=None, low_open=False,
                        high_open=False) -> float:
    """Return ``value`` as a float, or raise InputError saying why it is not acceptable."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise InputError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{what} must be finite, got {value!r}")
    lo_bad = low is not None and (number <= low if low_open else number < low)
    hi_bad = high is not None and (number >= high if high_open else number > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"{lo or '(-inf'}, {hi or 'inf)'}"
        raise InputError(f"{what} must be in {rng}, got {value!r}")
    return number


def check_int(what: str, value, *, low=None) -> int:
    """Return ``value`` as an int (ints and NumPy integers only: 4.7 is refused, not
    truncated), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{what} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise InputError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def check_bool(what: str, value) -> bool:
    """``True``/``False``, 1/0, or the words true/false/yes/no/on/off/1/0 (any case); anything
    else is an error, never silently True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise InputError(f"{what} must be true or false (also accepted: yes/no, on/off, 1/0), got {value!r}")
