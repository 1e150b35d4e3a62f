"""SoTTA: robust test-time adaptation on noisy data streams (Gong et al., NeurIPS 2023).

Paper: "SoTTA: Robust Test-Time Adaptation on Noisy Data Streams", https://arxiv.org/abs/2310.10074.
Official code: https://github.com/taeckyung/SoTTA (``learner/sotta.py``, ``utils/memory.py``,
``utils/sam_optimizer.py``, ``utils/loss_functions.py``, ``tta.sh``); docs/methods/sotta.md.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..objectives import weighted_mean
from ..objectives.sam import SAMPerturbation
from ..policies import Policy, SoTTAMemory
from .batch import BatchMethod
from .memory_step import admit_in_update_periods
from .registry import register


def entropy_loss_terms(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SoTTA's ``HLoss`` per sample: ``-sum_c softmax(z/T)_c log(softmax(z/T)_c + 1e-6)``
    (``utils/loss_functions.py`` lines 9-19; the loss is its batch mean)."""
    p = (logits / temperature).softmax(1)
    return -(p * torch.log(p + 1e-6)).sum(1)


@register("sotta")
class SoTTA(BatchMethod):
    """SoTTA (taeckyung/SoTTA @ 50b3333): a memory of confident samples, class-balanced (HUS), and
    entropy minimisation with SAM on the memory; BatchNorm on running statistics with momentum 0.2.

    Setup (``learner/sotta.py`` lines 17-44, ``dnn.py`` lines 108-111): BatchNorm keeps its running
    statistics (``--use_learned_stats``) with momentum ``bn_momentum`` (0.2); the affine parameters
    of BatchNorm / LayerNorm / GroupNorm are adapted **except** in the last stage (``params="sar"``:
    ``layer4``, ``blocks.9-11``, the final ``norm``; ``sam_collect_params(freeze_top=True)``).

    Per ``update_every`` (64) samples of the stream (``train_online``, lines 52-143):

    1. the model in ``eval()`` (BatchNorm on its running statistics) predicts the samples -- these
       are the returned logits -- and each one is offered to the memory (``sotta_memory``: kept if its
       confidence is at least ``threshold``, a random sample of the largest class evicted when full).
       The reference forwards one sample at a time for the memory and then the last 64 together for
       the prediction; in ``eval()`` both are the same numbers, so one forward serves both;
    2. after the 64th sample, an update: ``train()`` mode; the memory's contents (classes in order)
       in the order of a shuffled ``DataLoader`` (one batch: its batch size, 128 / 256, exceeds the
       memory), i.e. ``torch.randperm`` under a seed drawn from torch's generator after the
       iterator's base seed (two host-side draws, as ``torch.utils.data`` makes them); SAM (rho 0.05)
       over Adam: forward, ``HLoss`` (mean entropy with ``+1e-6``, temperature 1), backward, ascend,
       second forward, backward, restore, Adam step (``step``, lines 145-174). Both train-mode
       forwards update the BatchNorm running statistics.

    With a batch of 200 the update happens in the middle of the batch; the samples after it are
    predicted by the updated model, as in the reference.

    Defaults (``tta.sh`` lines 70-77, 171-196): Adam lr 1e-3, no weight decay, SAM rho 0.05,
    ``capacity`` 64, ``update_every`` 64, ``bn_momentum`` 0.2, ``temperature`` 1, ``threshold``
    0.33 (ImageNet-C; 0.99 CIFAR-10-C, 0.66 CIFAR-100-C under the ``cifar`` protocol).

    Decisions: the layers whose parameters are not adapted (``layer4``) do not get
    ``requires_grad`` here (the reference sets it and never steps them: the same updates). The
    memory decides on the host (one read per chunk of the batch), as the reference.
    """

    paper = "Gong et al., NeurIPS 2023 (taeckyung/SoTTA)"
    #: its own step: no other memory to train from
    provides = frozenset({"source", "model"})
    default_params = "sar"
    default_optimizer = "adam"
    batch_stats = False

    def __init__(self, model, *, threshold: float = 0.33, capacity: int = 64, update_every: int = 64,
                 bn_momentum: float = 0.2, rho: float = 0.05, temperature: float = 1.0, **kwargs: Any):
        super().__init__(model, **kwargs)
        if int(update_every) < 1:
            raise ValueError(f"sotta: update_every must be at least 1, got {update_every}")
        self.threshold, self.capacity, self.update_every = float(threshold), int(capacity), int(update_every)
        self.bn_momentum, self.rho, self.temperature = float(bn_momentum), float(rho), float(temperature)
        for module in self.model.net.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.momentum = self.bn_momentum
        self.sam = SAMPerturbation(self.adapted_parameters(), rho=self.rho)
        self.register_buffer("instances", torch.zeros((), dtype=torch.long))  # samples seen (saved with the state)
        self._seen: int | None = 0  # its host copy (None: read the buffer once, after a load)
        self._initial_state = self._capture_state()

    def default_lr(self, batch_size: int) -> float:
        """1e-3 (``tta.sh``)."""
        return 1e-3

    def default_policies(self) -> list[Policy]:
        return [SoTTAMemory(num_classes=self.num_classes, capacity=self.capacity, threshold=self.threshold)]

    @property
    def memory_policy(self) -> SoTTAMemory:
        return self.policies[0]

    def reset_state(self) -> None:
        self.instances.zero_()
        self._seen = 0

    def compile_step(self, mode: str | None = None) -> None:
        """The network is compiled; the step stays eager (the memory's host decisions)."""
        super().compile_step(mode)
        self._compiled_adapt = self.adapt

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        pieces = admit_in_update_periods(self, x, lambda start, end: self._predict_piece(x[start:end]),
                                         "sotta_memory_admitted")
        return torch.cat(pieces)

    def _predict_piece(self, piece: torch.Tensor) -> torch.Tensor:
        """The model's logits on a piece of the batch in eval mode (after the updates before it)."""
        self.model.eval()
        with torch.no_grad():
            logits = self.run_model(piece)
        self.counters.add("forwards", 1)
        return logits

    def update_model(self) -> None:
        """SAM over Adam on the memory, shuffled as the reference's ``DataLoader`` (``step``)."""
        self.model.train()
        policy = self.memory_policy
        slots = policy.training_slots()
        if slots.numel() == 0:
            return
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed (unused: no workers)
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # then RandomSampler's seed
        order = torch.randperm(slots.numel(), generator=torch.Generator().manual_seed(seed))
        slots = slots[order.to(slots.device)]
        policy.memory.trained_on(self.__dict__.get("last_memory"), slots)  # the selection diagnostics
        images = policy.memory.images.index_select(0, slots)
        logits = self.run_model(images)
        ctx = self.context(images, logits)
        ctx.extras.update(slots=slots, ages=policy.memory.ages.index_select(0, slots))
        weights = self.select(ctx)
        loss = weighted_mean(entropy_loss_terms(logits, self.temperature), weights)
        self._observe_loss(loss)  # the first (unperturbed) loss, for an attached monitor
        ok_first = loss.detach().isfinite()
        loss.backward()
        self.sam.ascend(ok_first, host=self._host_guard)
        loss2 = weighted_mean(entropy_loss_terms(self.run_model(images), self.temperature), weights)
        ok = loss2.detach().isfinite()
        loss2.backward()
        self.sam.restore()
        ok = self.update(None, ok & ((weights > 0).sum() > 0))
        self.counters.add("forwards", 2)
        self.record_step(ok, (weights > 0).sum(), backwards=2)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None  # the loaded count is read at the next batch

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "threshold": self.threshold, "capacity": self.capacity,
                "update_every": self.update_every, "bn_momentum": self.bn_momentum, "rho": self.rho,
                "temperature": self.temperature}


__all__ = ["SoTTA"]
