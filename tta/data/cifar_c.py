"""CIFAR-10-C / CIFAR-100-C: as released, or synthesised on the device from the clean test set.

Released (``kind: cifar_c``; Hendrycks & Dietterich's ``CIFAR-10-C.tar`` / ``CIFAR-100-C.tar``)::

    <root>/<corruption>.npy   uint8 (5 n, 32, 32, 3): severities 1..5 stacked, n images each (n = 10,000)
    <root>/labels.npy         (5 n,) or (n,) integer labels

On the fly (``kind: cifar_c_onthefly``) from the clean test set, in either layout:

* torchvision's download folder: ``<root>/cifar-10-batches-py/test_batch`` (CIFAR-10) or
  ``<root>/cifar-100-python/test`` (CIFAR-100), or those files directly in ``<root>``;
* NumPy: ``<root>/test_images.npy`` (uint8 (n, 32, 32, 3)) and ``<root>/test_labels.npy``.

``dataset: cifar10 | cifar100`` in the data config says which pickle to look for. The same layouts
serve as ``clean_root`` of the released configs (needed by the forgetting setting only).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .benchmarks import LOADERS, Benchmark, corrupted_domains, corruptions_of, require_root, severities_of
from .checks import integer_severities
from .sources import ArraySource
from .stream import Domain

RELEASED_LAYOUT = "<root>/<corruption>.npy and <root>/labels.npy"
_PICKLES = {"cifar10": ("cifar-10-batches-py", "test_batch", "labels"),
            "cifar100": ("cifar-100-python", "test", "fine_labels")}


def cifar_dataset(config: dict[str, Any]) -> str:
    dataset = str(config.get("dataset", "cifar10"))
    if dataset not in _PICKLES:
        raise ValueError(f"{config.get('name')}: dataset must be cifar10 or cifar100, got {dataset!r}")
    return dataset


def clean_layouts(dataset: str) -> str:
    folder, file, _ = _PICKLES[dataset]
    return (f"<root>/{folder}/{file} or <root>/{file} (torchvision's format), or <root>/test_images.npy with "
            f"<root>/test_labels.npy")


def load_clean_test_set(root: Path, dataset: str, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The clean test images (n, 32, 32, 3) uint8 and labels from ``root`` (see the module docstring)."""
    folder, file, key = _PICKLES[dataset]
    for path in (root / folder / file, root / file):
        if path.is_file():
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return np.ascontiguousarray(images), np.asarray(entry[key], dtype=np.int64)
    images, labels = root / "test_images.npy", root / "test_labels.npy"
    if images.is_file() and labels.is_file():
        return np.load(images, mmap_mode="r"), np.load(labels)
    raise FileNotFoundError(f"{name}: no clean {dataset} test set in {root}: expected {clean_layouts(dataset)}")


def _check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _num_classes(config: dict[str, Any]) -> int | None:
    from .benchmarks import num_classes_of

    return num_classes_of(config)


def _clean_from(config: dict[str, Any], root: str | Path | None):
    if not root:
        return None
    dataset = cifar_dataset(config)

    def make() -> Domain:
        path = Path(str(root)).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{config.get('name')}: clean_root {path} is not a folder ({clean_layouts(dataset)})")
        images, labels = load_clean_test_set(path, dataset, name=config.get("name", dataset))
        _check_labels(labels, _num_classes(config), f"{path} labels")
        return Domain("clean", ArraySource(images, labels, name=f"{dataset}_test"))

    return make


@LOADERS.register("cifar_c")
def cifar_c(config: dict[str, Any], *, severity: int | list[int] | None = None, seed: int = 0, **_: Any) -> Benchmark:
    """Released CIFAR-10-C / CIFAR-100-C, one domain per severity x corruption (memory-mapped)."""
    root = require_root(config, "CIFAR-C", RELEASED_LAYOUT)
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise FileNotFoundError(f"{config.get('name')}: expected the file {labels_path} ({RELEASED_LAYOUT})")
    all_labels = np.asarray(np.load(labels_path)).reshape(-1)
    domains = []
    for name in corruptions_of(config, synthesized=False):
        path = root / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{config.get('name')}: expected the file {path} ({RELEASED_LAYOUT}); check "
                                    f"data.root and data.corruptions")
        array = np.load(path, mmap_mode="r")
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or array.shape[0] % 5:
            raise ValueError(f"{path}: expected uint8 (5 n, H, W, 3) with the 5 severities stacked, got "
                             f"{array.dtype} {array.shape}")
        n = array.shape[0] // 5
        if len(all_labels) not in (n, 5 * n):
            raise ValueError(f"{labels_path} has {len(all_labels)} labels but {path} holds 5 x {n} images")
        for s in integer_severities(severities_of(config, severity), f"{config.get('name', 'cifar_c')} (released)"):
            labels = all_labels[(s - 1) * n: s * n] if len(all_labels) == 5 * n else all_labels
            _check_labels(labels, _num_classes(config), str(labels_path))
            domains.append((s, Domain(f"{name}/{s}", ArraySource(array, labels, offset=(s - 1) * n, name=f"{name}/{s}"))))
    domains.sort(key=lambda item: item[0])  # severity-major, like every other loader
    size = tuple(domains[0][1].source.image_size)
    return Benchmark(config.get("name", "cifar_c"), [d for _, d in domains], clean=_clean_from(config, config.get("clean_root")),
                     image_size=size, info={"root": str(root)})


@LOADERS.register("cifar_c_onthefly")
def cifar_c_onthefly(config: dict[str, Any], *, severity: int | list[int] | None = None, seed: int = 0,
                     **_: Any) -> Benchmark:
    """The clean CIFAR test set, corrupted on the device per batch (seeded per sample)."""
    dataset = cifar_dataset(config)
    root = require_root(config, f"clean {dataset} test set", clean_layouts(dataset))
    images, labels = load_clean_test_set(root, dataset, name=config.get("name", dataset))
    _check_labels(labels, _num_classes(config), f"{root} labels")
    source = ArraySource(images, labels, name=f"{dataset}_test")
    return Benchmark(config.get("name", "cifar_c_onthefly"), corrupted_domains(config, source, severities_of(config, severity)),
                     clean=Domain("clean", source), image_size=tuple(source.image_size), info={"root": str(root)})
