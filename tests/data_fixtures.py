"""Tiny on-disk datasets in the released layouts, for the stream / dataset / CLI tests.

Everything is small (a few 32-64 px JPEGs, a few dozen CIFAR-sized arrays) and deterministic.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

WNIDS = ["n01440764", "n01443537", "n01484850"]  # the first three of the sorted 1,000 ImageNet wnids
CORRUPTIONS = ["gaussian_noise", "brightness"]


def _smooth_image(generator: torch.Generator, h: int, w: int) -> torch.Tensor:
    base = torch.rand(1, 3, 4, 4, generator=generator)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (x * 255).round().to(torch.uint8)


def write_jpeg(path: Path, image: torch.Tensor) -> None:
    from torchvision.io import encode_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_jpeg(image, quality=90).numpy()))


def make_imagenet_c(root: Path, *, corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5), classes=WNIDS,
                    per_class: int = 2, size: int = 64, seed: int = 0) -> Path:
    """``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, ``size`` x ``size``."""
    generator = torch.Generator().manual_seed(seed)
    for corruption in corruptions:
        for severity in severities:
            for wnid in classes:
                for i in range(per_class):
                    write_jpeg(root / corruption / str(severity) / wnid / f"ILSVRC2012_val_{i:08d}.JPEG",
                               _smooth_image(generator, size, size))
    return root


def make_imagenet_val(root: Path, *, classes=WNIDS, per_class: int = 2, size: tuple[int, int] = (72, 90),
                      nested: bool = True, seed: int = 1) -> Path:
    """Clean val images of varying aspect: ``<root>/val/<wnid>/*.JPEG`` (or without ``val/``)."""
    generator = torch.Generator().manual_seed(seed)
    folder = root / "val" if nested else root
    for k, wnid in enumerate(classes):
        for i in range(per_class):
            h, w = size if (i + k) % 2 == 0 else size[::-1]
            write_jpeg(folder / wnid / f"ILSVRC2012_val_{k * per_class + i:08d}.JPEG", _smooth_image(generator, h, w))
    return root


def cifar_images(n: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int64)
    return images, labels


def make_cifar_c(root: Path, *, corruptions=CORRUPTIONS, n: int = 8, seed: int = 0) -> Path:
    """``<root>/<corruption>.npy`` (5 n, 32, 32, 3) uint8 and ``<root>/labels.npy`` (5 n,)."""
    root.mkdir(parents=True, exist_ok=True)
    _, labels = cifar_images(n, seed)
    for j, corruption in enumerate(corruptions):
        images, _ = cifar_images(5 * n, seed + 1 + j)
        np.save(root / f"{corruption}.npy", images)
    np.save(root / "labels.npy", np.tile(labels, 5))
    return root


def make_cifar_npy(root: Path, *, n: int = 8, seed: int = 5, num_classes: int = 10) -> Path:
    """``<root>/test_images.npy`` and ``<root>/test_labels.npy``."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = cifar_images(n, seed, num_classes)
    np.save(root / "test_images.npy", images)
    np.save(root / "test_labels.npy", labels)
    return root


def make_cifar_pickle(root: Path, *, dataset: str = "cifar10", n: int = 8, seed: int = 6) -> Path:
    """torchvision's layout: ``cifar-10-batches-py/test_batch`` or ``cifar-100-python/test``."""
    num_classes = 10 if dataset == "cifar10" else 100
    images, labels = cifar_images(n, seed, num_classes)
    folder, file, key = {"cifar10": ("cifar-10-batches-py", "test_batch", "labels"),
                         "cifar100": ("cifar-100-python", "test", "fine_labels")}[dataset]
    (root / folder).mkdir(parents=True, exist_ok=True)
    entry = {"data": images.transpose(0, 3, 1, 2).reshape(n, -1), key: labels.tolist()}
    with open(root / folder / file, "wb") as handle:
        pickle.dump(entry, handle)
    return root


def imagenet_config(root: Path, kind: str = "imagenet_c", **overrides) -> dict:
    from tta.data import load_data_config

    config = dict(load_data_config(kind))
    config.update(root=str(root), classes=list(WNIDS), corruptions=list(CORRUPTIONS), num_workers=0, crop=64)
    if kind == "imagenet_c_onthefly":
        config["resize"] = 72
    config.update(overrides)
    return config


def cifar_config(root: Path, name: str = "cifar10_c", **overrides) -> dict:
    from tta.data import load_data_config

    config = dict(load_data_config(name))
    config.update(root=str(root), corruptions=list(CORRUPTIONS))
    config.update(overrides)
    return config
