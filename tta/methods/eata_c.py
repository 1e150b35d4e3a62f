"""EATA-C: EATA with calibration (Tan, Chen, Wu, Zhang, Chen, Zhao, Niu; arXiv 2403.11491, TPAMI 2025).

**EXPERIMENTAL, NOT PARITY-CHECKED.** No official code was found (docs/methods/eata_c.md); everything
below except the abstract-level idea is a decision of this toolkit, marked [U].
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compiling import eager_boundary
from ..models.params import NORM_TYPES
from ..objectives import shannon_entropy, weighted_mean
from .eata import EATA
from .registry import register


class ChannelDropout:
    """A stochastic sub-network: while active, every normalisation layer's output is multiplied by
    a per-sample Bernoulli(1 - p) channel mask scaled by 1 / (1 - p) (channel dimension 1 for
    BatchNorm/GroupNorm, the last one for LayerNorm). [U: the paper's sub-network sampling is not
    known; this is a dropout-style masking that works for CNNs and ViTs alike.]"""

    def __init__(self, net: nn.Module, p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"subnet dropout must be in [0, 1), got {p}")
        self.modules = [m for m in net.modules() if isinstance(m, NORM_TYPES)]
        self.p = p
        self.handles: list[Any] = []

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self.p == 0 or output.ndim < 2:
            return output
        if isinstance(module, nn.LayerNorm):
            shape = (output.shape[0],) + (1,) * (output.ndim - 2) + (output.shape[-1],)
        else:
            shape = output.shape[:2] + (1,) * (output.ndim - 2)
        mask = torch.empty(shape, device=output.device, dtype=output.dtype).bernoulli_(1.0 - self.p)
        return output * mask / (1.0 - self.p)

    def __enter__(self) -> "ChannelDropout":
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@register("eata_c")
class EATAC(EATA):
    """EATA-C [EXPERIMENTAL, not parity-checked: no official code; the hyperparameters are U].

    Keeps EATA's selection (``entropy_margin`` -> ``redundancy`` -> ``eata_weight``) and Fisher
    anchor, and replaces the entropy loss by the two terms the abstract describes:

    * **model uncertainty**: a second forward through a stochastic sub-network (channel dropout
      with ``subnet_dropout`` = 0.1 after every normalisation layer, see :class:`ChannelDropout`),
      and the divergence ``KL(stopgrad(p_full) || p_sub)`` [U: direction, stop-gradient, one
      sub-network];
    * **data uncertainty**: label disagreement ``argmax p_full != argmax p_sub``; a min-max entropy
      term ``+H(p_full)`` where the labels agree and ``-H(p_full)`` where they disagree, weighted by
      ``minmax_weight`` = 1.0 [U].

    ``L = mean_kept(w * (divergence_weight * KL + minmax_weight * s * H)) + beta * Fisher`` with
    EATA's weights ``w`` and ``s = +1/-1``; one step when a sample is kept. Returns the full
    model's pre-update logits. Cost: 2 forwards + 1 backward. Fisher as :class:`~tta.methods.eata.EATA`.
    """

    paper = "Tan et al., arXiv 2403.11491 / TPAMI 2025 (no official code) -- EXPERIMENTAL, not parity-checked"
    #: its own step (not the family's default): no sample memory to train from (tta.methods.memory_step)
    provides = frozenset({"source", "model"})

    def __init__(self, model, *, subnet_dropout: float = 0.1, divergence_weight: float = 1.0,
                 minmax_weight: float = 1.0, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.subnet_dropout, self.divergence_weight = float(subnet_dropout), float(divergence_weight)
        self.minmax_weight = float(minmax_weight)
        self.subnet = ChannelDropout(self.model.net, self.subnet_dropout)
        self.counters.add("label_disagreements", 0)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_fisher()
        logits = self.run_model(x)
        ctx = self.context(x, logits)
        weights = self.select(ctx)
        sub_logits = self.subnet_logits(x)
        self.counters.add("forwards", 2)
        log_full = logits.float().log_softmax(dim=1)
        log_sub = sub_logits.float().log_softmax(dim=1)
        divergence = (log_full.detach().exp() * (log_full.detach() - log_sub)).sum(dim=1)
        agree = logits.detach().argmax(dim=1) == sub_logits.detach().argmax(dim=1)
        sign = agree.to(torch.float32) * 2.0 - 1.0
        per_sample = self.divergence_weight * divergence + self.minmax_weight * sign * shannon_entropy(logits.float())
        loss = weighted_mean(per_sample, weights) + self.fisher().to(logits.device)
        self.counters.add("label_disagreements", (~agree & (weights > 0)).sum())
        self.step(loss, weights)
        return logits.detach()

    @eager_boundary
    def subnet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the stochastic sub-network (eager even in a compiled step: its forward hooks and
        dropout masks stay exactly as without compile)."""
        with self.subnet:
            return self.model(x)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "experimental": True, "parity_checked": False,
                "subnet_dropout": self.subnet_dropout, "divergence_weight": self.divergence_weight,
                "minmax_weight": self.minmax_weight}
