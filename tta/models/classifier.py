"""One interface over timm, torchvision, local and in-memory classifiers.

``Classifier`` takes images in [0, 1], applies the normalisation that belongs to the weights, and
returns logits. It records where the weights came from so that every run can say so.

Model specs understood by :func:`load_classifier`:

* ``digits_cnn`` -- the embedded digits-C source model shipped with the package;
* ``timm:<name>[.<tag>]`` -- any timm model, e.g. ``timm:vit_base_patch16_224.augreg_in21k_ft_in1k``;
* ``torchvision:<name>[:<weights enum>]`` -- e.g. ``torchvision:resnet50:IMAGENET1K_V1``;
* a path to a checkpoint file (``.pt``/``.pth``/``.safetensors``) together with an architecture
  spec (``weights=`` argument), or a ``.pt`` file holding a whole pickled module;
* an already-built ``nn.Module``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NAMED_NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}


@dataclass
class ModelInfo:
    """Where a classifier came from; written into every run record."""

    spec: str
    source: str  # "timm", "torchvision", "digits", "module", "file"
    weights: str  # weight tag, file, or "random"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classifier(nn.Module):
    """A classifier that sees images in [0, 1]: ``logits = net((x - mean) / std)``.

    ``fixed_input_size`` models (ViTs) get inputs resized to their input size; CNNs see the images
    as they are.
    """

    def __init__(self, net: nn.Module, info: ModelInfo, fixed_input_size: bool = False):
        super().__init__()
        self.net = net
        self.info = info
        self.fixed_input_size = fixed_input_size
        self.register_buffer("mean", torch.tensor(info.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_input_size and self.info.input_size and tuple(x.shape[-2:]) != tuple(self.info.input_size):
            x = F.interpolate(x, size=self.info.input_size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def head(self) -> nn.Linear:
        """The final linear layer (the classifier head)."""
        return find_head(self.net)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit features: the input of the classifier head."""
        captured: list[torch.Tensor] = []
        handle = self.head().register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            self(x)
        finally:
            handle.remove()
        return captured[0]

    @property
    def num_classes(self) -> int:
        return self.head().out_features


