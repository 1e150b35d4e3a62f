"""``roid_weight``: ROID's certainty-and-diversity weights against an EMA of the predictions.

Marsden, Döbler, Yang, "Universal Test-time Adaptation through Weight Ensembling, Diversity
Weighting, and Prior Correction", WACV 2024; code mariodoebler/test-time-adaptation @ 8b2ed63,
``classification/methods/roid.py`` lines 61-76.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..objectives.entropy import shannon_entropy
from .base import BatchContext, Policy
from .registry import register


def _minmax(values: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``(v - min) / (max - min)`` over the alive samples; 0 where ``max == min`` (the reference: NaN)."""
    big = torch.finfo(values.dtype).max
    low = torch.where(alive, values, values.new_full((), big)).min()
    high = torch.where(alive, values, values.new_full((), -big)).max()
    span = high - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(values))


@register("roid_weight")
class ROIDWeight(Policy):
    """ROID's sample weights (``loss_calculation``, ``roid.py`` lines 61-76), on the device.

    With ``p_i`` the softmax of the logits and ``m`` the running class prior (uniform at the start):

    * diversity ``d_i = 1 - cos(m, p_i)``, min-max normalised over the batch; a sample with
      ``d_i < mean(d)`` is **dropped** (weight 0);
    * certainty ``c_i = -H(p_i)``, min-max normalised;
    * weight ``exp(d_i * c_i / T)`` (``T`` = 1/3), so a kept sample weighs between 1 and ``e^3``;
    * then ``m <- 0.9 m + 0.1 mean_i p_i`` over the batch (after the weights).

    Inside another method (``policies.extra=[roid_weight]``) the statistics (min, max, mean, the
    batch mean for ``m``) are taken over the samples still alive; as ROID's own first policy that is
    the whole batch, as the reference. ``reset()`` puts ``m`` back to uniform (``roid.py`` line 129).

    Deviation: the reference divides by ``max - min``, which is 0 when the batch has one sample or
    identical predictions (NaN weights there); here the normalised value is then 0.
    """

    level = "samples"
    needs = ()

    def __init__(self, num_classes: int, temperature: float = 1 / 3, momentum: float = 0.9):
        super().__init__()
        self.num_classes, self.temperature, self.momentum = int(num_classes), float(temperature), float(momentum)
        self.register_buffer("prior", torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64))

    def reset(self) -> None:
        self.prior.fill_(1.0 / self.num_classes)

    @torch.no_grad()
    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(ctx.logits.dtype, torch.float32)
        logits = ctx.logits.detach().to(dtype)
        probs = logits.softmax(1)
        prior = self.prior.to(dtype)  # kept in float64: exact for float32 and float64 models alike
        diversity = _minmax(1 - F.cosine_similarity(prior.unsqueeze(0), probs, dim=1), alive)
        count = alive.sum().clamp(min=1)
        drop = diversity < torch.where(alive, diversity, torch.zeros_like(diversity)).sum() / count
        certainty = _minmax(-shannon_entropy(logits, dim=1), alive)
        weights = torch.exp(diversity * certainty / self.temperature)
        weights = torch.where(alive & ~drop, weights, torch.zeros_like(weights))
        batch_mean = (probs * alive.unsqueeze(1)).sum(0) / count
        self.prior.copy_(self.momentum * prior + (1 - self.momentum) * batch_mean)
        return weights

    def hparams(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "momentum": self.momentum}


__all__ = ["ROIDWeight"]
