"""ADTE's view ranking (Jinx630/ADTE ``ttas/zero.py``): keep the 10% most confident views of one
image by a Tsallis score.

* ``score="adte"`` (default): ``s_v = sum_c p_{v,c}^{q_c} / (1 - q_c)`` with a class-specific
  Tsallis index ``q_c`` in [0.01, 0.9] from the estimated label bias (exactly this formula, see
  :func:`~tta.objectives.tsallis.adte_score`);
* ``score="tsallis"``: fixed ``q`` (ADTE's ``--use_adte --same_q --scale_w 0.1``; without
  ``--use_adte`` the official code ranks by Shannon entropy): ``(1 - sum_c p_c^q) / (q - 1)``;
* ``score="shannon"``: ``-sum_c p_c log(p_c + 1e-8)`` (ADTE/ZERO without ``--use_adte``).

The label bias comes from :class:`~tta.policies.label_bias.LabelBias`: a memory of confident
predictions per class, a class-confusion matrix ``P`` and a power iteration for its leading
eigenvector ``q``; ``b = ln q``. The ADTE method fills it in a transductive pre-pass over the test
set; used on its own (e.g. ``method=tpt policies.extra=[tsallis]``) the policy updates it online
from each image's views and, until the memory holds ``min_entries`` entries, uses a uniform bias
(every ``q_c = 0.01``, the official min-max map of a flat bias). The official online path divides
by zero (``q_c = 1``); this one does not.
"""
from __future__ import annotations

from typing import Any

import torch

from ..objectives.entropy import shannon_entropy_of_probs
from ..objectives.tsallis import adte_score, tsallis_entropy
from .base import BatchContext
from .label_bias import DEFAULT_DOMAIN, LabelBias, load_bias_file, minmax_q_index
from .registry import register
from .view_ranking import ViewSelection

SCORES = ("adte", "tsallis", "shannon")


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

    level = "views"
    needs = ()

    def __init__(self, num_classes: int | None = None, fraction: float = 0.1, score: str = "adte", q: float = 0.1,
                 online: bool = True, min_entries: int = 1, update_every: int = 1, q_path: str | None = None,
                 memory_size: int = 20, gap: float = 1.0, eps: float = 1e-4, max_iter: int = 500,
                 q_range: tuple[float, float] = (0.01, 0.9)):
        super().__init__(fraction)
        self.num_classes = num_classes
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {score!r}")
        if score == "adte" and num_classes is None:
            raise ValueError("the adte score needs num_classes")
        if score == "tsallis" and q == 1:
            raise ValueError("the Tsallis index q must differ from 1")
        if q_path is not None and score != "adte":
            raise ValueError(f"q_path sets the label bias of score='adte'; score={score!r} does not use one")
        self.kind, self.q, self.online, self.q_path = score, float(q), bool(online), q_path
        self.min_entries, self.update_every = int(min_entries), max(int(update_every), 1)
        self.q_range = (float(q_range[0]), float(q_range[1]))
        self.bias = LabelBias(num_classes or 1, memory_size, gap, eps, max_iter, q_range) if score == "adte" else None
        c = num_classes or 1
        self.register_buffer("log_bias", torch.zeros(c))
        self.register_buffer("q_index", torch.full((c,), float(q_range[0])))
        self.seen = 0
        if q_path is not None:
            table = load_bias_file(q_path)
            b = next(iter(table.values())) if len(table) == 1 else table.get(DEFAULT_DOMAIN)
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
            return tsallis_entropy(probs, self.q)
        return shannon_entropy_of_probs(probs)

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
