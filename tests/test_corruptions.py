"""tta.data.corruptions against the reference ImageNet-C functions (imagecorruptions 1.1.2).

Deterministic corruptions must reproduce the reference image (PSNR >= 30 dB); random ones must
change the image as much as the reference does (mean |corrupted - clean| within 15%), at every
severity, on real photographs (scikit-image's samples) at 224 / 96 px and at 32 px (the digits-C
size), and at fractional severities (continuous severities, CCC's interpolated parameters, see
``tests/ccc_reference.py``). The reference functions are called directly (float output, before
``imagecorruptions.corrupt`` truncates to uint8). Those comparisons need the ``dev`` extras
(scikit-image, imagecorruptions); the API, determinism and error tests do not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tta.data.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt

from ccc_reference import FRACTIONAL, imagecorruptions_parameters

DETERMINISTIC = ("brightness", "contrast", "saturate", "pixelate", "jpeg_compression",
                 "defocus_blur", "gaussian_blur", "zoom_blur")
RANDOM = tuple(name for name in ALL_CORRUPTIONS if name not in DETERMINISTIC)
SEVERITIES = (1, 2, 3, 4, 5)
# Draws per severity for the distribution test at (96 px, 32 px), cycling over the three
# photographs (default 3): enough for the corruptions whose strength varies a lot from draw to
# draw (frost: which texture; spatter: how much liquid; fog: the fractal's range; impulse noise
# on 3,072 values, with the reference's unseeded generator) to estimate the mean change within
# a few percent.
DRAWS = {"frost": (100, 100), "spatter": (150, 450), "impulse_noise": (3, 48), "fog": (16, 16),
         "snow": (8, 16), "motion_blur": (8, 8), "elastic_transform": (4, 4)}


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("imagecorruptions")
    pytest.importorskip("cv2")
    from imagecorruptions_shim import load_imagecorruptions

    return load_imagecorruptions().corruptions


def with_parameters(function, parameters):
    from imagecorruptions_shim import with_parameters as replace_table

    return replace_table(function, parameters)


def _photos(size: int) -> list[np.ndarray]:
    """Astronaut, cat and coffee photographs, centre-cropped square and resized to ``size``."""
    skimage_data = pytest.importorskip("skimage.data")
    photos = []
    for load in (skimage_data.astronaut, skimage_data.chelsea, skimage_data.coffee):
        image = load()
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = Image.fromarray(image[top:top + side, left:left + side])
        photos.append(np.asarray(square.resize((size, size), Image.BICUBIC)))
    return photos


@pytest.fixture(scope="module")
def photos():
    return {size: _photos(size) for size in (224, 96, 32)}


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _synthetic(n: int, size: int) -> torch.Tensor:
    """Smooth random colour images with a few sharp edges (no scikit-image needed)."""
    generator = torch.Generator().manual_seed(size)
    smooth = F.interpolate(torch.rand(n, 3, 6, 6, generator=generator), size=size,
                           mode="bicubic", align_corners=False)
    edges = (torch.rand(n, 1, 4, 4, generator=generator) > 0.5).float()
    edges = F.interpolate(edges, size=size, mode="nearest")
    return (0.7 * smooth + 0.3 * edges).clamp(0, 1)


def _run_reference(reference, name: str, image: np.ndarray, severity: int) -> np.ndarray:
    out = getattr(reference, name)(Image.fromarray(image), severity)
    return np.clip(np.asarray(out, dtype=np.float64) / 255, 0, 1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-20))


# ------------------------------------------------------------------------------------- API


def test_names():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    assert ALL_CORRUPTIONS == CORRUPTIONS + EXTRA_CORRUPTIONS
    assert set(DETERMINISTIC) | set(RANDOM) == set(ALL_CORRUPTIONS)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_shape_dtype_range_any_size(name):
    x = torch.rand(2, 3, 37, 50)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = corrupt(x.to(dtype), name, 5)
        assert out.shape == x.shape and out.dtype == dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1


# ------------------------------------------------------------------------ against reference


def _assert_psnr(name: str, photos, severities, run_reference, threshold: float) -> None:
    """Ours against ``run_reference(image, severity)`` on every photograph at 224 and 32 px."""
    for size in (224, 32):
        images = photos[size]
        for severity in severities:
            ours = corrupt(_to_tensor(images), name, severity).permute(0, 2, 3, 1).double().numpy()
            for image, mine in zip(images, ours):
                psnr = _psnr(mine, run_reference(image, severity))
                assert psnr >= threshold, f"{name} severity {severity} at {size} px: {psnr:.1f} dB"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_matches_reference(name, reference, photos):
    _assert_psnr(name, photos, SEVERITIES, lambda image, s: _run_reference(reference, name, image, s), 30)


def _mean_change_against(name: str, severity: float, images: list[np.ndarray], draws: int, run_reference,
                         dtype: torch.dtype = torch.float32):
    """Mean |corrupted - clean| over ``draws`` draws cycling over ``images``: (ours, the reference's
    ``run_reference(image, severity)`` with numpy's generator seeded per draw)."""
    batch = [images[i % len(images)] for i in range(draws)]
    clean = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(dtype) / 255
    ours = (corrupt(clean, name, severity, ids=torch.arange(draws)) - clean).abs().mean()
    ref = []
    for i, image in enumerate(batch):
        np.random.seed(i)
        with np.errstate(invalid="ignore"):
            change = np.abs(run_reference(image, severity) - image / 255).mean()
        # The reference's water spatter divides by zero when a draw has no liquid at all (a few
        # percent of 32 px draws at severity 1) and returns NaN; ours leaves such images as they
        # are, so count them as unchanged.
        ref.append(0.0 if np.isnan(change) else change)
    return float(ours), float(np.mean(ref))


def _mean_change(name: str, severity: int, images: list[np.ndarray], draws: int, reference):
    return _mean_change_against(name, severity, images, draws,
                                lambda image, s: _run_reference(reference, name, image, s))


# The reference glass blur loops over pixels in Python (about 0.1 s per 96 px image and a second
# per 224 px one), so the random corruptions are compared at 96 px and at 32 px. Spatter and frost
# need many draws to estimate their mean change (DRAWS): slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("spatter", "frost") else n
                                  for n in RANDOM])