def find_head(net: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of a network, taken as its classifier head."""
    get_classifier = getattr(net, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Linear):
            name = next(n for n, m in net.named_modules() if m is head)
            return name, head
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("could not find a classifier head (no nn.Linear layer) in the model")
    return linears[-1]


def resize_head(net: nn.Module, num_classes: int) -> bool:
    """Replace the head when it has another number of classes; returns whether it did."""
    name, head = find_head(net)
    if head.out_features == num_classes:
        return False
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None).to(head.weight.device)
    parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
    setattr(parent, name.rsplit(".", 1)[-1], new)
    return True


def _normalization(name_or_values: str | Sequence | None, default: tuple) -> tuple[tuple, tuple]:
    if name_or_values is None or name_or_values == "weights":
        return default
    if isinstance(name_or_values, str):
        if name_or_values not in NAMED_NORMALIZATIONS:
            raise ValueError(f"unknown normalization {name_or_values!r}; use 'weights', "
                             f"{sorted(NAMED_NORMALIZATIONS)} or a (mean, std) pair")
        return NAMED_NORMALIZATIONS[name_or_values]
    mean, std = name_or_values
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def pretrained_or_random(load_pretrained: Callable[[], Any], load_random: Callable[[], Any], what: str,
                         pretrained: str | bool, hint: str, notes: list[str]) -> tuple[Any, bool]:
    """Published weights when they can be had; with ``pretrained="auto"`` a loud, recorded fallback
    to random weights otherwise (``True``: an error). Returns (model, whether weights were loaded)."""
    try:
        return load_pretrained(), True
    except Exception as err:  # noqa: BLE001 - offline, unknown tag, no weights published
        if pretrained is True or pretrained == "true":
            raise RuntimeError(f"could not load pretrained weights for {what}: {err}") from err
        message = (f"pretrained weights for {what} are not available ({type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200]}); using RANDOM weights. {hint}")
        warnings.warn(message, stacklevel=4)
        notes.append(message)
        return load_random(), False


def _load_timm(name: str, pretrained: str | bool) -> tuple[nn.Module, str, list[str]]:
    import timm

    notes: list[str] = []
    if pretrained is False or pretrained == "false":
        return timm.create_model(name, pretrained=False), "random", notes
    net, loaded = pretrained_or_random(
        lambda: timm.create_model(name, pretrained=True), lambda: timm.create_model(name, pretrained=False),
        f"timm:{name}", pretrained, "Pass pretrained=true to make this an error, or weights=<file> to load a "
        "local checkpoint.", notes)
    tag = (getattr(net, "pretrained_cfg", {}).get("tag") or "default") if loaded else None
    return net, f"pretrained:{tag}" if loaded else "random", notes


def _timm_classifier(name: str, pretrained: str | bool) -> tuple[nn.Module, ModelInfo, bool]:
    net, weights, notes = _load_timm(name, pretrained)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    size = cfg.get("input_size")
    fixed = hasattr(net, "patch_embed")  # ViT-style models need their input size
    info = ModelInfo(f"timm:{name}", "timm", weights, mean, std, tuple(size[-2:]) if size else None, notes=notes)
    return net, info, fixed


def _torchvision_classifier(name: str, tag: str | None) -> tuple[nn.Module, ModelInfo, bool]:
    import torchvision

    weights = None
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, None
    if tag:
        weights = torchvision.models.get_model_weights(name)[tag]
        transform = weights.transforms()
        mean, std = tuple(transform.mean), tuple(transform.std)
        size = (transform.crop_size[0],) * 2
    net = torchvision.models.get_model(name, weights=weights)
    fixed = name.startswith(("vit_", "swin", "maxvit"))
    spec = f"torchvision:{name}" + (f":{tag}" if tag else "")
    info = ModelInfo(spec, "torchvision", tag or "random", mean, std, size)
    return net, info, fixed


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_classifier(
    spec: str | nn.Module = "digits_cnn",
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    pretrained: str | bool = "auto",
    normalization: str | Sequence | None = "weights",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build a :class:`Classifier` from a spec string or module (see the module docstring).

    Args:
        spec: model spec or an ``nn.Module`` (expects ImageNet-normalised input unless ``mean``/``std``).
        num_classes: resize the head to this many classes when it differs (with a warning).
        weights: a local checkpoint (state dict, ``.safetensors``) loaded into the built architecture.
        pretrained: ``"auto"`` loads published weights when they can be had and otherwise warns
            loudly and records random weights; ``True`` makes that an error; ``False`` skips them.
        normalization: ``"weights"`` (the weights' own mean/std), ``"imagenet"`` (the ImageNet
            mean/std, e.g. to reproduce SAR/DeYO's ViT tables), ``"half"`` (0.5/0.5) or (mean, std).
    """
    if isinstance(spec, Classifier):
        return spec
    fixed = False
    if isinstance(spec, nn.Module):
        info = ModelInfo(type(spec).__name__, "module", "given", tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))
        net = spec
    elif spec == "digits_cnn":
        from .digits import load_digits_cnn

        net, info = load_digits_cnn(weights)
        weights = None
    elif spec.startswith("clip:"):
        from .clip import load_clip_classifier

        return load_clip_classifier(spec[5:], num_classes=num_classes, weights=weights)
    elif spec.startswith("timm:"):
        net, info, fixed = _timm_classifier(spec[5:], False if weights else pretrained)
    elif spec.startswith("torchvision:"):
        parts = spec.split(":")
        net, info, fixed = _torchvision_classifier(parts[1], None if weights else (parts[2] if len(parts) > 2 else None))
    elif Path(spec).is_file():
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise ValueError(f"{spec} holds a state dict, not a module: pass the architecture as the spec "
                             f"and the file as weights=")
        net = obj
        info = ModelInfo(str(spec), "file", str(spec), tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))
    else:
        raise ValueError(f"unknown model spec {spec!r}: use digits_cnn, timm:<name>, torchvision:<name>[:<weights>], "
                         f"a checkpoint file, or an nn.Module")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        state = _read_state_dict(path)
        head_name, head = find_head(net)
        head_weight = state.get(f"{head_name}.weight")
        if head_weight is not None and head_weight.ndim == 2 and head_weight.shape[0] != head.out_features:
            resize_head(net, head_weight.shape[0])  # the checkpoint defines its own number of classes
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"weights {path} do not fit {info.spec}: {err}") from err
        if missing or unexpected:
            raise ValueError(f"weights {path} do not fit {info.spec}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        info.weights = str(path)
    if mean is not None and std is not None:
        info.mean, info.std = tuple(mean), tuple(std)
    else:
        info.mean, info.std = _normalization(normalization, (info.mean, info.std))
    if num_classes is not None and resize_head(net, num_classes):
        message = f"classifier head of {info.spec} resized to {num_classes} classes (new head is randomly initialised)"
        warnings.warn(message, stacklevel=2)
        info.notes.append(message)
    info.num_classes = find_head(net)[1].out_features
    return Classifier(net, info, fixed_input_size=fixed)


def clone_classifier(model: Classifier) -> Classifier:
    """An independent copy (weights, buffers and info)."""
    return copy.deepcopy(model)
