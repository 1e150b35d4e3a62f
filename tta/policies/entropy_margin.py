"""The entropy reliability filter of EATA, SAR and DeYO: learn only from low-entropy samples.

Margins are fractions of ``ln C`` with ``C`` read from the logits (EATA/SAR/DeYO's ``main.py``
rescale their margins the same way), so the same defaults work for 10 and 1000 classes.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import BatchContext, Policy
from .registry import register


def entropy_threshold(fraction: float, margin: float | None, num_classes: int) -> float:
    """An entropy threshold in nats: ``margin`` when given, else ``fraction * ln C`` (EATA's 0.4 ln C)."""
    return float(margin) if margin is not None else fraction * math.log(num_classes)


@register("entropy_margin")
class EntropyMargin(Policy):
    """Keep the samples whose entropy is strictly below a margin: ``H(p_i) < fraction * ln C``.

    EATA's reliability filter (``E < 0.4 ln C``), SAR's (``0.4 ln C``) and DeYO's (``0.5 ln C``);
    the inequality is strict in all three. ``margin`` (nats) overrides ``fraction``.
    Returns 1 for kept samples and 0 otherwise.
    """

    level = "samples"
    needs = ()
    inert_when_empty = True  # a mask or weight of the alive samples, no state

    def __init__(self, fraction: float = 0.4, margin: float | None = None):
        super().__init__()
        self.fraction, self.margin = float(fraction), margin

    def threshold(self, num_classes: int) -> float:
        return entropy_threshold(self.fraction, self.margin, num_classes)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        keep = alive & (ctx.entropy < self.threshold(ctx.num_classes))  # a comparison records no gradient
        return keep.to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "margin": self.margin}
