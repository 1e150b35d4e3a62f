"""DeYO's PLPD policy (Lee et al., ICLR 2024; Jhyun17/DeYO ``forward_and_adapt_deyo``).

PLPD, the pseudo-label probability difference, is how much the adapted model's probability of its
predicted class drops when the object's shape is destroyed: ``PLPD_i = p_i[y_i] - p'_i[y_i]`` with
``y_i = argmax p_i`` and ``p'`` the prediction on the destroyed image.

Where the transform is applied. The official code destroys the *normalised* tensor the network
sees; our classifiers take images in [0, 1] and normalise inside. The three transforms commute
with a per-channel affine normalisation ``(x - mu) / sigma``, so destroying the [0, 1] image is the
same computation:

* ``patch`` and ``pixel`` only move values around (and the optional resize of ``patch`` is a
  bilinear interpolation whose weights sum to 1, so it maps a per-channel affine map to itself);
* ``occ`` writes the per-image, per-channel mean into a window, and the mean of the normalised
  image is the normalised mean.

One difference remains: a fixed-input-size classifier (a ViT) resizes its input inside; the
official pipeline hands the network 224-px images already, so there the transform is applied at
the network's resolution, here at the stream's. With 224-px streams (ImageNet-C) they coincide.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..compiling import eager_boundary
from .base import BatchContext, Policy
from .entropy_margin import entropy_threshold
from .registry import register

AUG_TYPES = ("patch", "pixel", "occ")
#: the official occlusion is given for 224-px images: a 112-px window with its corner at (56, 56)
OCC_REFERENCE_SIZE = 224


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU index tensor to ``device`` (pageable source: staged copy, no stream sync)."""
    return t if t.device == device else t.to(device, non_blocking=True)


