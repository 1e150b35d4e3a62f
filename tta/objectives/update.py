"""A guarded optimizer step: learn from a batch only when it is worth learning from.

``GuardedStep(optimizer)(loss, ok)`` backpropagates ``loss`` and steps, then undoes the step on the
device when ``ok`` is false or when the loss or a gradient is not finite. Nothing waits for the GPU:
the decision is a tensor, and the undo is an exact blend between the stepped state and a snapshot
(``x * keep + snapshot * undo`` with ``keep``/``undo`` a 0/1 device scalar: either side is reproduced
bit for bit, and ``torch._foreach`` kernels take the scalar as a tensor, so no value is read on the
host). Skipping a step this way is equivalent to not calling ``optimizer.step()`` at all, as
EATA/DeYO do on an empty selection: the optimizer state is primed with zeros before the first step
(SGD momentum buffers, Adam moments and step counters), which gives the same first update as lazily
created state, and the snapshot covers that state too.

The step is written so that ``torch.compile`` traces it without recompiling per batch: the
optimizer state is primed (and the snapshot buffers allocated) eagerly by :meth:`GuardedStep.prime`,
which callers run outside a compiled region, so a compiled step sees the same Python state on every
batch.

Optimizers other than SGD/Adam/AdamW fall back to a host-side check (one sync per batch). Where
a read costs nothing (the CPU), callers pass ``host=True`` for the same check and skip the
snapshot and the undo: the stepped state is the same either way (the blend reproduces either side
bit for bit). There the loss is read before the backward (a step that will not be taken runs no
backward: its gradients would be cleared unused) and the gradients' check is read as a number.
Every gradient check is one multi-tensor kernel (:func:`nonfinite_found`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torch.optim.sgd import sgd as _sgd_update

_PRIMABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _bare_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` would be torch's dense SGD update and nothing else: exactly
    ``torch.optim.SGD``, no step hooks (its own or global), its ``step`` not wrapped on the instance
    (an LR scheduler counting the calls wraps it), not differentiable, eager, and no sparse gradient
    in any group (decided before any group moves)."""
    return (type(optimizer) is torch.optim.SGD and "step" not in optimizer.__dict__
            and not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
            and not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
            and not optimizer.defaults.get("differentiable", False) and not torch.compiler.is_compiling()
            and not any(p.grad is not None and p.grad.is_sparse for g in optimizer.param_groups for p in g["params"]))


