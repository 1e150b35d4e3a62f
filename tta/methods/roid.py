"""ROID: weight ensembling, diversity weighting and prior correction (Marsden et al., WACV 2024).

Paper: "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting, and Prior
Correction", https://arxiv.org/abs/2306.00650. Official code: https://github.com/mariodoebler/test-time-adaptation
(``classification/methods/roid.py``, ``utils/losses.py``, ``utils/misc.py``); docs/methods/roid.md.
"""
from __future__ import annotations

from typing import Any

import torch

from ..augment.cotta import TeacherAugmentation
from ..objectives.teacher import ema_update_, symmetric_cross_entropy
from ..policies import Policy, ROIDWeight
from .batch import BatchMethod
from .registry import register


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """``-sum_c p~_c log(p~_c / (1 - p~_c) + eps)`` with ``p~ = clamp(softmax(z), 0, clip)`` per sample
    (``utils/losses.py`` lines 32-41; the clamp stops the gradient where ``p > clip``)."""
    p = logits.softmax(1).clamp(min=0.0, max=clip)
    return -(p * torch.log(p / (torch.ones_like(p) - p) + eps)).sum(1)


@torch.no_grad()
def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """ROID's output correction (``roid.py`` lines 116-121): the logits times a smoothed batch prior
    ``(pi + s) / (1 + s C)``, ``pi = mean_i softmax(z_i)``, ``s = max(1/N, 1/C) / max(pi)``."""
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / logits.shape[0], 1 / logits.shape[1]) / torch.max(prior)
    return logits * ((prior + smooth) / (1 + smooth * logits.shape[1]))


@register("roid")
class ROID(BatchMethod):
    """ROID (mariodoebler/test-time-adaptation @ 8b2ed63, ``methods/roid.py``).

    Setup (lines 131-163): norm-layer affine parameters adapted (``params="norm"``), BatchNorm on
    test-batch statistics, the model in ``eval()`` mode otherwise. Per batch (``loss_calculation``
    lines 57-92, ``forward_and_adapt`` lines 94-123):

    1. logits ``z`` of the batch (with gradient);
    2. weights (``roid_weight``, :class:`tta.policies.ROIDWeight`): drop the samples whose diversity
       to the running prior is below the batch mean, weigh the others ``exp(d c / T)``; the prior moves;
    3. loss ``sum_kept w_i SLR(z_i) / B`` (soft likelihood ratio, :func:`soft_likelihood_ratio`) plus
       the consistency ``sum_kept w_i SCE(z_aug_i, z_i) / B``, with ``z_aug`` the logits of one
       augmented copy of the kept samples (a second forward, their own BatchNorm statistics;
       :class:`tta.augment.cotta.TeacherAugmentation` with reflect padding, no blur, no noise) and the
       gradient through both sides; ``B`` is the **configured** batch size (``batch_size``), not the
       number kept, as the reference;
    4. one optimizer step (taken even when no sample is kept, as the reference steps every batch);
    5. weight ensembling: every adapted parameter ``theta <- 0.99 theta + 0.01 theta_source``;
    6. return ``z`` (from before the update) times the smoothed batch prior (:func:`prior_correction`).

    Defaults (``conf.py`` lines 265-270 and 134-140): ``use_weighting``, ``use_consistency``,
    ``use_prior_correction`` on; ``momentum_src`` 0.99, ``momentum_probs`` 0.9, ``temperature`` 1/3;
    ImageNet: SGD lr 2.5e-4, momentum 0.9, Nesterov, no weight decay (the ``cifar`` protocol: Adam 1e-3).

    Host syncs: the consistency forward takes the kept samples only (``x[kept]``), whose number is
    read on the host once per batch, as the reference's subset forward requires (its BatchNorm
    statistics are the subset's). When no sample is kept there is no augmented forward and no
    augmentation draw (the consistency term is an empty sum, 0); the reference would augment and
    forward an empty batch, which the augmentation cannot do. Decisions: the source weights for the ensembling stay on the
    model's device (the reference keeps them on the CPU and copies them every step: the same numbers).
    """

    paper = "Marsden et al., WACV 2024 (mariodoebler/test-time-adaptation)"
    #: its own step: no sample memory to train from
    provides = frozenset({"source", "model"})
    default_params = "norm"

    def __init__(self, model, *, use_weighting: bool = True, use_consistency: bool = True,
                 use_prior_correction: bool = True, momentum_src: float = 0.99, momentum_probs: float = 0.9,
                 temperature: float = 1 / 3, nesterov: bool = True, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.use_weighting, self.use_consistency = bool(use_weighting), bool(use_consistency)
        self.use_prior_correction = bool(use_prior_correction)
        self.momentum_src, self.momentum_probs, self.temperature = float(momentum_src), float(momentum_probs), float(temperature)
        self.nesterov = bool(nesterov) and self.optimizer_name.lower() == "sgd"
        if self.nesterov and self.optimizer is not None:  # the reference's SGD (conf.py OPTIM.NESTEROV True)
            group = self.optimizer.param_groups[0]
            self.optimizer = torch.optim.SGD(group["params"], lr=group["lr"], momentum=group["momentum"],
                                             dampening=0, weight_decay=group["weight_decay"], nesterov=True)
            self.update = type(self.update)(self.optimizer)
        self.model.eval()  # BatchNorm still on batch statistics (no running estimates)
        self.augment = TeacherAugmentation(padding_mode="reflect", blur=False, noise_std=0.0)
        self._initial_state = self._capture_state()

    def default_lr(self, batch_size: int) -> float:
        """2.5e-4 (``cfgs/imagenet_c/roid.yaml``), for any batch size."""
        return 2.5e-4

    def default_policies(self) -> list[Policy]:
        if not self.use_weighting:
            return []
        return [ROIDWeight(num_classes=self.num_classes, temperature=self.temperature, momentum=self.momentum_probs)]

    def source_parameters(self) -> list[torch.Tensor]:
        initial = self._initial_state["model"]
        return [initial[f"net.{name}"] for name in self.param_names]

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.run_model(x)
        self.counters.add("forwards", 1)
        ctx = self.context(x, logits)
        weights = self.select(ctx)
        kept = weights > 0
        zero = logits.new_zeros(())
        loss = torch.where(kept, weights * soft_likelihood_ratio(logits), zero).sum() / self.batch_size
        index = kept.nonzero().squeeze(1) if self.use_consistency else None  # one host read of the kept size
        if index is not None and index.numel():  # an empty kept subset: no augmented view, no draw, term 0
            augmented = self.run_model(self.augment(x.index_select(0, index)))
            self.counters.add("forwards", 1)
            consistency = symmetric_cross_entropy(augmented, logits.index_select(0, index))
            loss = loss + (consistency * weights.index_select(0, index)).sum() / self.batch_size
        self.step(loss, weights, require_nonempty=False)
        ema_update_(self.adapted_parameters(), self.source_parameters(), self.momentum_src)
        out = logits.detach()
        return prior_correction(out) if self.use_prior_correction else out

    def hparams(self) -> dict[str, Any]:
        out = {**super().hparams(), "use_weighting": self.use_weighting, "use_consistency": self.use_consistency,
               "use_prior_correction": self.use_prior_correction, "momentum_src": self.momentum_src,
               "momentum_probs": self.momentum_probs, "temperature": self.temperature,
               "augmentation": self.augment.hparams(), "loss_denominator": self.batch_size}
        if "optimizer" in out:
            out["optimizer"]["nesterov"] = self.nesterov
        return out


__all__ = ["ROID", "prior_correction", "soft_likelihood_ratio"]
