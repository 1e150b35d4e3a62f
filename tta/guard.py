"""Collapse protection for long deployments: back to the source state when predictions collapse.

Entropy minimisation on a long or hostile stream can collapse: the model ends up predicting one
or a few classes for everything, confidently, and never recovers (the failure SAR's model
recovery was built for). :class:`CollapseGuard` watches a cheap online signal and, when it crosses
a threshold, puts the method back into the state it had when the guard was attached (the source
state for ``tta.adapt(..., guard=...)``)::

    adapted = tta.adapt(model, method="tent", guard="reset_on_collapse")     # the preset
    adapted = tta.adapt(model, method="tent", guard={"min_effective_classes": 3, "warmup": 20})
    adapted.stats()["counters"]["guard_resets"]

The signal, after every call (from the logits the call returned):

* ``h_t``: the batch's predicted-class histogram (the share of its predictions, ``argmax``, per
  class); ``q <- momentum * q + (1 - momentum) * h_t`` (an EMA, started at the first batch after a
  reset);
* the **effective number of predicted classes** ``exp(H(q))``: ``C`` for predictions spread
  evenly over all classes, 1 when every prediction is the same class. Below
  ``min_effective_classes`` (default ``sqrt(C)``), after at least ``warmup`` batches since the last
  reset, the guard resets. (Hard predictions, not the mean softmax: a model whose predictions are
  all the same class but unconfident has collapsed too.);
* optionally (``min_entropy``, in nats; off by default) an EMA of the mean per-sample entropy:
  below it, predictions have become overconfident (SAR's signal, there on its filtered loss).

Everything is computed on the device and the reset is applied on the device (a 0/1 select between
the live state and the attach-time snapshot with weight 0 or 1, which reproduces either side
exactly), so the guard adds no host synchronisation. A reset restores every tensor of the
method's state except the counters: the adapted parameters, the model's buffers, the optimizer
state (to a fresh one: zeros) and the policies' and the method's buffers (SAR's EMA, EATA's running
mean prediction). Resets are counted in the method's ``guard_resets`` counter (the run record's
counts), and the settings appear in ``hparams()["guard"]``.

Off by default: benchmark runs compute what the papers' code computes. The signal assumes a stream
whose recent predictions should cover several classes; on a stream sorted by class (strong label
shift, a long run of one class) it fires although nothing collapsed: raise ``warmup`` or lower
``min_effective_classes`` there.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from .objectives.update import select_

if TYPE_CHECKING:  # the methods import this module lazily: no import cycle
    from .methods.core import Method

PRESETS: dict[str, dict[str, Any]] = {
    "reset_on_collapse": {},  # the defaults below
}

_SKIPPED_PREFIXES = ("counters.", "policy_counters.", "collapse_guard.")


class CollapseGuard(nn.Module):
    """Reset a method to its attach-time state when its predictions collapse (module docstring).

    Args:
        num_classes: number of classes ``C``.
        min_effective_classes: reset when ``exp(H(EMA of the mean prediction))`` falls below this
            (default ``sqrt(C)``; at least 1).
        min_entropy: also reset when the EMA of the mean per-sample entropy (nats) falls below this
            (default ``None``: off).
        momentum: EMA momentum of both signals.
        warmup: batches after a reset (or :meth:`clear`) before the guard may fire again.
    """

    def __init__(self, num_classes: int, *, min_effective_classes: float | None = None,
                 min_entropy: float | None = None, momentum: float = 0.9, warmup: int = 10):
        super().__init__()
        num_classes = int(num_classes)
        if num_classes < 2:
            raise ValueError(f"the collapse guard needs at least 2 classes, got {num_classes}")
        if min_effective_classes is None:
            min_effective_classes = math.sqrt(num_classes)
        min_effective_classes = float(min_effective_classes)
        if not 1.0 <= min_effective_classes <= num_classes:
            raise ValueError(f"min_effective_classes must be in [1, {num_classes}], got {min_effective_classes}")
        if min_entropy is not None and not float(min_entropy) >= 0:
            raise ValueError(f"min_entropy must be a number of nats >= 0 or None, got {min_entropy!r}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if isinstance(warmup, bool) or int(warmup) != warmup or int(warmup) < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        self.num_classes = num_classes
        self.min_effective_classes = min_effective_classes
        self.min_entropy = None if min_entropy is None else float(min_entropy)
        self.momentum = float(momentum)
        self.warmup = int(warmup)
        self.register_buffer("mean_prediction", torch.zeros(num_classes))
        self.register_buffer("mean_entropy", torch.zeros(()))
        self.register_buffer("since_reset", torch.zeros((), dtype=torch.long))
        self._param_names: list[str] = []
        self._buffer_names: list[str] = []

    # ------------------------------------------------------------------ attaching
    def attach(self, method: "Method") -> "CollapseGuard":
        """Snapshot ``method``'s current state as the one to return to, and watch its calls."""
        with method.lock:
            named_params = dict(method.named_parameters())
            adapted = {id(p) for p in method.adapted_parameters()}
            self._param_names = [n for n, p in named_params.items() if id(p) in adapted]
            persistent = set(method.state_dict(keep_vars=True))
            self._buffer_names = [n for n, _ in method.named_buffers()
                                  if n in persistent and not n.startswith(_SKIPPED_PREFIXES)]
            tensors = self._live(method)[0]
            for i, t in enumerate(tensors):
                self.register_buffer(f"source_{i}", t.detach().clone(), persistent=False)
            method.collapse_guard = self  # a submodule: moves with the method, its EMAs are in state_dict()
            method.counters.add("guard_resets", 0)
            self.to(method.counters.batches.device)
            self.clear()
        return self

    def _live(self, method: "Method") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors a reset restores to the snapshot, and the optimizer state it zeroes."""
        params = dict(method.named_parameters())
        buffers = dict(method.named_buffers())
        tensors = [params[n] for n in self._param_names] + [buffers[n] for n in self._buffer_names]
        state: list[torch.Tensor] = []
        if method.optimizer is not None:
            for p in method.adapted_parameters():
                state.extend(v for v in method.optimizer.state[p].values() if torch.is_tensor(v))
        return tensors, state

    # ------------------------------------------------------------------ the signal
    @torch.no_grad()
    def clear(self) -> None:
        """Forget the signal's history (a method reset does this): the next batch starts the EMAs."""
        self.mean_prediction.zero_()
        self.mean_entropy.zero_()
        self.since_reset.zero_()

    @torch.no_grad()
    def observe(self, method: "Method", logits: torch.Tensor) -> torch.Tensor:
        """Update the signal with a call's ``logits`` (N, C); reset ``method`` on the device where it
        crossed a threshold. Returns the device bool "reset now"."""
        log_p = logits.detach().float().log_softmax(dim=-1).reshape(-1, logits.shape[-1])
        p = log_p.exp()
        predicted = log_p.argmax(dim=-1)
        batch_mean = torch.zeros_like(self.mean_prediction).index_add_(  # exact counts; bincount would sync
            0, predicted, torch.ones_like(predicted, dtype=torch.float32)) / predicted.numel()
        batch_entropy = -(p * log_p.clamp_min(-1e4)).sum(dim=-1).mean()
        first = self.since_reset == 0
        m = self.momentum
        self.mean_prediction.copy_(torch.where(first, batch_mean, m * self.mean_prediction + (1 - m) * batch_mean))
        self.mean_entropy.copy_(torch.where(first, batch_entropy, m * self.mean_entropy + (1 - m) * batch_entropy))
        self.since_reset.add_(1)
        q = self.mean_prediction.clamp_min(1e-12)
        log_effective = -(q * q.log()).sum()
        collapsed = log_effective < math.log(self.min_effective_classes)
        if self.min_entropy is not None:
            collapsed = collapsed | (self.mean_entropy < self.min_entropy)
        fire = collapsed & (self.since_reset >= self.warmup)
        self._restore(method, fire)
        self.since_reset.mul_((~fire).long())
        method.counters.add("guard_resets", fire.long())
        return fire

    def effective_classes(self) -> float:
        """``exp(H(q))`` of the current EMA (a host sync; for inspection, not the per-batch path)."""
        q = self.mean_prediction.clamp_min(1e-12)
        return float((-(q * q.log()).sum()).exp()) if int(self.since_reset) else float("nan")

    @torch.no_grad()
    def _restore(self, method: "Method", fire: torch.Tensor) -> None:
        tensors, state = self._live(method)
        sources = [self._buffers[f"source_{i}"] for i in range(len(tensors))]
        select_([t.data if isinstance(t, nn.Parameter) else t for t in tensors], sources, fire)  # no host sync
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in state:
            by_device.setdefault((t.device, t.dtype), []).append(t)
        for (device, dtype), group in by_device.items():
            torch._foreach_mul_(group, (~fire).to(device=device, dtype=dtype))

    def hparams(self) -> dict[str, Any]:
        return {"name": "reset_on_collapse", "min_effective_classes": self.min_effective_classes,
                "min_entropy": self.min_entropy, "momentum": self.momentum, "warmup": self.warmup}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items() if k != "name")


