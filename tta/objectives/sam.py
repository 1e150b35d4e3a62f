"""Sharpness-aware minimisation (SAM, Foret et al. 2021) as an update rule, as SAR uses it.

SAR (mr-eggplant/SAR, ``sam.py`` from davda54/sam) wraps SGD in SAM with ``rho = 0.05``,
``adaptive = False``:

1. after the first backward: ``e = rho * g / (||g|| + 1e-12)``, with ``||g||`` the global L2 norm
   over the gradients of all adapted tensors together (adaptive SAM: ``g`` scaled by ``|theta|``
   in the norm and by ``theta^2`` in ``e``); save ``theta``; ``theta <- theta + e``; zero the grads;
2. second forward/backward at ``theta + e``;
3. restore ``theta`` exactly and let the base optimizer step with the gradient taken at ``theta + e``.

``SAMPerturbation(params).ascend(ok)`` does step 1 on the device (no host sync): when ``ok`` is
false (non-finite loss or gradients) the perturbation is zero. :meth:`restore` does the first half
of step 3; the base step is the caller's (a :class:`~tta.objectives.update.GuardedStep`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from .update import nonfinite_found


class SAMPerturbation:
    def __init__(self, params: Sequence[nn.Parameter], rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12):
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        self.params = list(params)
        self.rho, self.adaptive, self.eps = float(rho), bool(adaptive), float(eps)
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def ascend(self, ok: torch.Tensor | bool = True, *, host: bool = False) -> torch.Tensor:
        """Move to ``theta + e`` using the current gradients, then drop them. Returns ``||g||``.

        ``host=True`` (where a read is free: the CPU) reads the gradients' finiteness first and uses
        finite gradients as they are, without the zeroing copies (the same ``e``)."""
        params = [p for p in self.params if p.grad is not None]
        self._saved = [p.detach().clone() for p in params]
        if not params:
            self._saved_params = params
            return torch.zeros(())
        found = nonfinite_found([p.grad for p in params])
        finite = found[0] == 0
        if host and not bool(found):  # finite: zeroing non-finite entries would copy them unchanged
            grads = [p.grad for p in params]
        else:
            grads = [p.grad.nan_to_num(0.0, 0.0, 0.0) for p in params]
        if self.adaptive:
            norm_terms = torch._foreach_mul(grads, torch._foreach_abs(params))
        else:
            norm_terms = grads
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(norm_terms)))
        scale = self.rho / (grad_norm + self.eps) * (finite & torch.as_tensor(ok, device=grad_norm.device))
        e = torch._foreach_mul(grads, torch._foreach_mul(params, params)) if self.adaptive else grads
        e = torch._foreach_mul(e, scale)
        torch._foreach_add_(params, e)
        self._saved_params = params
        for p in self.params:
            p.grad = None
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Back to ``theta`` (bit-exact), keeping the gradients taken at ``theta + e``."""
        if self._saved is None:
            raise RuntimeError("restore() without ascend()")
        if self._saved_params:
            torch._foreach_copy_(self._saved_params, self._saved)
        self._saved = None
