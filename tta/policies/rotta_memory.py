"""``rotta_memory``: RoTTA's category-balanced memory with timeliness and uncertainty (CSTU).

Yuan, Xie, Li, "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023; official code
BIT-DA/RoTTA @ 67e34c9, ``core/utils/memory.py`` (``CSTU``) and ``core/adapter/rotta.py``
(``timeliness_reweighting``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import BatchContext
from .memory import MemoryPolicy
from .registry import register


@register("rotta_memory")
class RoTTAMemory(MemoryPolicy):
    """Category-balanced sampling with timeliness and uncertainty (CSTU), as ``memory.py``.

    Admission, sample by sample in batch order (``add_instance``, lines 49-56): a sample with
    pseudo-label ``c`` (argmax of the logits it was predicted with) and uncertainty
    ``u = -sum_k p_k log(p_k + 1e-6)`` (``rotta.py`` line 31) has the score
    ``lambda_t / (1 + exp(-age / N)) + lambda_u * u / ln C`` at age 0 (line 105, ``N`` the capacity).

    * class ``c`` holds fewer than ``N / C`` samples and the memory is not full: admitted;
    * class ``c`` holds fewer than ``N / C`` but the memory is full: the candidate for eviction is the
      highest-scoring sample among the classes holding the most samples; otherwise the highest
      scoring sample of class ``c`` (lines 58-69). Ties go to the last one in class order, then
      insertion order (``>=``, line 80). The candidate is evicted and the sample admitted only if the
      candidate's score is strictly higher than the sample's (line 86); otherwise the sample is
      dropped;
    * after every sample, admitted or not, every stored sample ages by 1 (lines 107-111).

    Training weights (``timeliness_reweighting``, ``rotta.py`` lines 99-102): ``sigmoid(-age / N)``,
    in (0, 0.5]. Defaults (``configs/adapter/rotta.yaml``): capacity 64, ``lambda_t = lambda_u = 1``.

    The decisions are sequential over samples (each depends on the memory the previous one left), so
    the batch's pseudo-labels and uncertainties and the memory's bookkeeping are read on the host once
    per batch (one sync) and the rules run in Python, as the reference runs them.
    """

    extra_defaults: dict[str, Any] = {}

    def __init__(self, num_classes: int, capacity: int = 64, lambda_t: float = 1.0, lambda_u: float = 1.0):
        super().__init__(capacity)
        self.num_classes, self.lambda_t, self.lambda_u = int(num_classes), float(lambda_t), float(lambda_u)
        self.per_class = self.memory.capacity / self.num_classes

    def score(self, age: int, uncertainty: float) -> float:
        return (self.lambda_t * 1 / (1 + math.exp(-age / self.memory.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    @staticmethod
    def uncertainty(logits: torch.Tensor) -> torch.Tensor:
        p = logits.detach().softmax(1)
        return -(p * torch.log(p + 1e-6)).sum(1)

    def admission_scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.argmax(1), self.uncertainty(logits)

    def admit_on_host(self, view: dict[str, Any], labels: list[int], uncertainties: list[float]
                      ) -> tuple[list[int], int]:
        """Run CSTU over the batch on the host bookkeeping ``view`` (changed in place; ``view["batch_index"]``
        gives, per slot, the batch index of the sample stored there in this batch, or -1). Returns the
        batch indices admitted (a later sample may evict an earlier one of the same batch) and the
        number of evictions."""
        cap = self.memory.capacity
        admitted: list[int] = []
        evicted = 0
        view["batch_index"] = [-1] * cap
        for i, (c, u) in enumerate(zip(labels, uncertainties)):
            slots = [s for s in range(cap) if view["occupied"][s]]
            by_class: list[list[int]] = [[] for _ in range(self.num_classes)]
            for s in sorted(slots, key=lambda s: view["order"][s]):
                by_class[view["labels"][s]].append(s)
            new_score = self.score(0, u)
            accept, removed = self._make_room(view, by_class, c, new_score, len(slots))
            if removed is not None:
                view["occupied"][removed], view["batch_index"][removed] = False, -1
                evicted += 1
            if accept:
                slot = next(s for s in range(cap) if not view["occupied"][s])
                view["occupied"][slot], view["labels"][slot], view["ages"][slot] = True, c, 0
                view["scores"][slot], view["order"][slot] = u, view["inserted"]
                view["batch_index"][slot] = i
                view["inserted"] += 1
                admitted.append(i)
            for s in range(cap):  # every stored sample ages, the new one included
                if view["occupied"][s]:
                    view["ages"][s] += 1
        return admitted, evicted

    def _make_room(self, view: dict[str, list], by_class: list[list[int]], c: int, new_score: float,
                   occupancy: int) -> tuple[bool, int | None]:
        if len(by_class[c]) < self.per_class:
            if occupancy < self.memory.capacity:
                return True, None
            most = max(len(items) for items in by_class)
            classes = [k for k, items in enumerate(by_class) if len(items) == most]
        else:
            classes = [c]
        best, best_score = None, None
        for k in classes:
            for s in by_class[k]:
                score = self.score(view["ages"][s], view["scores"][s])
                if best_score is None or score >= best_score:
                    best, best_score = s, score
        if best is None:
            return True, None
        if best_score > new_score:
            return True, best
        return False, None

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        """Timeliness weights ``sigmoid(-age / N)`` of the memory samples trained from."""
        ages = ctx.extras["ages"].to(torch.float32) / self.memory.capacity
        return torch.exp(-ages) / (1 + torch.exp(-ages))

    def hparams(self) -> dict[str, Any]:
        return {"capacity": self.memory.capacity, "lambda_t": self.lambda_t, "lambda_u": self.lambda_u}


__all__ = ["RoTTAMemory"]
