"""Is the data or the adaptation step the bottleneck? The stream alone, the step alone, and both.

Prints one markdown table. For each workload:

* **stream alone**: the tta stream (read, decode, resize/crop, corrupt on the device, copy), batches
  consumed as fast as they come;
* **step alone**: the method's step (``tta.methods.build(method, ...)``, forward + selection + loss +
  update) on batches made beforehand, already on the device;
* **stream + step**: the real loop, ``tta.engine.run`` over the stream (metrics included), with the
  stream's background prefetch (the default: the next batches are read, decoded, corrupted and
  copied in a worker thread, on a side CUDA stream on GPUs, while the step runs), and the same loop
  with ``prefetch=0`` (no overlap) for comparison.

``overlap`` is stream+step over min(stream, step): 100% means the loop runs as fast as its slower
part, i.e. the other part is fully hidden. Workloads:

* ``digits``: digits-C (32 px, arrays in memory), the shipped digits CNN, ``mixed_domains`` (every
  batch mixes the corruptions);
* ``imagenet``: on-the-fly ImageNet-C from a folder of JPEGs (a synthetic one of ``--images`` JPEGs of
  ``--size``, or ``--folder``): decode -> Resize(256) -> CenterCrop(224) -> corrupt, ``mixed_domains``,
  a random-weight timm model (``--model``).

    python scripts/bench_pipeline.py                                   # CPU: small batches, resnet18
    python scripts/bench_pipeline.py --device cuda --model resnet50 --batch-size 64 --batches 30 --images 3000

The step on the CPU shares the cores with the loader, so the overlap there is bounded by the core
count; on a GPU the step runs on the device while the loader's CPU work (file reads, CPU decoding)
and its GPU work (nvJPEG, corruptions on a side stream) proceed alongside.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_streams import class_folders, make_folder  # noqa: E402

import tta.methods as methods  # noqa: E402
from tta import engine  # noqa: E402
from tta.data import CORRUPTIONS, build_stream, load_data_config  # noqa: E402
from tta.models import load_classifier  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """The stream's batches; the clock starts when batch ``warmup`` is handed out (earlier ones warm up)."""

    def __init__(self, stream: Any, warmup: int, device: torch.device):
        self.stream, self.warmup, self.device, self.start = stream, warmup, device, None

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.stream):
            if i == self.warmup:
                sync(self.device)
                self.start = time.perf_counter()
            yield batch


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def time_stream(make_stream: Callable[[int], Any], warmup: int, device: torch.device) -> float:
    """Images per second of the stream alone (after ``warmup`` batches)."""
    timed = Timed(make_stream(2), warmup, device)
    n = 0
    for i, batch in enumerate(timed):
        if i >= warmup:
            n += batch.images.shape[0]
    sync(device)
    return rate(n, time.perf_counter() - timed.start)


def time_step(make_method: Callable[[], Any], xs: list[torch.Tensor], warmup: int, batches: int,
              device: torch.device) -> float:
    """Images per second of the adaptation step alone on batches already on the device."""
    method = make_method()
    method.prepare(device=device)
    for i in range(warmup):
        method(xs[i % len(xs)])
    sync(device)
    start = time.perf_counter()
    n = 0
    for i in range(batches):
        x = xs[i % len(xs)]
        method(x)
        n += x.shape[0]
    sync(device)
    return rate(n, time.perf_counter() - start)


def time_loop(make_method: Callable[[], Any], make_stream: Callable[[int], Any], prefetch: int, warmup: int,
              device: torch.device) -> float:
    """Images per second of ``tta.engine.run`` over the stream (after ``warmup`` batches)."""
    stream = make_stream(prefetch)
    timed = Timed(stream, warmup, device)
    engine.run(make_method(), timed, device=device, progress=False, reset_each_domain=False)
    end = time.perf_counter()  # engine.run synchronises the device before it returns
    return rate(stream.num_samples - warmup * stream.batch_size, end - timed.start)  # full batches (mixed_domains)


