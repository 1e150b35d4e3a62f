"""A guarded optimizer step: learn from a batch only when it is worth learning from.

``GuardedStep(optimizer)(loss, ok)`` backpropagates ``loss`` and steps, then undoes the step on the
device when ``ok`` is false or when the loss or a gradient is not finite. Nothing waits for the GPU:
the decision is a tensor, and the undo is a ``lerp`` between the stepped state and a snapshot
(weight 0 or 1, which reproduces either side exactly). Skipping a step this way is equivalent to
not calling ``optimizer.step()`` at all, as EATA/DeYO do on an empty selection: the optimizer state
is primed with zeros before the first step (SGD momentum buffers, Adam moments and step counters), which gives
the same first update as lazily created state, and the snapshot covers that state too.

Optimizers other than SGD/Adam/AdamW fall back to a host-side check (one sync per batch).
"""
from __future__ import annotations

import torch

_PRIMABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


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


class GuardedStep:
    """``loss.backward(); optimizer.step(); optimizer.zero_grad()``, undone unless ``ok``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device_side = isinstance(optimizer, _PRIMABLE)

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = list(self.params)
        for p in self.params:
            tensors.extend(v for v in self.optimizer.state[p].values() if torch.is_tensor(v))
        return tensors

    def grads_finite(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.params[0].device)
        return torch.stack(torch._foreach_norm(grads)).isfinite().all()

    def __call__(self, loss: torch.Tensor | None, ok: torch.Tensor) -> torch.Tensor:
        """Backward ``loss`` (``None``: gradients are already there) and step if ``ok``.

        Returns the boolean tensor saying whether the step was kept.
        """
        if loss is not None:
            ok = ok & loss.detach().isfinite()
            loss.backward()
        ok = ok & self.grads_finite()
        for p in self.params:
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        if self.device_side:
            _prime_state(self.optimizer)  # here, not at construction: the parameters may have moved since
            tensors = self._state_tensors()
            by_device: dict[torch.device, list[int]] = {}
            for i, t in enumerate(tensors):
                by_device.setdefault(t.device, []).append(i)
            snapshot = [t.detach().clone() for t in tensors]
            self.optimizer.step()
            with torch.no_grad():
                for device, idx in by_device.items():
                    undo = (~ok).to(device=device, dtype=torch.float32)
                    current = [tensors[i] for i in idx]
                    torch._foreach_lerp_(current, [snapshot[i].to(current[0].dtype) for i in idx], undo)
        elif bool(ok):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ok
