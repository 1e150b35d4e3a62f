"""The ImageNet-C corruptions in torch: batched, on any device, seeded per sample.

Reimplements the corruption functions of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019), in the version of the
``imagecorruptions`` package 1.1.2 (Michaelis et al., 2019), which adapts them to arbitrary image
sizes. Parameters per severity are those of that package, and every step follows its algorithm;
``tests/test_corruptions.py`` checks each corruption against it.

Everything is computed with batched torch ops on the images' device (no Python loop over samples;
loops run over a handful of kernel taps, zoom factors or fractal levels). Randomness comes from a
counter-based hash of (seed, corruption, severity, sample id, draw, element), so a sample gets the
same corruption whatever batch it is in, and CPU and CUDA agree up to float rounding.

Deviations from the reference, all of them deliberate:

* Random numbers come from the hash above, not from NumPy's global generator; the distributions
  are the same (Poisson counts for shot noise are sampled exactly, by inverse CDF).
* The reference quantises to uint8 after every corruption (and ``imagecorruptions.corrupt``
  truncates). Here the output stays float; the uint8 steps *inside* an algorithm (glass blur's
  first blur, the snow layer, the spatter distance map) are kept.
* Glass blur: the reference's pixel loop (a "swap" that, because of NumPy views, only copies the
  neighbour into the current pixel) is resolved exactly as a pointer chain and vectorised with
  pointer jumping: the same algorithm, not an approximation.
* Spatter (water, severities 1-3): OpenCV's Canny, chamfer distance transform, histogram
  equalisation and filters are re-implemented in torch. A draw without any liquid (a few percent
  of 32 px images at severity 1) leaves the image unchanged; the reference divides by zero there
  and returns NaN.
* Frost: the reference's textures ship in ``assets/frost`` (``frost3.png`` is pixel-identical to
  ``frost2.png`` and is stored once); as in the reference, the sixth texture is never drawn.
* Elastic transform follows ``imagecorruptions`` 1.1.2, which (unlike the original ImageNet-C
  code) has no random affine step: a Gaussian-smoothed random displacement field only.
* JPEG: libjpeg through ``torchvision.io`` (the same codec PIL uses, so the same images), on the
  CPU also for CUDA inputs (see ``_jpeg_compression``).
* Pixelate: the same PIL box/nearest geometry (including how PIL's accumulated coordinates break
  ties, see ``_pil_box_matrix`` and ``_pil_nearest_index``; before, the rounding of exact ties
  differed from PIL's at some sizes, e.g. 28, 160, 299 and 320 px), without PIL's intermediate
  uint8 rounding.

Continuous severities: ``severity`` may be any real number in [0, 5], as in the continually
changing corruptions of CCC (Press et al., "RDumb: A simple approach that questions our progress in
continual test-time adaptation", NeurIPS 2023; reference oripress/CCC@656dec3,
``make_imagenet_c.py``). The integers 1..5 (also written ``2.0`` or as NumPy scalars) run with the
integer table and random keys as before; 0 returns the images unchanged (CCC skips a corruption at severity
0, ``generate.py`` L405-412). A fractional severity ``s`` interpolates each parameter linearly
between the anchors at ``floor(s)`` and ``floor(s) + 1`` with the arithmetic of
``scipy.interpolate.interp1d(kind="linear")`` that the reference uses (``(high - low) * t + low``
in float64; :func:`corruption_parameters`), then converts it as the reference does. Anchors 1..5
are the integer table; the severity-0 anchors and conversions are the reference's (line numbers
in ``make_imagenet_c.py``):

* gaussian noise 0 (L188), impulse noise 0 (L234), brightness 0 (L537), contrast 1 (L522),
  pixelate 1 (L573; the size is then ``int(H * c)``, as at the integers), frost (1, 0) (L435; the
  texture drawn among the first five, L446), fog (0, 2) (L416).
* shot noise: interpolated in 1/photons, anchors (0, 1/60, 1/25, 1/12, 1/5, 1/3), photons =
  1 / value (L206-225).
* defocus blur (0, 0) (L332): the disk's radius is fractional; above 8 its coordinates are
  ``np.arange(-r, r + 1)`` (L78-90), an even count for some radii, placed as ``cv2.filter2D``
  places an even kernel (see ``_disk_kernel``).
* glass blur (0, 0, 0) (L300-308): the radius is clamped to >= 1 (L318-319), then radius and
  passes are rounded half to even (``round`` in the numba loop, L287-290).
* motion blur (0, 0) (L357), snow (0.1, 0.3, 3, 1.0, 10, 4, 1.0) (L471-478): the reference's
  ImageMagick motion blur takes a fractional radius and uses ``2 * ceil(radius) + 1`` taps
  (``GetOptimalKernelWidth1D``, MagickCore/gem.c); so does ``_motion_blur``.
* zoom blur (start, stop, step) = (1, 1, 0.01) (L385-392), the factors ``np.arange`` of the
  interpolated triple (L401), with its float end-point behaviour.
* JPEG quality 85 (L555), rounded half to even (``round``, L562).
* Deviation, elastic transform: CCC interpolates the original ImageNet-C parameters (alpha, sigma,
  affine; L585-600); this module follows imagecorruptions 1.1.2 (one displacement scale alpha,
  no affine step), so alpha is interpolated between 0 (CCC's severity-0 alpha) and its anchors.
* Not in CCC (the four held-out corruptions), anchors chosen here so that severity 0 changes
  nothing: speckle noise 0, Gaussian blur 0, saturate (1, 0) (the interpolated factor passes
  through 1, the identity, again near severity 2.47: the table goes from 0.1 at 2 to 2 at 3),
  spatter (0.65, 0.3, 4, 0.69, 0, 0): severity 1's water at intensity 0. The mud flag is
  interpolated too and, as the original code tests ``c[5] == 0``, every severity above 3 is mud.

Where a parameter is rounded or counted (JPEG quality, glass blur's radius and passes, the
number of zoom factors, pixelate's size, the defocus disk's pixels, snow's zoom crop) the images
change in steps between the anchors, as in the reference. Just above 0 some corruptions are not
near the identity, as in the reference: JPEG at quality 85 - 60 s, glass blur's uint8 round trip,
pixelate's one-pixel shrink. Random draws for a fractional severity are keyed by its float64 bit
pattern (integer severities keep their keys), so they stay a pure function of (seed, id, name,
severity). The interpolation runs on the host, once per (name, severity).

Channels: the reference turns every image into RGB first. Here the corruptions that treat the
channels alike (every noise, every blur, fog, contrast, elastic transform, pixelate) take any number
of channels, so a greyscale stream is corrupted as greyscale; JPEG takes 1 or 3 (what the codec
encodes). Five need RGB (:data:`RGB_CORRUPTIONS`): ``snow`` (a greyscale conversion of RGB),
``frost`` (RGB textures), ``brightness`` and ``saturate`` (HSV), ``spatter`` (coloured water and
mud); other channel counts raise a ``ValueError`` that names them (convert first, e.g. with
``tta.data.channels.convert_channels(images, 3)``, as the reference does).
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import struct
import warnings
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "ALL_CORRUPTIONS", "RGB_CORRUPTIONS", "corrupt", "corruption_parameters",
           "severity_anchors", "supports_channels"]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
"""The 15 ImageNet-C benchmark corruptions, in the usual order."""

EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""The four held-out ("validation") corruptions of ImageNet-C."""

ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS

