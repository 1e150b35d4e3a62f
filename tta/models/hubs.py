"""Model specs of the two model hubs: ``timm:<name>[.<tag>]`` and ``torchvision:<name>[:<weights enum>]``.

Published weights come through the hubs' own download caches (``pretrained="auto"``: a loud,
recorded fallback to random weights when they cannot be had, e.g. offline). With a local
checkpoint (``weights=``) the architecture is built without published weights and the file is
loaded into it; the normalisation is then the architecture's default config (timm) or, for
torchvision, which has none, guessed (ImageNet, with a warning) unless stated.
"""
from __future__ import annotations

from torch import nn

from .classifier import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, pretrained_or_random
from .specs import MODEL_SPECS, Built, SpecRequest


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


@MODEL_SPECS.register("timm:", help="timm:<name>[.<tag>]  any timm model, e.g. timm:resnet50.a1_in1k")
def timm_spec(rest: str, request: SpecRequest) -> Built:
    net, weights, notes = _load_timm(rest, False if request.weights else request.pretrained)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    size = cfg.get("input_size")
    origin = "weights" if weights.startswith("pretrained:") else "model_config"
    info = ModelInfo(f"timm:{rest}", "timm", weights, mean, std, tuple(size[-2:]) if size else None, notes=notes,
                     normalization_source=origin, crop_pct=cfg.get("crop_pct"))
    return Built(net, info, fixed_input_size=hasattr(net, "patch_embed"))  # ViT-style models need their size


@MODEL_SPECS.register("torchvision:", help="torchvision:<name>[:<weights enum>]  e.g. torchvision:resnet50:IMAGENET1K_V1")
def torchvision_spec(rest: str, request: SpecRequest) -> Built:
    import torchvision

    name, _, tag = rest.partition(":")
    tag = None if request.weights else (tag or None)
    weights = None
    mean, std, size, crop_pct, origin = IMAGENET_MEAN, IMAGENET_STD, None, None, "guessed"
    if tag:
        weights = torchvision.models.get_model_weights(name)[tag]
        transform = weights.transforms()
        mean, std, origin = tuple(transform.mean), tuple(transform.std), "weights"
        size = (transform.crop_size[0],) * 2
        resize = transform.resize_size[0] if getattr(transform, "resize_size", None) else None
        crop_pct = size[0] / resize if resize else None
    net = torchvision.models.get_model(name, weights=weights)
    spec = f"torchvision:{name}" + (f":{tag}" if tag else "")
    info = ModelInfo(spec, "torchvision", tag or "random", mean, std, size, normalization_source=origin,
                     crop_pct=crop_pct)
    return Built(net, info, fixed_input_size=name.startswith(("vit_", "swin", "maxvit")))


__all__ = ["timm_spec", "torchvision_spec"]
