"""Clean images of a data config, for methods that need them (EATA's Fisher) and the forgetting setting.

:func:`clean_data_for` is what a run hands a method that declared it needs clean images: digits-C's
training split (``fisher_split``) as one shuffled tensor, or a :func:`clean_batches` stream of the
ImageNet-C / CIFAR-C clean images; ``None`` (or an error naming what to set) when there are none.

Where the clean images are (``clean_root`` when set, else the on-the-fly configs' ``root``, which
is the clean set itself):

==========================  =====================================================================
kind                        clean images
==========================  =====================================================================
imagenet_c                  ``clean_root``: clean ImageNet val, ``<dir>/val/<wnid>/*`` or ``<dir>/<wnid>/*``
imagenet_c_onthefly         ``clean_root``, else ``root`` (the same layout)
cifar_c                     ``clean_root``: the clean test set (torchvision's pickles or ``test_images.npy``)
cifar_c_onthefly            ``clean_root``, else ``root`` (the same layouts)
==========================  =====================================================================

ImageNet images get ``Resize(256) -> CenterCrop(224)`` (released: ``clean_resize``/``clean_crop``;
on the fly: the config's ``resize``/``crop``, as its test images). The folder is only indexed; a
:func:`clean_batches` stream then decodes just the samples it takes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .benchmarks import loading_options, class_list, preprocess_of
from .checks import positive_int
from .sources import FileSource, ImageSource
from .stream import Domain, Segment, Stream, shuffled

CLEAN_KINDS = ("imagenet_c", "imagenet_c_onthefly", "cifar_c", "cifar_c_onthefly")
SPLIT_KINDS = ("digits_c",)  # kinds whose data config may name a clean split (``fisher_split``)
DEFAULT_HINT = "or pass a precomputed file instead (EATA: method.fisher_path=<file>)"


def clean_root_of(config: dict[str, Any]) -> str | None:
    """``clean_root``, else ``root`` for the on-the-fly kinds (their root is the clean set)."""
    kind = config.get("kind", config.get("name"))
    root = config.get("clean_root")
    if not root and str(kind).endswith("_onthefly"):
        root = config.get("root")
    return str(root) if root else None


def clean_source(config: dict[str, Any], *, purpose: str = "clean images") -> ImageSource:
    """The clean images of an ImageNet-C / CIFAR-C data config (indexed, not loaded).

    A missing folder raises ``FileNotFoundError`` naming the folder, the layout expected and the
    config key to set; ``purpose`` says what the images are for in that message."""
    kind = config.get("kind", config.get("name"))
    name = config.get("name", kind)
    if kind not in CLEAN_KINDS:
        raise ValueError(f"{name}: no clean images known for data kind {kind!r} (only {', '.join(CLEAN_KINDS)})")
    if kind.startswith("imagenet"):
        from .imagenet_c import CLEAN_LAYOUT as layout
    else:
        from .cifar_c import cifar_dataset, clean_layouts

        layout = clean_layouts(cifar_dataset(config))
    key = "data.clean_root" + (" (default: data.root)" if kind.endswith("_onthefly") else "")  # for messages
    root = clean_root_of(config)
    if not root:
        raise FileNotFoundError(f"{name}: {purpose}: no clean images configured: set {key} to the clean folder ({layout})")
    path = Path(os.path.expandvars(root)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: {purpose}: expected the clean folder {path} ({layout}); check {key}")
    try:
        if kind.startswith("imagenet"):
            return _imagenet_source(config, path, onthefly=kind.endswith("_onthefly"))
        return _cifar_source(config, path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{purpose}: {error}; check {key}") from error


def _imagenet_source(config: dict[str, Any], path: Path, *, onthefly: bool) -> FileSource:
    from .imagenet_c import CLEAN_LAYOUT, clean_folder, clean_source as released_clean_source
    from .sources import index_class_folders

    if not onthefly:  # the loader of setting=forgetting: clean_resize/clean_crop (256/224)
        return released_clean_source(config, path, name="imagenet_val")
    folder = clean_folder(path)  # as the on-the-fly loader: the test images' resize/crop
    files, labels = index_class_folders(folder, class_list(config) or [], what=f"{config.get('name')} clean images "
                                        f"(expected {CLEAN_LAYOUT})")
    return FileSource(folder, files, labels, preprocess_of(config, resize=256, crop=224), name="imagenet_val")


def _cifar_source(config: dict[str, Any], path: Path) -> ImageSource:
    from .cifar_c import cifar_dataset, load_clean_test_set
    from .sources import ArraySource

    dataset = cifar_dataset(config)
    images, labels = load_clean_test_set(path, dataset, name=config.get("name", dataset))
    return ArraySource(images, labels, name=f"{dataset}_test")


def clean_batches(config: dict[str, Any], *, num_samples: int, seed: int, batch_size: int = 64,
                  device: torch.device | str = "cpu", purpose: str = "clean images", **loading: Any) -> Stream:
    """``num_samples`` clean images in a seeded random order (``seed``), as a stream of batches of
    [0, 1] images on ``device``; only those samples are ever read. ``loading``: ``num_workers``,
    ``prefetch``, ``decode``, ``on_bad_image`` (default: the data config's)."""
    source = clean_source(config, purpose=purpose)
    order = shuffled(len(source), int(seed), "fisher")[: int(num_samples)]
    return Stream([Domain("clean", source)], [Segment("clean", [0] * len(order), order)], batch_size=batch_size,
                  seed=int(seed), device=device, info={"dataset": config.get("name"), "setting": "clean"},
                  **loading_options(config, **loading))


def clean_data_for(config: dict[str, Any], *, num_samples: int, seed: int, batch_size: int = 64,
                   device: torch.device | str = "cpu", required: bool = True, on_bad_image: str | None = None,
                   purpose: str = "clean images", hint: str | None = None) -> Tensor | Stream | None:
    """Clean images of the data ``config`` for a method that needs them (EATA's Fisher), in an order
    seeded by ``seed`` (as EATA's ``main.py`` shuffles its clean set before taking its first images).

    * ``fisher_split`` (digits-C, e.g. ``train``): that split as one tensor (N, 3, 32, 32) in [0, 1] on
      the CPU, shuffled by ``torch.randperm`` seeded with ``seed`` and cut to its first ``num_samples``;
    * ImageNet-C / CIFAR-10/100-C (released and on the fly): ``num_samples`` images of the clean set
      (``data.clean_root``; on-the-fly configs default to ``data.root``) as a :func:`clean_batches`
      stream of ``batch_size`` batches on ``device``, which reads only those images;
    * any other kind: ``None``.

    Args:
        required: the method cannot run without them. Missing clean images (a kind without any, or
            a clean folder not configured or not found) then raise an error that names the folder,
            the config key and ``hint``; else they give ``None``.
        on_bad_image: ``skip`` or ``fail`` (default: the data config's).
        purpose: what the images are for, in error messages (``"EATA's Fisher"``).
        hint: what else the user can do, appended to errors (default :data:`DEFAULT_HINT`).
    """
    num_samples = positive_int(num_samples, "num_samples")
    batch_size = positive_int(batch_size, "batch_size")
    hint = DEFAULT_HINT if hint is None else hint
    kind = config.get("kind", config.get("name"))
    name = config.get("name", kind)
    split = config.get("fisher_split")
    if split:
        if kind not in SPLIT_KINDS:
            raise ValueError(f"{name}: fisher_split is only implemented for {', '.join(SPLIT_KINDS)} data, not "
                             f"{kind!r}" + (f"; {hint}" if hint else ""))
        from .digits import load_digits_split

        images, _ = load_digits_split(split)
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))
        return images[order[:num_samples]]
    if kind not in CLEAN_KINDS:
        if not required:
            return None
        raise ValueError(f"{name}: {purpose}: no clean images known for data kind {kind!r} (only "
                         f"{', '.join(CLEAN_KINDS + SPLIT_KINDS)})" + (f"; {hint}" if hint else ""))
    try:
        return clean_batches(config, num_samples=num_samples, seed=seed, batch_size=batch_size, device=device,
                             purpose=purpose, on_bad_image=on_bad_image)
    except FileNotFoundError as error:
        if not required:
            return None
        raise FileNotFoundError(f"{error}" + (f"; {hint}" if hint else "")) from None