RGB_CORRUPTIONS: tuple[str, ...] = ("snow", "frost", "brightness", "saturate", "spatter")
"""Corruptions defined on RGB only (colour-space conversions, RGB textures or colours)."""

_JPEG_CHANNELS = (1, 3)

_INPUT_TOLERANCE = 1e-3
_FROST_DIR = Path(__file__).resolve().parent / "assets" / "frost"
# The reference draws one of its first five textures; frost3.png equals frost2.png.
_FROST_FILES = ("frost1.png", "frost2.png", "frost2.png", "frost4.jpg", "frost5.jpg")

# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (integer hashing in int64 tensors, exact on every device)
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _hash32(h):
    """A 32-bit integer mixer (xorshift-multiply, Wellons' "lowbias32" constants) on Python ints
    or int64 tensors holding values in [0, 2**32). Both multipliers are below 2**31, so no
    product overflows int64."""
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & _MASK32
    return h ^ (h >> 15)


def _combine(h, value):
    """Hash ``value`` into the 32-bit state ``h``."""
    return _hash32(h ^ _hash32((value + _GOLDEN32) & _MASK32))


def _severity_key(state: int, severity: "int | float") -> int:
    """Hash a severity into ``state``: an integer severity as itself (the keys of the integer
    table), a fractional one as a tag and the two 32-bit halves of its float64 bit pattern."""
    if isinstance(severity, int):
        return _combine(state, severity)
    bits = struct.unpack("<Q", struct.pack("<d", severity))[0]
    return _combine(_combine(_combine(state, _FRACTIONAL_TAG), bits & _MASK32), bits >> 32)


_FRACTIONAL_TAG = 0x46524143  # "FRAC"


class _SampleRng:
    """Independent streams of uniforms / normals per sample, keyed by (seed, name, severity, id)."""

    def __init__(self, seed: int, name: str, severity: "int | float", ids: Tensor) -> None:
        state = _combine(seed & _MASK32, (seed >> 32) & _MASK32)
        state = _severity_key(_combine(state, zlib.crc32(name.encode())), severity)
        ids = ids.to(torch.int64)
        self.keys = _combine(_combine(state, ids & _MASK32), (ids >> 32) & _MASK32)

    def uniform(self, shape: Sequence[int], stream: int) -> Tensor:
        """Float32 uniforms in (0, 1) of shape ``(N, *shape)``; each ``stream`` is independent."""
        stream_keys = _combine(self.keys, stream)[:, None]
        count = math.prod(shape)
        index = torch.arange(count, device=self.keys.device, dtype=torch.int64)[None]
        bits = _hash32(_hash32((stream_keys + index * _GOLDEN32) & _MASK32) ^ stream_keys)
        # 23 random bits centred in their bin: exact in float32, never 0 or 1.
        uniform = ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23
        return uniform.view(-1, *shape)

    def normal(self, shape: Sequence[int], stream: int) -> Tensor:
        """Float32 standard normals of shape ``(N, *shape)`` (Box-Muller, both outputs used)."""
        count = math.prod(shape)
        u = self.uniform((2, (count + 1) // 2), stream)
        radius = torch.sqrt(-2.0 * torch.log(u[:, 0]))
        angle = 2.0 * math.pi * u[:, 1]
        normals = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)), 1)
        return normals[:, :count].reshape(-1, *shape)

    def integers(self, low: int, high, shape: Sequence[int], stream: int) -> Tensor:
        """Integers in ``[low, high)`` (NumPy's ``randint``) of shape ``(N, *shape)``; ``high`` may
        be a per-sample tensor (N,)."""
        u = self.uniform(shape, stream).to(torch.float64)
        if isinstance(high, Tensor):
            high = high.view(-1, *([1] * len(shape)))
        return (low + torch.floor(u * (high - low))).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# Filtering and resampling helpers (images are (N, C, H, W))
# ---------------------------------------------------------------------------------------------


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    """Source indices of a border of ``pad`` pixels on each side, for any ``pad``.

    ``replicate`` = scipy 'nearest'; ``reflect101`` = OpenCV's default (scipy 'mirror');
    ``symmetric`` = scipy 'reflect' (the edge pixel is repeated).
    """
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect101":
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i >= n, period - i, i)
    period = 2 * n
    i = i.remainder(period)
    return torch.where(i >= n, period - 1 - i, i)


