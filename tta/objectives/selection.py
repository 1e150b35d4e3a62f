"""Counting and ranking rules of the selection policies: how many to keep, and which.

Two keep counts exist in the official codes, with different meanings, so two functions:

* :func:`views_kept` -- TPT/ADTE keep ``max(floor(V * fraction), 1)`` of the V views of an
  image (a Python ``int``: V is known when the views are made);
* :func:`floor_fraction` -- DiffTPT keeps ``int(n * ratio)`` of ``n`` candidates, ``n`` counted on the
  device (a tensor, no host sync), computed in float64 as Python does (``int(127 * 0.8)`` = 101).
"""
from __future__ import annotations

import torch


def views_kept(num_views: int, fraction: float) -> int:
    """``max(floor(V * fraction), 1)``: ADTE's rule; TPT's ``int(V * 0.1)`` for ``V >= 10``."""
    return max(int(num_views * fraction), 1)


def floor_fraction(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """``floor(n * ratio)`` of a count tensor on its device, in float64 as Python's ``int(n * ratio)``."""
    return torch.floor(n.to(torch.float64) * float(ratio)).to(torch.long)


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Float mask (..., V) with 1 at the ``k`` lowest scores (ties in ``torch.argsort`` order, as the
    official ``torch.argsort(batch_entropy, descending=False)[:k]``)."""
    idx = torch.argsort(score, dim=-1, descending=False)[..., :k]
    return torch.zeros_like(score, dtype=torch.float32).scatter_(-1, idx, 1.0)


def rank_among(scores: torch.Tensor, alive: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank (0 = best) of every alive entry of ``scores`` (1-D) among the alive ones; dead entries rank last.

    Sorting is stable, so ties keep index order (the official ``argsort`` is not stable; ties are
    practically irrelevant for continuous scores).
    """
    scores = scores.detach().float()
    fill = float("-inf") if descending else float("inf")
    order = torch.where(alive, scores, torch.full_like(scores, fill)).argsort(descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def top_fraction(scores: torch.Tensor, alive: torch.Tensor, ratio: float, descending: bool) -> torch.Tensor:
    """Mask of the ``floor(n_alive * ratio)`` alive entries with the highest (``descending``) or lowest
    scores, computed on the device from ranks (no host sync)."""
    return alive & (rank_among(scores, alive, descending) < floor_fraction(alive.sum(), ratio))
