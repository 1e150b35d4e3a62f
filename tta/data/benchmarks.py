"""Build the stream a data config describes, in a given evaluation setting.

``build_stream(config, setting=..., severity=..., seed=..., batch_size=..., device=...)`` returns a
:class:`~tta.data.stream.Stream` (an iterable of :class:`~tta.data.stream.Batch`) and the engine
options the setting implies (``reset_each_domain``, ``open_set``).

A data config's ``kind`` picks a loader from :data:`LOADERS`; a loader turns the config into a
:class:`Benchmark` (its domains and, when it has them, its clean images). Loaders shipped here:

=====================  ==========================================================================
kind                   data
=====================  ==========================================================================
digits_c               the embedded digits-C benchmark (``tta/data/digits.py``)
imagenet_c             ImageNet-C as released: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``
imagenet_c_onthefly    clean ImageNet val (``<root>/val/<wnid>/*`` or ``<root>/<wnid>/*``), corrupted on the device
cifar_c                CIFAR-10-C / CIFAR-100-C as released: ``<root>/<corruption>.npy``, ``<root>/labels.npy``
cifar_c_onthefly       the clean CIFAR test set (torchvision's pickles or .npy), corrupted on the device
=====================  ==========================================================================

The data-config schema is described in ``data_configs/README.md``.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..registry import Registry
from . import settings as settings_module
from .benchmark import Benchmark
from .checks import positive_int, severity_list
from .decode import Preprocess
from .sources import FileSource, ImageSource, NoiseSource, index_class_folders, index_image_files
from .stream import Domain, Stream

LOADERS: Registry[Callable[..., Any]] = Registry("dataset kind")
ASSETS = Path(__file__).resolve().parent / "assets"
NAMED_CLASS_LISTS = {"imagenet": ASSETS / "imagenet_wnids.txt"}
_LOADER_MODULES = ("imagenet_c", "cifar_c", "folders")


# ---------------------------------------------------------------------------------------------
# config helpers
# ---------------------------------------------------------------------------------------------


def class_list(config: dict[str, Any]) -> list[str] | None:
    """The class names of a data config: ``classes`` as a list, a shipped list name, or a text file."""
    classes = config.get("classes")
    if classes is None:
        return None
    if isinstance(classes, str):
        path = NAMED_CLASS_LISTS.get(classes, Path(classes).expanduser())
        if not path.is_file():
            raise FileNotFoundError(f"class list {classes!r}: no such shipped list ({', '.join(NAMED_CLASS_LISTS)}) "
                                    f"or file {path}")
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"class list of {config.get('name')} has duplicate names")
    return names


def num_classes_of(config: dict[str, Any]) -> int | None:
    """``num_classes`` if the config sets it, else the length of its class list."""
    classes = class_list(config)
    n = config.get("num_classes")
    if n is None:
        return len(classes) if classes is not None else None
    if classes is not None and int(n) < len(classes):
        raise ValueError(f"data config {config.get('name')}: num_classes={n} but {len(classes)} classes are listed")
    return int(n)


def require_root(config: dict[str, Any], what: str, layout: str) -> Path:
    """The config's ``root`` folder; a clear error naming the expected layout when it is missing."""
    root = config.get("root")
    name = config.get("name", what)
    if not root:
        raise FileNotFoundError(f"{name}: no data root given: pass data.root=<folder> ({what}: {layout})")
    path = Path(os.path.expandvars(str(root))).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: data root {path} is not a folder ({what}: {layout})")
    return path


def severities_of(config: dict[str, Any], severity: int | float | list | None) -> list[int | float]:
    """``severity`` (1..5, a fractional severity in (0, 5), or a list), else the config's ``severity``
    (default 5)."""
    if severity is None:
        return severity_list(config.get("severity", 5), f"{config.get('name', 'data')}: severity")
    return severity_list(severity)


