"""View-ranking policies of the TPT family: keep the most confident augmented views of one image.

Here a "sample" of the :class:`~tta.policies.base.BatchContext` is a *view*: ``ctx.logits`` holds
the (V, C) logits of the V views of one test image, and the weight says which views the method
learns from (TPT) or votes with (ADTE). The kept views are the ``max(floor(V * fraction), 1)``
views with the lowest score, in ``torch.argsort`` order as the official code does.

* ``tpt_confidence`` -- TPT's ``select_confident_samples``: Shannon entropy from the logits,
  ``-(softmax(z) * log_softmax(z)).sum()``, keep 10%.
* ``tsallis`` -- ADTE's score (Jinx630/ADTE ``ttas/zero.py``), keep 10%:

  - ``score="adte"`` (default): ``s_v = sum_c p_{v,c}^{q_c} / (1 - q_c)`` with a class-specific
    Tsallis index ``q_c`` in [0.01, 0.9] from the estimated label bias (exactly this formula; it is
    not a class-wise Tsallis entropy, see METHODS.md section 9);
  - ``score="tsallis"``: fixed ``q`` (ADTE's ``--use_adte --same_q --scale_w 0.1``; without
    ``--use_adte`` the official code ranks by Shannon entropy): ``(1 - sum_c p_c^q) / (q - 1)``;
  - ``score="shannon"``: ``-sum_c p_c log(p_c + 1e-8)`` (ADTE/ZERO without ``--use_adte``).

The label bias comes from :class:`LabelBias`: a memory of confident predictions per class, a
class-confusion matrix ``P`` and a power iteration for its leading eigenvector ``q``; ``b = ln q``.
ADTE fills it in a transductive pre-pass over the test set (``tta.methods.adte``); used on its own
(e.g. ``method=tpt policies.extra=[tsallis]``) the policy updates it online from each image's views
and, until the memory holds ``min_entries`` entries, uses a uniform bias (every ``q_c = 0.01``, the
official min-max map of a flat bias). The official online path divides by zero (``q_c = 1``); this
one does not.
"""
from __future__ import annotations

from typing import Any

import torch

from . import register
from .base import BatchContext, Policy

SCORES = ("adte", "tsallis", "shannon")


# --------------------------------------------------------------------------------------- scores
def tpt_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT's per-view entropy ``-(softmax(z) * log_softmax(z)).sum(-1)``."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def adte_score(probs: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """ADTE's view score ``sum_c p_c^{q_c} / (1 - q_c)`` over the last dimension."""
    return (probs.pow(q_index) / (1 - q_index)).sum(-1)


def tsallis_score(probs: torch.Tensor, q: float) -> torch.Tensor:
    """Tsallis entropy with one index: ``(1 - sum_c p_c^q) / (q - 1)``."""
    return (1 - probs.pow(q).sum(-1)) / (q - 1)


def shannon_score(probs: torch.Tensor) -> torch.Tensor:
    """ADTE/ZERO's Shannon entropy ``-sum_c p_c log(p_c + 1e-8)``."""
    return -(probs * torch.log(probs + 1e-8)).sum(-1)


