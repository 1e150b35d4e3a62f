"""The teacher augmentation of CoTTA, shared by the mean-teacher methods (CoTTA, and RoTTA and ROID
in variants).

Wang et al., "Continual Test-Time Domain Adaptation" (CVPR 2022); official code qinenergy/cotta @
c212a20, ``cifar/cotta.py`` lines 14-46 (``get_tta_transforms``) and ``cifar/my_transforms.py``
(``ColorJitterPro``, ``GaussianNoise``, ``Clip``). One call draws **one** set of parameters for the
whole batch tensor (every image of the batch gets the same transform), in this order, all from the
default CPU generator of torch (as the reference, so a seeded run makes the reference's draws):

1. clip to [0, 1];
2. colour jitter in the order of ``torch.randperm(5)``; each factor is drawn as
   ``torch.tensor(1.0).uniform_(lo, hi)`` when its operation comes: brightness [0.6, 1.4], contrast
   [0.7, 1.3], saturation [0.5, 1.5], hue [-0.06, 0.06], gamma [0.7, 1.3] (the image is clamped to
   [1e-8, 1] before gamma);
3. pad by half the image size (``edge``; ROID: ``reflect``);
4. random affine: rotation +-15 degrees, translation up to 1/16 of the padded size, scale
   [0.9, 1.1], no shear, bilinear, fill 0 (torchvision's ``RandomAffine.get_params`` draws);
5. Gaussian blur, kernel 5, sigma in [0.001, 0.5] (torchvision's ``GaussianBlur.get_params``);
6. centre crop back to the image size;
7. horizontal flip with probability 0.5 (``torch.rand(1) < 0.5``);
8. additive Gaussian noise ``torch.randn(x.shape) * 0.005`` drawn on the CPU, then moved;
9. clip to [0, 1].

The reference writes the affine with ``resample=``/``fillcolor=None`` (torchvision 0.11: fill 0);
mariodoebler/test-time-adaptation ``augmentations/transforms_cotta.py`` writes the same with
``interpolation=``/``fill=0``, as here. The factors are host numbers from the CPU generator: no
device sync.
"""
from __future__ import annotations

from typing import Any

import torch

#: (low, high) of each colour-jitter factor, in the index order of ``torch.randperm(5)``
JITTER = {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
          "gamma": (0.7, 1.3)}
SOFT_JITTER = {"brightness": (0.8, 1.2), "contrast": (0.85, 1.15), "saturation": (0.75, 1.25),
               "hue": (-0.03, 0.03), "gamma": (0.85, 1.15)}


class TeacherAugmentation:
    """CoTTA's batch augmentation (see the module docstring).

    Args:
        padding_mode: ``"edge"`` (CoTTA, RoTTA) or ``"reflect"`` (ROID).
        blur: apply the Gaussian blur (ROID: no).
        noise_std: standard deviation of the additive noise (0: none, ROID).
        soft: the reference's ``soft=True`` ranges (not used by any method's default).
    """

    def __init__(self, padding_mode: str = "edge", blur: bool = True, noise_std: float = 0.005, soft: bool = False):
        if padding_mode not in ("edge", "reflect", "constant", "symmetric"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.padding_mode, self.blur, self.noise_std, self.soft = padding_mode, bool(blur), float(noise_std), bool(soft)
        self.jitter = SOFT_JITTER if soft else JITTER
        self.degrees = [-8.0, 8.0] if soft else [-15.0, 15.0]
        self.scale = [0.95, 1.05] if soft else [0.9, 1.1]
        self.sigma = (0.001, 0.25) if soft else (0.001, 0.5)

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """``ColorJitterPro``: the five operations in a random order, each factor drawn when it comes."""
        import torchvision.transforms.functional as TF  # here, not at import: torchvision loads torch._dynamo

        for index in torch.randperm(5).tolist():
            name = ("brightness", "contrast", "saturation", "hue", "gamma")[index]
            low, high = self.jitter[name]
            factor = torch.tensor(1.0).uniform_(low, high).item()
            if name == "brightness":
                x = TF.adjust_brightness(x, factor)
            elif name == "contrast":
                x = TF.adjust_contrast(x, factor)
            elif name == "saturation":
                x = TF.adjust_saturation(x, factor)
            elif name == "hue":
                x = TF.adjust_hue(x, factor)
            else:
                x = TF.adjust_gamma(x.clamp(1e-8, 1.0), factor)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One augmented copy of the batch ``x`` (N, C, H, W) in [0, 1]."""
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        height, width = x.shape[-2:]
        x = x.clip(0.0, 1.0)
        x = self.color_jitter(x)
        x = TF.pad(x, [int(width / 2), int(height / 2)], padding_mode=self.padding_mode)
        angle, translations, scale, shear = T.RandomAffine.get_params(
            self.degrees, [1 / 16, 1 / 16], self.scale, None, [x.shape[-1], x.shape[-2]])
        x = TF.affine(x, angle, list(translations), scale, list(shear), interpolation=T.InterpolationMode.BILINEAR,
                      fill=[0.0] * x.shape[-3])
        if self.blur:
            sigma = T.GaussianBlur.get_params(*self.sigma)
            x = TF.gaussian_blur(x, [5, 5], [sigma, sigma])
        x = TF.center_crop(x, [height, width])
        if torch.rand(1) < 0.5:
            x = TF.hflip(x)
        if self.noise_std:
            x = x + (torch.randn(x.shape) * self.noise_std).to(device=x.device, dtype=x.dtype)
        return x.clip(0.0, 1.0)

    def hparams(self) -> dict[str, Any]:
        return {"padding_mode": self.padding_mode, "blur": self.blur, "noise_std": self.noise_std, "soft": self.soft}


__all__ = ["JITTER", "SOFT_JITTER", "TeacherAugmentation"]