def corruptions_of(config: dict[str, Any], *, synthesized: bool) -> list[str]:
    """The config's corruption names (default the 15); checked against ``corrupt`` when synthesized."""
    from .corruptions import ALL_CORRUPTIONS, CORRUPTIONS

    names = config.get("corruptions")
    names = list(CORRUPTIONS) if names is None else ([names] if isinstance(names, str) else [str(n) for n in names])
    if not names:
        raise ValueError(f"{config.get('name')}: the corruption list is empty")
    if synthesized:
        unknown = [n for n in names if n not in ALL_CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; valid: {', '.join(ALL_CORRUPTIONS)}")
    return names


def preprocess_of(config: dict[str, Any], resize: int | None = None, crop: int | None = None) -> Preprocess:
    return Preprocess(resize=config.get("resize", resize), crop=config.get("crop", crop))


def corrupted_domains(config: dict[str, Any], source: ImageSource, severities: list[int | float]) -> list[Domain]:
    """One domain per severity x corruption (severity-major, the config's corruption order), named
    ``<corruption>/<severity>`` (``fog/2.5`` for a fractional severity)."""
    return [Domain(f"{name}/{s}", source, corruption=name, severity=s)
            for s in severities for name in corruptions_of(config, synthesized=True)]


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


@LOADERS.register("digits_c")
def digits_c_domains(config: dict[str, Any], *, severity: int | list[int] | None, seed: int = 0,
                     **_: Any) -> Benchmark:
    """The digits-C test split under each corruption and severity (corrupted on the fly)."""
    from .digits import IMAGE_SIZE, load_digits_split
    from .sources import ArraySource

    images, labels = load_digits_split("test")
    source = ArraySource(images, labels, name="digits_test")
    return Benchmark(config.get("name", "digits_c"), corrupted_domains(config, source, severities_of(config, severity)),
                     clean=Domain("clean", source), image_size=(IMAGE_SIZE, IMAGE_SIZE))


def ccc_benchmark(config: dict[str, Any], *, seed: int, load: Callable[[], Any]) -> Any:
    """A benchmark whose clean images feed the stream: ``data.clean_root`` (class folders, labels =
    sorted folder names unless ``data.classes`` says otherwise), else ``load()``'s clean images."""
    root = config.get("clean_root")
    if not root:
        bench = load()
        if bench.clean is None:
            raise ValueError(f"the ccc setting needs clean images: {config.get('name')} has none; set "
                             f"data.clean_root=<folder of class folders of clean images>")
        clean = bench.clean() if callable(bench.clean) else bench.clean
        return Benchmark(bench.name, [clean], clean=clean, image_size=bench.image_size)
    folder = Path(os.path.expandvars(str(root))).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"ccc: data.clean_root {folder} is not a folder (expected <class>/<image files>)")
    classes = class_list(config)
    if classes is None:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files, labels = index_class_folders(folder, classes, what=f"ccc clean images {folder}")
    crop = int(config.get("clean_crop") or config.get("crop") or 224)  # ImageNet val: Resize(256) + CenterCrop(224)
    preprocess = preprocess_of({"resize": int(config.get("clean_resize") or round(crop / 0.875)), "crop": crop})
    clean = Domain("clean", FileSource(folder, files, labels, preprocess, name="clean"))
    return Benchmark(config.get("name", "ccc"), [clean], clean=clean, image_size=preprocess.output_size())


def _import_loaders() -> None:
    for module in _LOADER_MODULES:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.{module}":
                raise


def load_benchmark(config: dict[str, Any], *, severity: int | list[int] | None = None, seed: int = 0) -> Benchmark:
    """Run the config's loader; a plain list of domains is wrapped into a :class:`Benchmark`."""
    _import_loaders()
    loader = LOADERS.get(config.get("kind", config.get("name")))
    result = loader(config, severity=severity, seed=seed)
    if not isinstance(result, Benchmark):
        result = Benchmark(config.get("name", "data"), list(result))
    if not result.domains:
        raise ValueError(f"{result.name}: no domains to evaluate")
    return result


def _image_size(bench: Benchmark) -> tuple[int, int] | None:
    if bench.image_size is not None:
        return tuple(bench.image_size)
    size = getattr(bench.domains[0].source, "image_size", None)
    return tuple(size) if size else None


