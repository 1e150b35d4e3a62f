"""``sotta_memory``: SoTTA's high-confidence uniform-class sampling memory (HUS).

Gong et al., "SoTTA: Robust Test-Time Adaptation on Noisy Data Streams", NeurIPS 2023; official code
taeckyung/SoTTA @ 50b3333, ``utils/memory.py`` (``HUS``, lines 51-159) and ``learner/sotta.py``.
"""
from __future__ import annotations

import random
from typing import Any

import torch

from .memory import MemoryPolicy
from .registry import register


@register("sotta_memory")
class SoTTAMemory(MemoryPolicy):
    """High-confidence uniform-class sampling (HUS), as ``memory.py``.

    Sample by sample in batch order (``add_instance``, lines 111-124): a sample whose confidence
    (maximum softmax probability of the logits it was predicted with) is below ``threshold`` is
    rejected (strict ``<``, line 117); otherwise, if the memory is full, one stored sample leaves
    first: when the sample's pseudo-class is not among the classes holding the most samples, a
    random one of those classes (``random.choice``) and a random sample of it (``random.randrange``);
    otherwise a random sample of its own class (lines 148-159). Then it enters. Every stored
    sample weighs 1 when a method trains from the memory.

    The draws use Python's ``random`` module, as the reference (a run seeds it with ``seed``).
    Defaults: ``capacity`` 64 (``--memory_size``), ``threshold`` 0.33 (ImageNet-C, ``tta.sh``); the
    ``cifar`` protocol gives 0.99 (CIFAR-10) / 0.66 (CIFAR-100) to ``sotta``. As an extra policy it
    takes the ImageNet default; set ``policy_kwargs={"sotta_memory": {"threshold": ...}}`` for another.
    """

    extra_defaults: dict[str, Any] = {}

    def __init__(self, num_classes: int, capacity: int = 64, threshold: float = 0.33):
        super().__init__(capacity)
        self.num_classes, self.threshold = int(num_classes), float(threshold)

    def admission_scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        confidence, labels = logits.float().softmax(1).max(1)
        return labels, confidence

    def admit_on_host(self, view: dict[str, Any], labels: list[int], confidences: list[float]
                      ) -> tuple[list[int], int]:
        cap = self.memory.capacity
        view["batch_index"] = [-1] * cap
        admitted: list[int] = []
        evicted = 0
        for i, (c, conf) in enumerate(zip(labels, confidences)):
            if conf < self.threshold:
                continue
            slots = sorted((s for s in range(cap) if view["occupied"][s]), key=lambda s: view["order"][s])
            if len(slots) >= cap:
                by_class: list[list[int]] = [[] for _ in range(self.num_classes)]
                for s in slots:
                    by_class[view["labels"][s]].append(s)
                most = max(len(items) for items in by_class)
                largest = [k for k, items in enumerate(by_class) if len(items) == most]
                victim_class = random.choice(largest) if c not in largest else c
                victim = by_class[victim_class][random.randrange(0, len(by_class[victim_class]))]
                view["occupied"][victim], view["batch_index"][victim] = False, -1
                evicted += 1
            slot = next(s for s in range(cap) if not view["occupied"][s])
            view["occupied"][slot], view["labels"][slot], view["ages"][slot] = True, c, 0
            view["scores"][slot], view["order"][slot], view["batch_index"][slot] = conf, view["inserted"], i
            view["inserted"] += 1
            admitted.append(i)
        return admitted, evicted

    def hparams(self) -> dict[str, Any]:
        return {"capacity": self.memory.capacity, "threshold": self.threshold}


__all__ = ["SoTTAMemory"]