def keep_count(num_views: int, fraction: float) -> int:
    """``max(floor(V * fraction), 1)`` (ADTE's rule; TPT's ``int(V * 0.1)`` for V >= 10)."""
    return max(int(num_views * fraction), 1)


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Float mask (..., V) with 1 at the ``k`` lowest scores (ties in ``torch.argsort`` order)."""
    idx = torch.argsort(score, dim=-1, descending=False)[..., :k]
    return torch.zeros_like(score, dtype=torch.float32).scatter_(-1, idx, 1.0)


# -------------------------------------------------------------------------------- the label bias
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

    def recompute_sums(self) -> None:
        """Rebuild the softmax sums from the memory (after loading a memory from a file)."""
        valid = (self.gaps != -1).float()
        self.column_sums.copy_((self.memory.softmax(dim=-1) * valid[..., None]).sum(dim=1))
        self.entries.copy_((self.gaps != -1).sum())

    def log_bias(self) -> torch.Tensor:
        """``b = ln q`` (clamped at ``q >= 1e-12``); zeros (uniform) while the memory is empty."""
        q = power_iteration(self.confusion(), self.eps, self.max_iter)
        b = torch.log(q.clamp_min(1e-12))
        return torch.where(self.entries > 0, b, torch.zeros_like(b))

    def q_index(self, b: torch.Tensor | None = None) -> torch.Tensor:
        return minmax_q_index(self.log_bias() if b is None else b, *self.q_range)


# ------------------------------------------------------------------------------------ policies
class ViewSelection(Policy):
    """Base of view-ranking policies: weight 1 for the ``keep_count(V, fraction)`` lowest-score
    views among the alive ones, 0 elsewhere. A view-ranking policy passed to TPT as an extra policy
    replaces TPT's own Shannon confidence selection."""

    ranks_views = True

    def __init__(self, num_classes: int | None = None, fraction: float = 0.1):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.num_classes, self.fraction = num_classes, float(fraction)

    def score(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, logits: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """Weights (..., V) for view logits (..., V, C)."""
        score = self.score(logits.detach())
        if alive is not None:
            score = torch.where(alive, score, torch.full_like(score, float("inf")))
        weights = lowest_k_mask(score, keep_count(score.shape[-1], self.fraction))
        return weights if alive is None else weights * alive

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        return self.select(ctx.logits, alive)

    def hparams(self) -> dict[str, Any]:
        return {"fraction": self.fraction}


@register("tpt_confidence")
class TPTConfidence(ViewSelection):
    """TPT's confidence selection: the 10% views with the lowest Shannon entropy (azshue/TPT
    ``select_confident_samples``)."""

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return tpt_entropy(logits)


@register("tsallis")
class TsallisRanking(ViewSelection):
    """ADTE's view ranking (see the module docstring).

    Args:
        num_classes: number of classes (needed for ``score="adte"``).
        fraction: kept fraction of views (ADTE ``gamma`` = 0.1).
        score: ``adte`` (class-specific ``q_c``), ``tsallis`` (fixed ``q``) or ``shannon``.
        q: the fixed index of ``score="tsallis"`` (ADTE ``--use_adte --same_q --scale_w 0.1``).
        online: update the label bias from every ranked image (the policy on its own); ADTE turns
            this off and feeds the estimate itself.
        min_entries: memory entries needed before the online bias is used (uniform before).
        update_every: recompute the online bias every this many images.
        q_path: a bias file written by ADTE's pre-pass (``{domain: {"log_bias": b}}``) or a bare
            ``ln q`` tensor as the official code saves it; used instead of the online estimate.
        memory_size, gap, eps, max_iter, q_range: :class:`LabelBias` settings (ADTE: 20, 1.0, 1e-4,
            500, (0.01, 0.9)).
    """

    def __init__(self, num_classes: int | None = None, fraction: float = 0.1, score: str = "adte", q: float = 0.1,
                 online: bool = True, min_entries: int = 1, update_every: int = 1, q_path: str | None = None,
                 memory_size: int = 20, gap: float = 1.0, eps: float = 1e-4, max_iter: int = 500,
                 q_range: tuple[float, float] = (0.01, 0.9)):
        super().__init__(num_classes, fraction)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {score!r}")
        if score == "adte" and num_classes is None:
            raise ValueError("the adte score needs num_classes")
        if score == "tsallis" and q == 1:
            raise ValueError("the Tsallis index q must differ from 1")
        self.kind, self.q, self.online, self.q_path = score, float(q), bool(online), q_path
        self.min_entries, self.update_every = int(min_entries), max(int(update_every), 1)
        self.q_range = (float(q_range[0]), float(q_range[1]))
        self.bias = LabelBias(num_classes or 1, memory_size, gap, eps, max_iter, q_range) if score == "adte" else None
        c = num_classes or 1
        self.register_buffer("log_bias", torch.zeros(c))
        self.register_buffer("q_index", torch.full((c,), float(q_range[0])))
        self.seen = 0
        if q_path is not None and score == "adte":
            from ..methods.adte import load_bias_file

            table = load_bias_file(q_path)
            b = next(iter(table.values())) if len(table) == 1 else table.get("default")
            if b is None:
                raise ValueError(f"{q_path} holds biases for several domains {sorted(table)}; use method=adte")
            self.set_bias(b)
            self.online = False

    @torch.no_grad()
    def set_bias(self, log_bias: torch.Tensor) -> None:
        """Use ``b = ln q`` (a C-vector) from now on: sets the class-specific Tsallis index."""
        if log_bias.numel() != self.log_bias.numel():
            raise ValueError(f"label bias has {log_bias.numel()} classes, the policy {self.log_bias.numel()}")
        self.log_bias.copy_(log_bias.to(self.log_bias.device).float().view(-1))
        self.q_index.copy_(minmax_q_index(self.log_bias, *self.q_range))

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the bias from the memory (uniform until it holds ``min_entries`` entries)."""
        b = self.bias.log_bias()
        b = torch.where(self.bias.entries >= self.min_entries, b, torch.zeros_like(b))
        self.set_bias(b)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)
        if self.kind == "adte":
            return adte_score(probs, self.q_index)
        if self.kind == "tsallis":
            return tsallis_score(probs, self.q)
        return shannon_score(probs)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        if self.kind == "adte" and self.online:
            self.bias.observe(ctx.logits.detach())
            self.seen += 1
            if self.seen % self.update_every == 0:
                self.refresh()
        return self.select(ctx.logits, alive)

    def reset(self) -> None:
        """A new domain: the online estimate starts again (a loaded or pre-computed bias stays)."""
        if self.kind == "adte" and self.online:
            self.bias.reset()
            self.log_bias.zero_()
            self.q_index.fill_(self.q_range[0])
            self.seen = 0

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fraction": self.fraction, "score": self.kind}
        if self.kind == "tsallis":
            out["q"] = self.q
        if self.kind == "adte":
            out.update(online=self.online, min_entries=self.min_entries, update_every=self.update_every,
                       memory_size=self.bias.memory_size, gap=self.bias.gap, q_range=list(self.q_range),
                       q_path=self.q_path)
        return out


__all__ = ["LabelBias", "SCORES", "TPTConfidence", "TsallisRanking", "ViewSelection", "adte_score", "keep_count",
           "lowest_k_mask", "minmax_q_index", "power_iteration", "shannon_score", "tpt_entropy", "tsallis_score"]