def ood_source(bench: Benchmark, options: dict[str, Any], *, seed: int, needed: int) -> tuple[ImageSource, bool]:
    """The out-of-distribution source of the open-set setting and whether to corrupt it like the domain.

    ``ood=noise``: uniform-noise images; ``ood=data`` with ``ood_data=<data config>`` (and
    ``ood_root``): that dataset's clean images (corrupted with each domain's corruption when
    ``ood_corrupt``, e.g. SVHN-C next to CIFAR-10-C); ``ood=folder`` with ``ood_root``: every image
    below that folder.
    """
    from .configs import load_data_config

    kind = options["ood"]
    size = _image_size(bench)
    if kind == "noise":
        if size is None:
            raise ValueError("open_set with ood=noise needs a fixed image size: set data.crop")
        return NoiseSource(max(needed, 1), size, seed, name="noise"), False
    if kind == "data":
        if not options.get("ood_data"):
            raise ValueError("open_set with ood=data needs setting.ood_data=<data config name or file>")
        other = dict(load_data_config(str(options["ood_data"])))
        if options.get("ood_root"):
            other["root"] = options["ood_root"]
        ood = load_benchmark(other, seed=seed)
        if ood.clean is None:
            raise ValueError(f"open_set: data config {other['name']} provides no clean images to use as OOD data")
        clean = ood.clean() if callable(ood.clean) else ood.clean
        source = clean.source
        source.name = other["name"]
        return source, True
    if kind == "folder":
        if not options.get("ood_root"):
            raise ValueError("open_set with ood=folder needs setting.ood_root=<folder of images>")
        if size is None:
            raise ValueError("open_set with ood=folder needs a fixed image size: set data.crop")
        files = index_image_files(options["ood_root"], what="open-set OOD folder")
        return FileSource(options["ood_root"], files, torch.zeros(len(files), dtype=torch.int64),
                          Preprocess(resize=min(size), crop=size[0]), name="folder"), True
    raise ValueError(f"open_set ood must be noise, data or folder, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------


def loading_options(config: dict[str, Any], **given: Any) -> dict[str, Any]:
    workers = given.get("num_workers")
    if workers is None:
        workers = config.get("num_workers", 0)
    if workers == "auto":
        workers = min(8, os.cpu_count() or 1)
    options = {
        "num_workers": int(workers or 0),
        "prefetch": int(given["prefetch"] if given.get("prefetch") is not None else config.get("prefetch", 2)),
        "decode": given.get("decode") or config.get("decode", "auto"),
        "on_bad_image": given.get("on_bad_image") or config.get("on_bad_image", "skip"),
    }
    return options


def _with_subset(bench: Benchmark, config: dict[str, Any], seed: int) -> Benchmark:
    """Restrict every domain to the same samples (``subset``/``subset_seed``/``subset_file``)."""
    size, file = config.get("subset"), config.get("subset_file")
    if size is None and not file:
        return bench
    from .subset import apply_subset

    subset_seed = config.get("subset_seed")
    domains, info = apply_subset(bench.domains, size=size, seed=seed if subset_seed is None else int(subset_seed),
                                 file=file or None)
    return Benchmark(bench.name, domains, clean=bench.clean, image_size=bench.image_size, preprocess=bench.preprocess,
                     info={**bench.info, "subset": info})


def build_stream(config: dict[str, Any], *, setting: str | dict[str, Any] | None = "reset_each_shift",
                 severity: int | list[int] | None = None, seed: int = 0, batch_size: int | None = None,
                 device: torch.device | str = "cpu", shuffle: bool = True, max_samples: int | None = None,
                 on_bad_image: str | None = None, num_workers: int | str | None = None, prefetch: int | None = None,
                 decode: str | None = None, channels: int | None = None) -> tuple[Stream, dict[str, Any]]:
    """The stream for ``config`` in ``setting`` and the engine options of that setting.

    Args:
        setting: a setting name or a dict with ``name`` and options (see :mod:`tta.data.settings`).
        severity: the severities (default: the config's); the gradual setting uses its own.
        batch_size: an integer >= 1; ``None``: the setting's (``bs1``: 1), else the config's (64).
        max_samples: cut the stream after this many samples (an integer >= 1; ``None``: all).
        on_bad_image, num_workers, prefetch, decode: default to the data config's entries.
        channels: the model's input channels (greyscale <-> RGB conversion after any corruption,
            recorded in ``describe()["channels"]``); ``None``: as the data comes.

    A ``batch_size``, ``max_samples`` or ``severity`` that is not a valid number raises ``ValueError``
    before anything is loaded.
    """
    batch_size = positive_int(batch_size, "batch_size", none_means="the data config's default")
    max_samples = positive_int(max_samples, "max_samples", none_means="the whole stream")
    if severity is not None:
        severity = severity_list(severity)
    options = settings_module.resolve(setting)
    needed = settings_module.severities_needed(options)
    if options["name"] == "ccc":  # clean images only: data.clean_root or the benchmark's clean split
        from .ccc.setting import options_with_defaults

        options = options_with_defaults(options, config)
        bench = ccc_benchmark(config, seed=seed, load=lambda: load_benchmark(config, severity=severity, seed=seed))
    else:
        bench = load_benchmark(config, severity=needed if needed is not None else severity, seed=seed)
        bench = _with_subset(bench, config, seed)
    plan = settings_module.plan(bench, options, seed=seed, shuffle=shuffle,
                                ood_source=lambda needed: ood_source(bench, options, seed=seed, needed=needed))
    if batch_size is not None:
        size = batch_size
    elif options.get("batch_size") is not None:
        size = positive_int(options["batch_size"], f"setting {options['name']}: batch_size")
    else:
        size = positive_int(config.get("batch_size", 64), f"{config.get('name', 'data')}: batch_size")
    stream = Stream(plan.parts, plan.segments, batch_size=size, seed=seed, device=device, max_samples=max_samples,
                    info={"dataset": config.get("name", bench.name), **bench.info, **plan.info},
                    summarize=plan.summarize, channels=channels,
                    **loading_options(config, num_workers=num_workers, prefetch=prefetch, decode=decode,
                                       on_bad_image=on_bad_image))
    if "ccc" in stream.info:  # a cut by max_samples= (any setting's) shortens the CCC stream too
        ccc = stream.info["ccc"]
        ccc["num_samples"] = stream.num_samples
        ccc["truncated"] = stream.num_samples < ccc["reference_length"]
    engine = {"reset_each_domain": True, "open_set": False, **plan.engine}
    return stream, engine