def test_random_matches_reference_in_distribution(name, reference, photos):
    for size, draws in zip((96, 32), DRAWS.get(name, (3, 3))):
        for severity in SEVERITIES:
            ours, ref = _mean_change(name, severity, photos[size], draws, reference)
            assert abs(ours / ref - 1) <= 0.15, (
                f"{name} severity {severity} at {size} px: mean change {ours:.4f} vs "
                f"reference {ref:.4f}"
            )


# ------------------------------------------------- fractional severities against reference
# The reference functions run at the parameters CCC interpolates for a fractional severity
# (tests/ccc_reference.py), through imagecorruptions_shim.with_parameters; zoom blur computes its
# factors in the function body, so its reference is the function's loop over its clipped_zoom.


def _run_reference_fractional(reference, name: str, image: np.ndarray, severity: float) -> np.ndarray:
    parameters = imagecorruptions_parameters(name, severity)
    if name == "zoom_blur":
        x = image.astype(np.float32) / 255
        out = np.zeros_like(x)
        for zoom in parameters:
            out += reference.clipped_zoom(x, zoom)[: x.shape[0], : x.shape[1], :]
        return np.clip((x + out) / (len(parameters) + 1), 0, 1).astype(np.float64)
    function = with_parameters(getattr(reference, name), parameters)
    out = function(Image.fromarray(image), 1)
    return np.clip(np.asarray(out, dtype=np.float64) / 255, 0, 1)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "zoom_blur" else n
                                  for n in DETERMINISTIC])
