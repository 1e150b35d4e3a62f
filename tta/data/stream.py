"""Streams: what the engine consumes, one batch at a time.

A stream is any iterable of :class:`Batch`. Images are float in [0, 1] (N, 3, H, W), already on
the device when the stream can put them there; ``ids`` stay on the CPU (they identify samples for
seeding and for the order hash in the run record, and reading them must not sync the GPU).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    domain: str
    ids: torch.Tensor  # int64, CPU

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0] or self.labels.shape[0] != self.ids.shape[0]:
            raise ValueError(f"batch of {self.images.shape[0]} images has {self.labels.shape[0]} labels and "
                             f"{self.ids.shape[0]} ids")


@dataclass
class Domain:
    """One domain of a stream: a name ("gaussian_noise/5") and how to make its images."""

    name: str
    images: torch.Tensor  # clean or pre-corrupted images, CPU or device
    labels: torch.Tensor
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (images, ids) -> images
    ids: torch.Tensor | None = None


class OrderHash:
    """A running hash of the exact sample order (domain names and sample ids)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, domain: str, ids: torch.Tensor) -> None:
        self._hash.update(domain.encode())
        self._hash.update(ids.to(torch.int64).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


@dataclass
class DomainStream:
    """Domains one after another, each cut into batches in a seeded (or fixed) order.

    Corruptions are applied per batch on the target device, so only the clean images are stored.
    """

    domains: Sequence[Domain]
    batch_size: int = 64
    shuffle: bool = True
    seed: int = 0
    device: torch.device | str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def __len__(self) -> int:
        return sum((len(d.labels) + self.batch_size - 1) // self.batch_size for d in self.domains)

    def order(self, index: int, n: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[Batch]:
        device = torch.device(self.device)
        for index, domain in enumerate(self.domains):
            n = len(domain.labels)
            ids_all = domain.ids if domain.ids is not None else torch.arange(n)
            order = self.order(index, n)
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                ids = ids_all[idx]
                images = domain.images[idx].to(device, non_blocking=True)
                if domain.transform is not None:
                    images = domain.transform(images, ids.to(device))
                yield Batch(images, domain.labels[idx].to(device, non_blocking=True), domain.name, ids)

    def describe(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed,
                "domains": [d.name for d in self.domains], "num_samples": sum(len(d.labels) for d in self.domains),
                **self.info}
