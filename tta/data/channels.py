"""Greyscale / RGB conversion between what a stream holds and what the model takes.

Sources deliver RGB (image files are decoded to RGB; arrays keep their 1 or 3 channels). A model
built for greyscale (``Classifier.input_channels == 1``) gets the luma of RGB images; an RGB model
gets a greyscale image repeated over its three channels. The luma weights are ITU-R BT.601's
(0.299 R + 0.587 G + 0.114 B), those of PIL's ``convert("L")`` and torchvision's
``rgb_to_grayscale``, so a model trained on PIL-converted greyscale images sees the same values.
A greyscale image repeated to RGB and converted back is unchanged (the weights sum to 1).

Streams convert after any corruption, so a corruption sees the data as it is (RGB CIFAR images are
corrupted in colour, then turned grey for a greyscale model).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
LUMA = "ITU-R BT.601 luma: 0.299 R + 0.587 G + 0.114 B (as PIL convert('L'))"


def convert_channels(images: Tensor, channels: int) -> Tensor:
    """``images`` (N, C, H, W) with ``channels`` channels: unchanged when C already fits, the luma of
    RGB for 1, a greyscale image repeated for any C. Other conversions raise ``ValueError``."""
    have = int(images.shape[1])
    if have == channels:
        return images
    if have == 1:
        return images.repeat(1, channels, 1, 1)
    if have == 3 and channels == 1:
        if not images.is_floating_point():
            raise ValueError("convert_channels: RGB to greyscale needs float images in [0, 1]")
        weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
        return torch.einsum("nchw,c->nhw", images, weights).unsqueeze(1)
    raise ValueError(f"cannot convert {have}-channel images for a {channels}-channel model: only greyscale <-> RGB "
                     f"(1 <-> 3) and greyscale to any channel count are defined")


def channel_conversion(source_channels: int, model_channels: int) -> dict[str, Any] | None:
    """What :func:`convert_channels` does between these counts, for the run record (``None``: nothing).
    Raises ``ValueError`` up front for a conversion that is not defined."""
    if source_channels == model_channels:
        return None
    if source_channels == 1:
        method = f"greyscale repeated over {model_channels} channels"
    elif source_channels == 3 and model_channels == 1:
        method = LUMA
    else:
        raise ValueError(f"the data has {source_channels} channels and the model takes {model_channels}: only "
                         f"greyscale <-> RGB (1 <-> 3) conversions are defined")
    return {"from": int(source_channels), "to": int(model_channels), "method": method}


__all__ = ["LUMA_WEIGHTS", "channel_conversion", "convert_channels"]