@torch.no_grad()
def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; for a bare ``torch.optim.SGD`` (:func:`_bare_sgd`) the same update
    through torch's functional SGD (``torch.optim.sgd.sgd``, the function ``SGD.step`` calls), without
    the method's wrappers (the profiler's record scope, the hook loops, the grad-mode and compiler
    guards, the per-group state gathering in ``_init_group``): bitwise the same parameters and
    momentum buffers, a fraction of the Python work per step (it shows at small batches on a CPU).
    Anything else (another optimizer, hooks, a scheduler's wrapper, sparse gradients) calls
    ``optimizer.step()``."""
    if not _bare_sgd(optimizer):
        optimizer.step()
        return
    state = optimizer.state
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        momentum = group["momentum"]
        buffers = [state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        _sgd_update(params, grads, buffers, weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
                    dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                    foreach=group["foreach"], fused=group["fused"], grad_scale=getattr(optimizer, "grad_scale", None),
                    found_inf=getattr(optimizer, "found_inf", None))
        for p, buffer in zip(params, buffers):  # a first step creates the buffers (as SGD.step stores them)
            state[p]["momentum_buffer"] = buffer


def _prime_state(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if not isinstance(optimizer, torch.optim.SGD) and p.is_cuda:
                group["capturable"] = True  # keeps Adam's step counter on the GPU: no host sync
            if isinstance(optimizer, torch.optim.SGD):
                if group.get("momentum", 0) != 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                capturable = group.get("capturable", False) or group.get("fused", False)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad", False):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


_UNITS: dict[torch.device, torch.Tensor] = {}


def _unit(device: torch.device) -> torch.Tensor:
    """A 1-element ``1.0`` on ``device``, made once per device (the check's unscale factor: only read);
    a fresh one inside a compiled region."""
    if torch.compiler.is_compiling():
        return torch.ones(1, device=device)
    unit = _UNITS.get(device)
    if unit is None:
        unit = _UNITS[device] = torch.ones(1, device=device)
    return unit


def nonfinite_found(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-element float tensor on the tensors' device: 1 when any of ``tensors`` holds a NaN or an
    infinity, else 0 — in one multi-tensor kernel (torch's mixed-precision check,
    ``_amp_foreach_non_finite_check_and_unscale_``, with an unscale factor of exactly 1, which leaves
    every value as it is). Tensors on several devices, or a device without that kernel, fall back to
    their norms (a norm is finite iff every element is; the same answer, more operations).
    ``tensors`` must be non-empty."""
    device = tensors[0].device
    found = torch.zeros(1, device=device)
    if all(t.device == device for t in tensors):
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(list(tensors), found, _unit(device))
            return found
        except (RuntimeError, NotImplementedError):  # pragma: no cover - a backend without the kernel
            found.zero_()
    norms = [n.to(device) for n in torch._foreach_norm(list(tensors))]
    return found + (~torch.stack(norms).isfinite().all()).float()


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


@torch.no_grad()
def select_(tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor], take_other: torch.Tensor) -> None:
    """``tensors[i] <- others[i]`` where the 0-dim bool ``take_other`` is true, else unchanged; in place,
    exact (``t * keep + o * take`` with 0/1 scalars) and without a host sync (the foreach kernels take
    the scalar as a device tensor; ``torch._foreach_lerp_`` with a tensor weight reads it on the host).

    As a ``lerp``, a non-finite entry on the side not taken still turns the result into NaN
    (``inf * 0``); the guarded step zeroes non-finite gradients first, so the stepped state is finite.
    """
    for device, idx in _by_device(tensors).items():
        flag = take_other.to(device=device)
        current = [tensors[i] for i in idx]
        source = [others[i] if others[i].dtype == current[k].dtype else others[i].to(current[k].dtype)
                  for k, i in enumerate(idx)]
        float_idx = [k for k, t in enumerate(current) if t.is_floating_point()]
        other_idx = [k for k, t in enumerate(current) if not t.is_floating_point()]
        if float_idx:
            cur = [current[k] for k in float_idx]
            keep, take = (~flag).to(cur[0].dtype), flag.to(cur[0].dtype)
            torch._foreach_mul_(cur, keep)
            torch._foreach_add_(cur, torch._foreach_mul([source[k] for k in float_idx], take))
        for k in other_idx:  # integer state (none in SGD/Adam/AdamW): one ``where`` each
            current[k].copy_(torch.where(flag, source[k], current[k]))


class GuardedStep:
    """``loss.backward(); optimizer.step(); optimizer.zero_grad()``, undone unless ``ok``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device_side = isinstance(optimizer, _PRIMABLE)
        self._snapshot: list[torch.Tensor] | None = None
        self._primed: dict[torch.Tensor, dict[str, object]] = {}
        #: with ``host=True``: whether the last update was taken (the decision, read on the host)
        self.stepped = False

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = list(self.params)
        for p in self.params:
            tensors.extend(v for v in self.optimizer.state[p].values() if torch.is_tensor(v))
        return tensors

    def prime(self) -> None:
        """Create the optimizer state (zeros) for parameters that have none, on their current device.

        Also allocates the snapshot buffers. Cheap when nothing is missing; run it outside a compiled
        region (``Method`` does before each batch) so that a compiled step never sees the state change."""
        if not self.device_side:
            return
        if len(self.optimizer.state) < len(self.params):
            self._reuse_primed_state()
            _prime_state(self.optimizer)
            if not isinstance(self.optimizer, torch.optim.SGD):
                for group in self.optimizer.param_groups:  # a reloaded param group lost the flag
                    if any(p.is_cuda for p in group["params"]):
                        group["capturable"] = True
            self._primed = {p: dict(self.optimizer.state[p]) for p in self.params}
        if self._snapshot is None:
            self._snapshot = [torch.empty_like(t) for t in self._state_tensors()]

    @torch.no_grad()
    def _reuse_primed_state(self) -> None:
        """After ``optimizer.load_state_dict`` of an empty state (a method's reset), put back the
        tensors primed before, zeroed in place: the same fresh state, in the same tensors, so a
        compiled step (which guards on the optimizer state's identity) does not recompile."""
        for p, old in self._primed.items():
            state = self.optimizer.state[p]
            if state or not old:
                continue
            tensors = [v for v in old.values() if torch.is_tensor(v)]
            if any(t.device != p.device for t in tensors) or any(
                    v.shape != p.shape for k, v in old.items() if k != "step" and torch.is_tensor(v)):
                continue
            torch._foreach_zero_(tensors)
            state.update(old)

    def _snapshot_of(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``tensors`` into persistent snapshot buffers (one multi-tensor copy, reallocated only
        when a tensor's shape, dtype or device changes)."""
        snap = self._snapshot
        if snap is None or len(snap) != len(tensors) or any(
                s.shape != t.shape or s.dtype != t.dtype or s.device != t.device for s, t in zip(snap, tensors)):
            snap = self._snapshot = [torch.empty_like(t) for t in tensors]
        with torch.no_grad():
            torch._foreach_copy_(snap, tensors)
        return snap

    def grads_finite(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.params[0].device)
        return nonfinite_found(grads)[0] == 0

    def _grads_finite_on_host(self) -> bool:
        """:meth:`grads_finite` read on the host (free on the CPU)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or nonfinite_found(grads).item() == 0

    def constant_flag(self, value: bool) -> torch.Tensor:
        """A 0-dim bool tensor on the parameters' device (cached; callers only read it)."""
        device = self.params[0].device
        flags = self.__dict__.get("_flags")
        if flags is None or flags[0].device != device:
            flags = self._flags = (torch.zeros((), dtype=torch.bool, device=device),
                                   torch.ones((), dtype=torch.bool, device=device))
        return flags[value]

    def __call__(self, loss: torch.Tensor | None, ok: torch.Tensor | bool, *, host: bool = False) -> torch.Tensor:
        """Backward ``loss`` (``None``: gradients are already there) and step if ``ok``.

        ``host=True`` reads the decision on the host (free on the CPU) and steps only when it holds,
        without the snapshot and the undo: the same result, less work. Returns the boolean tensor
        saying whether the step was kept (with ``host=True`` a shared constant: read it, do not
        modify it in place).
        """
        if host:  # the decisions read on the host (free on the CPU)
            take = bool(ok)
            if loss is not None:
                take = take and math.isfinite(loss.item())
                if take:  # a step that will not be taken needs no gradients (they would be cleared)
                    loss.backward()
            ok = self.apply(take, host=True)
            self.clear_grads()
            return ok
        if loss is not None:
            ok = ok & loss.detach().isfinite()
            loss.backward()
        ok = self.apply(ok, host=host)
        self.clear_grads()
        return ok

    def clear_grads(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)`` without its per-call profiling and dispatch wrappers
        (the same effect: every parameter's gradient set to ``None``)."""
        for p in self.params:
            p.grad = None

    def apply(self, ok: torch.Tensor | bool, *, host: bool = False) -> torch.Tensor:
        """Step with the gradients already there, undone unless ``ok`` and all gradients are finite.
        Does not clear the gradients (non-finite ones are zeroed, except with ``host=True``, where a
        step that would be undone is not taken). Returns the boolean tensor "the step was kept"."""
        if host:  # the decision read on the host (one read): step or not, nothing to undo
            self.stepped = bool(ok) and self._grads_finite_on_host()
            if self.stepped:
                self.prime()
                optimizer_step(self.optimizer)
            return self.constant_flag(self.stepped)
        ok = ok & self.grads_finite()
        for p in self.params:
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        if self.device_side:
            self.prime()  # here too, not only at construction: the parameters may have moved since
            tensors = self._state_tensors()
            snapshot = self._snapshot_of(tensors)
            optimizer_step(self.optimizer)
            select_(tensors, snapshot, ~ok)
        elif bool(ok):
            optimizer_step(self.optimizer)
        return ok
