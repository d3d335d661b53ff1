"""Guard clauses of the public functions: a parameter's type and range, or a `ParameterError`
naming it (the numpy core below trusts its inputs)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .errors import ParameterError

__all__ = ["flag", "integer", "number"]


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float if it is a real number (not a bool) within the bounds.

    ``low`` is inclusive unless ``low_open``; ``high`` is inclusive.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if np.isnan(out) or (finite and not np.isfinite(out)):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (out <= low if low_open else out < low):
        relation = "above" if low_open else "at least"
        raise ParameterError(f"{name} must be {relation} {low:g}, got {value!r}")
    if high is not None and out > high:
        raise ParameterError(f"{name} must be at most {high:g}, got {value!r}")
    return out


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool; 3.0 is accepted) within
    ``[low, high]``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    if not (np.isfinite(value) and int(value) == value):
        raise ParameterError(f"{name} must be an integer, got {value!r}")
    out = int(value)
    if low is not None and out < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ParameterError(f"{name} must be {what}, got {value!r}")
    if high is not None and out > high:
        raise ParameterError(f"{name} must be an integer <= {high}, got {value!r}")
    return out


def flag(name: str, value: Any, *, none: bool = False) -> bool | None:
    """``value`` as a bool if it is one (``None`` too when ``none``)."""
    if value is None and none:
        return None
    if not isinstance(value, bool | np.bool_):
        allowed = "True, False or None" if none else "True or False"
        raise ParameterError(f"{name} must be {allowed}, got {value!r}")
    return bool(value)
