"""The learning-rate rule of the SAR and DeYO code, and how a network's family is recognised.

Niu et al. (SAR, ICLR 2023) and Lee et al. (DeYO, ICLR 2024) pick the learning rate from the
architecture and the batch size; their repositories apply the same rule to Tent and EATA:

* ResNet (a CNN): 2.5e-4 for ``bs >= 32``, else ``2.5e-4 / 64 * bs * 2``;
* ViT: ``1e-3 / 64 * bs``;
* SAR and DeYO double the result again at ``bs = 1`` (SAR commit a266f7d).

The official scripts decide the family from the model *name* (``resnet50_gn_timm`` vs
``vit_base_patch16_224``). A name is not available for every model here, so the family is decided
from what the network *is*: a network with self-attention modules (timm ``Attention``/
``WindowAttention``, ``nn.MultiheadAttention`` in torchvision and open_clip ViTs) is a ``"vit"``,
anything else a ``"cnn"`` (ResNets, EfficientNets, MobileNets, ConvNeXts, the digits CNNs). An
attention-pooling head alone (CLIP's ``AttentionPool2d`` on a ResNet tower) does not make a ViT.
"""
from __future__ import annotations

from torch import nn

FAMILIES = ("cnn", "vit")


def is_attention(module: nn.Module) -> bool:
    """Self-attention blocks: ``nn.MultiheadAttention`` or a class named ``...Attention``."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def model_family(net: nn.Module) -> str:
    """``"vit"`` when ``net`` contains self-attention modules, else ``"cnn"``."""
    return "vit" if any(is_attention(m) for m in net.modules()) else "cnn"


def niu_learning_rate(family: str, batch_size: int, double_at_bs1: bool = False) -> float:
    """The SAR/DeYO learning rate for a model ``family`` (``cnn``/``vit``) at ``batch_size``."""
    if family not in FAMILIES:
        raise ValueError(f"model family must be one of {FAMILIES}, not {family!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if family == "vit":
        lr = 1e-3 / 64 * batch_size
    else:
        lr = 2.5e-4 if batch_size >= 32 else 2.5e-4 / 64 * batch_size * 2
    if batch_size == 1 and double_at_bs1:
        lr *= 2
    return lr


__all__ = ["FAMILIES", "is_attention", "model_family", "niu_learning_rate"]
