"""Confidence thresholding: learn only from samples the model is already sure of.

The classic pseudo-label filter of FixMatch (Sohn et al., NeurIPS 2020, ``mask =
max_probs.ge(threshold)``, ``threshold = 0.95``). It is also the example of the README's
"extending" section: a policy is one class with ``@register`` and one import in ``__init__``.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import BatchContext, Policy
from .registry import register


@register("confidence")
class Confidence(Policy):
    """Keep a sample iff its maximum softmax probability is ``>= threshold`` (FixMatch's 0.95)."""

    level = "samples"  # it ranks the samples of a batch
    needs = ()         # the adapted model's logits are enough

    def __init__(self, threshold: float = 0.95):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence: threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        keep = alive & (ctx.probs.max(dim=1).values >= self.threshold)
        return keep.to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"threshold": self.threshold}
