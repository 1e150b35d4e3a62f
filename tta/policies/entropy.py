"""Entropy-based policies: the reliability filter of EATA/SAR/DeYO and EATA's re-weighting.

Margins are fractions of ``ln C`` with ``C`` read from the logits (EATA/SAR/DeYO's ``main.py``
rescale their margins the same way), so the same defaults work for 10 and 1000 classes.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import register
from .base import BatchContext, Policy


def _margin(fraction: float, margin: float | None, num_classes: int) -> float:
    return float(margin) if margin is not None else fraction * math.log(num_classes)


@register("entropy_margin")
class EntropyMargin(Policy):
    """Keep the samples whose entropy is strictly below a margin: ``H(p_i) < fraction * ln C``.

    EATA's reliability filter (``E < 0.4 ln C``), SAR's (``0.4 ln C``) and DeYO's (``0.5 ln C``);
    the inequality is strict in all three. ``margin`` (nats) overrides ``fraction``.
    Returns 1 for kept samples and 0 otherwise.
    """

    def __init__(self, fraction: float = 0.4, margin: float | None = None, num_classes: int | None = None):
        super().__init__()
        self.fraction, self.margin = float(fraction), margin

    def threshold(self, num_classes: int) -> float:
        return _margin(self.fraction, self.margin, num_classes)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        keep = alive & (ctx.entropy.detach() < self.threshold(ctx.num_classes))
        return keep.to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "margin": self.margin}


@register("eata_weight")
class EATAWeight(Policy):
    """EATA's sample weight ``exp(E0 - H(p_i))`` (detached), ``E0 = e0_fraction * ln C`` (0.4 ln C).

    Written ``1 / exp(H - E0)`` in the official code; the same number. Keeps every alive sample.
    """

    def __init__(self, e0_fraction: float = 0.4, e0: float | None = None, num_classes: int | None = None):
        super().__init__()
        self.e0_fraction, self.e0 = float(e0_fraction), e0

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        e0 = _margin(self.e0_fraction, self.e0, ctx.num_classes)
        weight = 1.0 / torch.exp(ctx.entropy.detach().float() - e0)  # the official expression
        return torch.where(alive, weight, torch.zeros_like(weight))

    def hparams(self) -> dict[str, Any]:
        return {"e0_fraction": self.e0_fraction, "e0": self.e0}
