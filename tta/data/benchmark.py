"""The :class:`Benchmark` record: what a dataset loader returns.

Kept in its own module so that the settings (which order a benchmark's samples) and the loaders
(``tta/data/benchmarks.py``, which build benchmarks and streams) both depend on it without
depending on each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .decode import Preprocess
from .stream import Domain


@dataclass
class Benchmark:
    """What a loader returns: the test domains and, if available, the clean images (lazily)."""

    name: str
    domains: list[Domain]
    clean: Callable[[], Domain] | Domain | None = None
    image_size: tuple[int, int] | None = None
    preprocess: Preprocess | None = None
    info: dict[str, Any] = field(default_factory=dict)
