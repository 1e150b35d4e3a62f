"""The registry of model specs: ``load_classifier("<prefix>:<rest>")`` looks the prefix up here.

A leaf module (standard library only), in the spirit of timm's model registry: each loader module
registers its own entries when the package ``tta.models`` is imported (``digits.py``: ``digits_cnn``;
``hubs.py``: ``timm:`` and ``torchvision:``; ``clip.py``: ``clip:``; ``custom.py``: ``py:`` and
checkpoint files; ``robustbench.py``: ``robustbench:``), so ``classifier.py`` imports none of them.

A key ending in ``:`` is a prefix (the loader gets the text after it), any other key an exact name
(the loader gets an empty string); :data:`FILE` is the entry for a spec that names an existing file.
A loader is ``loader(rest: str, request: SpecRequest) -> Built``.

Adding a spec (one file plus its registration)::

    from tta.models.specs import MODEL_SPECS, Built

    @MODEL_SPECS.register("mynets:", help="mynets:<name>  my architectures")
    def _mynets(rest, request):
        net = build_my_net(rest)
        info = ModelInfo(f"mynets:{rest}", "mynets", "random", mean, std, (32, 32))
        return Built(net, info)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover - type hints only (no import at run time: this module is a leaf)
    from torch import nn

    from .classifier import Classifier, ModelInfo

FILE = "<file>"
"""Registry key of the loader for a spec that is a path to an existing file."""

_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".ckpt", ".safetensors")
ClassNames = Union[Sequence[str], Callable[[], Union[Sequence[str], None]], None]


@dataclass
class SpecRequest:
    """What the caller of :func:`~tta.models.load_classifier` asked for, as a loader sees it."""

    spec: str
    num_classes: int | None = None
    weights: Path | None = None
    pretrained: str | bool = "auto"
    class_names: ClassNames = None
    templates: Any = None
    allow_pickle: bool = False
    model_dir: str | os.PathLike | None = None

    def resolve_class_names(self) -> list[str] | None:
        """The class names (a callable is called only here, so specs without a text head pay nothing)."""
        names = self.class_names() if callable(self.class_names) else self.class_names
        return None if names is None else [str(n) for n in names]


@dataclass
class Built:
    """A loader's result, before :func:`~tta.models.load_classifier` applies the common steps
    (a local weights file, the normalisation, the head size, the input channels).

    Attributes:
        net: the network (normalised images -> logits).
        info: its :class:`~tta.models.ModelInfo`; ``info.normalization_source`` says where the
            mean/std came from (``weights``, ``model_config`` or ``guessed``).
        fixed_input_size: inputs are resized to ``info.input_size`` (ViTs).
        weights_loaded: the loader has already loaded ``request.weights`` itself.
        head_sized: the loader has already given the net ``request.num_classes`` outputs (CLIP's
            text head); otherwise a linear head of another size is replaced.
        wrap: builds the classifier from ``(net, info)`` (default: :class:`~tta.models.Classifier`).
    """

    net: "nn.Module"
    info: "ModelInfo"
    fixed_input_size: bool = False
    weights_loaded: bool = False
    head_sized: bool = False
    wrap: Callable[["nn.Module", "ModelInfo"], "Classifier"] | None = None


Loader = Callable[[str, SpecRequest], Built]


class SpecRegistry:
    """Prefixes and names of model specs -> loaders."""

    def __init__(self) -> None:
        self._loaders: dict[str, Loader] = {}
        self._help: dict[str, str] = {}

    def register(self, key: str, *, help: str) -> Callable[[Loader], Loader]:
        """Register ``loader`` for a prefix (``"timm:"``), a name (``"digits_cnn"``) or :data:`FILE`."""
        def decorator(loader: Loader) -> Loader:
            if key in self._loaders:
                raise ValueError(f"model spec {key!r} is registered twice")
            self._loaders[key] = loader
            self._help[key] = help
            return loader

        return decorator

    def resolve(self, spec: str) -> tuple[Loader, str]:
        """The loader of ``spec`` and the text it gets (after the prefix; ``""`` for a name, the path
        for a file). Names first, then the longest matching prefix, then an existing file."""
        if spec in self._loaders and not spec.endswith(":") and spec != FILE:
            return self._loaders[spec], ""
        prefixes = [k for k in self._loaders if k.endswith(":") and spec.startswith(k)]
        if prefixes:
            key = max(prefixes, key=len)
            return self._loaders[key], spec[len(key):]
        if FILE in self._loaders and Path(spec).expanduser().is_file():
            return self._loaders[FILE], str(Path(spec).expanduser())
        if FILE in self._loaders and (os.sep in spec or spec.endswith(_FILE_SUFFIXES)):
            raise FileNotFoundError(f"model file not found: {Path(spec).expanduser()} (working directory "
                                    f"{os.getcwd()})")
        raise ValueError(f"unknown model spec {spec!r}; use one of:\n  " + "\n  ".join(self.describe())
                         + "\n  or pass an nn.Module (Python API)")

    def describe(self) -> list[str]:
        """One help line per registered spec form."""
        return [self._help[k] for k in self._loaders]

    def keys(self) -> list[str]:
        return list(self._loaders)


MODEL_SPECS = SpecRegistry()
"""The model-spec registry that :func:`~tta.models.load_classifier` consults."""

__all__ = ["FILE", "MODEL_SPECS", "Built", "SpecRegistry", "SpecRequest"]
