"""Augmented views of test images for TPT-family methods (TPT, ADTE/ZERO, DiffTPT's conventional views).

The official ``AugMixAugmenter`` (azshue/TPT ``data/datautils.py``) and ADTE's
``MultiViewCropAndFlip`` make, per test image:

* view 0, the "original": Resize(224, bicubic) + CenterCrop(224);
* ``num_views - 1`` views: ``RandomResizedCrop(224)`` (scale (0.08, 1), ratio (3/4, 4/3), bilinear)
  + ``RandomHorizontalFlip``;
* with ``augmix=True`` (TPT on the fine-grained datasets only, never on ImageNet/-A/-V2/-R/-Sketch)
  each crop is further AugMix-ed: 3 chains of 1-3 ops drawn from {autocontrast, equalize, posterize,
  rotate, solarize, shear_x, shear_y, translate_x, translate_y} at severity 1, chain weights
  ~ Dirichlet(1, 1, 1), and ``m ~ Beta(1, 1)``: ``view = m * crop + (1 - m) * sum_k w_k chain_k``.

Here the views are made from tensors, on the images' device, in one batched crop for all views of
all images (``torchvision.ops.roi_align`` with an adaptive sampling grid: bilinear for enlarging
crops, area-averaging for shrinking ones), and every random number of view ``v`` of image ``id``
comes from its own ``torch.Generator`` seeded from ``(seed, salt, id, v)``. A view therefore does
not depend on the batch it is in, the order of the stream or the device, and two passes over a
dataset (ADTE's pre-pass and its evaluation) draw different views by using different ``salt``.

Deviation from the official pipeline, by construction of the toolkit's streams: the crops are cut
from the stream's image (already resized to its short side and centre-cropped to
``data.image_size``), not from the full-resolution original file. View 0 is identical to the
official one when ``data.image_size`` equals the model resolution. The random crop parameters
follow ``RandomResizedCrop.get_params`` exactly (10 tries, then the central-crop fallback); only the
random number stream differs from torchvision's global one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")
_TRIES = 10
_CROP_U = _TRIES * 4          # per try: scale, log-ratio, top, left
_FLIP_U = 1
_AUGMIX_U = 3 + 1 + 3 + 3 * 3 * 3   # Dirichlet(3), Beta, 3 chain depths, 3 chains x 3 ops x (op, level, sign)
NUM_UNIFORMS = _CROP_U + _FLIP_U + _AUGMIX_U
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def view_seed(seed: int, salt: int, image_id: int, view: int) -> int:
    """Stable 63-bit seed of view ``view`` of image ``image_id`` (same in every process and device)."""
    h = 0
    for value in (seed, salt, image_id, view):
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h >> 1


def view_uniforms(seed: int, salt: int, ids: Sequence[int], num: int) -> torch.Tensor:
    """Uniforms in [0, 1), float64, shape (len(ids), num, NUM_UNIFORMS): one Generator per view."""
    out = torch.empty(len(ids), num, NUM_UNIFORMS, dtype=torch.float64)
    generator = torch.Generator()
    for a, image_id in enumerate(ids):
        for v in range(num):
            generator.manual_seed(view_seed(seed, salt, image_id, v + 1))  # view 0 is the original
            torch.rand(NUM_UNIFORMS, generator=generator, dtype=torch.float64, out=out[a, v])
    return out


def resized_crop_params(u: torch.Tensor, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for every view at once: (..., 4) as (top, left, h, w).

    ``u`` holds (..., 10, 4) uniforms; try ``t`` uses ``u[..., t, :]`` as torchvision uses its
    random draws (area fraction, log aspect ratio, top, left); the first valid try wins, else the
    central-crop fallback.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    aspect = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = valid.to(torch.int8).argmax(dim=-1, keepdim=True)
    pick = lambda t: t.gather(-1, first).squeeze(-1)  # noqa: E731
    found = valid.any(dim=-1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    ft, fl = (height - fh) // 2, (width - fw) // 2
    params = torch.stack([pick(top), pick(left), pick(h), pick(w)], dim=-1)
    fallback = torch.tensor([ft, fl, fh, fw], dtype=params.dtype)
    return torch.where(found.unsqueeze(-1), params, fallback)


@dataclass
class ViewPlan:
    """The random draws of the augmented views of a batch (CPU tensors)."""

    crops: torch.Tensor      # (N, V-1, 4) top, left, h, w  (float64, integral values)
    flips: torch.Tensor      # (N, V-1) bool
    augmix: torch.Tensor     # (N, V-1, _AUGMIX_U) uniforms
    height: int
    width: int

    _device_cache: dict | None = None

    def boxes(self) -> torch.Tensor:
        """roi_align boxes (N * (V-1), 5): batch index, x1, y1, x2, y2 (pixel edges)."""
        n, v = self.crops.shape[:2]
        top, left, h, w = self.crops.unbind(-1)
        index = torch.arange(n, dtype=torch.float64).view(n, 1).expand(n, v)
        return torch.stack([index, left, top, left + w, top + h], dim=-1).reshape(n * v, 5).float()

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes, flips) on ``device``, copied once per plan (pinned, non-blocking on CUDA)."""
        key = str(device)
        if self._device_cache is None:
            self._device_cache = {}
        if key not in self._device_cache:
            self._device_cache[key] = (_to_device(self.boxes(), device), _to_device(self.flips.reshape(-1), device))
        return self._device_cache[key]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize(size, bicubic, antialiased) + CenterCrop(size) on a batch in [0, 1]."""
    import torchvision.transforms.v2.functional as TF

    if x.shape[-2:] == (size, size):
        return x
    x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [size, size]).clamp_(0, 1)


class ViewGenerator:
    """Make ``num_views`` views per image: the original plus random resized crops (+ flips, + AugMix).

    Args:
        num_views: views per image including the original (TPT/ADTE: 64).
        size: output resolution (the model's, 224 for CLIP ViT-B/16).
        scale, ratio: ``RandomResizedCrop`` ranges (torchvision defaults).
        flip: random horizontal flips (p = 0.5).
        augmix: TPT's AugMix on the crops (fine-grained datasets only in the paper).
        severity: AugMix severity (TPT: 1).
        seed: base seed; views are seeded per (seed, salt, image id, view index).
    """

    def __init__(self, num_views: int = 64, size: int = 224, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, augmix: bool = False,
                 severity: int = 1, seed: int = 0):
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        self.num_views, self.size = int(num_views), int(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip, self.augmix, self.severity, self.seed = flip, augmix, severity, seed

    def hparams(self) -> dict:
        return {"num_views": self.num_views, "size": self.size, "scale": list(self.scale), "ratio": list(self.ratio),
                "flip": self.flip, "augmix": self.augmix, "severity": self.severity, "seed": self.seed}

    def plan(self, ids: Sequence[int] | torch.Tensor, height: int, width: int, salt: int = 0) -> ViewPlan:
        ids = ids.tolist() if torch.is_tensor(ids) else [int(i) for i in ids]
        u = view_uniforms(self.seed, salt, ids, self.num_views - 1)
        crops = resized_crop_params(u[..., :_CROP_U].reshape(*u.shape[:2], _TRIES, 4), height, width,
                                    self.scale, self.ratio)
        flips = (u[..., _CROP_U] < 0.5) if self.flip else torch.zeros(u.shape[:2], dtype=torch.bool)
        return ViewPlan(crops, flips, u[..., _CROP_U + _FLIP_U:].clone(), height, width)

    def __call__(self, x: torch.Tensor, ids: Sequence[int] | torch.Tensor | None = None, salt: int = 0,
                 plan: ViewPlan | None = None, images: slice | None = None) -> torch.Tensor:
        """Views of a batch ``x`` (N, 3, H, W) in [0, 1]: (n, num_views, 3, size, size), view 0 the original.

        ``plan``: the draws (default: made from ``ids`` and ``salt``); ``images``: a slice of the
        batch to make views for (default: all), so that a caller can go image by image without
        holding every view of the batch in memory.
        """
        n_all = x.shape[0]
        if plan is None:
            ids = list(range(n_all)) if ids is None else ids
            plan = self.plan(ids, x.shape[-2], x.shape[-1], salt)
        start, stop, _ = (images or slice(None)).indices(n_all)
        n = stop - start
        original = resize_center_crop(x[start:stop], self.size).unsqueeze(1)
        if self.num_views == 1:
            return original
        from torchvision.ops import roi_align

        boxes, flips = plan.on_device(x.device)
        per = self.num_views - 1
        boxes, flips = boxes[start * per:stop * per].to(x.dtype), flips[start * per:stop * per]
        crops = roi_align(x, boxes, (self.size, self.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops).clamp_(0, 1)
        crops = crops.view(n, per, *crops.shape[1:])
        if self.augmix:
            params = plan.augmix[start:stop].tolist()
            crops = torch.stack([torch.stack([augmix_view(c, u, self.severity) for c, u in zip(img, us)])
                                 for img, us in zip(crops, params)])
        return torch.cat([original, crops], dim=1)


# ---------------------------------------------------------------------------------------- AugMix
def _affine(img: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """PIL ``Image.transform(size, AFFINE, coeffs, BILINEAR)`` on a (3, S, S) float image:
    output pixel (x, y) samples input ``(a x + b y + c, d x + e y + f)`` (pixel centres), zero fill."""
    a, b, c, d, e, f = coeffs
    s_h, s_w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(s_h, device=img.device, dtype=torch.float32) + 0.5,
                            torch.arange(s_w, device=img.device, dtype=torch.float32) + 0.5, indexing="ij")
    gx = (a * xs + b * ys + c) / s_w * 2 - 1
    gy = (d * xs + e * ys + f) / s_h * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0)
    return F.grid_sample(img.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).squeeze(0)


def apply_op(img: torch.Tensor, op: str, level: float, sign: bool) -> torch.Tensor:
    """One AugMix op (``data/augmix_ops.py``) on a uint8 (3, S, S) tensor; ``level`` is the sampled
    level in [0.1, severity], ``sign`` the coin that negates signed ops."""
    import torchvision.transforms.v2.functional as TF

    size = img.shape[-1]
    if op == "autocontrast":
        return TF.autocontrast(img)
    if op == "equalize":
        return TF.equalize(img)
    if op == "posterize":
        return TF.posterize(img, 4 - int(level * 4 / 10))
    if op == "solarize":
        return TF.solarize(img, 256 - int(level * 256 / 10))
    if op == "rotate":
        degrees = int(level * 30 / 10) * (-1 if sign else 1)
        return TF.rotate(img, degrees, interpolation=TF.InterpolationMode.BILINEAR)
    if op in ("shear_x", "shear_y"):
        amount = float(level) * 0.3 / 10 * (-1 if sign else 1)
        coeffs = (1, amount, 0, 0, 1, 0) if op == "shear_x" else (1, 0, 0, amount, 1, 0)
    elif op in ("translate_x", "translate_y"):
        shift = int(level * (size / 3) / 10) * (-1 if sign else 1)
        coeffs = (1, 0, shift, 0, 1, 0) if op == "translate_x" else (1, 0, 0, 0, 1, shift)
    else:
        raise ValueError(f"unknown AugMix op {op!r}")
    return _affine(img, coeffs).round_().clamp_(0, 255).to(torch.uint8)


def augmix_view(crop: torch.Tensor, u: Sequence[float], severity: int = 1) -> torch.Tensor:
    """AugMix of one crop (3, S, S) in [0, 1] with the view's uniforms ``u`` (``_AUGMIX_U`` values)."""
    gammas = [-math.log(1.0 - v) for v in u[0:3]]          # Dirichlet(1, 1, 1) via Exp(1) draws
    weights = [g / sum(gammas) for g in gammas]
    m = u[3]                                                # Beta(1, 1) = Uniform(0, 1)
    depths = [1 + min(int(v * 3), 2) for v in u[4:7]]      # randint(1, 4)
    ops = u[7:]
    base = (crop * 255).round_().clamp_(0, 255).to(torch.uint8)  # the crop is a uint8 PIL image officially
    mix = torch.zeros_like(crop)
    for k in range(3):
        chain = base
        for d in range(depths[k]):
            o, lv, sg = ops[(k * 3 + d) * 3:(k * 3 + d) * 3 + 3]
            op = AUGMIX_OPS[min(int(o * len(AUGMIX_OPS)), len(AUGMIX_OPS) - 1)]
            chain = apply_op(chain, op, 0.1 + lv * (severity - 0.1), sg > 0.5)
        mix = mix + weights[k] * (chain.float() / 255)
    return m * (base.float() / 255) + (1 - m) * mix


__all__ = ["AUGMIX_OPS", "ViewGenerator", "ViewPlan", "apply_op", "augmix_view", "resize_center_crop",
           "resized_crop_params", "view_seed", "view_uniforms"]
