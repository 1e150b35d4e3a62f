"""Mean-teacher formulas: the teacher's exponential moving average, the stochastic restore to the
source weights, and the teacher-to-student cross-entropies.

* :func:`ema_update_` -- ``theta_t <- m theta_t + (1 - m) theta_s`` over parameter lists (CoTTA
  ``cifar/cotta.py`` lines 49-52, ``mt`` 0.999; RoTTA's ``update_ema`` with ``nu = 1 - m``);
* :func:`stochastic_restore_` -- CoTTA's restore (``cifar/cotta.py`` lines 119-125): each element
  of each parameter goes back to its source value with probability ``p``; the masks are drawn per
  tensor, in order, with ``torch.rand(shape)`` on the CPU generator (as the reference) or on the
  parameter's device;
* :func:`soft_cross_entropy` -- ``-sum_c softmax(target)_c log_softmax(student)_c`` per sample, and
  :func:`symmetric_cross_entropy`, its symmetric half-half form (CoTTA's ImageNet loss,
  ``imagenet/cotta.py`` lines 131-134; ROID's consistency term).
"""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, in place (one multi-tensor op each)."""
    teacher, student = list(teacher), [s.detach() for s in student]
    if not teacher:
        return
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - momentum))


@torch.no_grad()
def stochastic_restore_(params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], probability: float,
                        rng: str = "cpu") -> None:
    """Put each element of ``params`` back to ``sources`` with probability ``probability``, in place.

    ``rng="cpu"``: one ``torch.rand(p.shape) < probability`` per tensor, in order, on the default CPU
    generator, then moved to the parameter's device (the reference's draws; a host-to-device copy of
    one mask per tensor). ``rng="device"``: drawn on the parameter's device (no copy; other numbers).
    """
    for p, source in zip(params, sources):
        if rng == "cpu":
            mask = (torch.rand(p.shape) < probability).to(p.device)
        else:
            mask = torch.rand(p.shape, device=p.device) < probability
        p.copy_(torch.where(mask, source.to(p.dtype), p))


def soft_cross_entropy(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum_c softmax(target)_c * log_softmax(student)_c`` per sample (CoTTA's CIFAR loss)."""
    return -(target.softmax(1) * student.log_softmax(1)).sum(1)


def symmetric_cross_entropy(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``0.5 * CE(target -> student) + 0.5 * CE(student -> target)`` per sample."""
    return 0.5 * soft_cross_entropy(student, target) + 0.5 * soft_cross_entropy(target, student)


__all__ = ["ema_update_", "soft_cross_entropy", "stochastic_restore_", "symmetric_cross_entropy"]