def _pad(x: Tensor, pad_h: int, pad_w: int, mode: str) -> Tensor:
    rows = _pad_index(x.shape[-2], pad_h, mode, x.device)
    cols = _pad_index(x.shape[-1], pad_w, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _filter2d(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel with an odd-sized 2-D ``kernel`` (like ``cv2.filter2D``)."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    padded = _pad(x.reshape(n * c, 1, h, w), kh // 2, kw // 2, mode)
    out = F.conv2d(padded, kernel.to(x)[None, None])
    return out.view(n, c, h, w)


def _filter_separable(x: Tensor, k_rows: Tensor, k_cols: Tensor, mode: str) -> Tensor:
    """Correlate every channel with ``k_rows`` along H, then ``k_cols`` along W (odd sizes)."""
    n, c, h, w = x.shape
    padded = _pad(x.reshape(n * c, 1, h, w), k_rows.numel() // 2, k_cols.numel() // 2, mode)
    out = F.conv2d(padded, k_rows.to(x).view(1, 1, -1, 1))
    out = F.conv2d(out, k_cols.to(x).view(1, 1, 1, -1))
    return out.view(n, c, h, w)


def _gaussian_kernel1d(sigma: float, truncate: float) -> Tensor:
    """scipy.ndimage's Gaussian kernel: radius ``int(truncate * sigma + 0.5)``, unit sum."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return torch.ones(1, dtype=torch.float64)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _gaussian_blur(x: Tensor, sigma, mode: str = "replicate", truncate: float = 4.0) -> Tensor:
    """``skimage.filters.gaussian`` per channel; ``sigma`` is a number or ``(sigma_h, sigma_w)``."""
    sigma_h, sigma_w = (sigma, sigma) if np.isscalar(sigma) else sigma
    return _filter_separable(
        x, _gaussian_kernel1d(sigma_h, truncate), _gaussian_kernel1d(sigma_w, truncate), mode
    )


def _box_blur3(x: Tensor) -> Tensor:
    """``cv2.blur(x, (3, 3))`` (3x3 mean, reflect-101 border), as an exact sum divided by 9."""
    ones = torch.ones(3, dtype=torch.float64)
    return _filter_separable(x, ones, ones, "reflect101") / 9


def _clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """Zoom into the centre by ``zoom`` and crop to the input size (the reference's
    ``clipped_zoom``: ``scipy.ndimage.zoom`` with order 1 = bilinear with aligned corners).
    The result may be larger than the input; callers crop ``[:H, :W]``."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    size = (int(round(ch * zoom)), int(round(cw * zoom)))
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)


def _shift_clamped(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Edge-replicating shift: ``out[n, :, i, j] = x[n, :, clamp(i - dy[n]), clamp(j - dx[n])]``."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None] - dy[:, None]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None] - dx[:, None]).clamp(0, w - 1)
    out = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _motion_blur(x: Tensor, radius: float, sigma: float, angle_deg: Tensor) -> Tensor:
    """The reference's ``_motion_blur``: a one-sided Gaussian-weighted line of edge-replicated
    shifted copies, one angle per sample; taps stop (without renormalising) once a shift leaves
    the image. The width is ImageMagick's for a positive radius, ``2 * ceil(radius) + 1``
    (``GetOptimalKernelWidth1D``, MagickCore/gem.c), which a fractional radius needs."""
    width = 2 * math.ceil(radius) + 1
    taps = torch.arange(width, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).tolist()
    angle = torch.deg2rad(angle_deg.to(torch.float64))
    sin, cos = torch.sin(angle), torch.cos(angle)
    h, w = x.shape[-2:]
    alive = torch.ones_like(sin, dtype=torch.bool)
    out = torch.zeros_like(x)
    for i in range(width):
        dy = -torch.ceil(i * sin - 0.5).to(torch.int64)
        dx = -torch.ceil(i * cos - 0.5).to(torch.int64)
        alive = alive & (dy.abs() < h) & (dx.abs() < w)
        weight = alive.to(x.dtype).view(-1, 1, 1, 1) * kernel[i]
        out = out + weight * _shift_clamped(x, dy, dx)
    return out


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """``skimage.color.rgb2hsv`` on (N, 3, H, W): the same hue priorities and zero conventions."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    s = torch.where(delta == 0, torch.zeros_like(v), delta / torch.where(v == 0, 1.0, v))
    h = torch.where(r == v, (g - b) / safe, torch.zeros_like(v))
    h = torch.where(g == v, 2.0 + (b - r) / safe, h)
    h = torch.where(b == v, 4.0 + (r - g) / safe, h)
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0).remainder(1.0))
    return torch.stack((h, s, v), 1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    """``skimage.color.hsv2rgb`` on (N, 3, H, W)."""
    h, s, v = hsv.unbind(1)
    sector = torch.floor(h * 6)
    f = h * 6 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = torch.stack([
        torch.stack(rgb, 1)
        for rgb in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    ])
    index = sector.to(torch.int64).remainder(6)[None, :, None].expand(1, *hsv.shape)
    return choices.gather(0, index)[0]


def _gray(x: Tensor) -> Tensor:
    """``cv2.cvtColor(RGB2GRAY)`` on float images, keeping a channel dimension."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return torch.einsum("nchw,c->nhw", x, weights)[:, None]


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


def _gaussian_noise(x: Tensor, c: float, rng: _SampleRng) -> Tensor:
    return x + rng.normal(x.shape[1:], 0).to(x) * c


def _poisson(lam: Tensor, u: Tensor, max_count: int) -> Tensor:
    """Exact Poisson(``lam``) by inverse CDF: the smallest k with ``P(K <= k) >= u``, found by
    bisection on ``P(K <= k) = Q(k + 1, lam)`` (regularised upper incomplete gamma)."""
    lo = torch.full_like(lam, -1.0)
    hi = torch.full_like(lam, float(max_count))
    for _ in range(max(1, (max_count + 1).bit_length())):
        mid = torch.floor((lo + hi) / 2)
        above = torch.special.gammaincc(mid + 1, lam) >= u
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return hi


def _shot_noise(x: Tensor, c: float, rng: _SampleRng) -> Tensor:
    max_count = int(c + 12 * math.sqrt(c) + 20)  # P(K > max_count) < 1e-20 for lam <= c
    return _poisson(x * c, rng.uniform(x.shape[1:], 0).to(x), max_count) / c


def _impulse_noise(x: Tensor, amount: float, rng: _SampleRng) -> Tensor:
    """``skimage.util.random_noise(mode='s&p')``: each value is replaced with probability
    ``amount`` by 0 or 1 (equally likely)."""
    flipped = rng.uniform(x.shape[1:], 0).to(x) <= amount
    salted = rng.uniform(x.shape[1:], 1).to(x) <= 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


def _speckle_noise(x: Tensor, c: float, rng: _SampleRng) -> Tensor:
    return x + x * rng.normal(x.shape[1:], 0).to(x) * c


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def _disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The reference's anti-aliased disk: a normalised binary disk (at least 17x17) blurred by
    ``cv2.GaussianBlur`` with a 3x3 (radius <= 8) or 5x5 kernel and reflect-101 borders.

    A fractional radius above 8 (continuous severities) gives the reference's coordinates
    ``np.arange(-radius, radius + 1)``, possibly an even count: ``cv2.filter2D`` then anchors the
    kernel at index ``size // 2``, which a zero row and column appended at the end reproduce
    with an odd kernel."""
    half, ksize = (8, 3) if radius <= 8 else (radius, 5)
    coords = torch.from_numpy(np.arange(-half, half + 1, dtype=np.float64))
    disk = ((coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2).to(torch.float64)
    disk = disk / disk.sum()
    g = torch.exp(-((torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2) ** 2)
                  / (2 * alias_blur**2))
    g = g / g.sum()
    kernel = _filter_separable(disk[None, None], g, g, "reflect101")[0, 0]
    if kernel.shape[0] % 2 == 0:
        kernel = F.pad(kernel, (0, 1, 0, 1))
    return kernel


def _defocus_blur(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    radius, alias_blur = c
    return _filter2d(x, _disk_kernel(radius, alias_blur), "reflect101")


def _gaussian_blur_corruption(x: Tensor, sigma: float, rng: _SampleRng) -> Tensor:
    return _gaussian_blur(x, sigma)


def _glass_blur(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    sigma, max_delta, iterations = c
    n, ch, h, w = x.shape
    x = torch.floor(_gaussian_blur(x, sigma) * 255) / 255  # the reference's uint8 round trip
    flat = x.reshape(n, ch, h * w)
    for it in range(iterations):
        deltas = rng.integers(-max_delta, max_delta, (2, h, w), stream=it)
        src = _glass_pass_sources(deltas, max_delta)
        flat = flat.gather(2, src[:, None].expand(n, ch, h * w))
    return _gaussian_blur(flat.view(n, ch, h, w), sigma)


def _glass_pass_sources(deltas: Tensor, max_delta: int) -> Tensor:
    """Flat source index of every pixel after one pass of the reference's pixel loop.

    The loop visits (i, j) for i = H-d .. d+1 and j = W-d .. d+1 in decreasing raster order and
    runs ``x[i, j], x[i', j'] = x[i', j'], x[i, j]`` with (i', j') = (i + dy, j + dx). On NumPy
    views that statement *copies* x[i', j'] into x[i, j] and leaves x[i', j'] unchanged. Hence
    pixel p ends with the final value of q = p + delta if q was visited before p (q inside the
    loop's range and later in raster order), and with the original x[q] otherwise. Following
    these pointers by pointer jumping yields the whole pass at once, exactly.
    """
    n, _, h, w = deltas.shape
    d = max_delta
    device = deltas.device
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)

    def visited(r, c):
        return (r > d) & (r <= h - d) & (c > d) & (c <= w - d)

    here = (rows * w + cols).expand(n, h, w)
    active = visited(rows, cols).expand(n, h, w)
    target_rows, target_cols = rows + deltas[:, 0], cols + deltas[:, 1]
    target = torch.where(active, target_rows * w + target_cols, here)
    follows = active & visited(target_rows, target_cols) & (target > here)
    parent = torch.where(follows, target, here).view(n, -1)
    source = target.reshape(n, -1)
    for _ in range(max(1, (h * w).bit_length())):
        parent = parent.gather(1, parent)
    return source.gather(1, parent)


def _motion_blur_corruption(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    radius, sigma = c
    angle = rng.uniform((), 0).to(torch.float64) * 90 - 45
    return _motion_blur(x, radius, sigma, angle)


def _zoom_blur(x: Tensor, zooms: tuple, rng: _SampleRng) -> Tensor:
    h, w = x.shape[-2:]
    out = x.clone()
    for zoom in zooms:
        out = out + _clipped_zoom(x, zoom)[..., :h, :w]
    return out / (len(zooms) + 1)


# ---------------------------------------------------------------------------------------------
# Weather
# ---------------------------------------------------------------------------------------------


def _snow(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    loc, scale, zoom, threshold, radius, sigma, blend = c
    h, w = x.shape[-2:]
    layer = rng.normal((1, h, w), 0).to(x) * scale + loc
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    angle = rng.uniform((), 1).to(torch.float64) * 90 - 135
    layer = _motion_blur(layer, radius, sigma, angle)
    layer = torch.round(layer * 255)[..., :h, :w] / 255  # the reference rounds to uint8
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


@contextlib.contextmanager
def _torchvision_codecs():
    """Silence torchvision >= 0.29's per-call deprecation notice for its image codecs (TorchCodec
    is their successor); they still work as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*image decoding and encoding",
                                category=DeprecationWarning)
        yield


@functools.lru_cache(maxsize=None)
def _frost_images() -> tuple[Tensor, ...]:
    from torchvision.io import ImageReadMode, decode_image, read_file

    with _torchvision_codecs():
        return tuple(
            decode_image(read_file(str(_FROST_DIR / name)), mode=ImageReadMode.RGB)
            for name in _FROST_FILES
        )


@functools.lru_cache(maxsize=8)
def _frost_textures_cpu(h: int, w: int) -> tuple[Tensor, Tensor]:
    """The frost textures rescaled as the reference does for an ``h x w`` image (to cover it,
    times 1.1, bicubic, uint8), zero-padded into one float64 ``(5, 3, Hmax, Wmax)`` stack in
    [0, 1], plus their sizes ``(5, 2)``."""
    textures = []
    for image in _frost_images():
        fh, fw = image.shape[-2:]
        if fh >= h and fw >= w:
            scale = 1.0
        elif fw >= w:
            scale = h / fh
        elif fh >= h:
            scale = w / fw
        else:
            scale = max(h / fh, w / fw)
        size = (math.ceil(fh * scale * 1.1), math.ceil(fw * scale * 1.1))
        resized = F.interpolate(image[None].to(torch.float64), size=size, mode="bicubic",
                                align_corners=False)
        textures.append(resized[0].round().clamp(0, 255) / 255)
    sizes = torch.tensor([t.shape[-2:] for t in textures])
    stack = torch.zeros(len(textures), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()),
                        dtype=torch.float64)
    for i, texture in enumerate(textures):
        stack[i, :, : texture.shape[1], : texture.shape[2]] = texture
    return stack, sizes


@functools.lru_cache(maxsize=8)
def _frost_textures(h: int, w: int, device: torch.device, dtype: torch.dtype):
    stack, sizes = _frost_textures_cpu(h, w)
    return stack.to(device=device, dtype=dtype), sizes.to(device)


def _frost(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    image_weight, frost_weight = c
    h, w = x.shape[-2:]
    stack, sizes = _frost_textures(h, w, x.device, x.dtype)
    choice = rng.integers(0, len(_FROST_FILES), (), stream=0)
    top = rng.integers(0, sizes[choice, 0] - h, (), stream=1)
    left = rng.integers(0, sizes[choice, 1] - w, (), stream=2)
    rows = top[:, None, None] + torch.arange(h, device=x.device)[None, :, None]
    cols = left[:, None, None] + torch.arange(w, device=x.device)[None, None, :]
    frost = stack[choice[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return image_weight * x + frost_weight * frost


def _plasma_fractal(rng: _SampleRng, map_size: int, decay: float, dtype: torch.dtype) -> Tensor:
    """Diamond-square height maps in [0, 1], shape (N, map_size, map_size), as the reference's
    ``plasma_fractal`` (same recursion, wrap-around neighbours, ``wibble`` schedule)."""
    n = rng.keys.shape[0]
    maps = torch.zeros(n, map_size, map_size, dtype=dtype, device=rng.keys.device)
    step, wibble, level = map_size, 100.0, 0

    def wibbled_mean(total: Tensor, stream: int) -> Tensor:
        noise = rng.uniform(total.shape[1:], stream).to(dtype) * (2 * wibble) - wibble
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        maps[:, half::step, half::step] = wibbled_mean(squares, 3 * level)
        centres = maps[:, half::step, half::step]
        corners = maps[:, ::step, ::step]
        left = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        maps[:, ::step, half::step] = wibbled_mean(left, 3 * level + 1)
        top = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        maps[:, half::step, ::step] = wibbled_mean(top, 3 * level + 2)
        step, wibble, level = half, wibble / decay, level + 1
    maps = maps - maps.amin((1, 2), keepdim=True)
    return maps / maps.amax((1, 2), keepdim=True)


def _fog(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    strength, decay = c
    h, w = x.shape[-2:]
    map_size = 1 << (max(h, w, 3) - 1).bit_length()
    max_val = x.amax((1, 2, 3), keepdim=True)
    fog = _plasma_fractal(rng, map_size, decay, x.dtype)[:, None, :h, :w]
    return (x + strength * fog) * max_val / (max_val + strength)


def _spatter(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    loc, scale, sigma, threshold, intensity, mud = c
    h, w = x.shape[-2:]
    liquid = _gaussian_blur(rng.normal((1, h, w), 0).to(x) * scale + loc, sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if mud:
        mask = _gaussian_blur((liquid > threshold).to(x.dtype), intensity)
        mask = torch.where(mask < 0.8, torch.zeros_like(mask), mask)
        color = torch.tensor([63, 42, 20], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * (1 - mask) + color / 255 * mask
    liquid = torch.floor(liquid * 255)
    m = liquid * _water_texture(liquid)
    m = m / m.amax((2, 3), keepdim=True).clamp_min(1e-12) * intensity
    color = torch.tensor([175, 238, 238], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x + m * color / 255


def _water_texture(liquid: Tensor) -> Tensor:
    """The reference's water-drop shading from a uint8-valued liquid layer (N, 1, H, W):
    distance to the Canny edges (capped at 20), blurred, histogram-equalised, embossed, blurred."""
    edges = _canny(liquid, low=50, high=150)
    dist = torch.floor(_box_blur3(_edge_distance(edges, cap=20).to(liquid.dtype)))
    dist = _equalize_hist(dist)
    emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=liquid.dtype)
    dist = _filter2d(dist, emboss, "reflect101").clamp(0, 255)
    return torch.round(_box_blur3(dist))


def _canny(image: Tensor, low: float, high: float) -> Tensor:
    """``cv2.Canny(image, low, high)`` (3x3 Sobel, L1 magnitude, 4-sector non-maximum
    suppression, 8-connected hysteresis) on (N, 1, H, W) uint8-valued images; a bool edge map."""
    sobel = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=image.dtype)
    gx = _filter2d(image, sobel, "replicate")
    gy = _filter2d(image, sobel.T.contiguous(), "replicate")
    mag = gx.abs() + gy.abs()
    padded = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image count as 0

    def neighbour(di: int, dj) -> Tensor:
        h, w = mag.shape[-2:]
        if isinstance(dj, int):
            return padded[..., 1 + di:1 + di + h, 1 + dj:1 + dj + w]
        left = padded[..., 1 + di:1 + di + h, 0:w]
        right = padded[..., 1 + di:1 + di + h, 2:2 + w]
        return torch.where(dj < 0, left, right)

    tan22 = math.tan(math.pi / 8)
    ax, ay = gx.abs(), gy.abs()
    horizontal = ay < tan22 * ax
    vertical = ay > (tan22 + 2) * ax
    sign = torch.where((gx < 0) != (gy < 0), -1, 1)
    keep_h = (mag > neighbour(0, -1)) & (mag >= neighbour(0, 1))
    keep_v = (mag > neighbour(-1, 0)) & (mag >= neighbour(1, 0))
    keep_d = (mag > neighbour(-1, -sign)) & (mag > neighbour(1, sign))
    keep = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    candidate = keep & (mag > low)
    edges = candidate & (mag > high)
    while True:
        grown = candidate & (F.max_pool2d(edges.to(image.dtype), 3, 1, 1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


# OpenCV's 5x5 chamfer metric for DIST_L2 (steps 1, 1.4, 2.1969) in its 16-bit fixed point.
_CHAMFER_STEPS = tuple(
    (dy, dx, round({1: 1.0, 2: 1.4, 5: 2.1969}[dy * dy + dx * dx] * 65536) / 65536)
    for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx in (1, 2, 5)
)


def _edge_distance(edges: Tensor, cap: int) -> Tensor:
    """``cv2.distanceTransform(DIST_L2, 5)`` to the nearest edge pixel, truncated at ``cap``:
    shortest paths over the chamfer steps, relaxed ``cap`` times (every step costs >= 1)."""
    h, w = edges.shape[-2:]
    far = float(2 * cap)
    dist = torch.where(edges, 0.0, far).to(torch.float32)
    for _ in range(cap):
        padded = F.pad(dist, (2, 2, 2, 2), value=far)
        for dy, dx, step in _CHAMFER_STEPS:
            dist = torch.minimum(dist, padded[..., 2 + dy:2 + dy + h, 2 + dx:2 + dx + w] + step)
    return dist.clamp_max(cap)


def _equalize_hist(image: Tensor) -> Tensor:
    """``cv2.equalizeHist`` per image on (N, 1, H, W) uint8-valued tensors."""
    n = image.shape[0]
    values = image.reshape(n, -1).to(torch.int64)
    hist = torch.zeros(n, 256, dtype=torch.float64, device=image.device)
    hist.scatter_add_(1, values, torch.ones_like(values, dtype=torch.float64))
    cdf = hist.cumsum(1)
    total = values.shape[1]
    first = hist.gather(1, values.amin(1, keepdim=True))
    scale = 255.0 / (total - first).clamp_min(1)
    lut = torch.round((cdf - first) * scale).clamp(0, 255)
    lut = torch.where(first == total, torch.arange(256, device=image.device, dtype=lut.dtype), lut)
    return lut.gather(1, values).to(image.dtype).view_as(image)


# ---------------------------------------------------------------------------------------------
# Digital
# ---------------------------------------------------------------------------------------------


def _brightness(x: Tensor, c: float, rng: _SampleRng) -> Tensor:
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack((hsv[:, 0], hsv[:, 1], (hsv[:, 2] + c).clamp(0, 1)), 1)
    return _hsv_to_rgb(hsv)


def _saturate(x: Tensor, c: tuple, rng: _SampleRng) -> Tensor:
    factor, offset = c
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack((hsv[:, 0], (hsv[:, 1] * factor + offset).clamp(0, 1), hsv[:, 2]), 1)
    return _hsv_to_rgb(hsv)


def _contrast(x: Tensor, c: float, rng: _SampleRng) -> Tensor:
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * c + means


def _elastic_transform(x: Tensor, alpha: float, rng: _SampleRng) -> Tensor:
    h, w = x.shape[-2:]
    max_shift = h * 0.005  # the reference uses the height for both directions
    sigma = (h * 0.01, w * 0.01)
    noise = rng.uniform((2, h, w), 0).to(x) * (2 * max_shift) - max_shift
    shift = _gaussian_blur(noise, sigma, mode="symmetric", truncate=3) * alpha
    # scipy map_coordinates(order=1, mode='reflect') == grid_sample(bilinear, reflection)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[:, None]
    grid_x = (cols + shift[:, 1] + 0.5) * (2 / w) - 1
    grid_y = (rows + shift[:, 0] + 0.5) * (2 / h) - 1
    grid = torch.stack((grid_x, grid_y), -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _pil_box_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) averaging matrix of PIL's BOX downsampling: input pixel i belongs to
    output o when its centre ``i + 0.5`` lies in ``(o * s, (o + 1) * s]``, ``s = n_in / n_out``.
    Computed with the float operations of PIL's ``precompute_coeffs`` (the window
    ``[int(c - s/2 + 0.5), int(c + s/2 + 0.5))`` around the centre ``c = (o + 0.5) * s``, the box
    test on ``(i - c + 0.5) / s``), so that an exact tie goes where PIL's rounding sends it."""
    return _pil_box_matrix_cpu(n_in, n_out).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _pil_box_matrix_cpu(n_in: int, n_out: int) -> Tensor:
    scale = n_in / n_out
    support, step = 0.5 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    stop = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    pixels = np.arange(n_in)
    t = ((pixels[None] - centre[:, None]) + 0.5) * step
    inside = (pixels[None] >= first[:, None]) & (pixels[None] < stop[:, None]) & (t > -0.5) & (t <= 0.5)
    matrix = inside.astype(np.float64)
    return torch.from_numpy(matrix / np.maximum(matrix.sum(1, keepdims=True), 1.0))


def _pixelate(x: Tensor, c: float, rng: _SampleRng) -> Tensor:
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * c)), max(1, int(w * c))
    rows = _pil_box_matrix(h, small_h, x.device, x.dtype)
    cols = _pil_box_matrix(w, small_w, x.device, x.dtype)
    small = rows @ x @ cols.T
    up_rows = _pil_nearest_index(h, small_h).to(x.device)
    up_cols = _pil_nearest_index(w, small_w).to(x.device)
    return small.index_select(2, up_rows).index_select(3, up_cols)


@functools.lru_cache(maxsize=64)
def _pil_nearest_index(n_out: int, n_in: int) -> Tensor:
    """Source index of each output pixel of PIL's NEAREST resize from ``n_in`` to ``n_out`` pixels:
    ``int(x)`` of the coordinate ``x`` that PIL's ``ImagingScaleAffine`` accumulates, starting at
    ``step / 2`` and adding ``step = n_in / n_out`` once per pixel. Mathematically
    ``floor((o + 0.5) * n_in / n_out)``; the accumulated rounding decides the ties (an integer
    coordinate), which exist at some sizes (28, 160, 299, 320 px at integer severities; 224 px
    at severity 4.25)."""
    step = n_in / n_out
    coordinates = np.cumsum(np.concatenate(([step * 0.5], np.full(n_out - 1, step))))
    return torch.from_numpy(coordinates.astype(np.int64))


def _jpeg_compression(x: Tensor, quality: int, rng: _SampleRng) -> Tensor:
    """libjpeg on the CPU for every input device: torchvision's nvJPEG encoder uses 4:4:4 chroma
    sampling where libjpeg and PIL (the reference) use 4:2:0, a visibly stronger corruption, and
    nvJPEG's decoder differs from libjpeg's by up to 39/255. The encoder, not the transfer, is
    the bottleneck either way."""
    from torchvision.io import decode_jpeg, encode_jpeg

    pixels = torch.round(x * 255).clamp(0, 255).to(device="cpu", dtype=torch.uint8)
    with _torchvision_codecs():
        decoded = decode_jpeg(encode_jpeg(list(pixels.unbind(0)), quality=quality))
    return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255


# ---------------------------------------------------------------------------------------------
# Registry and public entry point
# ---------------------------------------------------------------------------------------------


def _zoom_factors(start: float, stop: float, step: float) -> tuple:
    """The reference's ``np.arange`` zoom factors (including its float end-point quirk)."""
    return tuple(float(z) for z in np.arange(start, stop, step))


_CorruptionFn = Callable[[Tensor, object, _SampleRng], Tensor]

# zoom blur's (start, stop, step) of np.arange per severity 1..5, imagecorruptions 1.1.2
_ZOOM_RANGES = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))

# name -> (function, parameters for severities 1..5), parameters from imagecorruptions 1.1.2
_REGISTRY: dict[str, tuple[_CorruptionFn, tuple]] = {
    "gaussian_noise": (_gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": (_shot_noise, (60, 25, 12, 5, 3)),
    "impulse_noise": (_impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27)),
    "defocus_blur": (_defocus_blur, ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "glass_blur": (_glass_blur, ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))),
    "motion_blur": (_motion_blur_corruption, ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
    "zoom_blur": (_zoom_blur, tuple(_zoom_factors(*zoom) for zoom in _ZOOM_RANGES)),
    "snow": (_snow, (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )),
    "frost": (_frost, ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))),
    "fog": (_fog, ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))),
    "brightness": (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": (_contrast, (0.4, 0.3, 0.2, 0.1, 0.05)),
    "elastic_transform": (_elastic_transform, (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1,
                                               250 * 0.12)),
    "pixelate": (_pixelate, (0.6, 0.5, 0.4, 0.3, 0.25)),
    "jpeg_compression": (_jpeg_compression, (25, 18, 15, 10, 7)),
    "speckle_noise": (_speckle_noise, (0.15, 0.2, 0.35, 0.45, 0.6)),
    "gaussian_blur": (_gaussian_blur_corruption, (1, 2, 3, 4, 6)),
    "spatter": (_spatter, (
        (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1),
    )),
    "saturate": (_saturate, ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))),
}