def workload(name: str, args, device: torch.device,
             batch_size: int) -> tuple[Callable[[int], Any], Callable[[], Any], str]:
    """(make_stream(prefetch), make_method(), description) of a workload."""
    corruptions = [c for c in args.corruptions.split(",") if c] if args.corruptions else list(CORRUPTIONS)
    total = (args.warmup + args.batches) * batch_size
    if name == "digits":
        config = dict(load_data_config("digits_c"), corruptions=corruptions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_classifier("digits_cnn", num_classes=10)
        num_classes, what = 10, "digits-C 32 px, digits CNN"
    else:
        root = args.folder or args.keep or Path(tempfile.mkdtemp(prefix="tta-bench-pipeline-"))
        if not args.folder:
            w, h = (int(v) for v in args.size.lower().split("x"))
            make_folder(root, args.images or total, (w, h))
        config = dict(load_data_config("imagenet_c_onthefly"), root=str(root), classes=class_folders(root),
                      corruptions=corruptions, num_workers=args.num_workers, decode=args.decode)
        import timm

        net = timm.create_model(args.model, pretrained=False, num_classes=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_classifier(net, pretrained=False)
        num_classes = 1000
        what = f"JPEG {args.size} -> 224 px on the fly, {args.model} (random weights)"

    def make_stream(prefetch: int):
        stream, _ = build_stream(config, setting="mixed_domains", seed=0, batch_size=batch_size, device=device,
                                 max_samples=total, prefetch=prefetch)
        if stream.num_samples < total:
            raise SystemExit(f"{name}: only {stream.num_samples} samples; need {total} (more --images)")
        return stream

    def make_method():
        import copy

        return methods.build(args.method, copy.deepcopy(model).to(device), num_classes=num_classes,
                             batch_size=batch_size)

    return make_stream, make_method, what


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="digits,imagenet")
    parser.add_argument("--method", default="tent", help="a batch method that needs no run inputs (tent, eta, sar, ...)")
    parser.add_argument("--model", default=None, help="timm name for the imagenet workload (default: resnet50 on "
                                                      "GPU, resnet18 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (imagenet on CPU: 16)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per row (default 30 GPU, 6 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--corruptions", default=None, help="comma-separated (default: the 15), mixed in every batch")
    parser.add_argument("--folder", type=Path, help="imagenet workload: a folder of JPEGs in class folders")
    parser.add_argument("--images", type=int, default=None, help="synthetic folder size (default: what the rows need)")
    parser.add_argument("--size", default="500x375", help="synthetic JPEGs: WxH")
    parser.add_argument("--keep", type=Path, help="write (or reuse) the synthetic folder here")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="imagenet workload: DataLoader workers for CPU decoding")
    parser.add_argument("--decode", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=1, help="measure each cell this many times, keep the best")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("resnet50" if gpu else "resnet18")
    args.batches = args.batches or (30 if gpu else 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    print(f"device: {name}; method {args.method}; {args.batches} timed batches after {args.warmup}, best of "
          f"{args.repeats}; torch {torch.__version__}\n")
    rows = []
    for work in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        batch_size = args.batch_size or (64 if gpu or work == "digits" else 16)
        make_stream, make_method, what = workload(work, args, device, batch_size)
        xs = [b.images for _, b in zip(range(min(args.batches, 8)), make_stream(2))]
        def best(measure: Callable[[], float]) -> float:
            return max(measure() for _ in range(args.repeats))

        stream_rate = best(lambda: time_stream(make_stream, args.warmup, device))
        step_rate = best(lambda: time_step(make_method, xs, args.warmup, args.batches, device))
        xs = []  # free the pre-made batches
        both = best(lambda: time_loop(make_method, make_stream, 2, args.warmup, device))
        serial = best(lambda: time_loop(make_method, make_stream, 0, args.warmup, device))
        bound = min(stream_rate, step_rate)
        rows.append((work, f"{what}, batch {batch_size}", stream_rate, step_rate, both, serial, both / bound,
                     "data" if stream_rate < step_rate else "step"))
    print("| workload | data, model | stream alone img/s | step alone img/s | stream + step img/s (prefetch 2) "
          "| stream + step img/s (prefetch 0) | overlap | bound by |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for work, what, s, t, both, serial, overlap, bound in rows:
        print(f"| {work} | {what} | {s:,.0f} | {t:,.0f} | {both:,.0f} | {serial:,.0f} | {overlap:.0%} | {bound} |")


if __name__ == "__main__":
    main()
