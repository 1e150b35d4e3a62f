"""CoTTA: continual test-time adaptation with a mean teacher (Wang et al., CVPR 2022).

Paper: "Continual Test-Time Domain Adaptation", https://arxiv.org/abs/2203.13591.
Official code: https://github.com/qinenergy/cotta (``cifar/cotta.py``, ``imagenet/cotta.py``);
docs/methods/cotta.md.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..augment.cotta import TeacherAugmentation
from ..objectives import weighted_mean
from ..objectives.teacher import ema_update_, soft_cross_entropy, stochastic_restore_, symmetric_cross_entropy
from ..policies import BatchContext
from .batch import BatchMethod
from .registry import register
from .speed import compile_network

LOSSES = ("symmetric", "one_sided")
RESTORE_RNG = ("cpu", "device")


@register("cotta")
class CoTTA(BatchMethod):
    """CoTTA (qinenergy/cotta @ c212a20): a mean teacher whose targets are averaged over augmentations
    when the source model is unsure, and a stochastic restore of the weights to the source.

    Three networks, all configured like the student (``train()``, BatchNorm on test-batch statistics,
    ``cifar/cotta.py`` lines 171-187; copies made after configuration, lines 154-162): the
    **student** (every weight and bias adapted, ``params="all"``), the **teacher** (an EMA of the
    student, a submodule: it is in ``state_dict()``) and the **anchor** (the frozen configured source
    model, kept outside the state as the family's frozen source copy). Per batch
    (``forward_and_adapt``, ``imagenet/cotta.py`` lines 92-128, ``cifar/cotta.py`` lines 94-126):

    1. student logits ``z`` (with gradient); anchor confidence ``a_i = max_c softmax(anchor(x))_ic``;
       teacher logits ``t = teacher(x)``;
    2. the gate ``mean_i a_i < ap``: when it holds, the target is the mean of the teacher's *logits*
       over ``num_augs`` (32) augmented copies of the batch (:class:`tta.augment.cotta.TeacherAugmentation`,
       one draw per copy for the whole batch), otherwise ``t``. ImageNet (default,
       ``augment_always=False``): the 32 copies are made only when the gate holds (one host read of
       the gate per batch, the reference's semantics: its random draws and its cost depend on it).
       CIFAR (``augment_always=True``, lines 101-110): the 32 copies are always made and drawn;
    3. loss ``mean_i CE`` between the target and ``z``: ``loss="symmetric"`` (ImageNet, lines
       114 and 131-134: half CE(target -> z) + half CE(z -> target)) or ``"one_sided"`` (CIFAR, lines
       112 and 129-132: CE(target -> z)); one optimizer step;
    4. teacher EMA over all parameters, ``mt`` 0.999 (line 119);
    5. stochastic restore: every element of every adapted parameter back to its source value with
       probability ``rst`` (line 125), masks drawn per tensor on the CPU generator in module order;
    6. return the target of step 2 (the teacher's prediction, from before the update).

    Defaults (ImageNet, ``imagenet/cotta.py`` and ``imagenet/cfgs/10orders/cotta/*.yaml``): SGD lr
    0.01, momentum 0.9, **Nesterov** (``imagenetc.py`` lines 117-123), no weight decay, ``mt`` 0.999,
    ``rst`` 0.001, ``ap`` 0.1 (hard-coded, lines 102, 119, 125), ``num_augs`` 32, symmetric loss.
    The ``cifar`` protocol gives the CIFAR values (``cifar/cfgs/cifar10/cotta.yaml`` lines 26-34):
    Adam 1e-3, ``rst`` 0.01, ``ap`` 0.92 (CIFAR-10) / 0.72 (CIFAR-100), one-sided loss, always 32
    augmented copies.

    Policies: CoTTA learns from every sample (weight 1); extra policies (``entropy_margin``,
    ``plpd``, ...) weight the per-sample loss on the student's logits, the mean taken over the kept
    samples (:func:`~tta.objectives.weighted_mean`); an empty selection skips the optimizer step, the
    EMA and the restore still run, as the reference runs them every batch.

    Decisions and deviations:

    * ``params="all"`` takes every parameter; the reference takes every ``weight`` and ``bias``, the
      same set on CNNs (a ViT's class token and position embeddings are adapted here as well);
    * the anchor forward runs without gradient (the reference builds a graph it never uses);
    * ``restore_rng="device"`` draws the restore masks on the parameters' device (faster on a GPU:
      no host-side ``rand`` over every weight; other numbers). Off by default;
    * the guarded step (all methods): a non-finite loss skips the optimizer step.
    """

    paper = "Wang et al., CVPR 2022 (qinenergy/cotta)"
    #: its own step (not the family's default): no sample memory to train from (tta.methods.memory_step)
    provides = frozenset({"source", "model"})
    default_params = "all"
    default_optimizer = "sgd"

    def __init__(self, model, *, mt: float = 0.999, rst: float = 0.001, ap: float = 0.1, num_augs: int = 32,
                 loss: str = "symmetric", augment_always: bool = False, nesterov: bool = True,
                 restore_rng: str = "cpu", **kwargs: Any):
        super().__init__(model, **kwargs)
        if loss not in LOSSES:
            raise ValueError(f"cotta: loss must be one of {LOSSES}, not {loss!r}")
        if restore_rng not in RESTORE_RNG:
            raise ValueError(f"cotta: restore_rng must be one of {RESTORE_RNG}, not {restore_rng!r}")
        if int(num_augs) < 1:
            raise ValueError(f"cotta: num_augs must be at least 1, got {num_augs}")
        self.mt, self.rst, self.ap, self.num_augs = float(mt), float(rst), float(ap), int(num_augs)
        self.loss, self.augment_always, self.restore_rng = loss, bool(augment_always), restore_rng
        self.nesterov = bool(nesterov) and self.optimizer_name.lower() == "sgd"
        if self.nesterov and self.optimizer is not None:  # the reference's SGD (imagenetc.py lines 117-123)
            group = self.optimizer.param_groups[0]
            self.optimizer = torch.optim.SGD(group["params"], lr=group["lr"], momentum=group["momentum"],
                                             dampening=0, weight_decay=group["weight_decay"], nesterov=True)
            self.update = type(self.update)(self.optimizer)
        self.augment = TeacherAugmentation(padding_mode="edge", blur=True, noise_std=0.005)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.counters.add("augmented_batches", 0)  # batches whose target averaged the augmented copies
        self._initial_state = self._capture_state()

    def default_lr(self, batch_size: int) -> float:
        """0.01 (``imagenet/cfgs/10orders/cotta/cotta*.yaml`` line 26), for any batch size."""
        return 0.01

    # ------------------------------------------------------------------ networks
    def on_policies_assembled(self) -> None:
        """The anchor is the family's frozen copy of the configured source model, always kept."""
        self._frozen = [copy.deepcopy(self.model).requires_grad_(False)]

    @property
    def anchor(self) -> nn.Module:
        return self.frozen_source

    def networks(self) -> list[nn.Module]:
        return super().networks() + [self.teacher]

    def compile_step(self, mode: str | None = None) -> None:
        """Compile the three networks; the step stays eager (the augmentation draws host numbers and,
        on the ImageNet path, reads the gate)."""
        self._calls = {"model": compile_network(self.model, mode), "source": compile_network(self.anchor, mode),
                       "teacher": compile_network(self.teacher, mode)}
        self._compiled_adapt, self._compiled_id = self.adapt, id(self)

    def run_teacher(self, x: torch.Tensor) -> torch.Tensor:
        calls = self._calls
        return self.teacher(x) if calls is None else calls["teacher"](x)

    def run_anchor(self, x: torch.Tensor) -> torch.Tensor:
        calls = self._calls
        return self.anchor(x) if calls is None else calls["source"](x)

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        """The teacher goes back to the source weights too (``reset``, ``cifar/cotta.py`` lines 84-91)."""
        self.teacher.load_state_dict(self._initial_state["model"])

    def source_parameters(self) -> list[torch.Tensor]:
        initial = self._initial_state["model"]
        return [initial[f"net.{name}"] for name in self.param_names]

    def teacher_parameters(self) -> list[torch.Tensor]:
        named = dict(self.teacher.net.named_parameters())
        return [named[name] for name in self.param_names]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def teacher_target(self, x: torch.Tensor) -> torch.Tensor:
        """Step 2: the teacher's logits, averaged over augmented copies when the anchor is unsure."""
        confidence = self.run_anchor(x).softmax(1).max(1).values
        standard = self.run_teacher(x)
        self.counters.add("forwards", 2)
        gate = confidence.mean(0) < self.ap
        if self.augment_always:
            averaged = torch.stack([self.run_teacher(self.augment(x)) for _ in range(self.num_augs)]).mean(0)
            self.counters.add("forwards", self.num_augs)
            self.counters.add("augmented_batches", gate)
            return torch.where(gate, averaged, standard)
        if bool(gate):  # the reference's semantics: its draws and its 32 forwards depend on the gate
            self.counters.add("forwards", self.num_augs)
            self.counters.add("augmented_batches", 1)
            return torch.stack([self.run_teacher(self.augment(x)) for _ in range(self.num_augs)]).mean(0)
        return standard

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.run_model(x)
        self.counters.add("forwards", 1)
        target = self.teacher_target(x)
        ctx = self.context(x, logits)
        weights = self.select(ctx)
        per_sample = (symmetric_cross_entropy if self.loss == "symmetric" else soft_cross_entropy)(logits, target)
        self.step(weighted_mean(per_sample, weights), weights)
        params = self.adapted_parameters()
        ema_update_(self.teacher_parameters(), params, self.mt)
        stochastic_restore_(params, self.source_parameters(), self.rst, rng=self.restore_rng)
        return target

    def objective(self, ctx: BatchContext, weights: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("cotta computes its loss in adapt()")

    def hparams(self) -> dict[str, Any]:
        out = {**super().hparams(), "mt": self.mt, "rst": self.rst, "ap": self.ap, "num_augs": self.num_augs,
               "loss": self.loss, "augment_always": self.augment_always, "restore_rng": self.restore_rng,
               "augmentation": self.augment.hparams()}
        if "optimizer" in out:
            out["optimizer"]["nesterov"] = self.nesterov
        return out


__all__ = ["CoTTA"]