# ---------------------------------------------------------------------------------------------
# Continuous severities (see the module docstring, "Continuous severities")
# ---------------------------------------------------------------------------------------------


def _glass_parameters(c: tuple) -> tuple:
    sigma, max_delta, iterations = c
    return sigma, round(max(max_delta, 1.0)), round(iterations)


# name -> (severity-0 anchor, the table value -> the interpolated quantity, interpolated -> parameter)
_CONTINUOUS: dict[str, tuple[object, Optional[Callable], Optional[Callable]]] = {
    "gaussian_noise": (0.0, None, None),
    "shot_noise": (0.0, lambda photons: float(1) / photons, lambda inverse: float(1) / inverse),
    "impulse_noise": (0.0, None, None),
    "defocus_blur": ((0.0, 0.0), None, None),
    "glass_blur": ((0.0, 0.0, 0.0), None, _glass_parameters),
    "motion_blur": ((0.0, 0.0), None, None),
    "zoom_blur": ((1.0, 1.0, 0.01), None, lambda c: _zoom_factors(*c)),
    "snow": ((0.1, 0.3, 3, 1.0, 10, 4, 1.0), None, None),
    "frost": ((1.0, 0.0), None, None),
    "fog": ((0.0, 2.0), None, None),
    "brightness": (0.0, None, None),
    "contrast": (1.0, None, None),
    "elastic_transform": (0.0, None, None),
    "pixelate": (1.0, None, None),
    "jpeg_compression": (85, None, round),
    "speckle_noise": (0.0, None, None),
    "gaussian_blur": (0.0, None, None),
    "spatter": ((0.65, 0.3, 4, 0.69, 0.0, 0), None, None),
    "saturate": ((1.0, 0.0), None, None),
}


