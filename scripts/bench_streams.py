"""End-to-end stream throughput: decode + resize/crop + corrupt + normalise, for a folder of JPEGs.

Prints one markdown table (images per second and ms per batch) for tta's on-the-fly ImageNet-C
stream (``imagenet_c_onthefly``: Resize(256) -> CenterCrop(224) -> corrupt on the device), with
the decoding path of ``--device`` (nvJPEG batched on the GPU for cuda; DataLoader workers for cpu),
next to a plain baseline in the same run: torchvision ``ImageFolder`` + PIL transforms + a
DataLoader with the same workers, copied to the device and normalised (no corruption).

    python scripts/bench_streams.py                                   # synthetic folder, CPU
    python scripts/bench_streams.py --device cuda --images 2048 --corruptions none,gaussian_noise,glass_blur
    python scripts/bench_streams.py --folder /data/imagenet/val --device cuda --batches 50

Without ``--folder`` a synthetic ImageNet-like folder (``--images`` JPEGs of ``--size``, quality 90,
in 10 class folders) is written to a temporary directory (or ``--keep DIR``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_folder(root: Path, images: int, size: tuple[int, int], classes: int = 10) -> Path:
    """``images`` photo-like JPEGs (smooth colour fields plus texture) in ``classes`` class folders."""
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(0)
    w, h = size
    for i in range(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.JPEG"
        if path.exists():
            continue
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=generator), size=(h, w),
                                               mode="bicubic", align_corners=False)[0]
        texture = torch.rand(3, h, w, generator=generator) * 0.15
        image = ((base * 0.85 + texture).clamp(0, 1) * 255).to(torch.uint8)
        path.write_bytes(bytes(encode_jpeg(image, quality=90).numpy()))
    return root


def class_folders(root: Path) -> list[str]:
    folder = root / "val" if (root / "val").is_dir() else root
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def time_stream(make, device: torch.device, batches: int) -> tuple[float, float, int]:
    """(images/s, ms/batch, images) over up to ``batches`` batches after one warm-up pass of 2 batches."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def consume(limit: int) -> tuple[int, int]:
        n = k = 0
        for i, x in enumerate(make()):
            if i >= limit:
                break
            y = (x - mean) / std  # normalise, as the model wrapper does
            n, k = n + y.shape[0], k + 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n, k

    consume(2)
    start = time.perf_counter()
    n, k = consume(batches)
    elapsed = time.perf_counter() - start
    return n / elapsed, 1000 * elapsed / max(k, 1), n


def ours(root: Path, corruption: str | None, device: torch.device, args) -> callable:
    from tta.data import build_stream, load_data_config

    config = dict(load_data_config(str(ROOT / "data_configs" / "imagenet_c_onthefly.yaml")))
    config.update(root=str(root), classes=class_folders(root), corruptions=[corruption or "brightness"],
                  num_workers=args.num_workers, prefetch=args.prefetch, decode=args.decode)

    def make():
        stream, _ = build_stream(config, setting="reset_each_shift", seed=0, batch_size=args.batch_size, device=device)
        if corruption is None:  # decode + crop only: bypass the corruption
            for part in stream.parts:
                part.corruption = None
        return (b.images for b in stream)

    return make


def baseline(root: Path, device: torch.device, args) -> callable:
    from torchvision import datasets, transforms

    folder = root / "val" if (root / "val").is_dir() else root
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    dataset = datasets.ImageFolder(str(folder), transform=transform)

    def make():
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
        return (x.to(device, non_blocking=True) for x, _ in loader)

    return make


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="a folder of JPEGs in class folders (ImageNet val layout)")
    parser.add_argument("--images", type=int, default=512, help="synthetic folder: number of images")
    parser.add_argument("--size", default="500x375", help="synthetic folder: WxH")
    parser.add_argument("--keep", type=Path, help="write (or reuse) the synthetic folder here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per row")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--decode", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--corruptions", default="none,gaussian_noise,defocus_blur,jpeg_compression",
                        help="comma-separated; 'none' = decode + resize + crop + normalise only")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.folder:
        root = args.folder
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        root = args.keep or Path(tempfile.mkdtemp(prefix="tta-bench-streams-"))
        start = time.perf_counter()
        make_folder(root, args.images, (w, h))
        print(f"synthetic folder: {args.images} JPEGs of {w}x{h} in {root} ({time.perf_counter() - start:.1f} s)")
    decode = args.decode if args.decode != "auto" else ("cuda" if device.type == "cuda" else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {args.batch_size}; workers {args.num_workers}; prefetch {args.prefetch}\n")
    rows = []
    if not args.no_baseline:
        rate, ms, n = time_stream(baseline(root, device, args), device, args.batches)
        rows.append(("ImageFolder + PIL + DataLoader (baseline)", "cpu (PIL)", "none", rate, ms, n))
    for corruption in [c.strip() for c in args.corruptions.split(",") if c.strip()]:
        c = None if corruption == "none" else corruption
        rate, ms, n = time_stream(ours(root, c, device, args), device, args.batches)
        rows.append(("tta stream (imagenet_c_onthefly)", decode, corruption, rate, ms, n))
    print("| pipeline | decode | corruption (severity 5) | img/s | ms/batch | images |")
    print("|---|---|---|---:|---:|---:|")
    for pipeline, dec, corruption, rate, ms, n in rows:
        print(f"| {pipeline} | {dec} | {corruption} | {rate:,.0f} | {ms:.1f} | {n} |")


if __name__ == "__main__":
    main()
