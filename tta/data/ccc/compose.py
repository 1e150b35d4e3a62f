"""How one CCC image is made from a clean one, batched on the images' device.

The reference (oripress/CCC @ 656dec3, ``generate.py`` ``ApplyTransforms``, lines 362-433) does, per
image: ``RandomHorizontalFlip`` then ``RandomResizedCrop(224)`` (default scale (0.08, 1) and ratio
(3/4, 4/3); lines 376-378, 404), the first corruption at ``s1`` if ``s1 > 0`` and a conversion to
uint8, the second corruption at ``s2`` if ``s2 > 0`` and a conversion to uint8 (lines 405-412),
then a JPEG round trip at quality 85 (lines 413-415; ``optimize=True`` only changes the Huffman
tables, not the pixels). :func:`compose` does the same on a whole batch:

1. flip: each image with probability 1/2;
2. the crop: torchvision's ``RandomResizedCrop.get_params`` rule (ten attempts of a random area in
   ``scale`` and a log-uniform aspect ratio, then the centred fallback), all attempts drawn at once
   per sample; the boxes are resized to the output size with bilinear ``roi_align`` (adaptive
   sampling, which averages when a box is larger than the output) and rounded to uint8 levels, as
   the reference's PIL image is;
3. ``corrupt(n1, s1)`` (skipped at severity 0), truncation to uint8 levels (``np.uint8`` of the
   reference's float output truncates), ``corrupt(n2, s2)`` likewise, and
4. JPEG quality 85 through the corruption module's libjpeg path (the same codec as PIL).

Randomness cannot be the reference's: it draws from NumPy's global generator in an order that
depends on its process layout and file-system order (the published bytes cannot be regenerated
even with its own code). Here every draw is seeded by (stream seed, step, image index), so a
stream is reproducible and independent of batch composition. The schedule is exact; the pixels
are distributionally equivalent. Deviation: the crop is taken from the clean source's image as
it is delivered (e.g. ImageNet val resized to 256 and centre-cropped to 224), not from the full
original photograph.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..corruptions import _SampleRng, _jpeg_compression, corrupt

CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, used by generate.py line 377
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JPEG_QUALITY = 85  # generate.py line 414
_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
# a float image at an exact uint8 level k may read k - 1e-5 after scaling; truncation must not drop it a level
_TRUNCATE_TOLERANCE = 1e-3


def crop_boxes(rng: _SampleRng, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample ``(top, left, height, width)`` of torchvision's ``RandomResizedCrop.get_params``:
    up to ten attempts of an area ``uniform(scale) * H * W`` and an aspect ratio
    ``exp(uniform(log ratio))``, rounded; the first that fits is placed uniformly at random; if none
    fits, the whole image clamped to the ratio range, centred. All attempts are drawn at once."""
    area = float(height * width)
    u_area = rng.uniform((_ATTEMPTS,), 1).to(device, torch.float64)
    u_ratio = rng.uniform((_ATTEMPTS,), 2).to(device, torch.float64)
    target = area * (scale[0] + u_area * (scale[1] - scale[0]))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + u_ratio * (log_high - log_low))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(valid.any(1), valid.to(torch.int8).argmax(1), torch.full_like(valid[:, 0], -1,
                                                                                        dtype=torch.int64))
    pick = first.clamp(min=0).view(-1, 1)
    w_pick, h_pick = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    # the fallback: the whole image, clamped to the ratio range, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    use = first >= 0
    w_box = torch.where(use, w_pick, torch.full_like(w_pick, fw))
    h_box = torch.where(use, h_pick, torch.full_like(h_pick, fh))
    u_top, u_left = rng.uniform((2,), 3).to(device, torch.float64).unbind(1)
    top = torch.where(use, torch.floor(u_top * (height - h_box + 1)), torch.full_like(h_box, (height - fh) // 2))
    left = torch.where(use, torch.floor(u_left * (width - w_box + 1)), torch.full_like(w_box, (width - fw) // 2))
    return top, left, h_box, w_box


def flip_and_crop(images: Tensor, rng: _SampleRng, size: tuple[int, int],
                  scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                  flip: bool = True) -> Tensor:
    """Random horizontal flip (``flip``), then torchvision's RandomResizedCrop rule, resized to ``size``."""
    from torchvision.ops import roi_align

    n, _, height, width = images.shape
    device = images.device
    x = images
    if flip:
        flipped = rng.uniform((1,), 0)[:, 0].to(device) < 0.5
        x = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
    top, left, h_box, w_box = crop_boxes(rng, height, width, scale, ratio, device)
    boxes = torch.stack([torch.arange(n, device=device, dtype=torch.float64), left, top, left + w_box, top + h_box], 1)
    out = roi_align(x.float(), boxes.float(), output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return (torch.round(out.clamp(0, 1) * 255) / 255).to(images.dtype)


def to_uint8_levels(images: Tensor) -> Tensor:
    """``np.uint8`` of the reference's ``0..255`` float output: truncation to integer levels."""
    return torch.floor(images.clamp(0, 1) * 255 + _TRUNCATE_TOLERANCE).clamp(0, 255) / 255


def _severity(value: float) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else value


def compose(images: Tensor, ids: Tensor, *, n1: str, s1: float, n2: str, s2: float, seed: int, step: int,
            size: tuple[int, int] | None = None, crop: bool = True, jpeg: bool = True, flip: bool = True,
            crop_scale: tuple[float, float] = CROP_SCALE) -> Tensor:
    """The CCC image of each clean image: flip + crop, ``n1(s1)``, uint8, ``n2(s2)``, uint8, JPEG 85.

    Args:
        images: clean float images (N, C, H, W) in [0, 1] on any device.
        ids: the images' indices in their source (int64, (N,)); with ``seed`` and ``step`` they seed
            every draw, so an image gets the same result whatever batch it is in.
        step: the step's position in the schedule (a new draw for an image met again).
        size: the output size (default: the input's).
        crop, jpeg: off only for calibration (the reference calibrates without the crop).
        flip, crop_scale: the reference's flip and RandomResizedCrop scale (0.08, 1); options for
            images a flip changes the meaning of (digits) or a small crop erases.
    """
    size = tuple(images.shape[-2:]) if size is None else tuple(size)
    ids = ids.to(device=images.device, dtype=torch.int64)
    keyed = (int(step) << 32) | (ids & 0xFFFFFFFF)
    x = images
    if crop:
        x = flip_and_crop(x, _SampleRng(int(seed), "ccc_flip_crop", 0, keyed), size,
                          scale=(float(crop_scale[0]), float(crop_scale[1])), flip=flip)
    if float(s1) > 0:
        x = to_uint8_levels(corrupt(x, n1, _severity(s1), seed=seed, ids=keyed))
    if float(s2) > 0:
        x = to_uint8_levels(corrupt(x, n2, _severity(s2), seed=seed, ids=keyed))
    if jpeg:
        x = _jpeg_compression(x, JPEG_QUALITY, None)
    return x
