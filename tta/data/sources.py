"""Image sources: random access to N labelled images, read in two stages.

A stream loads a batch in two steps so that the slow part can run ahead of the model:

1. ``raw = source.read(index, mode, on_bad)`` -- CPU work (reading files, CPU decoding), safe to
   run in a DataLoader worker process or a background thread; ``raw`` is picklable and pinnable.
2. ``images, ok, bad = source.finish(raw, device)`` -- puts the batch on the device as float
   (n_ok, C, H, W) in [0, 1] (decoding there on the GPU path; C = 3, or 1 for greyscale arrays). ``ok`` marks the requested samples
   that made it (``None``: all), ``bad`` lists the files that were skipped.

Sources: :class:`ArraySource` (a tensor or a NumPy array / memory map, uint8 NHWC or NCHW, or float
NCHW in [0, 1]), :class:`FileSource` (image files, decoded on the CPU or the GPU) and
:class:`NoiseSource` (uniform-noise images, seeded per sample, used as out-of-distribution data).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .decode import (IMAGE_EXTENSIONS, BadImage, BadImageError, Preprocess, _short, decode_batch_cuda,
                     decode_file_cpu, read_bytes, stack_images)

ON_BAD_IMAGE = ("skip", "fail")


class ImageSource:
    """Base class; see the module docstring for the two-stage protocol."""

    labels: Tensor  # int64, CPU
    name: str = "images"
    heavy: bool = False  # reading costs real CPU time (decoding): worth worker processes
    channels: int = 3  # channels of the images finish() returns (files are decoded to RGB)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, index: np.ndarray, mode: str = "cpu", on_bad: str = "skip") -> Any:
        raise NotImplementedError

    def finish(self, raw: Any, device: torch.device) -> tuple[Tensor, np.ndarray | None, list[BadImage]]:
        raise NotImplementedError

    def keys(self, index: np.ndarray) -> list[str] | None:
        """Per-sample string keys (relative file paths) or ``None``."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": len(self), "channels": self.channels}


def _as_labels(labels: Any) -> Tensor:
    labels = torch.as_tensor(np.asarray(labels)).to(torch.int64).reshape(-1)
    return labels.clone()


# ---------------------------------------------------------------------------------------------
# In-memory / memory-mapped arrays
# ---------------------------------------------------------------------------------------------


class ArraySource(ImageSource):
    """Images held in a tensor or a NumPy array (memory maps are read lazily, row by row).

    Args:
        images: RGB (N, H, W, 3) or (N, 3, H, W), or greyscale (N, H, W), (N, H, W, 1) or
            (N, 1, H, W); uint8, or float in [0, 1]. Greyscale stays 1-channel (``channels``); the
            stream converts to the model's channel count (``tta.data.channels``).
        labels: (N,) integers, or (M,) with ``offset`` selecting rows ``offset .. offset+len(labels)``.
        offset: first row of ``images`` that sample 0 refers to (CIFAR-C stacks 5 severities).
    """

    def __init__(self, images: Tensor | np.ndarray, labels: Any, *, offset: int = 0, name: str = "array"):
        self.images = images
        self.labels = _as_labels(labels)
        self.offset = int(offset)
        self.name = name
        shape = tuple(images.shape)
        self.no_channel_axis = len(shape) == 3
        if self.no_channel_axis:
            self.channels_last, self.channels = False, 1
            self.image_size = tuple(shape[1:3])
        elif len(shape) == 4 and (shape[1] in (1, 3) or shape[3] in (1, 3)):
            self.channels_last = shape[3] in (1, 3) and shape[1] not in (1, 3)
            self.channels = shape[3] if self.channels_last else shape[1]
            self.image_size = tuple(shape[1:3]) if self.channels_last else tuple(shape[2:4])
        else:
            raise ValueError(f"{name}: images must be RGB (N, H, W, 3) or (N, 3, H, W), or greyscale (N, H, W), "
                             f"(N, H, W, 1) or (N, 1, H, W); got shape {shape}")
        if self.offset + len(self.labels) > shape[0]:
            raise ValueError(f"{name}: {len(self.labels)} labels from row {self.offset} but only {shape[0]} images")

    def read(self, index: np.ndarray, mode: str = "cpu", on_bad: str = "skip") -> Tensor:
        rows = np.asarray(index, dtype=np.int64) + self.offset
        if isinstance(self.images, Tensor):
            return self.images[torch.from_numpy(rows)]
        order = np.argsort(rows, kind="stable")  # sorted reads are kind to memory maps
        data = np.asarray(self.images[rows[order]])
        out = np.empty_like(data)
        out[order] = data
        return torch.from_numpy(out)

    def finish(self, raw: Tensor, device: torch.device) -> tuple[Tensor, None, list[BadImage]]:
        x = raw.to(device, non_blocking=True)
        if self.no_channel_axis:
            x = x.unsqueeze(1)
        elif self.channels_last:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x.contiguous(), None, []


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    """CPU-decoded uint8 images of the readable samples (pinnable for fast copies)."""

    images: Tensor | None
    ok: np.ndarray
    bad: list[BadImage]

    def pin_memory(self) -> "_Decoded":
        if self.images is not None and not self.images.is_pinned():
            self.images = self.images.pin_memory()
        return self


