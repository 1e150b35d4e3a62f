"""Image-folder datasets (``kind: image_folder``): ImageNet val, -A, -R, -V2, -Sketch, or any
``<root>/<class folder>/<image>`` tree, each dataset one domain.

Layouts (the ``data.root`` of each config)::

    imagenet         <root>/<wnid>/*.JPEG          (ImageNet val sorted into its 1,000 wnid folders)
    imagenet_a       <root>/<wnid>/*.jpg           200 wnid folders
    imagenet_r       <root>/<wnid>/*.jpg           200 wnid folders
    imagenet_v2      <root>/<0..999>/*.jpeg        folders named by the label itself
    imagenet_sketch  <root>/<wnid>/*.JPEG          (the ``sketch`` folder of the release)
    image_folder     <root>/<class>/*              any tree; classes = the sorted folder names

The ``classes`` list of the config maps folder names to labels (label = position in the list; a
folder that is not in the list is an error, a class without a folder is allowed and reported);
``classes: null`` takes the sorted folder names, as ``torchvision.datasets.ImageFolder``. The
human-readable names for CLIP's text head are ``class_names``: a list, or a shipped list
(``imagenet``: the 1,000 names of CLIP/TPT; ``imagenet_a`` / ``imagenet_r``: their 200-class
subsets in label order), else the folder names with ``_`` read as spaces. ImageNet-A and -R keep
TPT's 200-class heads (the sorted wnid folders map to ImageNet labels through
``imagenet_a_mask`` / ``imagenet_r_mask``, ``tta/models/clip_classnames.py``); ImageNet-V2's folder
``k`` is label ``k`` (TPT reaches the same mapping through ``imagenet_v_mask``).

Images are decoded (on the GPU with ``decode: auto`` on CUDA) and preprocessed as CLIP and TPT do:
``Resize(resize)`` of the shorter side with **bicubic** interpolation (antialiased; ``interpolation:
bilinear`` for torchvision's default) and ``CenterCrop(crop)``, as [0, 1] tensors. ``data.subset=N``
/ ``data.subset_file`` restrict the dataset to a recorded subset (``tta/data/subset.py``).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .benchmarks import LOADERS, Benchmark, class_list, require_root
from .decode import Preprocess
from .sources import FileSource, index_class_folders
from .stream import Domain

log = logging.getLogger(__name__)

FOLDER_LAYOUT = "<root>/<class folder>/<image files>"
DEFAULT_SIZE = 224  # resize / crop when neither the config nor the model says
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class FolderPreprocess(Preprocess):
    """:class:`~tta.data.decode.Preprocess` with a choice of interpolation (CLIP/TPT: bicubic)."""

    interpolation: str = "bicubic"

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        if self.resize:
            h, w = image.shape[-2:]
            if min(h, w) != self.resize:
                mode = (F.InterpolationMode.BICUBIC if self.interpolation == "bicubic"
                        else F.InterpolationMode.BILINEAR)
                if image.dtype == torch.uint8 and image.device.type != "cpu":
                    image = image.float()
                image = F.resize(image, [self.resize], interpolation=mode, antialias=True)
                if image.is_floating_point():
                    image = image.round_().clamp_(0, 255)
        if self.crop:
            image = F.center_crop(image, [self.crop, self.crop])
        return image


def folder_classes(config: dict[str, Any], root: Path) -> list[str]:
    """The config's class list (folder names in label order), or the sorted folder names."""
    classes = class_list(config)
    if classes is not None:
        return classes
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"{config.get('name')}: no class folders in {root} (expected {FOLDER_LAYOUT})")
    return found


def clip_class_names(config: dict[str, Any]) -> list[str] | None:
    """The names CLIP's text head uses for a data config, in label order (see the module docstring).

    ``class_names`` (a list or ``imagenet`` / ``imagenet_a`` / ``imagenet_r``), else the ``classes``
    list, else the folder names under ``root``; ``None`` when none of these is available.
    """
    from ..models import clip_classnames as names

    shipped = {"imagenet": names.IMAGENET_CLASSES,
               "imagenet_a": names.subset_names(names.IMAGENET_A_INDICES),
               "imagenet_r": names.subset_names(names.IMAGENET_R_INDICES)}
    given = config.get("class_names")
    if isinstance(given, str):
        if given not in shipped:
            raise ValueError(f"unknown class_names list {given!r}; shipped: {sorted(shipped)} (or give a list)")
        result = list(shipped[given])
    elif given is not None:
        result = [str(n) for n in given]
    elif config.get("classes") == "imagenet":  # the shipped wnid list: label k is ImageNet class k
        result = list(names.IMAGENET_CLASSES)
    else:
        classes = class_list(config)
        if classes is None and config.get("kind") == "image_folder" and config.get("root"):
            classes = folder_classes(config, require_root(config, "image folder", FOLDER_LAYOUT))
        if classes is None:
            return None
        result = [c.replace("_", " ") for c in classes]
    expected = config.get("num_classes")
    if expected is not None and int(expected) != len(result):
        raise ValueError(f"{config.get('name')}: {len(result)} class names for num_classes={expected}")
    return result


