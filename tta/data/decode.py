"""Reading and decoding image files, on the CPU or in batches on the GPU, plus resize / centre crop.

Two paths produce the same pixels up to one grey level:

* **CPU**: ``decode_image`` (libjpeg / libpng) per file, then resize and crop on the uint8 tensor
  (torchvision's antialiased uint8 path, the tensor twin of PIL's ``Resize``), usually inside
  DataLoader worker processes.
* **CUDA**: the file bytes are read on the CPU (cheap I/O) and decoded in one call on the GPU
  (``torchvision.io.decode_jpeg(list, device="cuda")``, nvJPEG); resize and crop then run on the GPU
  and the result is rounded to whole grey levels, as the uint8 pipeline does. Files nvJPEG cannot
  decode (PNG, CMYK or otherwise unusual JPEGs) fall back to the CPU decoder one by one.

Preprocessing follows torchvision's ``Resize(size)`` (shorter side to ``size``, bilinear,
antialiased) and ``CenterCrop(size)`` (zero padding when the image is smaller than the crop).
A file that cannot be read or decoded is reported as a :class:`BadImage`, never silently dropped.
Every image becomes 3-channel RGB (greyscale files are repeated, alpha is dropped); 16-bit PNGs are
scaled to 8 bits (``round(v * 255 / 65535)``), so 8- and 16-bit files give the same [0, 1] values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif")
_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded (raised with ``on_bad_image="fail"``)."""


@dataclass(frozen=True)
class BadImage:
    """One file that was skipped: its path and why."""

    path: str
    error: str


@dataclass(frozen=True)
class Preprocess:
    """``Resize(resize)`` (shorter side; ``None``: keep) then ``CenterCrop(crop)`` (``None``: keep)."""

    resize: int | None = None
    crop: int | None = None

    def output_size(self) -> tuple[int, int] | None:
        return (self.crop, self.crop) if self.crop else None

    def __call__(self, image: Tensor) -> Tensor:
        """Apply to one (3, H, W) image (uint8 or float, any device); keeps the dtype."""
        from torchvision.transforms.v2 import functional as F

        if self.resize:
            h, w = image.shape[-2:]
            if min(h, w) != self.resize:
                if image.dtype == torch.uint8 and image.device.type != "cpu":
                    image = image.float()
                image = F.resize(image, [self.resize], antialias=True)
                if image.is_floating_point():
                    image = image.round_().clamp_(0, 255)
        if self.crop:
            image = F.center_crop(image, [self.crop, self.crop])
        return image


def read_bytes(path: str | os.PathLike) -> Tensor:
    """The raw bytes of a file as a 1-D uint8 tensor."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data:
        raise BadImageError("empty file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def to_uint8(image: Tensor) -> Tensor:
    """Whole 8-bit grey levels of a decoded image: uint8 as it is; 16-bit (uint16, from 16-bit PNGs)
    scaled by 255 / 65535 and rounded, so that both depths map to the same [0, 1] range."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    raise BadImageError(f"unsupported decoded pixel type {image.dtype}")


def decode_cpu(data: Tensor, preprocess: Preprocess) -> Tensor:
    """Decode one encoded image on the CPU to (3, H, W) uint8 RGB and preprocess it (16-bit PNGs
    are reduced to 8 bits by :func:`to_uint8`)."""
    from torchvision.io import ImageReadMode, decode_image

    image = to_uint8(decode_image(data, mode=ImageReadMode.RGB))
    return preprocess(image).contiguous()


def decode_file_cpu(path: str | os.PathLike, preprocess: Preprocess) -> Tensor:
    return decode_cpu(read_bytes(path), preprocess)


def decode_batch_cuda(datas: Sequence[Tensor], preprocess: Preprocess, device: torch.device,
                      paths: Sequence[str] | None = None) -> tuple[list[Tensor | None], list[BadImage]]:
    """Decode a batch of encoded images on ``device`` (nvJPEG), falling back per image to the CPU.

    Returns one (3, H, W) float tensor with whole grey levels in [0, 255] per input (``None`` for
    files that cannot be decoded) and the list of those bad files.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Tensor | None] = [None] * len(datas)
    bad: list[BadImage] = []
    jpeg = [i for i, d in enumerate(datas) if _complete_jpeg(d)]
    decoded: dict[int, Tensor] = {}
    if jpeg:
        try:
            images = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(jpeg, images))
        except RuntimeError:
            for i in jpeg:  # find the culprit(s); the others still decode on the GPU
                try:
                    decoded[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    for i, data in enumerate(datas):
        image = decoded.get(i)
        if image is None or image.shape[0] != 3:
            try:
                image = decode_cpu(data, Preprocess()).to(device, non_blocking=False)
            except RuntimeError as error:
                bad.append(BadImage(paths[i] if paths else str(i), _short(error)))
                continue
        out[i] = preprocess(image.float())
    return out, bad


def _complete_jpeg(data: Tensor) -> bool:
    """A JPEG with its end-of-image marker near the end. nvJPEG decodes truncated files without an
    error (grey bottom rows), libjpeg refuses them: anything else goes to the CPU decoder, which decides."""
    if data.numel() < 4 or data[:2].numpy().tobytes() != _JPEG_MAGIC:
        return False
    return _JPEG_END in data[-1024:].numpy().tobytes()


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if ", " in text and "/csrc/" in text:  # drop torchvision's source location prefix
        text = text.split(", ", 2)[-1]
    return text[:200]


def stack_images(images: Sequence[Tensor], what: str = "images") -> Tensor:
    """Stack (3, H, W) images; a clear error when their sizes differ (set ``crop`` in the data config)."""
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise ValueError(f"{what} have different sizes {sorted(sizes)[:4]}: set a centre crop (data.crop=...) so "
                         f"that every image of a batch has the same size")
    return torch.stack(list(images))