@dataclass
class _Encoded:
    """File bytes for decoding on the GPU."""

    datas: list[Tensor]
    paths: list[str]
    ok: np.ndarray
    bad: list[BadImage] = field(default_factory=list)

    def pin_memory(self) -> "_Encoded":
        return self


_IO_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    global _IO_POOL
    if _IO_POOL is None:
        _IO_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tta-io")
    return _IO_POOL


class FileSource(ImageSource):
    """Image files under ``root`` (relative paths ``files``), decoded on the CPU or the GPU.

    ``mode="cpu"``: decode + preprocess here (in a worker); ``mode="cuda"``: read bytes here, decode
    on the GPU in :meth:`finish`. Unreadable files are skipped and reported, or raise
    :class:`BadImageError` with ``on_bad="fail"``.
    """

    heavy = True

    def __init__(self, root: str | os.PathLike, files: Sequence[str], labels: Any, preprocess: Preprocess,
                 *, name: str = "files"):
        self.root = str(root)
        self.files = list(files)
        self.labels = _as_labels(labels)
        self.preprocess = preprocess
        self.name = name
        if len(self.files) != len(self.labels):
            raise ValueError(f"{name}: {len(self.files)} files but {len(self.labels)} labels")
        self.image_size = preprocess.output_size()

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def keys(self, index: np.ndarray) -> list[str]:
        return [self.files[i] for i in index]

    def read(self, index: np.ndarray, mode: str = "cpu", on_bad: str = "skip") -> _Decoded | _Encoded:
        paths = [self.path(int(i)) for i in index]
        ok = np.ones(len(paths), dtype=bool)
        bad: list[BadImage] = []
        if mode == "cuda":
            def load(path: str) -> Tensor | str:
                try:
                    return read_bytes(path)
                except (OSError, BadImageError) as error:
                    return _short(error)

            results = list(_io_pool().map(load, paths)) if len(paths) > 4 else [load(p) for p in paths]
            datas = []
            for i, (path, result) in enumerate(zip(paths, results)):
                if isinstance(result, str):
                    _bad(path, result, on_bad, bad)
                    ok[i] = False
                else:
                    datas.append(result)
            return _Encoded(datas, [p for p, k in zip(paths, ok) if k], ok, bad)
        images = []
        for i, path in enumerate(paths):
            try:
                images.append(decode_file_cpu(path, self.preprocess))
            except (OSError, RuntimeError, BadImageError) as error:
                _bad(path, _short(error), on_bad, bad)
                ok[i] = False
        stacked = stack_images(images, f"images of {self.name}") if images else None
        return _Decoded(stacked, ok, bad)

    def finish(self, raw: _Decoded | _Encoded, device: torch.device) -> tuple[Tensor, np.ndarray, list[BadImage]]:
        if isinstance(raw, _Encoded):
            images, bad = decode_batch_cuda(raw.datas, self.preprocess, device, raw.paths)
            ok = raw.ok.copy()
            if bad:
                kept = np.flatnonzero(ok)
                for j, image in enumerate(images):
                    if image is None:
                        ok[kept[j]] = False
            good = [im for im in images if im is not None]
            x = stack_images(good, f"images of {self.name}").div_(255.0) if good else None
            return x, ok, raw.bad + bad
        x = None
        if raw.images is not None:
            x = raw.images.to(device, non_blocking=True).float().div_(255.0)
        return x, raw.ok, raw.bad


