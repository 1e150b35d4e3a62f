"""The embedded digits-C source model: a small BatchNorm CNN for 32x32 RGB digits.

Trained by ``scripts/train_digits_source.py`` (fixed seed) on the digits-C training split; the
weights ship inside the package as ``tta/weights/digits_cnn.safetensors``. Model spec ``digits_cnn``
(with ``weights=<file>``: the same architecture with other weights). ``digits_gn``: the same network
and training recipe with GroupNorm (8 groups) instead of BatchNorm (``digits_gn.safetensors``), for
the settings where test-batch statistics fail (label shift, batch size 1, mixed domains).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .classifier import ModelInfo
from .specs import MODEL_SPECS, Built, SpecRequest

WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "weights" / "digits_cnn.safetensors"
GN_WEIGHTS_FILE = WEIGHTS_FILE.with_name("digits_gn.safetensors")
GN_GROUPS = 8
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


def _block(cin: int, cout: int, norm: str = "batch") -> list[nn.Module]:
    layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(GN_GROUPS, cout)
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), layer, nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Five conv-BN-ReLU blocks, two max-pools, global average pooling and a linear head.

    ``norm="group"``: GroupNorm with :data:`GN_GROUPS` groups instead of BatchNorm (``digits_gn``)."""

    def __init__(self, num_classes: int = 10, width: int = 16, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', not {norm!r}")
        w = width
        self.features = nn.Sequential(
            *_block(3, w, norm), *_block(w, w, norm), nn.MaxPool2d(2),
            *_block(w, 2 * w, norm), *_block(2 * w, 2 * w, norm), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w, norm), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


SHIPPED = {"digits_cnn": ("batch", WEIGHTS_FILE), "digits_gn": ("group", GN_WEIGHTS_FILE)}
"""The shipped digits models: spec -> (normalisation layers, weights file)."""


def _shipped_digits(name: str = "digits_cnn") -> tuple[DigitsCNN, ModelInfo]:
    from safetensors.torch import load_file

    norm, path = SHIPPED[name]
    if not path.is_file():
        raise FileNotFoundError(f"digits source weights not found at {path}; run scripts/train_digits_source.py")
    net = DigitsCNN(norm=norm)
    net.load_state_dict(load_file(str(path)))
    info = ModelInfo(name, "digits", path.name, DIGITS_MEAN, DIGITS_STD, (32, 32), 10,
                     normalization_source="weights", crop_pct=1.0)
    return net, info


def _digits(name: str, request: SpecRequest) -> Built:
    """The shipped model; with ``request.weights`` the bare architecture (the caller loads the file)."""
    if request.weights is None:
        net, info = _shipped_digits(name)
    else:
        net = DigitsCNN(norm=SHIPPED[name][0])
        info = ModelInfo(name, "digits", "random", DIGITS_MEAN, DIGITS_STD, (32, 32), 10,
                         normalization_source="model_config", crop_pct=1.0)
    return Built(net, info)


@MODEL_SPECS.register("digits_cnn", help="digits_cnn  the digits-C source model shipped with the package")
def digits_spec(rest: str, request: SpecRequest) -> Built:
    return _digits("digits_cnn", request)


@MODEL_SPECS.register("digits_gn", help="digits_gn   the same with GroupNorm instead of BatchNorm (shipped)")
def digits_gn_spec(rest: str, request: SpecRequest) -> Built:
    return _digits("digits_gn", request)

