"""Pre-generate DiffTPT diffusion views (Feng et al., ICCV 2023) for an image folder.

The script does the work of DiffTPT's ``image_generator_R.py``, plus seeding, batching,
resuming and sharding. Images are read from an ImageFolder layout ``<root>/<class>/<image>``. An
image's id is its path relative to ``root``. Views go to the :class:`tta.augment.diffusion.DiffusionViews`
cache, where a DiffTPT run with the same parameters finds them.

Stream preprocessing: by default the pipeline is conditioned on the full image file, as the
official generator does; a DiffTPT run finds these views when its stream passes the files on
unchanged (``data.resize=0 data.crop=0 batch_size=1``, the exact protocol). For a run on a
resized/cropped stream (the default ``data.resize=224 data.crop=224``), pass the same ``--resize``
/ ``--crop`` (and ``--interpolation``): the views are then conditioned on the stream's pixels and
named ``<class>/<file>@resize224-crop224-bicubic``, as :mod:`tta.augment.mixed_views` names them.

Resuming: images whose views are all cached and valid are skipped without being read. Killing
the script and running it again finishes the rest. Half-done images keep their finished
variations, and corrupt files are regenerated. ``--limit N`` stops after N images that needed
generation, for time-boxed jobs. The last line printed is a JSON summary.

Examples::

    # the official ImageNet-R protocol: 5 random images per class (1,000 images), 63 views each
    python scripts/generate_diffusion_views.py --root data/imagenet-r --per-class 5
    # four GPUs, one shard each
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python scripts/generate_diffusion_views.py \\
        --root data/imagenet-r --per-class 5 --shard $i --num-shards 4 & done
"""
from __future__ import annotations

import argparse
import json
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import to_tensor
from tqdm.auto import tqdm

from tta.augment.diffusion import DEFAULT_CACHE_DIR, DEFAULT_PIPELINE, DiffusionViews


def list_images(root: Path) -> list[str]:
    """Sorted ids (``<class>/<file>``, with ``/`` separators) of the images under ``root``."""
    return sorted(
        f"{cls.name}/{f.name}" for cls in root.iterdir() if cls.is_dir()
        for f in cls.iterdir() if f.suffix.lower() in IMG_EXTENSIONS)


def select(ids: list[str], subset: int | None, per_class: int | None, seed: int) -> list[str]:
    """A seeded random subset: ``per_class`` images of each class, then ``subset`` images."""
    rng = random.Random(seed)
    if per_class is not None:
        by_class = defaultdict(list)
        for image_id in ids:
            by_class[image_id.split("/", 1)[0]].append(image_id)
        ids = [i for members in by_class.values() for i in rng.sample(members, min(per_class, len(members)))]
    if subset is not None:
        ids = rng.sample(ids, min(subset, len(ids)))
    return sorted(ids)


def read_image(path: Path, preprocess=None):
    """The conditioning image: ToTensor of the file (official), or the stream's pixels for ``preprocess``."""
    if preprocess is not None:  # the stream's CPU decoding path, pixel for pixel
        from tta.data.decode import decode_file_cpu

        return decode_file_cpu(path, preprocess).float() / 255
    with Image.open(path) as img:
        return to_tensor(img.convert("RGB"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="image folder <root>/<class>/<image>")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="hub name or save_pretrained folder")
    p.add_argument("--revision", default=None, help="hub revision (default: v2.0 for the default pipeline)")
    p.add_argument("--pipeline-class", default=None, help="diffusers class name (default: model_index.json)")
    p.add_argument("--num-views", type=int, default=63)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--strength", type=float, default=None, help="img2img pipelines only")
    p.add_argument("--resolution", type=int, default=None, help="output side (default: pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--subset", type=int, default=None, help="keep N random images")
    p.add_argument("--per-class", type=int, default=None, help="keep K random images per class (official: 5)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--limit", type=int, default=None, help="stop after generating for N images")
    p.add_argument("--resize", type=int, default=None, help="condition on the stream's Resize(N) (data.resize)")
    p.add_argument("--crop", type=int, default=None, help="... and CenterCrop(N) (data.crop)")
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"),
                   help="resize interpolation of the stream (data.interpolation)")
    args = p.parse_args(argv)
    if not 0 <= args.shard < args.num_shards:
        p.error("need 0 <= --shard < --num-shards")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Generate the missing views of this shard; return (and print) a summary."""
    args = parse_args(argv)
    ids = select(list_images(args.root), args.subset, args.per_class, args.subset_seed)
    ids = ids[args.shard::args.num_shards]
    views = DiffusionViews(
        args.pipeline, args.revision, pipeline_class=args.pipeline_class, num_views=args.num_views,
        steps=args.steps, guidance_scale=args.guidance, strength=args.strength, seed=args.seed,
        resolution=args.resolution, cache_dir=args.cache_dir, device=args.device,
        batch_size=args.batch_size)
    preprocess, tag = None, ""
    if args.resize is not None or args.crop is not None:
        from tta.augment.mixed_views import preprocess_tag
        from tta.data.folders import FolderPreprocess

        preprocess = FolderPreprocess(resize=args.resize, crop=args.crop, interpolation=args.interpolation)
        tag = preprocess_tag(preprocess)
    summary = {"images": len(ids), "complete": 0, "processed": 0}
    for image_id in (bar := tqdm(ids, unit="img", desc=f"shard {args.shard}/{args.num_shards}")):
        name = image_id + tag
        if not views.missing(name):
            summary["complete"] += 1
            continue
        if args.limit is not None and summary["processed"] >= args.limit:
            break
        views(read_image(args.root / image_id, preprocess)[None], [name])
        summary["processed"] += 1
        bar.set_postfix(generated=views.stats["generated"])
    summary.update(unfinished=len(ids) - summary["complete"] - summary["processed"],
                   generated_views=views.stats["generated"], cached_views=views.stats["cache_hits"],
                   invalid_views=views.stats["invalid"], cache=os.fspath(views.cache.dir))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
