"""EATA's sample re-weighting (Niu et al., ICML 2022; mr-eggplant/EATA ``forward_and_adapt_eata``)."""
from __future__ import annotations

from typing import Any

import torch

from .base import BatchContext, Policy
from .entropy_margin import entropy_threshold
from .registry import register


@register("eata_weight")
class EATAWeight(Policy):
    """EATA's sample weight ``exp(E0 - H(p_i))`` (detached), ``E0 = e0_fraction * ln C`` (0.4 ln C).

    Written ``1 / exp(H - E0)`` in the official code; the same number. Keeps every alive sample.
    ``e0`` (nats) overrides ``e0_fraction``.
    """

    level = "samples"
    needs = ()
    inert_when_empty = True  # a mask or weight of the alive samples, no state

    def __init__(self, e0_fraction: float = 0.4, e0: float | None = None):
        super().__init__()
        self.e0_fraction, self.e0 = float(e0_fraction), e0

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        e0 = entropy_threshold(self.e0_fraction, self.e0, ctx.num_classes)
        weight = 1.0 / torch.exp(ctx.entropy.detach().float() - e0)  # the official expression
        return torch.where(alive, weight, torch.zeros_like(weight))

    def hparams(self) -> dict[str, Any]:
        return {"e0_fraction": self.e0_fraction, "e0": self.e0}
