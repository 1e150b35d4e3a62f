"""ImageNet-C: as released, or synthesised on the device from clean ImageNet val.

Released (``kind: imagenet_c``; Hendrycks & Dietterich's tarballs unpacked)::

    <root>/<corruption>/<severity>/<wnid>/*.JPEG      e.g. <root>/gaussian_noise/5/n01440764/ILSVRC2012_val_00000293.JPEG

The images are 224x224 already; preprocessing is ``CenterCrop(224)`` (``crop``), as in the
Niu-family code. On the fly (``kind: imagenet_c_onthefly``) from the clean validation set::

    <root>/val/<wnid>/*.JPEG   or   <root>/<wnid>/*.JPEG

with ``Resize(256) -> CenterCrop(224)`` (``resize``, ``crop``) and then ``corrupt`` on the device,
seeded per sample (the released files were additionally saved as JPEG, quality 85; the synthesised
images skip that step, so they differ slightly).

The class list (``classes: imagenet``: the 1,000 wnids, sorted, shipped in
``tta/data/assets/imagenet_wnids.txt``) fixes the labels: label = position in the list. A class
folder that is not in the list is an error; a missing class folder is allowed. All 50,000 images per
domain by default; ``subset_file`` (``<wnid>/<file>`` per line, e.g. the usual 5,000-image list) or
``subset=N`` (seeded) restricts every domain to the same images (``tta/data/subset.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .benchmarks import (LOADERS, Benchmark, class_list, corrupted_domains, corruptions_of, preprocess_of,
                         require_root, severities_of)
from .checks import integer_severities
from .sources import FileSource, index_class_folders
from .stream import Domain

RELEASED_LAYOUT = "<root>/<corruption>/<severity>/<wnid>/*.JPEG"
CLEAN_LAYOUT = "<root>/val/<wnid>/*.JPEG or <root>/<wnid>/*.JPEG"


def _classes(config: dict[str, Any]) -> list[str]:
    classes = class_list(config)
    if classes is None:
        raise ValueError(f"{config.get('name')}: the data config has no class list (classes: imagenet, a list, or a "
                         f"text file with one class folder name per line)")
    return classes


def clean_folder(root: Path) -> Path:
    """``<root>/val`` when it exists, else ``root`` itself."""
    return root / "val" if (root / "val").is_dir() else root


def clean_source(config: dict[str, Any], root: Path, *, name: str) -> FileSource:
    """The clean validation images under ``root`` with ``Resize(256) -> CenterCrop(224)``."""
    classes = _classes(config)
    folder = clean_folder(root)
    files, labels = index_class_folders(folder, classes, what=f"{name} (expected {CLEAN_LAYOUT})")
    preprocess = preprocess_of({"resize": config.get("clean_resize", 256), "crop": config.get("clean_crop", 224)})
    return FileSource(folder, files, labels, preprocess, name=name)


def _clean_from_config(config: dict[str, Any]):
    clean_root = config.get("clean_root")
    if not clean_root:
        return None

    def make() -> Domain:
        path = Path(str(clean_root)).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{config.get('name')}: clean_root {path} is not a folder ({CLEAN_LAYOUT})")
        return Domain("clean", clean_source(config, path, name="imagenet_val"))

    return make


@LOADERS.register("imagenet_c")
def imagenet_c(config: dict[str, Any], *, severity: int | list[int] | None = None, seed: int = 0,
               **_: Any) -> Benchmark:
    """Released ImageNet-C, one domain per severity x corruption (severity-major)."""
    root = require_root(config, "ImageNet-C", RELEASED_LAYOUT)
    classes = _classes(config)
    preprocess = preprocess_of(config, resize=None, crop=224)
    domains = []
    for s in integer_severities(severities_of(config, severity), f"{config.get('name', 'imagenet_c')} (released)"):
        for name in corruptions_of(config, synthesized=False):
            folder = root / name / str(s)
            if not folder.is_dir():
                raise FileNotFoundError(f"{config.get('name')}: expected the folder {folder} (ImageNet-C layout "
                                        f"{RELEASED_LAYOUT}); check data.root, data.corruptions and severity")
            files, labels = index_class_folders(folder, classes, what=f"ImageNet-C {name}/{s}")
            domains.append(Domain(f"{name}/{s}", FileSource(folder, files, labels, preprocess, name=f"{name}/{s}")))
    return Benchmark(config.get("name", "imagenet_c"), domains, clean=_clean_from_config(config),
                     image_size=preprocess.output_size(), preprocess=preprocess, info={"root": str(root)})


@LOADERS.register("imagenet_c_onthefly")
def imagenet_c_onthefly(config: dict[str, Any], *, severity: int | list[int] | None = None, seed: int = 0,
                        **_: Any) -> Benchmark:
    """Clean ImageNet val, corrupted on the device per batch (seeded per sample)."""
    root = require_root(config, "clean ImageNet val", CLEAN_LAYOUT)
    folder = clean_folder(root)
    classes = _classes(config)
    files, labels = index_class_folders(folder, classes, what=f"{config.get('name')} (expected {CLEAN_LAYOUT})")
    preprocess = preprocess_of(config, resize=256, crop=224)
    source = FileSource(folder, files, labels, preprocess, name="imagenet_val")
    domains = corrupted_domains(config, source, severities_of(config, severity))
    return Benchmark(config.get("name", "imagenet_c_onthefly"), domains, clean=Domain("clean", source),
                     image_size=preprocess.output_size(), preprocess=preprocess, info={"root": str(folder)})
