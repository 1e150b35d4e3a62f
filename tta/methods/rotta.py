"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan et al., CVPR 2023).

Paper: "Robust Test-Time Adaptation in Dynamic Scenarios", https://arxiv.org/abs/2303.13899.
Official code: https://github.com/BIT-DA/RoTTA (``core/adapter/rotta.py``, ``core/utils/memory.py``,
``core/utils/bn_layers.py``); docs/methods/rotta.md.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..augment.cotta import TeacherAugmentation
from ..models.robust_bn import use_robust_batchnorm
from ..objectives import weighted_mean
from ..objectives.teacher import ema_update_, soft_cross_entropy
from ..policies import Policy, RoTTAMemory
from .batch import BatchMethod
from .memory_step import admit_in_update_periods
from .registry import register
from .speed import compile_network


@register("rotta")
class RoTTA(BatchMethod):
    """RoTTA (BIT-DA/RoTTA @ 67e34c9): robust BatchNorm, a category-balanced memory with timeliness
    and uncertainty, and a teacher-student update on the memory.

    Setup (``rotta.py`` lines 74-96): every BatchNorm layer becomes a robust BatchNorm
    (:mod:`tta.models.robust_bn`, ``alpha`` 0.05) whose affine parameters are adapted; the teacher is
    a copy of the configured student (``base_adapter.py`` lines 53-57), a submodule (in the state).

    Per batch (``forward_and_adapt``, lines 22-44):

    1. the teacher in ``eval()`` (robust BatchNorm on its stored statistics) predicts the batch,
       without gradient; pseudo-labels and uncertainties come from these logits;
    2. the samples enter the memory one by one (``rotta_memory``, :class:`tta.policies.RoTTAMemory`);
       after every ``update_every``-th sample of the stream (64), an update (so with a batch of 200
       the model is updated in the middle of the batch, as the reference does);
    3. update (``update_model``, lines 46-66): student and teacher in ``train()``; the memory's
       contents (classes in order) are augmented once (:class:`tta.augment.cotta.TeacherAugmentation`,
       edge padding, blur, noise); teacher logits on the clean memory (its robust BatchNorm statistics
       move to them), student logits on the augmented memory (its statistics move to those);
       loss ``mean_j sigmoid(-age_j / 64) * CE(teacher_j -> student_j)``; one Adam step; teacher EMA
       over the parameters, ``theta_t <- (1 - nu) theta_t + nu theta_s``, ``nu`` 0.001 (lines 68-72;
       the statistics are not averaged);
    4. return the teacher's logits of step 1.

    Defaults (``configs/adapter/rotta.yaml``, ``core/configs/defaults.py`` lines 95-101): Adam, lr
    1e-3, no weight decay; ``nu`` 0.001, ``capacity`` 64, ``update_every`` 64, ``lambda_t`` =
    ``lambda_u`` = 1, ``alpha`` 0.05; batch 64.

    Decisions: ``params="norm"``: BatchNorm layers become robust BatchNorm (their affine adapted, the
    official set on a BatchNorm network) and LayerNorm / GroupNorm affine parameters are adapted as in
    mariodoebler/test-time-adaptation's RoTTA (``methods/rotta.py``), so GroupNorm models run too.
    The memory's pseudo-labels are read on the host once per chunk of the batch between updates (the
    memory's rules are sequential, see :mod:`tta.policies.rotta_memory`).
    """

    paper = "Yuan et al., CVPR 2023 (BIT-DA/RoTTA)"
    default_params = "norm"
    default_optimizer = "adam"
    batch_stats = False  # robust BatchNorm starts from the running statistics

    def __init__(self, model, *, nu: float = 0.001, capacity: int = 64, update_every: int = 64,
                 lambda_t: float = 1.0, lambda_u: float = 1.0, alpha: float = 0.05, **kwargs: Any):
        super().__init__(model, **kwargs)
        if int(update_every) < 1:
            raise ValueError(f"rotta: update_every must be at least 1, got {update_every}")
        self.nu, self.capacity, self.update_every = float(nu), int(capacity), int(update_every)
        self.lambda_t, self.lambda_u, self.alpha = float(lambda_t), float(lambda_u), float(alpha)
        self.num_robust_bn = use_robust_batchnorm(self.model.net, self.alpha)
        self.augment = TeacherAugmentation(padding_mode="edge", blur=True, noise_std=0.005)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.register_buffer("instances", torch.zeros((), dtype=torch.long))  # samples seen (saved with the state)
        self._seen: int | None = 0  # its host copy (None: read the buffer once, after a load)
        self._initial_state = self._capture_state()  # with the robust BatchNorm statistics

    def default_lr(self, batch_size: int) -> float:
        """1e-3 (``configs/adapter/rotta.yaml`` line 8)."""
        return 1e-3

    def default_policies(self) -> list[Policy]:
        return [RoTTAMemory(num_classes=self.num_classes, capacity=self.capacity, lambda_t=self.lambda_t,
                            lambda_u=self.lambda_u)]

    @property
    def memory_policy(self) -> RoTTAMemory:
        return self.policies[0]

    def networks(self) -> list[torch.nn.Module]:
        return super().networks() + [self.teacher]

    def compile_step(self, mode: str | None = None) -> None:
        """Compile the two networks; the step stays eager (the memory's host decisions)."""
        self._calls = {"model": compile_network(self.model, mode), "teacher": compile_network(self.teacher, mode)}
        self._compiled_adapt, self._compiled_id = self.adapt, id(self)

    def run_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x) if self._calls is None else self._calls["teacher"](x)

    def reset_state(self) -> None:
        self.teacher.load_state_dict(self._initial_state["model"])
        self.instances.zero_()
        self._seen = 0

    def teacher_parameters(self) -> list[torch.Tensor]:
        named = dict(self.teacher.net.named_parameters())
        return [named[name] for name in self.param_names]

    # ------------------------------------------------------------------ the step
    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        self.teacher.eval()
        with torch.no_grad():
            logits = self.run_teacher(x)
        self.counters.add("forwards", 1)
        admit_in_update_periods(self, x, lambda start, end: logits[start:end], "rotta_memory_admitted")
        return logits

    def update_model(self) -> None:
        """Teacher-student step on the memory (``update_model``, ``rotta.py`` lines 46-66)."""
        self.model.train()
        self.teacher.train()
        policy = self.memory_policy
        slots = policy.training_slots()
        if slots.numel():
            policy.memory.trained_on(self.__dict__.get("last_memory"), slots)  # the selection diagnostics
            images = policy.memory.images.index_select(0, slots)
            augmented = self.augment(images)
            with torch.no_grad():
                target = self.run_teacher(images)
            student = self.run_model(augmented)
            self.counters.add("forwards", 2)
            ctx = self.context(augmented, student)
            ctx.extras.update(slots=slots, ages=policy.memory.ages.index_select(0, slots))
            weights = self.select(ctx)
            self.step(weighted_mean(soft_cross_entropy(student, target), weights), weights)
        ema_update_(self.teacher_parameters(), self.adapted_parameters(), 1.0 - self.nu)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None  # the loaded count is read at the next batch

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "nu": self.nu, "capacity": self.capacity, "update_every": self.update_every,
                "lambda_t": self.lambda_t, "lambda_u": self.lambda_u, "alpha": self.alpha,
                "robust_batchnorm_layers": self.num_robust_bn, "augmentation": self.augment.hparams()}


__all__ = ["RoTTA"]
