"""DiffTPT's cosine filter: keep the views that agree most with the original test image.

A *view-level* policy: the "samples" of the batch context are the views of one test image, with
view 0 the original (Resize + CenterCrop). It works inside any per-image view method (TPT,
DiffTPT, ADTE); a batch method refuses it at build time.

Official rule (DiffTPT ``select_confident_samples_cosine``, its first stage):
cosine similarity between the **logit vector** of view 0 and the logit vector of every other
view; keep the ``floor((V - 1) * ratio)`` most similar (descending, ``ratio = 0.8``: 101 of 127),
then prepend view 0 (102 candidates). ``on="embeddings"`` compares image embeddings instead, as
the paper's text ("similarity to the single test sample") can be read.

The selection is a mask computed on the device from ranks, without host syncs: a view is kept
when its rank among the alive views (view 0 excluded) is below ``floor(n * ratio)``, ``n`` the
number of those views. With every view alive this keeps exactly the official index set.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..objectives.selection import top_fraction
from .base import BatchContext, Policy
from .registry import register

ON = ("logits", "embeddings")


def view_embeddings(ctx: BatchContext) -> torch.Tensor:
    """Image embeddings of the views, from the context (a view-based CLIP method provides them)."""
    for name in ("image_features", "features"):
        value = ctx.extras.get(name)
        if value is None:
            value = getattr(ctx, name, None)
        if callable(value):
            value = value()
        if torch.is_tensor(value):
            return value
    encode = getattr(ctx.model, "encode_image", None)
    if callable(encode):  # e.g. TPT's context holds the views and the CLIP classifier: one extra pass

        def compute() -> torch.Tensor:
            with torch.no_grad():
                return encode(ctx.x)

        return ctx.cached("image_features", compute)
    raise RuntimeError("cosine_filter(on='embeddings') needs image embeddings of the views in the batch context "
                       "(ctx.extras['image_features']); this method does not provide them: use on='logits'")


@register("cosine_filter")
class CosineFilter(Policy):
    """DiffTPT's filter: view 0 plus the ``floor((V-1) * ratio)`` views most cosine-similar to it.

    Args:
        ratio: fraction of the other views to keep (DiffTPT ``selection_cosine`` = 0.8).
        on: ``"logits"`` (the released code) or ``"embeddings"`` (image embeddings).
        reference: index of the original view (0).

    Returns 1 for view 0 (when alive) and the kept views, 0 otherwise. ``needs`` is
    ``("embeddings",)`` with ``on="embeddings"``, nothing with ``on="logits"``.
    """

    level = "views"
    needs = ()  # per instance: ("embeddings",) with on="embeddings"

    def __init__(self, ratio: float = 0.8, on: str = "logits", reference: int = 0):
        super().__init__()
        if on not in ON:
            raise ValueError(f"cosine_filter: on must be one of {ON}, got {on!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"cosine_filter: ratio must be in [0, 1], got {ratio}")
        self.ratio, self.on, self.reference = float(ratio), on, int(reference)
        self.needs: tuple[str, ...] = ("embeddings",) if on == "embeddings" else ()

    def similarity(self, ctx: BatchContext) -> torch.Tensor:
        """Cosine similarity of every view to the reference view (the reference's own is 1)."""

        def compute() -> torch.Tensor:
            values = ctx.logits if self.on == "logits" else view_embeddings(ctx)
            values = values.detach().float()
            # torch.nn.CosineSimilarity(dim=0), the official call, with its eps = 1e-8
            return F.cosine_similarity(values[self.reference:self.reference + 1], values, dim=1, eps=1e-8)

        return ctx.cached(f"cosine_to_view{self.reference}_{self.on}", compute)

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        is_reference = torch.zeros_like(alive)
        is_reference[self.reference] = True
        others = alive & ~is_reference
        keep = top_fraction(self.similarity(ctx), others, self.ratio, descending=True)
        return (keep | (alive & is_reference)).to(torch.float32)

    def hparams(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "on": self.on, "reference": self.reference}
