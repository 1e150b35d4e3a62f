"""The batch family: methods that learn from the samples of each test batch (Tent, ETA, EATA, SAR,
DeYO, wisdom of crowds, EATA-C; the ``source`` and ``norm`` baselines).

``method(x)`` checks the batch, predicts and adapts on it (online), and returns the logits of the
forward pass *before* that batch's update, as the original Tent/EATA/SAR/DeYO code does. The default
step is Tent's shape: one forward, the policies' weights, the weighted mean entropy of the kept
samples, one guarded optimizer step. A recipe overrides :meth:`BatchMethod.objective` (EATA's
Fisher term, the diversity term of wisdom of crowds) or :meth:`BatchMethod.adapt` (SAR's two
forwards, EATA-C's sub-network).

Policies of this family rank the samples of a batch; their context can give them the frozen
source model's logits (``needs = ("source",)``, e.g. ``crowds``: a frozen copy of the configured
model is then kept, outside the state dict) and re-forward a transformed batch through the adapted
model (``"model"``, e.g. ``plpd``).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..models.params import has_batchnorm
from ..objectives import weighted_mean
from ..policies import BatchContext
from .core import Method, check_skip_empty
from .memory_step import adapt_from_memory, check_memory_policies, memory_policies
from .speed import compile_fn, compile_network


class BatchMethod(Method):
    """Base of the batch family (see the module docstring); arguments as :class:`Method`, and:

    Args:
        skip_empty: whether a batch reads the size of its selection on the host to skip the backward
            and the optimizer step when nothing was selected (the official ETA/EATA/DeYO loops skip
            them the same way). The result is the same either way (weights, optimizer state,
            counters); only the work differs. ``"auto"`` (default): on the CPU, where the read is
            free, always; on a GPU, where it is a host sync, only while empty selections are common
            (:meth:`~tta.methods.core.Method.plan_skip`). ``"never"``: the step never syncs.
            ``"always"``: one sync per batch on a GPU. On the CPU (not ``"never"``) the guarded
            update and the counters also use host reads: no snapshot and undo, counts added as
            numbers. SAR and wisdom of crowds step on an empty selection (``step_on_empty``).
    """

    policy_level: ClassVar[str] = "samples"
    provides: ClassVar[frozenset[str]] = frozenset({"source", "model", "memory"})

    def __init__(self, model, *, skip_empty: str = "auto", **kwargs: Any):
        super().__init__(model, **kwargs)
        self.skip_empty = check_skip_empty(skip_empty)

    # ------------------------------------------------------------------ the frozen source copy
    def on_policies_assembled(self) -> None:
        self._frozen: list[nn.Module] = []  # a list: not a submodule (not in state_dict or parameters())
        if any("source" in p.needs for p in self.policies):
            self._frozen = [copy.deepcopy(self.model).requires_grad_(False)]
        check_memory_policies(self)  # a memory policy: the step learns from its memory (tta.methods.memory_step)

    @property
    def frozen_source(self) -> nn.Module | None:
        """The frozen copy of the configured source model, when a policy needs one (else ``None``)."""
        frozen = self.__dict__.get("_frozen")
        return frozen[0] if frozen else None

    def _apply(self, fn, *args, **kwargs):
        """``.to()``/``.cuda()``/``.double()`` also move the frozen source copy."""
        out = super()._apply(fn, *args, **kwargs)
        for frozen in self.__dict__.get("_frozen", ()):
            frozen._apply(fn, *args, **kwargs)
        return out

    def networks(self) -> list[nn.Module]:
        return [self.model] + ([self.frozen_source] if self.frozen_source is not None else [])

    # ------------------------------------------------------------------ the online step
    def forward(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None,
                domain: str | None = None) -> torch.Tensor:
        """Predict on ``x`` (N, C, H, W) in [0, 1], then adapt on it; ``ids``/``domain`` are not used."""
        self.check_input(x)
        if x.shape[0] == 1 and self.batch_stats and "bs1" not in self.__dict__.get("_warned", ()):
            has_bn = self.__dict__.get("_has_batchnorm")
            if has_bn is None:  # looked up once: a walk over every module is not a per-batch cost
                has_bn = self.__dict__["_has_batchnorm"] = has_batchnorm(self.model.net)
            if has_bn:
                self.warn_once("bs1", "batch size 1 with BatchNorm: test-batch statistics come from a single image "
                                      "and are degenerate (it still runs)")
        if self.episodic:
            self.reset()
        self.periodic_reset()  # reset_every (tta.methods.periodic)
        self.count_batch(x)
        if self.speed.channels_last:  # the layout the compiled graphs were made for (a no-op when it is already)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.learns:  # the update's state and the skip decision: nothing to prepare without an update
            self.before_step()
            self.plan_skip(x.device)
        step = self.adapt
        if self.speed.compile:
            if self._compiled_id != id(self):  # a copy of a compiled method: its own compiled step
                self.compile_step(self.speed.compile_mode)
            step = self._compiled_adapt
        logits = None
        for _ in range(self.steps):
            logits = step(x)
        return logits

    def before_step(self) -> None:
        """Eager work before the (possibly compiled) step: anything that changes Python state once
        (the optimizer state's priming; EATA's pending Fisher) happens here, so a compiled step sees
        the same state on every batch."""
        if self.update is not None:
            self.update.prime()

    # ------------------------------------------------------------------ compiled step
    #: per-network callables of a compiled step (``None``: eager, the modules themselves)
    _calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
    #: the compiled ``adapt`` (``None``: eager), and ``id()`` of the method it was compiled for (a deep
    #: copy holds the original's functions, bound to the original: it compiles its own)
    _compiled_adapt: Callable[[torch.Tensor], torch.Tensor] | None = None
    _compiled_id: int | None = None

    def compile_step(self, mode: str | None = None) -> None:
        """Compile the whole step (:mod:`tta.methods.speed`): each network on its own behind a boundary,
        and :meth:`adapt` (selection, loss, guarded update, counters) around them."""
        calls = {"model": compile_network(self.model, mode)}
        if self.frozen_source is not None:
            calls["source"] = compile_network(self.frozen_source, mode)
        self._calls = calls
        self._compiled_adapt = compile_fn(self.adapt)
        self._compiled_id = id(self)

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted model's logits on ``x`` (its compiled graph when the step is compiled)."""
        calls = self._calls
        return self.model(x) if calls is None else calls["model"](x)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted model's forward (its compiled graph when the step is compiled), as the
        official stream-rate code predicts a missed batch: a teacher method (CoTTA, RoTTA) predicts
        it with the student, LAME and ``source`` with the source model (their ``model``)."""
        return self.run_model(x)

    def context(self, x: torch.Tensor, logits: torch.Tensor) -> BatchContext:
        frozen = self.frozen_source
        if frozen is None:
            return BatchContext(x, logits, self.model, None)
        if self._calls is not None:
            frozen = self._calls["source"]

        def source() -> Any:  # asked once per context, by the first policy that needs the frozen pass
            self.counters.add("forwards", 1)
            return frozen

        return BatchContext(x, logits, self.model, source)

    def objective(self, ctx: BatchContext, weights: torch.Tensor) -> torch.Tensor:
        """Loss to minimise: the weighted mean entropy over the kept samples."""
        if not self.policies:  # no policy: every weight is 1 (select), and the weighted mean is the plain
            entropy = ctx.entropy  # one, the same sum divided by the same count (bit for bit), fewer ops
            return entropy.sum() / entropy.shape[0]
        return weighted_mean(ctx.entropy, weights)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One step: forward, select, objective, guarded update. Returns pre-update logits."""
        if not self.learns:
            with torch.no_grad():
                logits = self.run_model(x)
            self.counters.add("forwards", 1)
            return logits
        if memory_policies(self):  # learn from a sample memory (tta.methods.memory_step)
            return adapt_from_memory(self, x)
        logits = self.run_model(x)
        self.counters.add("forwards", 1)
        ctx = self.context(x, logits)
        weights = self.select(ctx)
        self.step(lambda: self.objective(ctx, weights), weights)  # the loss only for a step not skipped
        return logits.detach()

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "frozen_source": self.frozen_source is not None, "skip_empty": self.skip_empty}


__all__ = ["BatchMethod"]
