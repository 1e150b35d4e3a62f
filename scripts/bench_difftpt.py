"""Benchmark DiffTPT: diffusion-view generation throughput and per-image latency (warm cache) vs TPT.

Prints one table:

* **generation**: :class:`tta.augment.diffusion.DiffusionViews` without a cache, one image, ``batch``
  variations per pipeline call, ``steps`` inference steps: seconds per call, views/s and UNet
  evaluations/s (``steps x batch x 2``: classifier-free guidance doubles the UNet batch);
* **latency**: ms per test image for TPT (original + 63 crops, 1 step) and DiffTPT (original + 64
  crops + 63 diffusion views, 4 steps) with every diffusion view already in the on-disk cache
  (PNG decoding included: the steady state of a run after ``generate_diffusion_views.py``), plus the
  DiffTPT time spent waiting for the cache (the next image's views are read while the current one
  is tuned, so this is the part of the reads that did not overlap).

Defaults: CPU, the tiny random-weight pipeline and CLIP of the tests (seconds). ``--device cuda
--full-size``: a Stable Diffusion 1.x image-variation pipeline at its real size (UNet 860M params,
ViT-L/14 image encoder, 512 px, fp16) and a CLIP ViT-B/16 with 1,000 classes, all with random
weights built on the device (nothing is downloaded); about 30-60 s on one H100.

    python scripts/bench_difftpt.py
    python scripts/bench_difftpt.py --device cuda --full-size
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ pipelines
def full_size_pipeline(device: torch.device, dtype: torch.dtype):
    """SD 1.x image variations (lambdalabs/sd-image-variations-diffusers architecture), random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, sample_size=512)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
            num_attention_heads=16, image_size=224, patch_size=14))
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def make_views(args, device: torch.device, num_views: int, batch: int, steps: int, cache_dir):
    """A DiffusionViews over the tiny pipeline folder, or over the injected full-size pipeline."""
    from tta.augment.diffusion import DiffusionViews, PipelineSpec

    if args.full_size:
        views = DiffusionViews("bench:sd-image-variations-random", num_views=num_views, steps=steps,
                               batch_size=batch, cache_dir=cache_dir, device=device, dtype=args.dtype,
                               progress=False)
        views.__dict__["spec"] = PipelineSpec(type(args.pipe), False, 512, None)
        views.__dict__["pipe"] = args.pipe
        return views
    return DiffusionViews(args.pipe_dir, num_views=num_views, steps=steps, batch_size=batch, cache_dir=cache_dir,
                          device=device, dtype=args.dtype, progress=False)


# ------------------------------------------------------------------------------------ benches
def bench_generation(args, device: torch.device, rows: list[dict]) -> None:
    image = torch.rand(1, 3, 224, 224)
    warm = make_views(args, device, 1, 1, 2, None)
    warm(image, ["warmup"])  # loads the pipeline, cuDNN/cuBLAS autotuning
    for steps in args.steps:
        for batch in args.batch:
            views = make_views(args, device, batch, batch, steps, None)
            sync(device)
            start = time.perf_counter()
            for r in range(args.repeats):
                views(image, [f"gen-{steps}-{batch}-{r}"])
            sync(device)
            per_call = (time.perf_counter() - start) / args.repeats
            rows.append({"bench": "generation", "setting": f"{steps} steps x batch {batch}",
                         "time": f"{per_call:.3f} s/call", "throughput": f"{batch / per_call:.2f} views/s",
                         "extra": f"{steps * batch * 2 / per_call:.1f} UNet evals/s"})


def clip_model(args, device: torch.device):
    from tta.models.clip import load_clip_classifier

    if args.full_size:  # ViT-B/16, 1,000 ImageNet classes, random weights (no download)
        return load_clip_classifier("ViT-B-16", device=device)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_clip import build_tiny_clip

    spec = build_tiny_clip(Path(args.tmp) / "clip")
    return load_clip_classifier(spec[5:], class_names=[f"class {i}" for i in range(10)], device=device)


