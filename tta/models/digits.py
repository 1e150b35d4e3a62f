"""The embedded digits-C source model: a small BatchNorm CNN for 32x32 RGB digits.

Trained by ``scripts/train_digits_source.py`` (fixed seed) on the digits-C training split; the
weights ship inside the package as ``tta/weights/digits_cnn.safetensors``. Model spec ``digits_cnn``
(with ``weights=<file>``: the same architecture with other weights).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .classifier import ModelInfo
from .specs import MODEL_SPECS, Built, SpecRequest

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


def _shipped_digits() -> tuple[DigitsCNN, ModelInfo]:
    from safetensors.torch import load_file

    if not WEIGHTS_FILE.is_file():
        raise FileNotFoundError(f"digits source weights not found at {WEIGHTS_FILE}; run scripts/train_digits_source.py")
    net = DigitsCNN()
    net.load_state_dict(load_file(str(WEIGHTS_FILE)))
    info = ModelInfo("digits_cnn", "digits", WEIGHTS_FILE.name, DIGITS_MEAN, DIGITS_STD, (32, 32), 10,
                     normalization_source="weights", crop_pct=1.0)
    return net, info


@MODEL_SPECS.register("digits_cnn", help="digits_cnn  the digits-C source model shipped with the package")
def digits_spec(rest: str, request: SpecRequest) -> Built:
    """The shipped model; with ``request.weights`` the bare architecture (the caller loads the file)."""
    if request.weights is None:
        net, info = _shipped_digits()
    else:
        net = DigitsCNN()
        info = ModelInfo("digits_cnn", "digits", "random", DIGITS_MEAN, DIGITS_STD, (32, 32), 10,
                         normalization_source="model_config", crop_pct=1.0)
    return Built(net, info)