def build_guard(spec: str | Mapping[str, Any] | CollapseGuard, num_classes: int) -> CollapseGuard:
    """A guard from a preset name (``"reset_on_collapse"``), a dict of :class:`CollapseGuard`
    keywords (``{"min_effective_classes": 3}``; ``"preset"`` picks the base), or a guard."""
    if isinstance(spec, CollapseGuard):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown guard {spec!r}; presets: {', '.join(PRESETS)} (or a dict of thresholds)")
        return CollapseGuard(num_classes, **PRESETS[spec])
    if isinstance(spec, Mapping):
        options = dict(spec)
        preset = options.pop("preset", "reset_on_collapse")
        if preset not in PRESETS:
            raise ValueError(f"unknown guard preset {preset!r}; presets: {', '.join(PRESETS)}")
        known = {"min_effective_classes", "min_entropy", "momentum", "warmup"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown guard option(s) {unknown}; known: {sorted(known)}")
        return CollapseGuard(num_classes, **{**PRESETS[preset], **options})
    raise ValueError(f"guard must be a preset name, a dict of thresholds or a CollapseGuard, not {type(spec).__name__}")


def attach_guard(method: "Method", spec: str | Mapping[str, Any] | CollapseGuard) -> CollapseGuard:
    """Build a guard (:func:`build_guard`) and attach it to ``method``: from now on it watches every
    call, and its reset target is ``method``'s state at this moment."""
    if method._modules.get("collapse_guard") is not None:
        raise ValueError(f"{method.name} already has a collapse guard")
    return build_guard(spec, method.num_classes).attach(method)


__all__ = ["CollapseGuard", "PRESETS", "attach_guard", "build_guard"]
