"""Ranking the views of one image: the base of the TPT family's confidence selections.

Here a "sample" of the :class:`~tta.policies.base.BatchContext` is a *view*: ``ctx.logits`` holds
the (V, C) logits of the V views of one test image, and the weight says which views the method
learns from (TPT) or votes with (ADTE). The kept views are the ``max(floor(V * fraction), 1)``
views with the lowest score, in ``torch.argsort`` order as the official code does.
"""
from __future__ import annotations

from typing import Any

import torch

from ..objectives.selection import lowest_k_mask, views_kept
from .base import BatchContext, Policy


class ViewSelection(Policy):
    """Base of view-ranking policies: weight 1 for the ``max(floor(V * fraction), 1)`` lowest-score
    views among the alive ones, 0 elsewhere (:func:`~tta.objectives.selection.views_kept`).
    Subclasses implement :meth:`score` (lower = more confident). A view ranking passed to a view
    method as an extra policy replaces the method's own ranking stage.
    """

    level = "views"
    needs = ()
    ranks_views = True

    def __init__(self, fraction: float = 0.1):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def score(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, logits: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """Weights (..., V) for view logits (..., V, C)."""
        score = self.score(logits.detach())
        if alive is not None:
            score = torch.where(alive, score, torch.full_like(score, float("inf")))
        weights = lowest_k_mask(score, views_kept(score.shape[-1], self.fraction))
        return weights if alive is None else weights * alive

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        return self.select(ctx.logits, alive)

    def hparams(self) -> dict[str, Any]:
        return {"fraction": self.fraction}
