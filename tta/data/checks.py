"""Checks of the numbers a stream is built from (batch size, sample cut, severities).

Values come from Python callers and from the command line (``batch_size=0``, ``severity=abc``);
a wrong one is a ``ValueError`` naming the option and the value, never a silent default.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

SEVERITIES = (1, 2, 3, 4, 5)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str, *, none_means: str | None = None) -> int | None:
    """``value`` as an ``int`` >= 1; ``None`` passes through when ``none_means`` says what it means."""
    if value is None and none_means is not None:
        return None
    if not _is_integer(value) or int(value) < 1:
        also = f" (or null for {none_means})" if none_means is not None else ""
        raise ValueError(f"{name} must be an integer >= 1{also}, got {value!r}")
    return int(value)


def _severity(value: Any) -> int | float | None:
    """An integer severity 1..5 as ``int`` (``2.0`` too), a fractional one in (0, 5) as ``float``
    (continuous severities, see ``tta.data.corruptions``); ``None`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    if not math.isfinite(number) or not 0 < number <= 5:
        return None
    return int(number) if number.is_integer() else number


def severity_list(value: Any, name: str = "severity") -> list[int | float]:
    """A severity or a non-empty list of them: the integers 1..5 (as ``int``, also when written
    ``2.0``) or fractional severities in (0, 5) (as ``float``, for the corruptions generated on the
    fly)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    severities = [_severity(v) for v in values]
    if not values or any(s is None for s in severities):
        raise ValueError(f"{name} must be a number in (0, 5] (the integers 1 to 5, or a fractional severity for "
                         f"corruptions generated on the fly) or a non-empty list of them, got {value!r}")
    return severities


def integer_severities(severities: list[int | float], what: str) -> list[int]:
    """``severities`` when all are integers; a ``ValueError`` naming ``what`` otherwise (released
    corrupted data sets hold the severities 1..5 only)."""
    fractional = [s for s in severities if not isinstance(s, int)]
    if fractional:
        raise ValueError(f"{what} holds the severities 1 to 5 only, got {fractional}; fractional severities need "
                         f"corruptions generated on the fly (the *_onthefly data configs, digits_c)")
    return severities
