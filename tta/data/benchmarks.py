"""Build the stream a data config describes, in a given evaluation setting.

``build_stream(config, setting=..., severity=..., seed=..., batch_size=..., device=...)`` returns a
stream (an iterable of :class:`~tta.data.stream.Batch`) and the engine options the setting implies.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..registry import Registry
from .stream import Domain, DomainStream

LOADERS: Registry[Callable[..., list[Domain]]] = Registry("dataset kind")
SETTINGS = {
    "reset_each_shift": {"reset_each_domain": True},
    "continual": {"reset_each_domain": False},
}


def corruption_transform(name: str, severity: int, seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Corrupt a batch on its device, seeded per sample id."""
    from .corruptions import corrupt

    def transform(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return corrupt(images, name, severity, seed=seed, ids=ids)

    return transform


def severities_of(config: dict[str, Any], severity: int | list[int] | None) -> list[int]:
    value = config.get("severity", 5) if severity is None else severity
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    for v in values:
        if not 1 <= v <= 5:
            raise ValueError(f"severity must be between 1 and 5, got {v}")
    return values


@LOADERS.register("digits_c")
def digits_c_domains(config: dict[str, Any], *, severity: int | list[int] | None, seed: int, **_: Any) -> list[Domain]:
    """The digits-C test split under each corruption and severity (corrupted on the fly)."""
    from .digits import load_digits_split

    images, labels = load_digits_split("test")
    corruptions = config.get("corruptions") or []
    return [Domain(f"{name}/{s}", images, labels, corruption_transform(name, s, seed))
            for s in severities_of(config, severity) for name in corruptions]


def build_stream(config: dict[str, Any], *, setting: str = "reset_each_shift", severity: int | list[int] | None = None,
                 seed: int = 0, batch_size: int | None = None, device: torch.device | str = "cpu",
                 shuffle: bool = True) -> tuple[DomainStream, dict[str, Any]]:
    """The stream for ``config`` and the engine options of ``setting``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; available: {', '.join(sorted(SETTINGS))}")
    domains = LOADERS.get(config.get("kind", config["name"]))(config, severity=severity, seed=seed)
    stream = DomainStream(domains, batch_size=batch_size or config.get("batch_size", 64), shuffle=shuffle, seed=seed,
                          device=device, info={"dataset": config["name"], "setting": setting})
    return stream, dict(SETTINGS[setting])
