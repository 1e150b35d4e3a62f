"""DiffTPT's second filter: the most confident of the candidate views (DiffTPT
``select_confident_samples_cosine``, its second stage).

A *view-level* policy, used after :class:`~tta.policies.cosine_filter.CosineFilter` in DiffTPT:
the views it ranks are those the cosine filter kept.
"""
from __future__ import annotations

from typing import Any

import torch

from ..objectives.entropy import shannon_entropy
from ..objectives.selection import floor_fraction, rank_among
from .base import BatchContext, Policy
from .registry import register


@register("difftpt_confidence")
class CandidateConfidence(Policy):
    """DiffTPT's second filter: the ``floor(n * fraction)`` lowest-entropy views among the ``n`` views
    still alive (the cosine filter's candidates; 30 of 102 with ``fraction = 0.3``).

    Unlike ``tpt_confidence`` (a fraction of *all* views), the count is relative to the views the
    earlier policies kept, as DiffTPT's ``select_confident_samples_cosine`` computes it on the
    candidate list. At least one view is kept when any is alive (identical for ``n >= 4``).

    Args:
        fraction: DiffTPT ``selection_selfentro`` (0.3).
    """

    level = "views"
    needs = ()
    ranks_views = True  # DiffTPT's entropy stage

    def __init__(self, fraction: float = 0.3):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"difftpt_confidence: fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        entropy = shannon_entropy(ctx.logits.detach().float(), dim=1)  # the official expression
        n = alive.sum()
        k = torch.maximum(floor_fraction(n, self.fraction), (n > 0).long())
        return (alive & (rank_among(entropy, alive, descending=False) < k)).to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"fraction": self.fraction}
