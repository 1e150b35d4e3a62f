"""ADTE's label-bias estimate (Jinx630/ADTE ``run.py`` pre-pass, ``compute_P``, ``estimate_q``).

A memory of confident predictions per class gives a class-confusion matrix ``P``; its leading
eigenvector ``q`` (power iteration) estimates the label bias ``b = ln q``, and a min-max map of
``b`` gives ADTE's class-specific Tsallis index ``q_c``. :func:`load_bias_file` reads a bias saved
by ADTE's pre-pass (ours or the official bare tensor).
"""
from __future__ import annotations

from pathlib import Path

import torch

#: the domain a bias file without domains (the official bare ``ln q`` tensor) is stored under
DEFAULT_DOMAIN = "default"


def minmax_q_index(b: torch.Tensor, low: float = 0.01, high: float = 0.9) -> torch.Tensor:
    """ADTE's class-specific Tsallis index: ``low + (b - min b)(high - low) / (max b - min b)``;
    all ``low`` when ``b`` is flat (the official ``min_max_normalize``)."""
    b = b.float()
    lo, hi = b.min(), b.max()
    spread = hi - lo
    mapped = low + (b - lo) * (high - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, mapped, torch.full_like(b, low))


def power_iteration(P: torch.Tensor, eps: float = 1e-4, max_iter: int = 500, check_every: int = 25) -> torch.Tensor:
    """ADTE's ``estimate_q``: ``q <- Pq / ||Pq||_2`` from ``q = 1/C`` until ``||q_new - q|| < eps``
    (the previous iterate is returned, as the official loop breaks before assigning) or
    ``max_iter`` iterations (then the last iterate). Converged entries are frozen on the device;
    the host checks for convergence every ``check_every`` iterations."""
    P = P.float()
    q = torch.full((P.shape[0],), 1.0 / P.shape[0], device=P.device)
    done = torch.zeros((), dtype=torch.bool, device=P.device)
    for it in range(max_iter):
        q_new = P @ q
        q_new = q_new / q_new.norm().clamp_min(torch.finfo(q_new.dtype).tiny)
        done = done | ((q_new - q).norm() < eps)
        q = torch.where(done, q, q_new)
        if check_every and (it + 1) % check_every == 0 and bool(done):
            break
    return q


class LabelBias(torch.nn.Module):
    """ADTE's label-bias estimate from confident predictions (``run.py`` pre-pass, ``compute_P``,
    ``estimate_q``).

    For each image, ``observe(view_logits)`` takes the mean ``o`` of its views' logits; when the
    gap between its two largest entries is ``>= gap``, ``o`` goes into the slot of class
    ``argmax o`` that has the smallest stored gap (empty slots hold gap -1 and fill first; after
    that the smallest-gap slot is overwritten unconditionally, even by a smaller gap).
    ``P[:, j]`` is the mean softmax of class ``j``'s stored entries (zero without entries); ``q`` its
    leading eigenvector by :func:`power_iteration`; ``b = ln max(q, 1e-12)``; the Tsallis index is
    :func:`minmax_q_index` of ``b``. Everything stays on the device; no host sync per image.
    """

    def __init__(self, num_classes: int, memory_size: int = 20, gap: float = 1.0, eps: float = 1e-4,
                 max_iter: int = 500, q_range: tuple[float, float] = (0.01, 0.9)):
        super().__init__()
        self.num_classes, self.memory_size, self.gap = int(num_classes), int(memory_size), float(gap)
        self.eps, self.max_iter, self.q_range = eps, max_iter, (float(q_range[0]), float(q_range[1]))
        self.register_buffer("memory", torch.zeros(num_classes, memory_size, num_classes))
        self.register_buffer("gaps", torch.full((num_classes, memory_size), -1.0))
        self.register_buffer("column_sums", torch.zeros(num_classes, num_classes))  # row j: sum of softmax
        self.register_buffer("entries", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        self.memory.zero_()
        self.gaps.fill_(-1.0)
        self.column_sums.zero_()
        self.entries.zero_()

    @torch.no_grad()
    def observe(self, view_logits: torch.Tensor) -> torch.Tensor:
        """Update the memory with one image's (V, C) view logits; returns whether it was written."""
        # 1-element index tensors throughout: indexing with 0-dim tensors would sync with the host.
        mean = view_logits.float().mean(dim=0)
        top2, top_idx = torch.topk(mean, 2)
        gap = top2[0] - top2[1]
        k = top_idx[:1]
        row_gaps = self.gaps.index_select(0, k)                  # (1, S)
        slot = row_gaps.argmin(dim=1)                            # first smallest gap (empty slots: -1)
        current = row_gaps.gather(1, slot[:, None]).view(())
        write = gap >= self.gap
        self.memory.index_put_((k, slot), torch.where(write, mean[None], self.memory[k, slot]))
        self.gaps.index_put_((k, slot), torch.where(write, gap, current).view(1))
        self.entries += (write & (current == -1)).long()
        valid = (self.gaps.index_select(0, k) != -1).float()     # (1, S)
        sums = (self.memory.index_select(0, k).softmax(dim=-1) * valid[..., None]).sum(dim=1)
        self.column_sums.index_copy_(0, k, sums)
        return write

    def confusion(self) -> torch.Tensor:
        """``P`` (C x C): column ``j`` is the mean softmax of class ``j``'s stored entries."""
        counts = (self.gaps != -1).sum(dim=1)
        return (self.column_sums / counts.clamp(min=1).unsqueeze(1)).T

    def log_bias(self) -> torch.Tensor:
        """``b = ln q`` (clamped at ``q >= 1e-12``); zeros (uniform) while the memory is empty."""
        q = power_iteration(self.confusion(), self.eps, self.max_iter)
        b = torch.log(q.clamp_min(1e-12))
        return torch.where(self.entries > 0, b, torch.zeros_like(b))

    def q_index(self, b: torch.Tensor | None = None) -> torch.Tensor:
        return minmax_q_index(self.log_bias() if b is None else b, *self.q_range)


def load_bias_file(path: str | Path) -> dict[str, torch.Tensor]:
    """``{domain: b}`` from a bias file: ours (``{"domains": {name: {"log_bias": b, ...}}}``) or the
    official one (a bare ``ln q`` tensor, used for every domain, under :data:`DEFAULT_DOMAIN`).

    Read with ``torch.load(weights_only=True)``: a file cannot run code.
    """
    obj = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    if torch.is_tensor(obj):
        return {DEFAULT_DOMAIN: obj.float().view(-1)}
    if isinstance(obj, dict) and "domains" in obj:
        return {name: entry["log_bias"].float().view(-1) for name, entry in obj["domains"].items()}
    raise ValueError(f"{path} is not an ADTE bias file (a ln-q tensor or a dict with 'domains')")
