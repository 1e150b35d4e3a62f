"""digits-C: scikit-learn's UCI handwritten digits as a tiny corruption benchmark.

1,797 8x8 grey images (values 0..16) are scaled to [0, 1], upscaled to 32x32 with bilinear
interpolation and repeated to three channels. A fixed stratified split (seed 0) keeps 719 images
(40%) as the held-out test set; the rest train the source model. The test images are then
corrupted with the ImageNet-C functions at 32x32, the way CIFAR-10-C is made.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SPLIT_SEED = 0
TEST_FRACTION = 0.4


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()
    return images, torch.from_numpy(data.target.astype(np.int64))


def load_digits_split(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) in [0, 1] and labels of the fixed ``train`` or ``test`` split."""
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', not {split!r}")
    images, labels = _all_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels.numpy()
    )
    idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
    return images[idx].clone(), labels[idx].clone()