def fill_cache(views, names: list[str]) -> None:
    """Write smooth random views (compress like natural images) for ``names`` into the cache."""
    from tta.augment.diffusion import to_uint8

    side = views.spec.resolution
    g = torch.Generator().manual_seed(0)
    for name in names:
        low = torch.rand(views.num_views, 3, max(side // 8, 2), max(side // 8, 2), generator=g)
        full = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
        for k, view in enumerate(to_uint8(full)):
            views.cache.save(name, k, view)


def bench_latency(args, device: torch.device, rows: list[dict]) -> None:
    from tta import methods

    model = clip_model(args, device)
    n = args.images
    x = torch.rand(n + 1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    ids = torch.arange(n + 1)
    cache = Path(args.tmp) / "cache"
    views = make_views(args, device, 63, 8, 50, cache)
    fill_cache(views, [f"#{i}" for i in ids.tolist()])
    read_time = [0.0]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.amp
                else contextlib.nullcontext())
    for name, kwargs in (("tpt", {}), ("difftpt", {"diffusion_views": views})):
        method = methods.build(name, copy_model(model), num_classes=model.num_classes, **kwargs).to(device)
        if name == "difftpt":  # count the cache reads through a wrapper around the source
            method.views.diffusion = _Timed(views, read_time)
        with autocast:
            method(x[:1], ids=ids[:1])  # warm-up (first image)
            sync(device)
            read_time[0] = 0.0
            start = time.perf_counter()
            method(x[1:], ids=ids[1:])  # one stream batch of n images, tuned one by one (as the engine does)
            sync(device)
        ms = (time.perf_counter() - start) / n * 1e3
        hp = method.hparams()
        extra = f"{hp['num_views']} views, {hp['steps']} step(s)"
        if name == "difftpt":
            stats = views.stats
            extra += (f"; cache wait {read_time[0] / n * 1e3:.0f} ms/img, hits {stats['cache_hits']}, "
                      f"generated {stats['generated']}")
        arch = model.info.spec.split("/")[0]
        rows.append({"bench": f"latency {name}", "setting": f"{arch}, {model.num_classes} classes",
                     "time": f"{ms:.1f} ms/img", "throughput": f"{1e3 / ms:.2f} img/s", "extra": extra})


class _Timed:
    """Forwards to a DiffusionViews, adding the wall time of each call to ``total[0]``."""

    def __init__(self, views, total):
        self.views, self.total = views, total

    def __getattr__(self, name):
        return getattr(self.views, name)

    def __call__(self, images, names, **kwargs):
        start = time.perf_counter()
        try:
            return self.views(images, names, **kwargs)
        finally:
            self.total[0] += time.perf_counter() - start


def copy_model(model):
    import copy

    return copy.deepcopy(model)


def print_table(rows: list[dict], header: str) -> None:
    cols = ["bench", "setting", "time", "throughput", "extra"]
    print(f"\n{header}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--full-size", action="store_true", help="real-size SD 1.x pipeline and CLIP ViT-B/16 (random)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="inference steps (tiny: 2 10; full: 50)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="variations per call (default 1 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per setting (tiny 3, full 1)")
    p.add_argument("--images", type=int, default=None, help="timed images for the latency (tiny 4, full 4)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="CUDA: no bf16 autocast for TPT/DiffTPT")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.steps = args.steps or ([50] if args.full_size else [2, 10])
    args.batch = args.batch or [1, 8]
    args.repeats = args.repeats or (1 if args.full_size else 3)
    args.images = args.images or 4
    args.dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        if args.full_size:
            args.pipe = full_size_pipeline(device, args.dtype)
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_diffusion import build_image_variation_pipeline

            args.pipe_dir = build_image_variation_pipeline(Path(tmp) / "pipe")
        built = time.perf_counter() - started
        if not args.skip_generation:
            bench_generation(args, device, rows)
        if not args.skip_latency:
            bench_latency(args, device, rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    size = "full-size SD 1.x image variations + CLIP ViT-B/16 (random weights)" if args.full_size else "tiny models"
    print_table(rows, f"DiffTPT bench on {name}, {size}; models built in {built:.1f} s, "
                      f"total {time.perf_counter() - started:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
