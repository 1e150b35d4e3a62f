"""EATA's redundancy filter (Niu et al., ICML 2022; mr-eggplant/EATA ``forward_and_adapt_eata``)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import BatchContext, Policy
from .registry import register


@register("redundancy")
class Redundancy(Policy):
    """Keep samples whose prediction is *dissimilar* to the running mean prediction ``m``.

    ``|cos(m, p_i)| < d_margin`` (strict; 0.05), tested only once ``m`` exists; before that every
    alive sample passes. ``m`` then moves with the probabilities of the samples this policy kept
    (EATA's ``update_model_probs``):

    * ``m`` missing and the kept set non-empty: ``m <- mean(p)``;
    * ``m`` present and the kept set non-empty: ``m <- 0.9 m + 0.1 mean(p)``;
    * kept set empty: ``m`` unchanged (it may stay missing).

    ``m`` is a buffer with an ``m_exists`` flag, updated with ``torch.where`` on the device (no host
    sync). As in the official code, :meth:`reset` does **not** clear it (``m`` persists across
    ``reset()``, e.g. from one corruption to the next); call :meth:`clear` to drop it.

    Composition: ``p`` are the detached probabilities of the adapted model's logits. The samples it
    sees are those alive after the policies before it (EATA: the entropy filter); policies after
    it do not affect ``m``.

    ``num_classes`` sizes ``m`` up front (so a saved state loads into a fresh policy); without it
    ``m`` is sized from the first batch's logits.
    """

    level = "samples"
    needs = ()

    def __init__(self, d_margin: float = 0.05, momentum: float = 0.9, num_classes: int | None = None):
        super().__init__()
        self.d_margin, self.momentum = float(d_margin), float(momentum)
        self.register_buffer("m", torch.zeros(num_classes or 0))
        self.register_buffer("m_exists", torch.zeros((), dtype=torch.bool))

    @property
    def inert_when_empty(self) -> bool:  # type: ignore[override]
        """No sample alive leaves ``m`` as it is, once ``m`` is sized (the first batch sizes it when
        ``num_classes`` was not given)."""
        return self.m.numel() > 0

    def clear(self) -> None:
        self.m.zero_()
        self.m_exists.fill_(False)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        probs = ctx.probs
        if self.m.numel() != probs.shape[1]:
            if self.m.numel():
                raise ValueError(f"redundancy: the running prediction has {self.m.numel()} classes, the logits "
                                 f"{probs.shape[1]}")
            self.m = torch.zeros(probs.shape[1], device=probs.device)
        m = self.m.to(probs.device)
        exists = self.m_exists.to(probs.device)
        cosine = F.cosine_similarity(m.unsqueeze(0), probs, dim=1)
        keep = alive & ((cosine.abs() < self.d_margin) | ~exists)
        with torch.no_grad():
            count = keep.sum()
            batch_mean = (probs * keep.unsqueeze(1)).sum(0) / count.clamp(min=1)
            moved = torch.where(exists, self.momentum * m + (1.0 - self.momentum) * batch_mean, batch_mean)
            nonempty = count > 0
            self.m.copy_(torch.where(nonempty, moved, m))
            self.m_exists.copy_(exists | nonempty)
        return keep.to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"d_margin": self.d_margin, "momentum": self.momentum}
