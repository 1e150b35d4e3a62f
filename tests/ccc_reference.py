"""The CCC reference's continuous severities, re-derived for the tests (no ``tta`` code used).

Press et al., "RDumb: A simple approach that questions our progress in continual test-time
adaptation" (NeurIPS 2023), generate their continually changing corruptions with fractional
severities: oripress/CCC@656dec3 ``make_imagenet_c.py`` interpolates every corruption's parameters
with ``scipy.interpolate.interp1d(kind="linear")`` over severities 0..5 and converts some of them
(photons, rounding, ``np.arange``). ``CCC_ANCHORS`` are its tables (line numbers below);
:func:`reference_parameters` applies its conversions; :func:`imagecorruptions_parameters` turns
them into what the ``imagecorruptions`` 1.1.2 functions take, so that the tests can run those
functions at fractional severities (``imagecorruptions_shim.with_parameters``).
"""
from __future__ import annotations

import math

import numpy as np

#: fractional severities the validation uses (4.25: a defocus radius of 8.5, an even-sized disk)
FRACTIONAL = (0.25, 1.5, 2.75, 4.25, 4.5)

#: severities 0..5 as oripress/CCC@656dec3 make_imagenet_c.py interpolates them (line of its table)
CCC_ANCHORS = {
    "gaussian_noise": [0.0, 0.08, 0.12, 0.18, 0.26, 0.38],  # L188
    "shot_noise": [0, 1 / 60, 1 / 25, 1 / 12, 1 / 5, 1 / 3],  # L206-213, 1/photons
    "impulse_noise": [0, 0.03, 0.06, 0.09, 0.17, 0.27],  # L234
    "defocus_blur": [(0.0, 0.0), (3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],  # L332
    "glass_blur": [(0.0, 0.0, 0.0), (0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # L300-308
    "motion_blur": [(0.0, 0.0), (10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],  # L357
    "zoom_blur": [(1.0, 1.0, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                  (1, 1.31, 0.03)],  # L385-392
    "snow": [(0.1, 0.3, 3, 1.0, 10, 4, 1.0), (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
             (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
             (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],  # L471-478
    "frost": [(1.0, 0.0), (1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],  # L435
    "fog": [(0.0, 2.0), (1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],  # L416
    "brightness": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # L537
    "contrast": [1.0, 0.4, 0.3, 0.2, 0.1, 0.05],  # L522
    "pixelate": [1.0, 0.6, 0.5, 0.4, 0.3, 0.25],  # L573
    "jpeg_compression": [85, 25, 18, 15, 10, 7],  # L555
    # not CCC's: elastic follows imagecorruptions 1.1.2 (one displacement scale, CCC's severity-0
    # value 0); the four held-out corruptions are not in CCC (identity at 0; spatter: no water)
    "elastic_transform": [0.0, 250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12],
    "speckle_noise": [0.0, 0.15, 0.2, 0.35, 0.45, 0.6],
    "gaussian_blur": [0.0, 1, 2, 3, 4, 6],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.0, 0), (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    "saturate": [(1.0, 0.0), (0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
}


def reference_parameters(name: str, severity: float):
    """The parameters of ``name`` at ``severity`` computed as the CCC reference does: interp1d over
    0..5, then its conversions (L221-225 shot noise, L318-319 and L287-290 glass blur, L401 zoom
    blur, L562 JPEG)."""
    from scipy.interpolate import interp1d

    value = interp1d([0, 1, 2, 3, 4, 5], CCC_ANCHORS[name], axis=0, kind="linear")(severity)
    if name == "shot_noise":
        return float(1) / value if value != 0 else 9999
    if name == "glass_blur":
        value = value.copy()
        if value[1] < 1:
            value[1] = 1
        return float(value[0]), round(value[1]), round(value[2])
    if name == "zoom_blur":
        return tuple(float(z) for z in np.arange(value[0], value[1], value[2]))
    if name == "jpeg_compression":
        return round(value.item())
    if value.ndim == 0:
        return float(value)
    return tuple(float(v) for v in value)


def imagecorruptions_parameters(name: str, severity: float):
    """The reference parameters as an ``imagecorruptions`` 1.1.2 function takes them: its motion
    blur emulates ImageMagick with ``2 * radius + 1`` taps from an integer radius, where ImageMagick
    (CCC's motion blur and snow) takes a fractional radius and uses ``2 * ceil(radius) + 1`` taps
    (``GetOptimalKernelWidth1D``, MagickCore/gem.c): the same kernel from ``ceil(radius)``."""
    c = reference_parameters(name, severity)
    if name == "motion_blur":
        return (math.ceil(c[0]), c[1])
    if name == "snow":
        return c[:4] + (math.ceil(c[4]),) + c[5:]
    return c
