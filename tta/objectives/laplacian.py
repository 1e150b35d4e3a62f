"""LAME's Laplacian-regularised output: affinities of the features and the bound optimisation.

Boudiaf et al., "Parameter-free Online Test-time Adaptation" (CVPR 2022); official code
fiveai/LAME @ d2e5f63, ``src/adaptation/lame.py`` (the same maths in
mariodoebler/test-time-adaptation ``classification/methods/lame.py``).

* :func:`affinity` -- the N x N affinity of L2-normalised features: ``rbf`` (default; lines 49-64),
  ``kNN`` (lines 32-46) or ``linear`` (lines 67-73);
* :func:`laplacian_optimization` -- ``Y = softmax(-unary + lambda K Y)`` iterated from
  ``softmax(-unary)`` until the relative change of the energy is at most 1e-8 (lines 125-148).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AFFINITIES = ("rbf", "kNN", "linear")


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``features`` (N, d) -> (N, N), as the reference writes
    them (``torch.norm(X[None] - X[:, None], dim=-1)``: exact zeros on the diagonal)."""
    return torch.norm(features.unsqueeze(0) - features.unsqueeze(1), dim=-1, p=2)


def affinity(features: torch.Tensor, kind: str = "rbf", knn: int = 5) -> torch.Tensor:
    """The affinity matrix of ``features`` (N, d), already L2-normalised.

    * ``rbf``: ``exp(-D^2 / (2 sigma^2))``, dense, diagonal included, with ``sigma`` the mean over
      the rows of the ``min(knn, N)``-th smallest distance, the point itself (0) counted first, so
      ``knn=5`` is the 4th real neighbour. The reference's ``SIGMA`` setting is not used by it.
      Deviation: when ``sigma`` is 0 (one image, or identical features) the reference divides 0
      by 0 and returns NaN; here the kernel's limit is taken instead: affinity 1 between points at
      distance 0, else 0.
    * ``kNN``: ``K_ij = 1`` for the ``knn`` nearest points ``j`` after the first one found (itself,
      unless another point ties at distance 0); not symmetric.
    * ``linear``: ``X X^T``.
    """
    if kind == "linear":
        return features @ features.t()
    n = features.shape[0]
    dist = pairwise_distances(features)
    if kind == "kNN":
        index = dist.topk(min(int(knn) + 1, n), dim=-1, largest=False).indices[:, 1:]
        return torch.zeros(n, n, dtype=features.dtype, device=features.device).scatter_(-1, index, 1.0)
    if kind == "rbf":
        kth = dist.topk(k=min(int(knn), n), dim=-1, largest=False).values[:, -1]
        scale = 2 * kth.mean() ** 2
        positive = scale > 0
        kernel = torch.exp(-dist ** 2 / torch.where(positive, scale, torch.ones_like(scale)))
        return torch.where(positive, kernel, (dist == 0).to(features.dtype))  # sigma 0: the kernel's limit
    raise ValueError(f"unknown affinity {kind!r}; use one of {AFFINITIES}")


def entropy_energy(y: torch.Tensor, unary: torch.Tensor, pairwise: torch.Tensor, bound_lambda: float) -> torch.Tensor:
    """``sum(unary * Y - lambda * pairwise * Y + Y log clip(Y, 1e-20))`` (reference lines 146-148)."""
    return (unary * y - bound_lambda * pairwise * y + y * torch.log(y.clip(1e-20))).sum()


def laplacian_optimization(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0,
                           max_steps: int = 100) -> torch.Tensor:
    """LAME's assignments ``Y`` (N, C): probabilities, not logits.

    From ``Y = softmax(-unary)``, repeat ``pairwise = lambda K Y``, ``Y = softmax(-unary + pairwise)``
    and stop after the iteration ``i > 1`` where ``|E - E_old| <= 1e-8 |E_old|`` (``E``:
    :func:`entropy_energy`), at most ``max_steps`` iterations; the reference's exact stopping rule.

    The reference reads ``E`` on the host at every iteration (``.item()``) to stop early. Here the
    decision stays on the device: every iteration runs and, once the rule has fired, ``Y`` is frozen
    at the iteration where the reference returns (``torch.where``), so the result is the same
    ``Y`` without a host sync; the price is the remaining iterations' ``N x N x C`` products.
    """
    y = (-unary).softmax(-1)
    old = torch.full((), float("inf"), dtype=torch.float64, device=unary.device)
    done = torch.zeros((), dtype=torch.bool, device=unary.device)
    for i in range(int(max_steps)):
        pairwise = bound_lambda * kernel.matmul(y)
        new = (-unary + pairwise).softmax(-1)
        energy = entropy_energy(new, unary, pairwise, bound_lambda).double()  # compared in float64, as .item()
        y = torch.where(done, y, new)
        if i > 1:
            done = done | ((energy - old).abs() <= 1e-8 * old.abs())
        old = torch.where(done, old, energy)
    return y


def lame_unary(probs: torch.Tensor) -> torch.Tensor:
    """``-log(p + 1e-10)``: the unary term of LAME (reference line 107)."""
    return -torch.log(probs + 1e-10)


def normalized(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (reference line 110)."""
    return F.normalize(features, p=2, dim=-1)


__all__ = ["AFFINITIES", "affinity", "entropy_energy", "laplacian_optimization", "lame_unary", "normalized",
           "pairwise_distances"]
