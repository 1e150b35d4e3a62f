"""The validation table of the continuous severities: ours vs the reference functions at CCC's
interpolated parameters.

    python scripts/validate_fractional_severities.py [--severities 0.25 1.5 2.75 4.25 4.5] [--out table.md]

Deterministic corruptions: the worst PSNR between ours and the reference over scikit-image's three
photographs at 224 px and 32 px, at every fractional severity. Random corruptions: mean absolute
change, ours divided by the reference's, per fractional severity at 32 px (the draws of
``tests/test_corruptions.py``). The reference is ``imagecorruptions`` 1.1.2 with its table replaced
by the parameters CCC (oripress/CCC ``make_imagenet_c.py``) interpolates; the same computation as
``test_deterministic_fractional_matches_reference`` and
``test_random_fractional_matches_reference_in_distribution``. Needs the ``dev`` extras.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ccc_reference import FRACTIONAL  # noqa: E402
from imagecorruptions_shim import load_imagecorruptions  # noqa: E402
from test_corruptions import (DETERMINISTIC, DRAWS, RANDOM, _mean_change_fractional, _photos, _psnr,  # noqa: E402
                              _run_reference_fractional, _to_tensor)

import torch  # noqa: E402

from tta.data.corruptions import corrupt  # noqa: E402


def worst_psnr(reference, name: str, size: int, severities: list[float], photos: dict) -> float:
    images = photos[size]
    worst = float("inf")
    for severity in severities:
        ours = corrupt(_to_tensor(images), name, severity).permute(0, 2, 3, 1).double().numpy()
        for image, mine in zip(images, ours):
            worst = min(worst, _psnr(mine, _run_reference_fractional(reference, name, image, severity)))
    return worst


def tables(severities: list[float]) -> str:
    reference = load_imagecorruptions().corruptions
    photos = {size: _photos(size) for size in (224, 32)}
    shown = ", ".join(f"{s:g}" for s in severities)
    lines = [f"Deterministic corruptions, worst PSNR between ours and the reference over severities {shown} "
             "and the images:", "", "| corruption | 224 px | 32 px |", "|---|---:|---:|"]
    for name in DETERMINISTIC:
        lines.append(f"| {name} | {worst_psnr(reference, name, 224, severities, photos):.1f} dB | "
                     f"{worst_psnr(reference, name, 32, severities, photos):.1f} dB |")
    lines += ["", f"Random corruptions, mean absolute change ours / reference at severities {shown} (32 px):", "",
              "| corruption | ratio per severity |", "|---|---|"]
    for name in RANDOM:
        draws = DRAWS.get(name, (3, 3))[1]
        ratios = []
        for severity in severities:
            ours, ref = _mean_change_fractional(name, severity, photos[32], draws, reference)
            mark = ""
            if ref < 2 / 255:  # nearly the identity: compared in float64, as the test does
                ours, ref = _mean_change_fractional(name, severity, photos[32], draws, reference, torch.float64)
                mark = "*"
            ratios.append(f"{ours / ref:.2f}{mark}")
        lines.append(f"| {name} | {' '.join(ratios)} |")
    lines += ["", "\\* nearly the identity (the reference's mean change is below 2/255): compared with float64 "
              "inputs, as in the test (glass blur's uint8 floor after a blur whose neighbour weights are near "
              "1e-7 depends on the precision)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--severities", type=float, nargs="+", default=list(FRACTIONAL))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = tables(args.severities)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
