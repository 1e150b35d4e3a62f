"""The on-the-fly ImageNet-C stream end to end with one method, default and fast: images per second
with JPEG decoding, Resize(256) -> CenterCrop(224), corruption synthesis and host-to-device copies
included (``tta.engine.run`` over the stream, its background prefetch on).

    python scripts/bench_stream_e2e.py --smoke                                    # CPU, tiny: it runs
    python scripts/bench_stream_e2e.py --device cuda --model resnet50 --method eata --batches 30

Rows: the stream alone (batches consumed as they come), the loop with ours default (fp32 eager)
and the loop with ours fast (bf16 + channels_last for CNNs + compiled step; the compile happens
in the warm-up batches, which are not timed). A synthetic JPEG folder (``--images`` of ``--size``)
is written to a temporary directory unless ``--folder`` is given; the model has random weights
and EATA's Fisher comes from random images (speed, not accuracy). Corruptions are mixed in every
batch (``mixed_domains``), so every corruption's cost is in the average.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_streams import class_folders, make_folder  # noqa: E402

import tta.methods as methods  # noqa: E402
from tta import engine  # noqa: E402
from tta.data import CORRUPTIONS, build_stream, load_data_config  # noqa: E402
from tta.models import load_classifier  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """The stream's batches; the clock runs from when batch ``warmup`` is handed out until the loop asks
    for the batch after the last one (the device synchronised then), so the engine's work after the
    loop (results, summaries) is not counted."""

    def __init__(self, stream, warmup: int, device: torch.device):
        self.stream, self.warmup, self.device = stream, warmup, device
        self.start = self.end = None
        self.images = 0

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        for i, batch in enumerate(self.stream):
            if i == self.warmup:
                sync(self.device)
                self.start = time.perf_counter()
            if i >= self.warmup:
                self.images += batch.images.shape[0]
            yield batch
        sync(self.device)
        self.end = time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet50", help="timm name (random weights)")
    parser.add_argument("--method", default="eata")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (fast: the compile)")
    parser.add_argument("--folder", type=Path, help="a folder of JPEGs in class folders (default: synthetic)")
    parser.add_argument("--images", type=int, default=None, help="synthetic folder size (default: what a row needs)")
    parser.add_argument("--size", default="500x375", help="synthetic JPEGs: WxH")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--decode", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--corruptions", default=None, help="comma-separated (default: the 15)")
    parser.add_argument("--rows", default="stream,default,fast")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU settings: check that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.batches, args.warmup = "test_resnet", 4, 2, 1
        args.images, args.size, args.num_workers = args.images or 16, "96x80", 0
        args.corruptions = args.corruptions or "gaussian_noise,contrast"
        torch.set_num_threads(1)  # tiny tensors: more threads only wait for each other
    device = torch.device(args.device)
    bs, total = args.batch_size, (args.warmup + args.batches) * args.batch_size
    root = args.folder or Path(tempfile.mkdtemp(prefix="tta-bench-e2e-"))
    if not args.folder:
        w, h = (int(v) for v in args.size.lower().split("x"))
        make_folder(root, args.images or total, (w, h))
    corruptions = [c for c in args.corruptions.split(",") if c] if args.corruptions else list(CORRUPTIONS)
    config = dict(load_data_config("imagenet_c_onthefly"), root=str(root), classes=class_folders(root),
                  corruptions=corruptions, num_workers=args.num_workers, decode=args.decode)
    if args.smoke:
        config.update(resize=40, crop=32)

    def make_stream():
        stream, _ = build_stream(config, setting="mixed_domains", seed=0, batch_size=bs, device=device,
                                 max_samples=total)
        return stream

    import timm

    net = timm.create_model(args.model, pretrained=False, num_classes=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_classifier(net, pretrained=False)
    crop = int(config["crop"])
    fisher = torch.rand(2 * bs, 3, crop, crop, generator=torch.Generator().manual_seed(0))

    def make_method():
        import copy

        kwargs = {"fisher_data": fisher.to(device)} if args.method in ("eata", "eata_c") else {}
        return methods.build(args.method, copy.deepcopy(base).to(device), num_classes=1000, batch_size=bs,
                             nonfinite="skip", input_range=None, **kwargs)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.method} on {args.model} (random weights), on-the-fly ImageNet-C from JPEGs "
          f"({'synthetic ' + args.size if not args.folder else args.folder}) -> {config['resize']} -> {crop} px, "
          f"{len(corruptions)} corruptions mixed, batch {bs}, {args.batches} timed batches after {args.warmup}, "
          f"{name}, torch {torch.__version__}\n", flush=True)
    print("| row | img/s | ms/batch | warm-up s |\n|---|---:|---:|---:|", flush=True)
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        sync(device)
        began = time.perf_counter()
        timed = Timed(make_stream(), args.warmup, device)
        if row == "stream":
            for _ in timed:
                pass
            sync(device)
        elif row in ("default", "fast"):
            engine.run(make_method(), timed, device=device, progress=False, reset_each_domain=False,
                       fast=row == "fast")
        else:
            raise SystemExit(f"unknown row {row!r}: stream, default or fast")
        if timed.start is None or not timed.images:
            raise SystemExit(f"the stream has no batch after the {args.warmup} warm-up ones (more --images)")
        seconds = timed.end - timed.start
        per_s = timed.images / seconds
        label = {"stream": "stream alone", "default": f"stream + {args.method} (fp32 eager)",
                 "fast": f"stream + {args.method} fast"}[row]
        print(f"| {label} | {per_s:,.0f} | {1000 * seconds / max(1, timed.images // bs):,.1f} | "
              f"{timed.start - began:.1f} |", flush=True)


if __name__ == "__main__":
    main()
