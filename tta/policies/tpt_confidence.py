"""TPT's confidence selection (Shu et al., NeurIPS 2022; azshue/TPT ``select_confident_samples``)."""
from __future__ import annotations

import torch

from ..objectives.entropy import shannon_entropy
from .registry import register
from .view_ranking import ViewSelection


@register("tpt_confidence")
class TPTConfidence(ViewSelection):
    """TPT's confidence selection: the 10% views with the lowest Shannon entropy
    ``-(softmax(z) * log_softmax(z)).sum(-1)``, computed in float32.

    Args:
        fraction: kept fraction of the views (TPT ``selection_p`` = 0.1).
    """

    level = "views"
    needs = ()

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return shannon_entropy(logits.float(), dim=-1)
