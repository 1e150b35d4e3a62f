"""Throughput of tta's torch corruptions against the reference ``imagecorruptions`` package.

Prints one markdown table: images per second for each corruption at ``--size`` px (224 by
default), ours batched on the CPU and (if available, or with ``--device cuda``) on CUDA, beside the
reference (numpy / OpenCV / PIL, one image at a time) on the CPU. Needs scikit-image for the test
photographs and ``imagecorruptions`` for the reference column (otherwise shown as "n/a").

    python scripts/bench_corruptions.py                           # all 19, short run
    python scripts/bench_corruptions.py --n 64 --corruptions fog,glass_blur --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tta.data.corruptions import ALL_CORRUPTIONS, corrupt  # noqa: E402


def _photos(n: int, size: int) -> np.ndarray:
    """``n`` uint8 RGB photographs (N, size, size, 3): random crops of scikit-image's samples."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    rng = np.random.default_rng(0)
    photos = []
    for i in range(n):
        image = sources[i % len(sources)]
        side = int(rng.integers(min(image.shape[:2]) // 2, min(image.shape[:2]) + 1))
        top = int(rng.integers(0, image.shape[0] - side + 1))
        left = int(rng.integers(0, image.shape[1] - side + 1))
        crop = Image.fromarray(image[top:top + side, left:left + side])
        photos.append(np.asarray(crop.resize((size, size), Image.BICUBIC)))
    return np.stack(photos)


def _rate(run: Callable[[], object], images: int, repeats: int, sync: Callable[[], None],
          warm_up: Optional[Callable[[], object]] = None) -> float:
    """Images per second of ``run`` (which handles ``images`` images), timed ``repeats`` times
    after a warm-up call (``warm_up``, by default ``run`` itself)."""
    (warm_up or run)()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return images * repeats / (time.perf_counter() - start)


def _no_sync() -> None:
    pass


def _reference_module():
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from imagecorruptions_shim import load_imagecorruptions

        return load_imagecorruptions().corruptions
    except ImportError:
        return None


def _reference_rate(reference, name: str, photos: np.ndarray, severity: int) -> Optional[float]:
    if reference is None:
        return None
    from PIL import Image

    pil_images = [Image.fromarray(image) for image in photos]
    function = getattr(reference, name)

    def run() -> None:
        for image in pil_images:
            np.asarray(function(image, severity))  # PIL results decode lazily: force it

    with np.errstate(all="ignore"):
        return _rate(run, len(pil_images), 1, _no_sync,
                     lambda: np.asarray(function(pil_images[0], severity)))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="batch size for ours (default 16)")
    parser.add_argument("--ref-n", type=int, default=3,
                        help="images timed for the reference, one at a time (default 3)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed batches for ours")
    parser.add_argument("--corruptions", default=",".join(ALL_CORRUPTIONS),
                        help="comma-separated names (default: all 19)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    names = [name.strip() for name in args.corruptions.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ALL_CORRUPTIONS))
    if unknown:
        parser.error(f"unknown corruptions {unknown}; valid: {', '.join(ALL_CORRUPTIONS)}")

    photos = _photos(max(args.n, args.ref_n), args.size)
    batch = torch.from_numpy(photos[:args.n]).permute(0, 3, 1, 2).float() / 255
    batch_cuda = batch.cuda() if use_cuda else None
    reference = _reference_module()

    header = f"| corruption | ours CPU, batch {args.n} |"
    if use_cuda:
        header += f" ours CUDA, batch {args.n} |"
    header += " reference CPU |"
    print(f"images/s at {args.size} px, severity {args.severity}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if use_cuda else "") + "\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in names:
        rate = _rate(lambda: corrupt(batch, name, args.severity), args.n, args.repeats, _no_sync)
        cells = [f"{rate:,.1f}"]
        if use_cuda:
            rate = _rate(lambda: corrupt(batch_cuda, name, args.severity), args.n, args.repeats,
                         torch.cuda.synchronize)
            cells.append(f"{rate:,.1f}")
        ref = _reference_rate(reference, name, photos[:args.ref_n], args.severity)
        cells.append("n/a" if ref is None else f"{ref:,.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