def severity_anchors(name: str) -> tuple:
    """The six values, severities 0..5, that a fractional severity of ``name`` interpolates
    between (numbers or tuples; shot noise's are 1/photons, zoom blur's are ``np.arange``'s
    (start, stop, step))."""
    zero, to_anchor, _ = _CONTINUOUS[name]
    table = _ZOOM_RANGES if name == "zoom_blur" else _REGISTRY[name][1]
    return (zero,) + tuple(to_anchor(p) if to_anchor is not None else p for p in table)


def _lerp(low, high, t: float):
    """``(high - low) * t + low`` in float64, elementwise on tuples: the arithmetic of
    ``scipy.interpolate.interp1d(kind="linear")`` (and ``np.interp``) between unit-spaced knots."""
    if isinstance(low, tuple):
        return tuple(_lerp(a, b, t) for a, b in zip(low, high))
    return (float(high) - float(low)) * t + float(low)


def corruption_parameters(name: str, severity: float):
    """The parameters corruption ``name`` runs with at ``severity`` (a real number in [0, 5]): the
    integer table's entry at 1..5, ``None`` at 0 (nothing is applied), and at a fractional
    severity the anchors of :func:`severity_anchors` interpolated linearly, then rounded or
    converted as the CCC reference does (module docstring). Computed on the host, once per
    (name, severity)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    severity = _check_severity(severity)
    if severity == 0:
        return None
    if isinstance(severity, int):
        return _REGISTRY[name][1][severity - 1]
    return _interpolated_parameters(name, severity)


@functools.lru_cache(maxsize=512)
def _interpolated_parameters(name: str, severity: float):
    k = math.floor(severity)
    anchors = severity_anchors(name)
    value = _lerp(anchors[k], anchors[k + 1], severity - k)
    finish = _CONTINUOUS[name][2]
    return finish(value) if finish is not None else value


def _check_severity(severity) -> "int | float":
    """An ``int`` for an integer severity (``2``, ``2.0``, ``np.int64(2)``), a ``float`` for a
    fractional one; ``ValueError`` for anything else."""
    if isinstance(severity, (bool, np.bool_)) or not isinstance(severity, numbers.Real):
        raise ValueError(f"severity must be a real number in [0, 5], got {severity!r}")
    value = float(severity)
    if not math.isfinite(value) or not 0 <= value <= 5:
        raise ValueError(f"severity must be a real number in [0, 5], got {severity!r}")
    return int(value) if value.is_integer() else value


def _check_inputs(images: Tensor, name: str, severity, ids: Optional[Tensor]) -> Tensor:
    if name not in _REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    _check_severity(severity)
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] < 1:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (N, C, H, W), got {shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}, which looks like "
                         f"channels-last (N, H, W, C): permute(0, 3, 1, 2) first")
    if not supports_channels(name, images.shape[1]):
        needed = "1 or 3 channels" if name == "jpeg_compression" else "RGB (3 channels)"
        raise ValueError(f"corruption {name!r} needs {needed}, got {images.shape[1]} channels. The corruptions "
                         f"that need RGB are {', '.join(RGB_CORRUPTIONS)}; convert the images first "
                         f"(tta.data.channels.convert_channels(images, 3)), as the reference does")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if min(images.shape[-2:]) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {tuple(images.shape[-2:])}")
    outside = (images < -_INPUT_TOLERANCE) | (images > 1 + _INPUT_TOLERANCE) | images.isnan()
    if bool(outside.any()):
        raise ValueError("images must hold finite values in [0, 1]")
    n = images.shape[0]
    if ids is None:
        return torch.arange(n, device=images.device)
    if not isinstance(ids, Tensor) or ids.shape != (n,) or ids.is_floating_point() \
            or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor of shape ({n},)")
    return ids.to(device=images.device, dtype=torch.int64)


def supports_channels(name: str, channels: int) -> bool:
    """Whether corruption ``name`` accepts images with ``channels`` channels (see the module docstring)."""
    if name in RGB_CORRUPTIONS:
        return channels == 3
    if name == "jpeg_compression":
        return channels in _JPEG_CHANNELS
    return channels >= 1


def corrupt(images: Tensor, name: str, severity: "float", seed: int = 0,
            ids: Optional[Tensor] = None) -> Tensor:
    """Apply an ImageNet-C corruption (Hendrycks & Dietterich, ICLR 2019) to a batch.

    Args:
        images: float tensor (N, C, H, W) with values in [0, 1], on any device, any size
            (the reference's pixel-based parameters are used as they are, as for CIFAR-10-C).
            C = 3 for :data:`RGB_CORRUPTIONS`, 1 or 3 for ``jpeg_compression``, any C otherwise.
        name: one of :data:`ALL_CORRUPTIONS`.
        severity: a real number in [0, 5] (a Python or NumPy int or float). The integers 1..5
            are the benchmark's severities; a fractional severity interpolates the parameters
            between them as CCC does (module docstring); 0 returns the images unchanged (clamped
            to [0, 1]).
        seed: seed of the corruption stream.
        ids: int64 tensor (N,) of per-sample ids (default ``arange(N)``). A sample's corruption
            depends only on (seed, id, name, severity) and its pixels, not on the rest of the
            batch, and matches between CPU and CUDA up to float rounding.

    Returns:
        The corrupted images: same shape, device and dtype, clamped to [0, 1]. Computation runs in
        float64 for float64 inputs and in float32 otherwise.

    Raises:
        ValueError: unknown name, a severity that is not a real number in [0, 5] (bools and NaN
            included), a tensor that is not (N, C, H, W)
            floating point, a channel count the corruption does not take (the message names
            them), values outside [0, 1] (tolerance 1e-3) or NaN, or bad ``ids``.
    """
    ids = _check_inputs(images, name, severity, ids)
    severity = _check_severity(severity)
    if images.shape[0] == 0:
        return images.clone()
    if severity == 0:
        return images.clamp(0, 1)
    function, table = _REGISTRY[name]
    parameters = table[severity - 1] if isinstance(severity, int) else _interpolated_parameters(name, severity)
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work_dtype).clamp(0, 1)
    rng = _SampleRng(int(seed), name, severity, ids)
    out = function(x, parameters, rng)
    return out.clamp(0, 1).to(images.dtype)
