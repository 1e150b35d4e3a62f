"""RobustBench's standard CIFAR-C models, without the ``robustbench`` package.

``model=robustbench:<name>`` or ``robustbench:<dataset>/<name>`` (dataset ``cifar10`` / ``cifar100``;
without it the dataset is the one whose class count matches the data, else the only one that has the
name). The models of RobustBench's "corruptions" model zoo that CIFAR-C test-time adaptation uses:

==================================  ===================  ==============================  ==============
name                                datasets             architecture                    normalisation
==================================  ===================  ==============================  ==============
``Standard``                        cifar10              WideResNet-28-10                none (0 / 1)
``Hendrycks2020AugMix_WRN``         cifar10, cifar100    WideResNet-40-2                 0.5 / 0.5
``Hendrycks2020AugMix_ResNeXt``     cifar10, cifar100    ResNeXt-29, cardinality 4,      0.5 / 0.5
                                                         base width 32
==================================  ===================  ==============================  ==============

``Standard`` (CIFAR-10-C) and ``Hendrycks2020AugMix_ResNeXt`` (CIFAR-100-C) are the source models of
Tent, CoTTA, EATA, SAR and most later CIFAR-C tables. The ``robustbench`` package itself is not a
dependency: its release 1.1.1 pins ``timm==1.0.9``, ``gdown`` and ``pyautoattack``, which would
downgrade timm for everyone. The two architectures are written here from their papers, with the
module and parameter names of RobustBench's code so that its published checkpoints load unchanged:

* Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): pre-activation
  basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3), widths 16, 16k, 32k, 64k, a 1x1 projection shortcut
  taken after the first BN-ReLU when the width or stride changes; no dropout at test time.
* ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017),
  CIFAR variant as in AugMix (Hendrycks et al., ICLR 2020): a 3x3 stem of 64 channels, three stages
  of (depth - 2) / 9 bottlenecks (1x1 reduce to ``cardinality * floor(planes * width / 64)``, grouped
  3x3, 1x1 expand to ``4 * planes``), projection shortcuts, ReLU after the sum.

Deviation (none on CIFAR's 32x32 images): the final pooling is a global average, where the reference
pools with a fixed 8x8 window (the same at 32x32 input, the only size these models were trained on).
The normalisation lives in the :class:`~tta.models.Classifier` wrapper (recorded in the run), not in
the network; ``mu``/``sigma`` buffers found in a checkpoint are used as its normalisation.

Where the checkpoint comes from (nothing is downloaded here):

1. ``model_weights=<file>`` (``weights=``), if given;
2. else robustbench's own cache layout ``<model_dir>/<dataset>/corruptions/<name>.pt``, with
   ``model_dir`` from ``model_dir=`` (``load_classifier(..., model_dir=)``), else the environment
   variable ``TTA_ROBUSTBENCH_DIR``, else ``./models`` (robustbench's default). A folder that
   ``robustbench.utils.load_model(name, dataset=..., threat_model="corruptions")`` has filled is
   therefore used as it is.

The files are the ones RobustBench publishes (Google Drive ids in :data:`ZOO`, e.g.
``https://drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC`` for ``Standard``); they are
read with ``weights_only=True`` (``allow_pickle`` for files that need more).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_checkpoint, unwrap_state_dict
from .classifier import ModelInfo
from .specs import MODEL_SPECS, Built, SpecRequest

ENV_DIR = "TTA_ROBUSTBENCH_DIR"
DEFAULT_DIR = "./models"
THREAT_MODEL = "corruptions"
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}


# ------------------------------------------------------------------------------ WideResNet (WRN-d-k)
class BasicBlock(nn.Module):
    """Pre-activation residual block of a wide ResNet (parameter names as RobustBench's)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (None if self.equalInOut
                             else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """``n`` basic blocks; the first changes width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------------- ResNeXt (CIFAR)
class ResNeXtBottleneck(nn.Module):
    """Aggregated-transformation bottleneck (grouped 3x3 convolution), expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, cardinality: int, base_width: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        dim = int(math.floor(planes * (base_width / 64.0))) * cardinality
        self.conv_reduce = nn.Conv2d(inplanes, dim, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(dim)
        self.conv_conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.conv_expand = nn.Conv2d(dim, planes * self.expansion, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        out = F.relu(self.bn(self.conv_conv(out)), inplace=True)
        out = self.bn_expand(self.conv_expand(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(residual + out, inplace=True)


class CifarResNeXt(nn.Module):
    """ResNeXt-``depth`` (``cardinality`` x ``base_width``d) for 32x32 images (Xie et al., 2017)."""

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"ResNeXt depth must be 9n + 2, got {depth}")
        blocks = (depth - 2) // 9
        self.cardinality, self.base_width = cardinality, base_width
        self.conv_1_3x3 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self.inplanes = 64
        self.stage_1 = self._stage(64, blocks, 1)
        self.stage_2 = self._stage(128, blocks, 2)
        self.stage_3 = self._stage(256, blocks, 2)
        self.classifier = nn.Linear(256 * ResNeXtBottleneck.expansion, num_classes)
        _init_weights(self)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        layers = [ResNeXtBottleneck(self.inplanes, planes, self.cardinality, self.base_width, stride, downsample)]
        self.inplanes = out
        layers += [ResNeXtBottleneck(out, planes, self.cardinality, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _init_weights(net: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit BatchNorm, zero biases (the papers' initialisation)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------ the zoo
@dataclass(frozen=True)
class ZooEntry:
    """One published RobustBench model: how to build it, its normalisation and where it comes from."""

    dataset: str
    name: str
    build: Callable[[int], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gdrive_id: str
    architecture: str

    @property
    def url(self) -> str:
        return f"https://drive.google.com/uc?id={self.gdrive_id}"


def _wrn_28_10(classes: int) -> nn.Module:
    return WideResNet(28, 10, classes)


def _wrn_40_2(classes: int) -> nn.Module:
    return WideResNet(40, 2, classes)


def _resnext_29(classes: int) -> nn.Module:
    return CifarResNeXt(29, 4, 32, classes)


_NONE, _HALF = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ZOO: dict[tuple[str, str], ZooEntry] = {(e.dataset, e.name): e for e in (
    ZooEntry("cifar10", "Standard", _wrn_28_10, *_NONE, "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC", "WideResNet-28-10"),
    ZooEntry("cifar10", "Hendrycks2020AugMix_WRN", _wrn_40_2, *_HALF, "1wy7gSRsUZzCzj8QhmTbcnwmES_2kkNph",
             "WideResNet-40-2"),
    ZooEntry("cifar10", "Hendrycks2020AugMix_ResNeXt", _resnext_29, *_HALF, "1uGP3nZbL3LC160kOsxwkkt6tDd4qbZT1",
             "ResNeXt-29 (cardinality 4, base width 32)"),
    ZooEntry("cifar100", "Hendrycks2020AugMix_WRN", _wrn_40_2, *_HALF, "1XpFFdCdU9LcDtcyNfo6_BV1RZHKKkBVE",
             "WideResNet-40-2"),
    ZooEntry("cifar100", "Hendrycks2020AugMix_ResNeXt", _resnext_29, *_HALF, "1ocnHbvDdOBLvgNr6K7vEYL08hUdkD1Rv",
             "ResNeXt-29 (cardinality 4, base width 32)"),
)}
"""RobustBench's corruption-robustness models available here, by (dataset, name)."""


def zoo_entry(rest: str, num_classes: int | None = None) -> ZooEntry:
    """The entry of ``"<name>"`` or ``"<dataset>/<name>"`` (see the module docstring)."""
    dataset, _, name = rest.rpartition("/")
    if dataset:
        if (dataset, name) not in ZOO:
            raise ValueError(f"robustbench:{rest}: not available; choose one of "
                             f"{', '.join(f'{d}/{n}' for d, n in ZOO)}")
        return ZOO[(dataset, name)]
    matches = [e for (d, n), e in ZOO.items() if n == name]
    if not matches:
        raise ValueError(f"robustbench:{rest}: unknown model; available: "
                         f"{', '.join(sorted({n for _, n in ZOO}))} (RobustBench's CIFAR corruption models)")
    if len(matches) > 1:
        fitting = [e for e in matches if DATASET_CLASSES[e.dataset] == num_classes]
        if len(fitting) != 1:
            raise ValueError(f"robustbench:{name} exists for {', '.join(e.dataset for e in matches)}: name the dataset, "
                             f"e.g. robustbench:{matches[0].dataset}/{name}")
        matches = fitting
    return matches[0]


def model_dir(given: str | os.PathLike | None = None) -> Path:
    """The folder of robustbench-layout checkpoints: ``given``, else ``$TTA_ROBUSTBENCH_DIR``, else ``./models``."""
    return Path(given or os.environ.get(ENV_DIR) or DEFAULT_DIR).expanduser()


def checkpoint_path(entry: ZooEntry, directory: str | os.PathLike | None = None) -> Path:
    """``<model_dir>/<dataset>/corruptions/<name>.pt`` (robustbench's own layout)."""
    return model_dir(directory) / entry.dataset / THREAT_MODEL / f"{entry.name}.pt"


def _missing_message(entry: ZooEntry, path: Path) -> str:
    return (f"robustbench:{entry.dataset}/{entry.name}: no checkpoint at {path} (nothing is downloaded here). "
            f"The file is RobustBench's published checkpoint of this model: {entry.url} "
            f"(robustbench.utils.load_model({entry.name!r}, model_dir=..., dataset={entry.dataset!r}, "
            f"threat_model='corruptions') saves it to <model_dir>/{entry.dataset}/corruptions/{entry.name}.pt). "
            f"Put it at {path}, or point model_dir= (or the environment variable {ENV_DIR}) to the folder that "
            f"holds {entry.dataset}/corruptions/{entry.name}.pt, or pass model_weights=<file>.")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_robustbench(entry: ZooEntry, path: Path, *, allow_pickle: bool = False) -> tuple[nn.Module, tuple, tuple]:
    """The model of ``entry`` with the checkpoint at ``path`` (strict), and its normalisation."""
    what = f"robustbench:{entry.dataset}/{entry.name} checkpoint"
    state = unwrap_state_dict(load_checkpoint(path, allow_pickle=allow_pickle, what=what), what=f"{what} {path}")
    state = _strip(_strip(state, "module."), "model.")  # as robustbench.utils.load_model does
    mean, std = entry.mean, entry.std
    if "mu" in state and "sigma" in state:  # the normalisation buffers of RobustBench's wrapper classes
        mean = tuple(float(v) for v in state.pop("mu").flatten())
        std = tuple(float(v) for v in state.pop("sigma").flatten())
    head = state.get("fc.weight", state.get("classifier.weight"))
    classes = int(head.shape[0]) if head is not None and head.ndim == 2 else DATASET_CLASSES[entry.dataset]
    net = entry.build(classes)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a checkpoint of {entry.architecture} ({entry.name}): missing keys "
                         f"{missing[:5]}, unexpected keys {unexpected[:5]}")
    return net, mean, std


@MODEL_SPECS.register("robustbench:", help="robustbench:[<dataset>/]<name>  RobustBench's CIFAR-C models (Standard, "
                                           "Hendrycks2020AugMix_ResNeXt, Hendrycks2020AugMix_WRN); checkpoint from "
                                           "model_weights= or <model_dir>/<dataset>/corruptions/<name>.pt")
def robustbench_spec(rest: str, request: SpecRequest) -> Built:
    entry = zoo_entry(rest, request.num_classes)
    path = request.weights or checkpoint_path(entry, request.model_dir)
    if not path.is_file():
        raise FileNotFoundError(_missing_message(entry, path))
    net, mean, std = load_robustbench(entry, path, allow_pickle=request.allow_pickle)
    info = ModelInfo(f"robustbench:{entry.dataset}/{entry.name}", "robustbench", str(path), mean, std, (32, 32),
                     notes=[f"{entry.architecture}, RobustBench corruptions model zoo ({entry.url})"],
                     normalization_source="weights", crop_pct=1.0)
    return Built(net, info, weights_loaded=True)


__all__ = ["BasicBlock", "CifarResNeXt", "ENV_DIR", "ResNeXtBottleneck", "WideResNet", "ZOO", "ZooEntry",
           "checkpoint_path", "load_robustbench", "model_dir", "zoo_entry"]
