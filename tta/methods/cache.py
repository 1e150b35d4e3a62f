"""A per-class feature cache with entropy-ranked admission: the memory of TDA (Karmanov et al.,
CVPR 2024; kdiAAA/TDA @ e697fb0, ``tda_runner.py:29-65``).

Each class holds at most ``capacity`` entries (an image feature, its entropy and, for the negative
cache, its probability map), kept sorted by entropy, lowest first. Admission of a sample with
pseudo-label ``c`` and entropy ``h`` (``update_cache``, ``tda_runner.py:29-40``):

* class ``c`` not full: the entry is appended;
* class ``c`` full: it replaces the last (highest-entropy) entry when ``h`` is strictly lower;
* then the class's entries are sorted by entropy (a stable sort: among equal entropies the older
  entry stays first, as Python's ``sorted``).

Cache logits (``compute_cache_logits``, ``tda_runner.py:43-65``): ``alpha * exp(-beta * (1 - f K^T)) V``
with ``K`` the cached features and ``V`` either the one-hot pseudo-labels (positive cache) or the
mask ``lower < p < upper`` of each entry's probability map (negative cache).

The state is fixed-size tensors (features, entropies, probability maps, fill counts), so it moves,
saves (``state_dict``: tensors only) and resets like any buffer, and an update is a few indexed
writes on the device with no host sync. Empty slots hold entropy ``+inf`` and count nothing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ClassCache(nn.Module):
    """Per-class top-``capacity`` cache (see the module docstring).

    Args:
        num_classes, dim: classes and feature size.
        capacity: entries per class (TDA: 3 positive, 2 negative).
        alpha, beta: the cache-logit weight and sharpness.
        keep_probs: store each entry's probability map (the negative cache); its values are then the
            mask ``mask[0] < p < mask[1]`` instead of the one-hot pseudo-label.
        mask: the bounds of that mask (TDA: 0.03, 1.0).
    """

    def __init__(self, num_classes: int, dim: int, capacity: int, alpha: float, beta: float, *,
                 keep_probs: bool = False, mask: tuple[float, float] = (0.03, 1.0)):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.num_classes, self.capacity = int(num_classes), int(capacity)
        self.alpha, self.beta, self.keep_probs = float(alpha), float(beta), bool(keep_probs)
        self.mask = (float(mask[0]), float(mask[1]))
        self.register_buffer("features", torch.zeros(num_classes, capacity, dim))
        self.register_buffer("entropy", torch.full((num_classes, capacity), float("inf")))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("probs", torch.zeros(num_classes, capacity, num_classes if keep_probs else 0))
        # the negative cache's class masks, derived from ``probs`` at admission (not saved: rebuilt on load)
        self.register_buffer("values", torch.zeros_like(self.probs), persistent=False)

    @torch.no_grad()
    def clear(self) -> None:
        self.features.zero_()
        self.entropy.fill_(float("inf"))
        self.count.zero_()
        self.probs.zero_()
        self.values.zero_()

    def _class_mask(self, probs: torch.Tensor) -> torch.Tensor:
        return ((probs > self.mask[0]) & (probs < self.mask[1])).to(self.values.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.values.copy_(self._class_mask(self.probs))

    @property
    def size(self) -> torch.Tensor:
        """Entries held (a device scalar)."""
        return self.count.sum()

    @torch.no_grad()
    def admit(self, label: torch.Tensor, feature: torch.Tensor, entropy: torch.Tensor,
              probs: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Offer one sample (``label``: 0-d long; ``feature`` (D,); ``entropy``: 0-d; ``probs`` (C,) for
        the negative cache); ``gate`` (0-d bool, optional) must hold for it to enter. Returns whether
        it entered (a device bool)."""
        idx = label.reshape(1).long()                      # a 1-element index: gathers, no host read
        last = self.capacity - 1
        count = self.count.index_select(0, idx)            # (1,)
        row_entropy = self.entropy.index_select(0, idx)    # (1, K)
        row_features = self.features.index_select(0, idx)  # (1, K, D)
        enter = (count < self.capacity) | (entropy.reshape(1) < row_entropy[:, last])
        if gate is not None:
            enter = enter & gate.reshape(1)
        row_entropy[:, last] = torch.where(enter, entropy.reshape(1).to(row_entropy.dtype), row_entropy[:, last])
        row_features[:, last] = torch.where(enter[:, None], feature.reshape(1, -1).to(row_features.dtype),
                                            row_features[:, last])
        order = row_entropy.argsort(dim=-1, stable=True)  # (1, K)
        self.entropy.index_copy_(0, idx, row_entropy.gather(-1, order))
        self.features.index_copy_(0, idx, row_features.gather(1, order[..., None].expand_as(row_features)))
        if self.keep_probs:
            row_probs = self.probs.index_select(0, idx)     # (1, K, C)
            row_probs[:, last] = torch.where(enter[:, None], probs.reshape(1, -1).to(row_probs.dtype),
                                             row_probs[:, last])
            row_probs = row_probs.gather(1, order[..., None].expand_as(row_probs))
            self.probs.index_copy_(0, idx, row_probs)
            self.values.index_copy_(0, idx, self._class_mask(row_probs))
        self.count.index_copy_(0, idx, torch.clamp(count + enter.long(), max=self.capacity))
        return enter.reshape(())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cache logits (N, C) of image features (N, D); zero while the cache is empty."""
        filled = (torch.arange(self.capacity, device=self.count.device) < self.count[:, None]).flatten()  # (C*K,)
        keys = self.features.flatten(0, 1).to(features.dtype)
        affinity = features @ keys.T
        weight = torch.exp(-(self.beta - self.beta * affinity)) * filled.to(features.dtype)       # (N, C*K)
        if self.keep_probs:
            return self.alpha * (weight @ self.values.flatten(0, 1).to(features.dtype))
        # one-hot values: the sum of each class's own slots (no C*K x C matrix)
        return self.alpha * weight.view(-1, self.num_classes, self.capacity).sum(dim=-1)

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"capacity": self.capacity, "alpha": self.alpha, "beta": self.beta}
        if self.keep_probs:
            out["mask"] = list(self.mask)
        return out


__all__ = ["ClassCache"]
