"""Checks of the numbers a stream is built from (batch size, sample cut, severities).

Values come from Python callers and from the command line (``batch_size=0``, ``severity=abc``);
a wrong one is a ``ValueError`` naming the option and the value, never a silent default.
"""
from __future__ import annotations

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


def severity_list(value: Any, name: str = "severity") -> list[int]:
    """A severity (1..5) or a non-empty list of them, as a list of ``int``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(_is_integer(v) and int(v) in SEVERITIES for v in values):
        raise ValueError(f"{name} must be an integer from 1 to 5 or a non-empty list of them, got {value!r}")
    return [int(v) for v in values]
