"""Wisdom of crowds (Lee, Das, Choo, Choi, ICCV 2023): open-set TTA, often called OSTTA.

Paper: "Towards Open-Set Test-Time Adaptation Utilizing the Wisdom of Crowds in Entropy
Minimization", https://arxiv.org/abs/2308.06879. **No official code was found**; this follows the
paper's selection rule as re-implemented by the UniEnt authors (https://github.com/gaozhengqing/UniEnt,
``imagenet/ostta.py``, ``criterion="ent"``); docs/methods/crowds.md.
"""
from __future__ import annotations

from typing import Any

import torch

from ..objectives import diversity, weighted_mean
from ..policies import BatchContext, Crowds, Policy
from .batch import BatchMethod
from .registry import register


@register("crowds")
class WisdomOfCrowds(BatchMethod):
    """Tent + the ``crowds`` policy + a diversity term (UniEnt's OSTTA re-implementation).

    Per batch: the frozen source model (a copy made after ``configure_model``, so BatchNorm uses
    test-batch statistics there too, as UniEnt's ``deepcopy``) and the adapted model both forward
    the batch; keep ``p_a[c_o] >= p_o[c_o] + margin`` with ``c_o`` the source prediction (ties
    kept); loss ``mean_kept H(p_a) - alpha * H(mean_batch p_a)``; one SGD step; pre-update logits.

    Defaults and decisions:

    * ``alpha = 0.5`` (UniEnt's default; grid {1.0, 0.5, 0.2, 0.1}); ``margin = 0`` [both are UniEnt
      values, the paper's own are U].
    * optimizer SGD, momentum 0.9, ``lr = 1e-3`` whatever the batch size (UniEnt's ImageNet setup at
      bs 32; its CIFAR setup is Adam 1e-3) [U: the paper's values are not known].
    * parameters ``norm``: BN + LN (UniEnt) and GroupNorm too (there are none in UniEnt's models).
    * empty selection: UniEnt still steps (the entropy term is NaN but its gradient is zero, so the
      diversity term alone moves the weights). Kept, with the entropy term written as 0 so logs stay
      finite (``step_on_empty=True``; counted in ``empty_selection_steps``); ``step_on_empty=False``
      skips (and, known on the host, skips the backward too: ``skip_empty``).
    """

    paper = "Lee et al., ICCV 2023 (no official code; UniEnt's re-implementation gaozhengqing/UniEnt)"
    default_params = "norm"

    def __init__(self, model, *, alpha: float = 0.5, margin: float = 0.0, step_on_empty: bool = True, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.alpha, self.margin, self.step_on_empty = float(alpha), float(margin), bool(step_on_empty)
        self.counters.add("empty_selection_steps", 0)

    def default_policies(self) -> list[Policy]:
        return [Crowds(margin=self.margin)]

    def default_lr(self, batch_size: int) -> float:
        return 1e-3

    def objective(self, ctx: BatchContext, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(ctx.entropy, weights) + diversity(ctx.logits, self.alpha)

    @property
    def requires_nonempty(self) -> bool:  # type: ignore[override]
        return not self.step_on_empty

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "alpha": self.alpha, "margin": self.margin, "step_on_empty": self.step_on_empty}
