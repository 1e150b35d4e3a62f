"""The strength of every corruption at every severity, checked without the reference package.

``tests/test_corruptions.py`` compares each corruption with the reference functions
(imagecorruptions 1.1.2) and skips where that optional package is missing; a change of one number
in a severity table would then go unseen. These checks need only the required packages:

* **from first principles**, where the effect has a closed form: the noise level of gaussian, shot
  and speckle noise (the standard deviation of the clipped result on a grey image, computed exactly
  from the normal and Poisson distributions), the flipped fraction of impulse noise, brightness,
  contrast and saturation on constructed colours (exact), the width of the Gaussian and defocus
  blur kernels (second moment of a blurred point), pixelate's block count (exact), and the JPEG
  quality (the PIL encoding, a required package, that the output is closest to);
* the same closed forms at fractional severities (:data:`FRACTIONAL`), with the parameters the
  CCC reference interpolates (``tests/ccc_reference.py``);
* **pinned**, for all corruptions and severities: the mean absolute change on six fixed digits
  images, as this implementation computed it when it matched the reference in
  ``tests/test_corruptions.py``. A changed severity parameter moves these by far more than the
  tolerance (one per cent).
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tta.data.corruptions import ALL_CORRUPTIONS, corrupt
from tta.data.digits import load_digits_split

from ccc_reference import FRACTIONAL, reference_parameters

SEVERITIES = (1, 2, 3, 4, 5)
#: integer severities, then fractional ones (continuous severities: CCC's interpolated parameters)
ALL_SEVERITIES = SEVERITIES + FRACTIONAL
#: the reference's severity parameters for the corruptions checked from first principles
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE = (60, 25, 12, 5, 3)
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)
DEFOCUS_RADIUS = (3, 4, 6, 8, 10)
DEFOCUS_ALIAS = (0.1, 0.5, 0.5, 0.5, 0.5)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)


def param(table: tuple, name: str, severity: float):
    """The reference's parameter of ``name``: the integer table's entry, or CCC's interpolation."""
    if float(severity).is_integer():
        return table[int(severity) - 1]
    return reference_parameters(name, severity)


def grey(n: int = 16, size: int = 64, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, 3, size, size), value, dtype=torch.float64)


def clipped_normal_std(mean: float, sigma: float) -> float:
    """Standard deviation of ``clip(mean + sigma * Z, 0, 1)``, Z standard normal (numerically exact)."""
    z = np.linspace(-12, 12, 400_001)
    density = np.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    values = np.clip(mean + sigma * z, 0, 1)
    first = np.trapezoid(values * density, z)
    second = np.trapezoid(values ** 2 * density, z)
    return math.sqrt(second - first ** 2)


def clipped_poisson_std(mean: float, photons: float) -> float:
    """Standard deviation of ``clip(K / photons, 0, 1)``, K ~ Poisson(mean * photons) (exact sum)."""
    lam = mean * photons
    k = np.arange(0, int(lam + 40 * math.sqrt(lam) + 40))
    pmf = np.exp(k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k]))
    values = np.clip(k / photons, 0, 1)
    first = (values * pmf).sum()
    return math.sqrt((values ** 2 * pmf).sum() - first ** 2)


@pytest.mark.parametrize("severity", ALL_SEVERITIES)
def test_noise_levels(severity):
    """On a grey image (0.5, about 200,000 values) the corrupted values' spread equals the clipped
    distribution's of the reference's parameter, within 1.5% (the sampling error is about 0.3%,
    a neighbouring severity is 15% away or more; shot noise at a fractional severity: photons
    = 1 / the interpolated 1/photons)."""
    x = grey()
    expected = {
        "gaussian_noise": clipped_normal_std(0.5, param(GAUSSIAN_NOISE, "gaussian_noise", severity)),
        "speckle_noise": clipped_normal_std(0.5, 0.5 * param(SPECKLE_NOISE, "speckle_noise", severity)),
        "shot_noise": clipped_poisson_std(0.5, param(SHOT_NOISE, "shot_noise", severity)),
    }
    for name, std in expected.items():
        measured = float(corrupt(x, name, severity, seed=1).std())
        assert measured == pytest.approx(std, rel=0.015), name
    flipped = (corrupt(x, "impulse_noise", severity, seed=1) != 0.5).double().mean()
    amount = param(IMPULSE_NOISE, "impulse_noise", severity)
    assert abs(float(flipped) - amount) < 5 * math.sqrt(amount * (1 - amount) / x.numel())