def _tile_permutations(n: int, tiles: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """DeYO's ``torch.argsort(torch.rand(n, tiles), dim=-1)``: drawn on the CPU (the global CPU RNG
    unless ``generator``, a CPU generator, is given), as the official code, whatever the images' device."""
    return _to(torch.rand((n, tiles), generator=generator).argsort(dim=1), device)


def _pixel_permutation(count: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """DeYO's ``torch.randperm(H * W)``, drawn on the CPU as the official code."""
    return _to(torch.randperm(count, generator=generator), device)


def patch_shuffle(x: torch.Tensor, patch_len: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cut each image into a ``patch_len x patch_len`` grid and permute its tiles at random, with an
    independent permutation per image (DeYO's ``patch``: ``argsort`` of ``torch.rand(N, P*P)``,
    drawn on the CPU as the official code; ``generator`` must then be a CPU generator).

    When a side is not a multiple of ``patch_len`` the image is first resized to the nearest lower
    multiple and resized back afterwards (bilinear, antialiased: what torchvision's ``Resize`` does
    for tensors). The official code resizes to a square of side ``(W // P) * P``; here each side is
    handled on its own, which is the same for square images.
    """
    n, c, h, w = x.shape
    p = patch_len
    hh, ww = (h // p) * p, (w // p) * p
    if hh == 0 or ww == 0:
        raise ValueError(f"patch_len {p} is larger than the image ({h}x{w})")
    resized = (hh, ww) != (h, w)
    if resized:
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
    th, tw = hh // p, ww // p
    tiles = x.reshape(n, c, p, th, p, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, p * p, c, th, tw)
    perm = _tile_permutations(n, p * p, x.device, generator)
    tiles = tiles[torch.arange(n, device=x.device).unsqueeze(1), perm]
    out = tiles.reshape(n, p, p, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
    if resized:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out


def pixel_shuffle(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random permutation of the ``H*W`` pixel positions, shared by every image and channel of
    the batch (DeYO's ``pixel``: ``torch.randperm(H*W)`` on the CPU RNG, as the official code)."""
    n, c, h, w = x.shape
    perm = _pixel_permutation(h * w, x.device, generator)
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def occlusion_window(h: int, w: int, size: int = 112, row_start: int = 56, column_start: int = 56,
                     reference: int = OCC_REFERENCE_SIZE) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` of DeYO's occlusion window, given in pixels of a ``reference``-px
    image and scaled to ``h x w`` (rounded): 112 at (56, 56) on 224 px, 16 at (8, 8) on 32 px."""
    sr, sc = h / reference, w / reference
    r0, c0 = int(round(row_start * sr)), int(round(column_start * sc))
    return r0, min(h, r0 + max(1, int(round(size * sr)))), c0, min(w, c0 + max(1, int(round(size * sc))))


def occlude(x: torch.Tensor, size: int = 112, row_start: int = 56, column_start: int = 56,
            reference: int = OCC_REFERENCE_SIZE) -> torch.Tensor:
    """Fill DeYO's occlusion window with each image's per-channel mean (DeYO's ``occ``)."""
    r0, r1, c0, c1 = occlusion_window(x.shape[2], x.shape[3], size, row_start, column_start, reference)
    out = x.clone()
    out[:, :, r0:r1, c0:c1] = x.mean(dim=(2, 3), keepdim=True)
    return out


@register("plpd")
class PLPD(Policy):
    """Keep samples with ``PLPD > threshold`` (strict; 0.2) and weight them as DeYO does.

    Per batch (only for the samples still alive, like the official ``x[S1]``):

    1. destroy the images: ``aug_type`` ``patch`` (default; ``patch_len`` 4, i.e. a 4x4 grid),
       ``pixel`` or ``occ`` (see the module docstring for the functions and for why transforming the
       [0, 1] image equals the official transform of the normalised tensor);
    2. forward them without grad through the adapted model, still in train mode, so BatchNorm
       uses the statistics of the alive subset only, as the official code forwarding ``x[S1]``.
       Selecting that subset is a boolean index: **one host sync per batch**, the only one in the
       policy path (the official code syncs several times). No alive sample: no forward;
    3. ``PLPD_i = p_i[y_i] - p'_i[y_i]``, ``y_i = argmax p_i``;
    4. weight ``reweight_ent * exp(E0 - H_i) + reweight_plpd * exp(PLPD_i)`` (detached,
       ``E0 = e0_fraction * ln C`` = 0.4 ln C), or 1 with ``reweight=False`` (a plain mask).

    The destroyed view's logits are shared through ``ctx.cached`` under a key naming the transform,
    so two policies asking for the same view pay for one forward.

    ``seed``: ``None`` draws the tile/pixel permutations from the global CPU RNG with the official
    calls (``torch.rand(N, P*P).argsort(-1)``, ``torch.randperm(H*W)``), whatever the device of the
    images, so ``torch.manual_seed`` reproduces the official draws; an integer gives the policy its
    own CPU generator (the same draws on every device).

    As an *extra* policy of another method (``extra_policies=["plpd"]``) it is a pure filter by
    default (``reweight=False``, see :attr:`extra_defaults`): its DeYO weights would multiply the
    method's own (EATA's ``exp(E0 - H)`` already weights by entropy) and scale the loss by about
    ``exp(E0)``. ``policy_kwargs={"plpd": {"reweight": True}}`` keeps DeYO's weights.
    """

    level = "samples"
    #: re-forwards the destroyed images through the adapted model (``ctx.model``)
    needs = ("model",)
    #: constructor defaults when the policy is added by name as an extra policy of a method
    extra_defaults = {"reweight": False}
    #: no sample alive: no forward, no permutation drawn, weight 0 for every sample
    inert_when_empty = True

    def __init__(self, threshold: float = 0.2, aug_type: str = "patch", patch_len: int = 4,
                 occlusion_size: int = 112, row_start: int = 56, column_start: int = 56,
                 reweight: bool = True, reweight_ent: bool = True, reweight_plpd: bool = True,
                 e0_fraction: float = 0.4, e0: float | None = None, seed: int | None = None):
        super().__init__()
        if aug_type not in AUG_TYPES:
            raise ValueError(f"aug_type must be one of {AUG_TYPES}, not {aug_type!r}")
        self.threshold, self.aug_type, self.patch_len = float(threshold), aug_type, int(patch_len)
        self.occlusion_size, self.row_start, self.column_start = int(occlusion_size), int(row_start), int(column_start)
        self.reweight, self.reweight_ent, self.reweight_plpd = bool(reweight), bool(reweight_ent), bool(reweight_plpd)
        self.e0_fraction, self.e0, self.seed = float(e0_fraction), e0, seed
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ the transform
    def generator(self, device: torch.device | None = None) -> torch.Generator | None:
        """The policy's own CPU generator (``seed`` given) or ``None`` (the global CPU RNG).
        The permutations are drawn on the CPU whatever ``device`` is, as the official code."""
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        """The object-destroyed version of images ``x`` (N, C, H, W)."""
        x = x.detach()
        if self.aug_type == "patch":
            return patch_shuffle(x, self.patch_len, self.generator(x.device))
        if self.aug_type == "pixel":
            return pixel_shuffle(x, self.generator(x.device))
        return occlude(x, self.occlusion_size, self.row_start, self.column_start)

    def cache_key(self) -> str:
        if self.aug_type == "patch":
            return f"destroyed_logits:patch:{self.patch_len}:{self.seed}"
        if self.aug_type == "pixel":
            return f"destroyed_logits:pixel:{self.seed}"
        return f"destroyed_logits:occ:{self.occlusion_size}:{self.row_start}:{self.column_start}"

    @eager_boundary  # eager in a compiled step: a size read on the host and CPU-RNG permutations
    def destroyed_logits(self, ctx: BatchContext, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(computed, logits)``: the destroyed view's logits (float32, batch-sized) for the rows in
        ``computed`` (a mask covering ``alive``), zeros elsewhere. Cached in ``ctx`` per transform;
        a later request for samples the cached forward did not include recomputes it.

        The size of the alive subset is read on the host (the one sync of DeYO's step): the official
        code forwards ``x[S1]``, so BatchNorm normalises with the statistics of that subset only, and
        a forward of the whole batch would change them. Under ``torch.compile`` this function runs
        eagerly (its input size varies from batch to batch)."""
        entry = ctx.cached(self.cache_key(), dict)
        if "logits" in entry and (alive is entry["alive"] or not bool((alive & ~entry["computed"]).any())):
            return entry["computed"], entry["logits"]
        full = torch.zeros(ctx.batch_size, ctx.num_classes, device=ctx.logits.device, dtype=torch.float32)
        count = int(alive.sum())  # the one host sync: the size of the subset to forward
        if count:
            index = (~alive).to(torch.uint8).argsort(stable=True)[:count]  # alive rows, in order, no sync
            with torch.no_grad():
                logits = ctx.model(self.destroy(ctx.x.index_select(0, index)))
            full.index_copy_(0, index, logits.float())
        entry.update(alive=alive, computed=alive.clone(), logits=full)
        return entry["computed"], entry["logits"]

    # ------------------------------------------------------------------ the policy
    def scores(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        """PLPD for every sample (0 where not alive)."""
        _, destroyed = self.destroyed_logits(ctx, alive)
        probs = ctx.probs
        label = probs.argmax(dim=1, keepdim=True)
        plpd = probs.gather(1, label).squeeze(1) - destroyed.softmax(dim=1).gather(1, label).squeeze(1)
        return torch.where(alive, plpd, torch.zeros_like(plpd))

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        plpd = self.scores(ctx, alive)
        keep = alive & (plpd > self.threshold)
        if not self.reweight or not (self.reweight_ent or self.reweight_plpd):
            return keep.to(torch.float32)
        e0 = entropy_threshold(self.e0_fraction, self.e0, ctx.num_classes)
        entropy = ctx.entropy.detach().float()
        weight = (float(self.reweight_ent) * (1.0 / torch.exp(entropy - e0))
                  + float(self.reweight_plpd) * (1.0 / torch.exp(-1.0 * plpd)))
        return torch.where(keep, weight, torch.zeros_like(weight))

    def hparams(self) -> dict[str, Any]:
        out = {"threshold": self.threshold, "aug_type": self.aug_type, "reweight": self.reweight,
               "reweight_ent": self.reweight_ent, "reweight_plpd": self.reweight_plpd,
               "e0_fraction": self.e0_fraction, "e0": self.e0, "seed": self.seed}
        if self.aug_type == "patch":
            out["patch_len"] = self.patch_len
        elif self.aug_type == "occ":
            out.update(occlusion_size=self.occlusion_size, row_start=self.row_start, column_start=self.column_start)
        return out
