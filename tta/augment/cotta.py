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

import math
from typing import Any

import torch

#: (low, high) of each colour-jitter factor, in the index order of ``torch.randperm(5)``
JITTER = {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
          "gamma": (0.7, 1.3)}
SOFT_JITTER = {"brightness": (0.8, 1.2), "contrast": (0.85, 1.15), "saturation": (0.75, 1.25),
               "hue": (-0.03, 0.03), "gamma": (0.85, 1.15)}


#: the source of each RGB channel in :func:`hsv_to_rgb`, per hue sector 0-5, as an index into (v, q, p, t)
_SECTOR_SOURCE = ((0, 1, 2, 2, 3, 0), (3, 0, 0, 1, 2, 2), (2, 2, 3, 0, 0, 1))


def adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_hue`` on a float RGB batch, with the same arithmetic and fewer kernels.

    As torchvision does, the image goes to float32, to HSV (Pillow's formulas), the hue is shifted
    modulo 1 and the image comes back to RGB and to its dtype. The RGB values of each hue sector are
    picked with one ``gather`` instead of torchvision's one-hot ``einsum`` over six stacked sectors
    (a pick of exactly the same numbers), and the hue's three cases with ``where`` instead of sums
    of masked terms (the same numbers: the unpicked terms are finite and added as zeros).
    """
    dtype = x.dtype
    img = x.to(torch.float32)
    r, g, b = img.unbind(dim=-3)
    maxc = img.amax(dim=-3)
    minc = img.amin(dim=-3)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = (h + factor) % 1.0
    # HSV -> RGB (torchvision's _hsv2rgb)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    v = maxc
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    sector = i.to(torch.int64) % 6
    table = torch.tensor(_SECTOR_SOURCE, dtype=torch.int64, device=x.device)  # (3 channels, 6 sectors)
    index = table[:, sector].movedim(0, -3)  # (..., 3, H, W)
    out = torch.stack((v, q, p, t), dim=-3).gather(-3, index)
    return out.to(dtype)


def affine_window(x: torch.Tensor, matrix: list[float], rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """torchvision's tensor ``affine`` (bilinear, fill 0) of ``x``, computed only on the output window
    ``rows`` x ``cols`` (half-open pixel ranges of the full output).

    The sampling grid is torchvision's grid for the whole image (``_gen_affine_grid``), sliced to the
    window; each output pixel depends on its grid point only, so the window holds the same numbers as
    the crop of the full output. The fill follows torchvision: the image is multiplied by the bilinear
    sample of an all-ones mask (one mask for the batch: the grid is the same for every image).
    """
    height, width = x.shape[-2:]
    theta = torch.tensor(matrix, dtype=x.dtype, device=x.device).reshape(1, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace(-width * 0.5 + 0.5, width * 0.5 + 0.5 - 1, steps=width, device=x.device))
    base[..., 1].copy_(torch.linspace(-height * 0.5 + 0.5, height * 0.5 + 0.5 - 1, steps=height,
                                      device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=x.dtype, device=x.device)
    grid = base.view(1, height * width, 3).bmm(rescaled).view(1, height, width, 2)
    grid = grid[:, rows[0]:rows[1], cols[0]:cols[1]]
    sample = torch.nn.functional.grid_sample
    mask = sample(torch.ones(1, 1, height, width, dtype=x.dtype, device=x.device), grid, mode="bilinear",
                  padding_mode="zeros", align_corners=False)
    out = sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * mask


def gaussian_kernel1d(sigma: float, size: int) -> list[float]:
    """torchvision's 1-D Gaussian kernel (its 2-D kernel is the outer product of two of these), as
    host numbers (the blur weighs slices with them: no kernel tensor, no device read)."""
    half = (size - 1) * 0.5
    pdf = [math.exp(-0.5 * ((-half + j) / sigma) ** 2) for j in range(size)]
    total = sum(pdf)
    return [value / total for value in pdf]


def blur_valid(x: torch.Tensor, kernel: list[float]) -> torch.Tensor:
    """A separable blur without padding: (..., H + k - 1, W + k - 1) -> (..., H, W), one 1-D pass per
    axis (torchvision's depthwise 2-D convolution with the outer-product kernel, up to rounding)."""
    size = len(kernel)
    height, width = x.shape[-2] - size + 1, x.shape[-1] - size + 1
    rows = x[..., :, 0:width] * kernel[0]
    for j in range(1, size):
        rows.add_(x[..., :, j:j + width], alpha=kernel[j])
    out = rows[..., 0:height, :] * kernel[0]
    for j in range(1, size):
        out.add_(rows[..., j:j + height, :], alpha=kernel[j])
    return out


class TeacherAugmentation:
    """CoTTA's batch augmentation (see the module docstring).

    The draws and the arithmetic are torchvision's (the composition the reference runs), computed
    with less work: the affine, the blur and the centre crop are computed only where the crop needs
    them (the crop plus the blur's 2-pixel margin; the blur's reflect padding is applied only where
    the margin leaves the padded image, which a 32-pixel image never does), the blur as two 1-D
    passes, the hue with a gather (:func:`adjust_hue`). The result equals torchvision's composition
    up to floating-point rounding (``tests/test_augment_cotta.py``).

    Args:
        padding_mode: ``"edge"`` (CoTTA, RoTTA) or ``"reflect"`` (ROID).
        blur: apply the Gaussian blur (ROID: no).
        noise_std: standard deviation of the additive noise (0: none, ROID).
        soft: the reference's ``soft=True`` ranges (not used by any method's default).
    """

    #: the blur's kernel size (the reference's ``GaussianBlur(kernel_size=5, ...)``)
    kernel_size = 5

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
                x = (x * factor).clamp_(0.0, 1.0)  # torchvision's blend with black
            elif name == "contrast":
                x = TF.adjust_contrast(x, factor)
            elif name == "saturation":
                x = TF.adjust_saturation(x, factor)
            elif name == "hue":
                x = adjust_hue(x, factor)
            else:
                x = x.clamp(1e-8, 1.0).pow_(factor).clamp_(0.0, 1.0)  # torchvision's adjust_gamma, gain 1
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One augmented copy of the batch ``x`` (N, C, H, W) in [0, 1]."""
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        height, width = x.shape[-2:]
        x = x.clip(0.0, 1.0)
        x = self.color_jitter(x)
        x = TF.pad(x, [int(width / 2), int(height / 2)], padding_mode=self.padding_mode)
        padded_h, padded_w = x.shape[-2:]
        angle, translations, scale, shear = T.RandomAffine.get_params(
            self.degrees, [1 / 16, 1 / 16], self.scale, None, [padded_w, padded_h])
        matrix = inverse_affine_matrix(angle, [float(t) for t in translations], scale)
        margin = self.kernel_size // 2 if self.blur else 0
        top, left = int(round((padded_h - height) / 2.0)), int(round((padded_w - width) / 2.0))  # the centre crop
        rows, cols = (top - margin, top + height + margin), (left - margin, left + width + margin)
        inside_rows, inside_cols = (max(rows[0], 0), min(rows[1], padded_h)), (max(cols[0], 0), min(cols[1], padded_w))
        x = affine_window(x, matrix, inside_rows, inside_cols)
        if self.blur:
            sigma = T.GaussianBlur.get_params(*self.sigma)
            reflect = [inside_cols[0] - cols[0], cols[1] - inside_cols[1], inside_rows[0] - rows[0], rows[1] - inside_rows[1]]
            if any(reflect):  # the margin leaves the padded image (images under 4 pixels): torchvision's reflect
                x = torch.nn.functional.pad(x, reflect, mode="reflect")
            x = blur_valid(x, gaussian_kernel1d(sigma, self.kernel_size))
        if torch.rand(1) < 0.5:
            x = x.flip(-1)
        if self.noise_std:
            x = x + (torch.randn(x.shape) * self.noise_std).to(device=x.device, dtype=x.dtype)
        return x.clip(0.0, 1.0)

    def hparams(self) -> dict[str, Any]:
        return {"padding_mode": self.padding_mode, "blur": self.blur, "noise_std": self.noise_std, "soft": self.soft}


def inverse_affine_matrix(angle: float, translate: list[float], scale: float) -> list[float]:
    """torchvision's inverse affine matrix for a tensor image (centre of the image, no shear): the
    matrix that ``TF.affine`` hands to its grid."""
    rot = math.radians(angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    matrix = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    tx, ty = translate
    matrix[2] += matrix[0] * (-0.0 - tx) + matrix[1] * (-0.0 - ty)
    matrix[5] += matrix[3] * (-0.0 - tx) + matrix[4] * (-0.0 - ty)
    return matrix


__all__ = ["JITTER", "SOFT_JITTER", "TeacherAugmentation", "adjust_hue", "affine_window", "blur_valid",
           "gaussian_kernel1d", "inverse_affine_matrix"]