def test_deterministic_fractional_matches_reference(name, reference, photos):
    # 50 dB, not 30: every one is above 53 dB (pixelate: PIL's intermediate uint8) and most above
    # 130 dB; 30 dB would let a one-pixel shift of a wide blur through
    _assert_psnr(name, photos, FRACTIONAL, lambda image, s: _run_reference_fractional(reference, name, image, s), 50)


def _mean_change_fractional(name: str, severity: float, images: list[np.ndarray], draws: int, reference,
                            dtype: torch.dtype = torch.float32):
    return _mean_change_against(name, severity, images, draws,
                                lambda image, s: _run_reference_fractional(reference, name, image, s), dtype)


# At 32 px only (96 px for the integer severities above): the same draws per severity.
@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM)
def test_random_fractional_matches_reference_in_distribution(name, reference, photos):
    draws = DRAWS.get(name, (3, 3))[1]
    for severity in FRACTIONAL:
        ours, ref = _mean_change_fractional(name, severity, photos[32], draws, reference)
        if ref < 2 / 255:
            # Nearly the identity: compare in float64. Glass blur at 0.25 (sigma 0.175, no pass)
            # is then only the floor of its first blur's uint8 round trip, and with neighbour
            # weights near 1e-7 which pixels lose a grey level depends on the precision.
            ours, ref = _mean_change_fractional(name, severity, photos[32], draws, reference, torch.float64)
        assert abs(ours / ref - 1) <= 0.15, (
            f"{name} severity {severity} at 32 px: mean change {ours:.4f} vs reference {ref:.4f}"
        )


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_seeded_per_sample(name):
    x = _synthetic(3, 32)
    x = torch.cat((x, x[:1]))
    ids = torch.tensor([7, 3, 11, 2**40 + 5])
    out = corrupt(x, name, 3, seed=5, ids=ids)
    assert torch.equal(out, corrupt(x, name, 3, seed=5, ids=ids))
    alone = corrupt(x[2:3], name, 3, seed=5, ids=ids[2:3])
    torch.testing.assert_close(alone, out[2:3], atol=1e-5, rtol=0)
    other_seed = corrupt(x, name, 3, seed=6, ids=ids)
    assert torch.equal(other_seed, out) == (name in DETERMINISTIC)
    if name not in DETERMINISTIC:
        # the same photograph under two ids gets two different draws
        assert not torch.equal(out[0], out[3])


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_float64_close_to_float32(name):
    x = _synthetic(3, 32)
    out32 = corrupt(x, name, 4, seed=1)
    out64 = corrupt(x.double(), name, 4, seed=1)
    assert out64.dtype == torch.float64
    assert float((out64 - out32.double()).abs().mean()) < 2e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_cuda_matches_cpu(name):
    x = _synthetic(3, 96)
    cpu = corrupt(x, name, 3, seed=2)
    cuda = corrupt(x.cuda(), name, 3, seed=2)
    assert cuda.is_cuda
    assert float((cuda.cpu() - cpu).abs().mean()) < 1e-4


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(x, "gaussian_nosie", 1)
    for severity in (-1, 6, 5.5, True, float("nan")):  # 0, 2.0 and 2.5 are valid (continuous severities)
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", severity)
    for bad in (x[0], x.permute(0, 2, 3, 1), x.numpy()):
        with pytest.raises(ValueError, match="shape"):
            corrupt(bad, "fog", 1)
    with pytest.raises(ValueError, match="needs RGB"):  # greyscale: every corruption but the RGB-only ones
        corrupt(x[:, :1], "frost", 1)
    with pytest.raises(ValueError, match="floating"):
        corrupt((x * 255).to(torch.uint8), "fog", 1)
    for bad in (x * 255, x - 0.5, torch.full_like(x, float("nan"))):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            corrupt(bad, "fog", 1)
    for ids in (torch.arange(3), torch.zeros(2), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="ids"):
            corrupt(x, "fog", 1, ids=ids)