@pytest.mark.parametrize("severity", ALL_SEVERITIES)
def test_brightness_contrast_and_saturation_are_exact(severity):
    out = corrupt(grey(1, 8), "brightness", severity)  # HSV value + c on a grey image
    torch.testing.assert_close(out, torch.full_like(out, min(1.0, 0.5 + param(BRIGHTNESS, "brightness", severity))))

    halves = grey(1, 8, 0.25)
    halves[..., 4:] = 0.75  # mean 0.5: contrast scales the deviation by c
    out = corrupt(halves, "contrast", severity)
    torch.testing.assert_close(out, 0.5 + (halves - 0.5) * param(CONTRAST, "contrast", severity))

    colour = torch.tensor([0.8, 0.6, 0.6], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    factor, offset = param(SATURATE, "saturate", severity)  # HSV saturation 0.25 -> 0.25 * factor + offset; value 0.8, hue 0
    saturation = min(1.0, 0.25 * factor + offset)
    expected = torch.tensor([0.8, 0.8 * (1 - saturation), 0.8 * (1 - saturation)], dtype=torch.float64)
    torch.testing.assert_close(corrupt(colour, "saturate", severity), expected.view(1, 3, 1, 1).expand(1, 3, 4, 4))


def point_spread(name: str, severity: int, size: int = 65) -> torch.Tensor:
    """The corruption of a single bright point at the centre of a black image (one channel)."""
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    x[..., size // 2, size // 2] = 1.0
    return corrupt(x, name, severity)[0, 0]


def second_moment(kernel: torch.Tensor) -> float:
    """``E[dx^2 + dy^2]`` of a kernel centred in its image."""
    size = kernel.shape[-1]
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return float((kernel * r2).sum() / kernel.sum())


def sampled_variance(sigma: float) -> float:
    """Variance of the Gaussian of ``sigma`` sampled at the integers up to ``int(4 sigma + 0.5)``
    (scipy.ndimage's kernel): sigma^2 for a wide kernel, far less below sigma = 0.5."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    return float((weights * offsets ** 2).sum() / weights.sum())


@pytest.mark.parametrize("severity", ALL_SEVERITIES)
def test_blur_widths(severity):
    """A Gaussian blur of sigma spreads a point with second moment twice the variance of its
    sampled kernel (2 sigma^2 for sigma >= 1; within 2%); the defocus disk of radius r, anti-aliased by a Gaussian of sigma a,
    with about r^2 / 2 + 2 a^2 (within 10%: a disk of pixels is not a continuous disk). Below a
    radius of 1 (severity 0.25: r = 0.75, a = 0.025) the disk is its centre pixel and the
    anti-aliasing weights underflow: the point stays a point."""
    sigma = param(GAUSSIAN_BLUR, "gaussian_blur", severity)
    assert second_moment(point_spread("gaussian_blur", severity)) == pytest.approx(2 * sampled_variance(sigma),
                                                                                 rel=0.02)
    radius, alias = param(tuple(zip(DEFOCUS_RADIUS, DEFOCUS_ALIAS)), "defocus_blur", severity)
    spread = second_moment(point_spread("defocus_blur", severity))
    if radius < 1:
        assert spread == 0
    else:
        assert spread == pytest.approx(radius ** 2 / 2 + 2 * alias ** 2, rel=0.10)


@pytest.mark.parametrize("severity", ALL_SEVERITIES)
def test_pixelate_block_count(severity):
    """Pixelate shrinks by the severity's factor and blows up with nearest neighbours: a row of a
    32-pixel image with distinct columns keeps exactly ``int(32 * factor)`` distinct values."""
    ramp = torch.linspace(0, 1, 32, dtype=torch.float64).expand(1, 3, 32, 32).contiguous()
    row = corrupt(ramp, "pixelate", severity)[0, 0, 0]
    assert len(torch.unique(row)) == int(32 * param(PIXELATE, "pixelate", severity))


@pytest.mark.parametrize("size, severity", [(28, 1), (299, 5), (224, 4.25), (32, 2.75)])
def test_pixelate_geometry_is_pils(size, severity):
    """Pixelate is PIL's BOX downsampling then NEAREST upsampling (the reference's), value for value
    on float images (PIL mode F, no uint8 rounding), including where a NEAREST coordinate is an
    exact integer and PIL's accumulated coordinates decide (these sizes and severities)."""
    generator = torch.Generator().manual_seed(size)
    x = torch.rand(1, 3, size, size, generator=generator, dtype=torch.float64)
    small = int(size * param(PIXELATE, "pixelate", severity))
    expected = []
    for channel in x[0].float().numpy():
        image = Image.fromarray(channel, mode="F").resize((small, small), Image.BOX)
        expected.append(np.asarray(image.resize((size, size), Image.NEAREST)))
    expected = torch.from_numpy(np.stack(expected)).double()[None]
    torch.testing.assert_close(corrupt(x, "pixelate", severity), expected, atol=1e-5, rtol=0)


def pil_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1).double() / 255)
    return torch.stack(out)


