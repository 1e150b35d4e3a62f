"""The embedded digits-C source model: a small BatchNorm CNN for 32x32 RGB digits.

Trained by ``scripts/train_digits_source.py`` (fixed seed) on the digits-C training split; the
weights ship inside the package as ``tta/weights/digits_cnn.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "weights" / "digits_cnn.safetensors"
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Five conv-BN-ReLU blocks, two max-pools, global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(3, w), *_block(w, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def load_digits_cnn(weights: str | Path | None = None):
    """The shipped digits-C source model (or the same architecture with other weights)."""
    from safetensors.torch import load_file

    from .classifier import ModelInfo

    path = Path(weights) if weights else WEIGHTS_FILE
    net = DigitsCNN()
    if not path.is_file():
        raise FileNotFoundError(f"digits source weights not found at {path}; run scripts/train_digits_source.py")
    net.load_state_dict(load_file(str(path)))
    info = ModelInfo("digits_cnn", "digits", path.name if path == WEIGHTS_FILE else str(path),
                     DIGITS_MEAN, DIGITS_STD, (32, 32), 10)
    return net, info
