"""Wisdom-of-crowds selection (Lee, Das, Choo, Choi, ICCV 2023, "OSTTA").

No official code was found; this follows the paper's rule as re-implemented in UniEnt
(gaozhengqing/UniEnt ``imagenet/ostta.py``, ``criterion="ent"``).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import BatchContext, Policy
from .registry import register


@register("crowds")
class Crowds(Policy):
    """Keep a sample iff the adapted model is at least as confident as the frozen source model in
    the source model's predicted class: ``p_a[c_o] >= p_o[c_o] + margin``, ``c_o = argmax p_o``.

    ``margin = 0`` and ties kept (``>=``), as UniEnt; on the first batch, where both models are the
    same, every sample is kept. (The CLIP variant in MarcLafon/cliptta uses ``margin = 0.05``.)

    Needs the frozen source model (``needs = ("source",)``): a method with this policy keeps a
    frozen copy of its model made right after ``configure_model``, so for BatchNorm networks the
    "source" model also normalises with test-batch statistics, as UniEnt's ``deepcopy``. Its logits
    come from ``ctx.source_logits()`` (whole batch, no grad, computed once per batch).
    """

    level = "samples"
    needs = ("source",)

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.margin = float(margin)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        source_probs = ctx.source_logits().detach().float().softmax(dim=1)
        source_conf, source_label = source_probs.max(dim=1)
        adapted_conf = ctx.probs.gather(1, source_label.unsqueeze(1)).squeeze(1)
        keep = alive & (adapted_conf >= source_conf + self.margin)
        return keep.to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"margin": self.margin}