@pytest.mark.parametrize("severity", ALL_SEVERITIES)
def test_jpeg_quality(severity):
    """The JPEG corruption is closest to PIL's encoding (the reference's encoder) at the severity's
    quality (at a fractional severity the reference's rounded interpolation: 70, 22, 16, 9, 8),
    among all qualities the table uses, that one, and their neighbours."""
    x, _ = load_digits_split("test")
    x = x[:4].double() * torch.tensor([1.0, 0.9, 0.7], dtype=torch.float64).view(1, 3, 1, 1)
    ours = corrupt(x, "jpeg_compression", severity)
    quality = param(JPEG_QUALITY, "jpeg_compression", severity)
    candidates = sorted({q + d for q in JPEG_QUALITY + (quality,) for d in (-1, 0, 1)})
    errors = {q: float((ours - pil_jpeg(x, q)).abs().mean()) for q in candidates}
    assert min(errors, key=errors.get) == quality, errors


#: mean |corrupted - clean| on ``pinned_images()`` (seed 3), severities 1..5, computed by this
#: implementation while it matched the reference functions (tests/test_corruptions.py)
PINNED = {
"gaussian_noise": (0.06213, 0.08926, 0.12682, 0.17302, 0.22663),
    "shot_noise": (0.05355, 0.08273, 0.11557, 0.17721, 0.21795),
    "impulse_noise": (0.01622, 0.02930, 0.04688, 0.08532, 0.13159),
    "defocus_blur": (0.02776, 0.04422, 0.07983, 0.11198, 0.14144),
    "glass_blur": (0.05286, 0.04865, 0.10036, 0.08123, 0.09172),
    "motion_blur": (0.07905, 0.13142, 0.16781, 0.19204, 0.19950),
    "zoom_blur": (0.02802, 0.03556, 0.04091, 0.04840, 0.06034),
    "snow": (0.16430, 0.27077, 0.26530, 0.30442, 0.38450),
    "frost": (0.24610, 0.31099, 0.32265, 0.36862, 0.35858),
    "fog": (0.19064, 0.20293, 0.21979, 0.20656, 0.22329),
    "brightness": (0.09500, 0.18669, 0.27215, 0.35065, 0.42176),
    "contrast": (0.12871, 0.15017, 0.17162, 0.19307, 0.20380),
    "elastic_transform": (0.05316, 0.06513, 0.08684, 0.10045, 0.11902),
    "pixelate": (0.02125, 0.02786, 0.03532, 0.04782, 0.05005),
    "jpeg_compression": (0.01794, 0.02240, 0.02421, 0.02980, 0.03471),
    "speckle_noise": (0.03779, 0.05012, 0.08475, 0.10590, 0.13409),
    "gaussian_blur": (0.01225, 0.03954, 0.06901, 0.09502, 0.13264),
    "spatter": (0.01409, 0.02422, 0.03869, 0.02747, 0.04043),
    "saturate": (0.01187, 0.01526, 0.01695, 0.08477, 0.15258),
}


def pinned_images() -> torch.Tensor:
    """Six digits test images, lifted off black and tinted so that every corruption (the HSV ones
    included) acts on them."""
    x, _ = load_digits_split("test")
    tint = torch.tensor([1.0, 0.95, 0.9], dtype=torch.float64).view(1, 3, 1, 1)
    return (x[:6].double() * 0.8 + 0.1) * tint


def test_every_corruption_is_pinned():
    assert set(PINNED) == set(ALL_CORRUPTIONS)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_pinned_strength(name):
    x = pinned_images()
    measured = [float((corrupt(x, name, s, seed=3) - x).abs().mean()) for s in SEVERITIES]
    assert measured == pytest.approx(PINNED[name], rel=0.01, abs=2e-4)
