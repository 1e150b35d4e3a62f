"""GPU checks of the stream layer (run on a CUDA machine; prints one line per check, exits 1 on failure).

    python scripts/check_streams_cuda.py [--out DIR]

* nvJPEG batched decoding + resize/crop on the GPU matches the CPU path (libjpeg) within a few grey
  levels, including the fallbacks (PNG, greyscale and CMYK JPEGs) and the bad files (garbage,
  truncated) that are skipped and listed;
* prefetching on a side CUDA stream gives the same batches as loading in the caller's thread;
* the same seed gives identical corrupted images on the GPU, another seed different ones;
* DataLoader workers with pinned memory (decode=cpu) feed a CUDA device.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAILED = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def make_folder(root: Path) -> list[str]:
    from PIL import Image
    from torchvision.io import encode_jpeg, encode_png

    g = torch.Generator().manual_seed(0)
    classes = ["n01440764", "n01443537", "n01484850"]
    for k, wnid in enumerate(classes):
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(6):
            h, w = (300 + 17 * i, 400 - 13 * i) if i % 2 else (375, 500)
            base = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 7, generator=g), size=(h, w), mode="bicubic")[0]
            x = ((base.clamp(0, 1) * 0.9 + 0.1 * torch.rand(3, h, w, generator=g)) * 255).to(torch.uint8)
            (folder / f"img_{i}.JPEG").write_bytes(bytes(encode_jpeg(x, quality=90).numpy()))
    odd = root / classes[0]
    (odd / "png.JPEG").write_bytes(bytes(encode_png(torch.full((3, 260, 300), 90, dtype=torch.uint8)).numpy()))
    Image.new("L", (320, 280), 150).save(odd / "grey.JPEG", format="JPEG")
    Image.new("CMYK", (300, 290), (10, 80, 160, 20)).save(odd / "cmyk.JPEG", format="JPEG")
    (odd / "garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg body")
    good = (odd / "img_0.JPEG").read_bytes()
    (odd / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    return classes


def collect(stream):
    batches = list(stream)
    return (torch.cat([b.images.float().cpu() for b in batches]), torch.cat([b.ids for b in batches]),
            torch.cat([b.labels for b in batches]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from tta.data import build_stream, load_data_config

    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="tta-check-streams-"))
    classes = make_folder(root)
    config = dict(load_data_config(str(ROOT / "data_configs" / "imagenet_c_onthefly.yaml")), root=str(root), classes=classes,
                  corruptions=["gaussian_noise", "glass_blur", "jpeg_compression"], num_workers=2)

    def stream(**kw):
        kw.setdefault("seed", 0)
        kw.setdefault("batch_size", 8)
        return build_stream(config, **kw)[0]

    gpu = stream(device=device, decode="cuda" if device.type == "cuda" else "cpu", prefetch=0)
    gx, gids, glabels = collect(gpu)
    cpu = stream(device="cpu", decode="cpu", prefetch=0, num_workers=0)
    cx, cids, clabels = collect(cpu)
    check("same ids and labels on GPU and CPU decoding", torch.equal(gids, cids) and torch.equal(glabels, clabels))
    bad_gpu = sorted(Path(b.path).name for b in gpu.bad_images)
    bad_cpu = sorted(Path(b.path).name for b in cpu.bad_images)
    check("bad files skipped and listed alike", bad_gpu == bad_cpu == ["garbage.JPEG", "truncated.JPEG"],
          f"gpu={bad_gpu} cpu={bad_cpu} errors={[b.error for b in gpu.bad_images]}")
    # compare the clean decode + resize + crop (corruptions amplify tiny differences, e.g. glass blur)
    gclean = gpu.parts[0].source
    index = np.arange(len(gclean))
    raw = gclean.read(index, "cuda" if device.type == "cuda" else "cpu")
    a, ok_a, _ = gclean.finish(raw, device)
    b, ok_b, _ = gclean.finish(gclean.read(index, "cpu"), torch.device("cpu"))
    if a.shape != b.shape:
        check("GPU and CPU decoding keep the same files", False, f"{tuple(a.shape)} vs {tuple(b.shape)}")
        a = b = torch.zeros(1)
    diff = (a.cpu() - b).abs()
    check("GPU decode+resize+crop = CPU path (within 3 grey levels at the 99.9th percentile)",
          bool(np.array_equal(ok_a, ok_b)) and float(diff.flatten().quantile(0.999)) <= 3 / 255,
          f"max {255 * float(diff.max()):.1f}, mean {255 * float(diff.mean()):.3f} grey levels; n={a.shape[0]}")
    noise = (gx - cx).abs() if gx.shape == cx.shape else torch.ones(1)
    check("corrupted GPU vs CPU stream close", float(noise.mean()) < 0.02, f"mean |diff| {float(noise.mean()):.4f}")
    px, pids, _ = collect(stream(device=device, prefetch=3))
    check("prefetch on a side stream = synchronous", torch.equal(px, gx) and torch.equal(pids, gids))
    sx, _, _ = collect(stream(device=device, prefetch=2))
    check("same seed, same GPU images", torch.equal(sx, gx))
    dx, _, _ = collect(stream(device=device, prefetch=2, seed=1))
    whole = list(stream(device=device, prefetch=2))
    k = len(whole) // 2
    rest = list(stream(device=device, prefetch=2).iterate(start_batch=k))
    check("a stream started at a batch (resume) = the rest of an uninterrupted one",
          len(rest) == len(whole) - k and all(a.number == b.number and torch.equal(a.ids, b.ids)
                                             and torch.equal(a.images, b.images) for a, b in zip(whole[k:], rest)))
    check("another seed, other images", not torch.equal(dx, gx))
    wx, wids, _ = collect(stream(device=device, decode="cpu", num_workers=2, prefetch=2))
    check("workers + pinned memory to CUDA", torch.equal(wids, gids) and wx.shape == gx.shape)
    for name in ["open_set", "mixed_domains", "forgetting", "label_shift", "bs1"]:
        s = build_stream(config, setting=name, seed=0, device=device, max_samples=40)[0]
        n = sum(len(b.labels) for b in s)
        check(f"setting {name} on {device.type}", n > 0, f"{n} samples")
    if FAILED:
        print(f"FAILED: {FAILED}")
        sys.exit(1)
    print("all stream checks passed")


if __name__ == "__main__":
    main()