@LOADERS.register("image_folder")
def image_folder(config: dict[str, Any], *, severity: Any = None, seed: int = 0, **_: Any) -> Benchmark:
    """One domain (the config's name) of every image under ``<root>/<class>/``."""
    name = config.get("name", "image_folder")
    root = require_root(config, config.get("description", "image folder"), config.get("layout", FOLDER_LAYOUT))
    classes = folder_classes(config, root)
    files, labels = index_class_folders(root, classes, what=f"{name} (expected {config.get('layout', FOLDER_LAYOUT)})")
    present = {f.split("/", 1)[0] for f in files}
    missing = [c for c in classes if c not in present]
    if missing:
        message = (f"{name}: {len(missing)} of {len(classes)} classes have no image folder under {root} "
                   f"(e.g. {', '.join(missing[:5])})")
        if config.get("require_all_classes", False):
            raise FileNotFoundError(message + "; set data.require_all_classes=false to run on a partial dataset")
        log.warning(message)
    interpolation = config.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{name}: interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    resize, crop = config.get("resize", config.get("image_size")), config.get("crop", config.get("image_size"))
    sizes = config.get("preprocess_choice") or {"resize": resize, "crop": crop, "source": "data config"}
    if resize is None and crop is None:  # nothing fitted them to a model (fit_preprocess_to_model)
        resize = crop = DEFAULT_SIZE
        sizes = {"resize": resize, "crop": crop, "source": f"default {DEFAULT_SIZE} (model input size unknown)"}
        log.warning("%s: data.resize / data.crop not set and no model input size known: using Resize(%d) + "
                    "CenterCrop(%d); set them to your model's input size", name, resize, crop)
    preprocess = FolderPreprocess(resize=resize, crop=crop, interpolation=interpolation)
    source = FileSource(root, files, labels, preprocess, name=name)
    domain = Domain(name, source)
    return Benchmark(name, [domain], clean=domain, image_size=preprocess.output_size(), preprocess=preprocess,
                     info={"root": str(root), "missing_classes": len(missing), "preprocess": sizes})


def fit_preprocess_to_model(data_cfg: dict[str, Any], input_size: tuple[int, int] | int | None, *,
                            crop_pct: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill an image-folder config's missing ``resize`` / ``crop`` from the model's input size.

    ``crop`` = the input size (the shorter side for a non-square one); ``resize`` =
    ``floor(crop / crop_pct)`` when the weights state their evaluation crop (timm's ``crop_pct``,
    torchvision's resize/crop sizes; e.g. 0.875: Resize(256) + CenterCrop(224)), else ``crop`` (the
    CLIP/TPT convention: Resize(224) + CenterCrop(224); a 32-px CIFAR model gets 32 / 32). Values the
    config states are kept. Without an input size nothing is filled and the loader falls back to 224
    with a warning (state ``model_input_size=`` or ``data.resize`` / ``data.crop``).

    Returns the updated config (a new dict; other kinds of data are returned unchanged) and the
    record entry ``{"resize", "crop", "source"}`` (empty for other kinds of data).
    """
    if data_cfg.get("kind") != "image_folder":
        return data_cfg, {}
    resize, crop = data_cfg.get("resize"), data_cfg.get("crop")
    if resize is not None and crop is not None:
        return data_cfg, {"resize": resize, "crop": crop, "source": "data config"}
    if input_size is None:
        return data_cfg, {"resize": resize, "crop": crop, "source": "unknown model input size"}
    h, w = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[-1]))
    stated = [k for k, v in (("resize", resize), ("crop", crop)) if v is not None]
    if crop is None:
        crop = min(h, w)
    if resize is None:
        resize = int(math.floor(crop / crop_pct)) if crop_pct else crop
    how = f"model input size {h}x{w}" + (f", crop_pct {crop_pct:g}" if crop_pct else "")
    if stated:
        how += f" ({', '.join(stated)} from the data config)"
    choice = {"resize": resize, "crop": crop, "source": how}
    return {**data_cfg, "resize": resize, "crop": crop, "preprocess_choice": choice}, choice


__all__ = ["FolderPreprocess", "clip_class_names", "fit_preprocess_to_model", "folder_classes", "image_folder"]
