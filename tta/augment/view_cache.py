"""On-disk cache of generated views (DiffTPT's offline diffusion images).

Layout::

    <root>/<key>/config.json                      the parameters that produced <key> (for humans)
    <root>/<key>/<h[:2]>/<h>/<view:03d>.png       one RGB PNG per (image, variation)

``key`` is the first 20 hex digits of the SHA-256 of the generation parameters (pipeline id and
revision, pipeline class, steps, guidance, strength, seed, resolution, preprocessing, a format
version) as canonical JSON; ``h`` is the SHA-256 of the image id, so any id (a relative path, a
URL, ``"gaussian_noise/5/n01440764/x.JPEG"``) maps to a safe path.

Why one PNG per (image, variation):

- PNG is lossless, so a view served from the cache is bit-identical to a freshly generated one
  (both are the pipeline output rounded to uint8, as PIL does when it makes images). A
  512x512 natural image takes 0.38-0.48 MB at ``compress_level=1``, against 0.79 MB raw in a
  uint8 safetensors file. So 63 views take about 28 MB per image, and a 1,000-image subset
  about 28 GB. Level 1 encodes about 4 times faster than the default level 6, for files about
  10% larger.
  The official DiffTPT generator saves the views with the source file's extension, usually
  JPEG, PIL's default quality 75. That lossy step is deliberately not reproduced.
- One file per variation makes every write small and atomic, so a run that is killed loses at
  most the views in flight. It also lets ``num_views`` grow later without regenerating anything.
- Each file is self-validating. PNG text chunks carry the image id, the variation index and the
  SHA-256 of the decoded pixels. A file that is truncated, corrupt, misplaced or has the wrong
  size fails ``load`` with :class:`InvalidCacheEntry`, and the caller regenerates it.

Writes go to a temporary file in the same folder, which is then ``os.replace``-d into place. So
readers and concurrent writers (several shards on one cache) never see a partial file, and a
crash at worst leaves a stray ``.*.tmp`` file, which is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

FORMAT_VERSION = 1
_ID, _VIEW, _SHA = "tta-image-id", "tta-view", "tta-sha256"


class InvalidCacheEntry(Exception):
    """A cache file exists but cannot be trusted (truncated, corrupt, wrong image or size)."""


def cache_key(params: Mapping[str, Any]) -> str:
    """Stable 20-hex-digit key of JSON-serialisable ``params`` (order-independent)."""
    blob = json.dumps(dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then move the temporary file onto ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ViewCache:
    """Views of images keyed by ``(image id, variation index)`` under one parameter key.

    Args:
        root: cache root folder (``~`` is expanded).
        params: the generation parameters; they determine :attr:`key`.
    """

    def __init__(self, root: str | Path, params: Mapping[str, Any]) -> None:
        self.params = {"format": FORMAT_VERSION, **params}
        self.key = cache_key(self.params)
        self.dir = Path(root).expanduser() / self.key

    def path(self, image_id: str, view: int) -> Path:
        """Where variation ``view`` of image ``image_id`` lives."""
        h = hashlib.sha256(image_id.encode()).hexdigest()
        return self.dir / h[:2] / h / f"{view:03d}.png"

    def load(self, image_id: str, view: int, size: int) -> torch.Tensor | None:
        """The cached view as a uint8 ``(3, size, size)`` tensor, or ``None`` if there is none.

        Raises:
            InvalidCacheEntry: the file exists but fails validation.
        """
        path = self.path(image_id, view)
        try:
            with Image.open(path) as img:
                img.load()
                text, mode, pixels = dict(img.text), img.mode, np.asarray(img)
        except FileNotFoundError:
            return None
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, zlib.error, ...)
            raise InvalidCacheEntry(f"{path}: unreadable ({err})") from err
        expected = {_ID: image_id, _VIEW: str(view), _SHA: hashlib.sha256(pixels.tobytes()).hexdigest()}
        if mode != "RGB" or pixels.shape != (size, size, 3) or any(
                text.get(k) != v for k, v in expected.items()):
            raise InvalidCacheEntry(f"{path}: content does not match its metadata or the request")
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def save(self, image_id: str, view: int, pixels: torch.Tensor) -> None:
        """Store a uint8 ``(3, H, W)`` view atomically."""
        array = np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())
        info = PngImagePlugin.PngInfo()
        info.add_text(_ID, image_id)
        info.add_text(_VIEW, str(view))
        info.add_text(_SHA, hashlib.sha256(array.tobytes()).hexdigest())
        path = self.path(image_id, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_config()
        _atomic_write(path, lambda tmp: Image.fromarray(array).save(
            tmp, format="PNG", pnginfo=info, compress_level=1))

    def _write_config(self) -> None:
        config = self.dir / "config.json"
        if not config.exists():
            _atomic_write(config, lambda tmp: tmp.write_text(json.dumps(self.params, indent=2)))