def _bad(path: str, error: str, on_bad: str, bad: list[BadImage]) -> None:
    if on_bad == "fail":
        raise BadImageError(f"cannot read image {path}: {error} (on_bad_image=fail; use on_bad_image=skip to skip "
                            f"and count such files)")
    bad.append(BadImage(path, error))


# ---------------------------------------------------------------------------------------------
# Noise images (out-of-distribution samples)
# ---------------------------------------------------------------------------------------------


class NoiseSource(ImageSource):
    """``n`` uniform-noise images of ``size``; sample ``i`` is the same for the same ``seed``."""

    def __init__(self, n: int, size: tuple[int, int], seed: int = 0, *, name: str = "noise"):
        self.labels = torch.zeros(int(n), dtype=torch.int64)
        self.image_size = tuple(size)
        self.seed = int(seed)
        self.name = name

    def read(self, index: np.ndarray, mode: str = "cpu", on_bad: str = "skip") -> Tensor:
        return torch.from_numpy(np.asarray(index, dtype=np.int64))

    def finish(self, raw: Tensor, device: torch.device) -> tuple[Tensor, None, list[BadImage]]:
        h, w = self.image_size
        images = []
        for i in raw.tolist():
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * i + 17) % (2**63))
            images.append(torch.rand(3, h, w, generator=generator))
        return torch.stack(images).to(device) if images else torch.zeros(0, 3, h, w, device=device), None, []


# ---------------------------------------------------------------------------------------------
# Class-folder indexing (ImageFolder layout)
# ---------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def index_class_folders(folder: str | os.PathLike, classes: Sequence[str], *, subset: Iterable[str] | None = None,
                        what: str = "dataset") -> tuple[list[str], np.ndarray]:
    """Image files of ``folder/<class>/*`` as (relative paths, labels), in ImageFolder order.

    Labels are positions in ``classes``; class folders come in ``classes`` order and files sorted by
    name, so with a sorted class list the sample order equals torchvision's ``ImageFolder`` (and
    order files made for it index the same images). A folder name missing from ``classes`` is an
    error; classes without a folder are allowed (a partial dataset). ``subset``: keep only files
    named in it (``<class>/<file>`` or ``<file>``); every entry must be found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected the folder {folder} (class folders <class>/<image files>)")
    position = {c: i for i, c in enumerate(classes)}
    found = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    unknown = [name for name in found if name not in position]
    if unknown:
        raise ValueError(f"{what}: class folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} in "
                         f"{folder} are not in the class list ({len(classes)} classes, e.g. "
                         f"{', '.join(list(classes)[:3])}): use the matching data config or set data.classes")
    wanted = None if subset is None else set(subset)
    matched: set[str] = set()
    files: list[str] = []
    labels: list[int] = []
    for name in sorted(found, key=position.__getitem__):
        names = sorted(e.name for e in os.scandir(folder / name) if e.is_file() and _is_image(e.name))
        for file in names:
            rel = f"{name}/{file}"
            if wanted is not None:
                if rel in wanted:
                    matched.add(rel)
                elif file in wanted:
                    matched.add(file)
                else:
                    continue
            files.append(rel)
            labels.append(position[name])
    if wanted is not None and matched != wanted:
        missing = sorted(wanted - matched)
        raise FileNotFoundError(f"{what}: {len(missing)} file(s) of the subset list are not in {folder}, e.g. "
                                f"{', '.join(missing[:3])}")
    if not files:
        raise FileNotFoundError(f"{what}: no image files found under {folder}/<class>/ (extensions: "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
    return files, np.asarray(labels, dtype=np.int64)


def index_image_files(folder: str | os.PathLike, *, what: str = "folder") -> list[str]:
    """Every image file below ``folder`` (recursively), as sorted relative paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected the folder {folder}")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and _is_image(p.name))
    if not files:
        raise FileNotFoundError(f"{what}: no image files found below {folder}")
    return files
