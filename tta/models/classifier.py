"""One interface over timm, torchvision, open_clip, RobustBench, your own and in-memory classifiers.

``Classifier`` takes images in [0, 1], applies the normalisation that belongs to the weights, and
returns logits. It records where the weights and the normalisation came from so that every run can
say so.

Model specs understood by :func:`load_classifier` (a registry, ``tta/models/specs.py``; each loader
module registers its own forms):

* ``digits_cnn`` -- the embedded digits-C source model shipped with the package;
* ``timm:<name>[.<tag>]`` -- any timm model, e.g. ``timm:vit_base_patch16_224.augreg_in21k_ft_in1k``;
* ``torchvision:<name>[:<weights enum>]`` -- e.g. ``torchvision:resnet50:IMAGENET1K_V1``;
* ``clip:<arch>/<tag or checkpoint>`` -- open_clip zero-shot classifiers (``tta/models/clip.py``);
* ``robustbench:[<dataset>/]<name>`` -- RobustBench's CIFAR-C models (``tta/models/robustbench.py``);
* ``py:<module>:<factory>`` -- your own architecture: ``<factory>()`` returns the ``nn.Module``
  (``tta/models/custom.py``); weights from ``weights=`` (``model_weights=``);
* a path to a file holding a whole pickled module (only with ``allow_pickle=True``: unpickling runs
  code from the file);
* any architecture spec above with ``weights=<state dict file>`` (``.pt``/``.pth``/``.safetensors``);
* an already-built ``nn.Module`` (Python API).

Normalisation (``normalization=``; on the command line the key of the same name):

* ``weights`` (default) -- the statistics that belong to the weights: the published weights'
  preprocessing (timm / torchvision / open_clip tags, the shipped digits model, RobustBench), else
  the architecture's default config (timm's ``pretrained_cfg``). When nothing says (a plain
  ``nn.Module``, ``py:``, a pickled module, a torchvision architecture with a local checkpoint) the
  ImageNet statistics are assumed, with a warning, and the record says ``normalization_source: guessed``;
* ``imagenet`` -- mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (e.g. to reproduce SAR/DeYO's
  ViT tables); ``half`` -- 0.5 / 0.5 per channel;
* ``[[m1, m2, m3], [s1, s2, s3]]`` -- a stated (mean, std) pair, one value per input channel (or one
  value for all), e.g. ``normalization=[[0.2860],[0.3530]]`` for a Fashion-MNIST model;
* the Python API also takes ``mean=`` and ``std=`` (both or neither).

The record's ``normalization_source`` is ``given`` (stated by you), ``weights``, ``model_config``
(the architecture's default config) or ``guessed``. For a 1-channel model a named 3-channel
normalisation (``imagenet``, ``weights``) is averaged over the channels, and that is noted.

Input channels: ``Classifier.input_channels`` is taken from the network's first ``Conv2d`` (in
definition order), or from ``input_channels=`` (``model_input_channels=``), which wins (with a
warning when it differs from that convolution); without a ``Conv2d`` 3 is assumed and noted.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import read_state_dict
from .specs import MODEL_SPECS, Built, ClassNames, SpecRequest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NAMED_NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}
NORMALIZATION_SOURCES = ("given", "weights", "model_config", "guessed")


@dataclass
class ModelInfo:
    """Where a classifier came from; written into every run record.

    ``normalization_source``: ``given`` (stated by the caller), ``weights`` (the published weights'
    own preprocessing), ``model_config`` (the architecture's default config) or ``guessed``
    (nothing said: ImageNet statistics assumed, with a warning).
    """

    spec: str
    source: str  # "timm", "torchvision", "digits", "open_clip", "robustbench", "python", "module", "file"
    weights: str  # weight tag, file, or "random"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None = None
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)
    normalization_source: str = "weights"
    input_channels: int | None = None
    crop_pct: float | None = None  # the weights' evaluation crop (crop / resize), when known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classifier(nn.Module):
    """A classifier that sees images in [0, 1]: ``logits = net((x - mean) / std)``.

    ``fixed_input_size`` models (ViTs) get inputs resized to their input size; CNNs see the images
    as they are. ``input_channels`` is the number of channels the network takes.
    """

    def __init__(self, net: nn.Module, info: ModelInfo, fixed_input_size: bool = False):
        super().__init__()
        self.net = net
        self.info = info
        self.fixed_input_size = fixed_input_size
        self.register_buffer("mean", torch.tensor(info.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_input_size and self.info.input_size and tuple(x.shape[-2:]) != tuple(self.info.input_size):
            x = F.interpolate(x, size=self.info.input_size, mode="bilinear", align_corners=False, antialias=True)
        mean, std = self.mean, self.std
        if mean.dtype != x.dtype:
            mean, std = mean.to(x.dtype), std.to(x.dtype)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def head(self) -> nn.Linear:
        """The final linear layer (the classifier head)."""
        return find_head(self.net)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit features: the input of the classifier head."""
        captured: list[torch.Tensor] = []
        handle = self.head().register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            self(x)
        finally:
            handle.remove()
        return captured[0]

    @property
    def num_classes(self) -> int:
        return self.head().out_features

    @property
    def input_channels(self) -> int:
        """Channels of the images the network takes (3 unless its first convolution or the loader says)."""
        return int(self.info.input_channels or 3)


def find_head(net: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of a network, taken as its classifier head."""
    get_classifier = getattr(net, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Linear):
            name = next(n for n, m in net.named_modules() if m is head)
            return name, head
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("could not find a classifier head (no nn.Linear layer) in the model")
    return linears[-1]


def resize_head(net: nn.Module, num_classes: int) -> bool:
    """Replace the head when it has another number of classes; returns whether it did."""
    name, head = find_head(net)
    if head.out_features == num_classes:
        return False
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None).to(head.weight.device)
    parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
    setattr(parent, name.rsplit(".", 1)[-1], new)
    return True


def first_conv_channels(net: nn.Module) -> int | None:
    """``in_channels`` of the first ``nn.Conv2d`` of ``net`` (definition order), or ``None``."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return None


# ------------------------------------------------------------------------------------ normalisation
def _as_values(values: Any, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number or a list of numbers, got {values!r}") from err
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite numbers, got {values!r}")
    return out


def stated_normalization(normalization: str | Sequence | None, mean: Sequence[float] | float | None = None,
                         std: Sequence[float] | float | None = None) -> tuple[tuple, tuple, bool] | None:
    """The caller's normalisation as ``(mean, std, exact)``, or ``None`` for ``weights``.

    ``exact`` is false for the named ones (``imagenet``, ``half``), which are fitted to the model's
    channel count; stated values must match it (or be one value for all channels).
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the normalisation the model expects), or neither: "
                         f"got mean={mean!r}, std={std!r}")
    named = normalization not in (None, "weights")
    if mean is not None:
        if named:
            raise ValueError(f"give either mean/std or normalization={normalization!r}, not both")
        pair: Any = (mean, std)
    elif not named:
        return None
    elif isinstance(normalization, str):
        if normalization not in NAMED_NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; use 'weights', "
                             f"{', '.join(sorted(NAMED_NORMALIZATIONS))} or a [mean, std] pair such as "
                             f"[[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]")
        m, s = NAMED_NORMALIZATIONS[normalization]
        return m, s, False
    elif isinstance(normalization, dict):
        if set(normalization) != {"mean", "std"}:
            raise ValueError(f"a normalization mapping needs exactly the keys mean and std, got {sorted(normalization)}")
        pair = (normalization["mean"], normalization["std"])
    else:
        pair = normalization
    try:
        m_values, s_values = pair
    except (TypeError, ValueError) as err:
        raise ValueError(f"normalization must be 'weights', a name or a [mean, std] pair, got {normalization!r}") from err
    m, s = _as_values(m_values, "mean"), _as_values(s_values, "std")
    if len(m) != len(s):
        raise ValueError(f"mean has {len(m)} values but std has {len(s)}")
    if min(s) <= 0:
        raise ValueError(f"std must be positive, got {s}")
    return m, s, True


def fit_to_channels(mean: tuple, std: tuple, channels: int, *, exact: bool, what: str) -> tuple[tuple, tuple, str | None]:
    """``mean``/``std`` for a ``channels``-channel model: unchanged when they fit, one value repeated,
    or (not ``exact``) three values averaged for a 1-channel model. Returns them and a note."""
    if len(mean) == channels:
        return mean, std, None
    if len(mean) == 1:
        return mean * channels, std * channels, None
    if channels == 1 and not exact:
        m, s = (sum(mean) / len(mean),), (sum(std) / len(std),)
        return m, s, (f"{what} normalisation {mean}/{std} averaged over the channels for a 1-channel model: "
                      f"mean {m[0]:.4f}, std {s[0]:.4f}")
    raise ValueError(f"{what} normalisation has {len(mean)} values but the model takes {channels} channels: "
                     f"give one value per channel, e.g. normalization=[[{', '.join(['0.5'] * channels)}],"
                     f"[{', '.join(['0.25'] * channels)}]]")


def _guess_warning(spec: str) -> str:
    return (f"no normalisation is known for {spec}: assuming the ImageNet statistics mean={IMAGENET_MEAN}, "
            f"std={IMAGENET_STD} (recorded as normalization_source: guessed). If the model was trained with "
            f"other statistics, pass mean=/std= (Python) or normalization=[[...],[...]] (command line); "
            f"normalization=half for (0.5, 0.5).")


def module_normalization(net: nn.Module) -> tuple[tuple, tuple, str]:
    """What a bare module says about its normalisation: timm's ``pretrained_cfg`` (``model_config``),
    else the ImageNet statistics (``guessed``)."""
    cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
        return tuple(cfg["mean"]), tuple(cfg["std"]), "model_config"
    return IMAGENET_MEAN, IMAGENET_STD, "guessed"


def module_built(net: nn.Module, spec: str, source: str, weights: str) -> Built:
    """A :class:`Built` for a network that comes without a config (a module, ``py:``, a pickled file)."""
    mean, std, origin = module_normalization(net)
    cfg = getattr(net, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    size = getattr(getattr(net, "patch_embed", None), "img_size", None) or cfg.get("input_size")
    size = (size, size) if isinstance(size, int) else (tuple(int(v) for v in size[-2:]) if size else None)
    info = ModelInfo(spec, source, weights, mean, std, size, normalization_source=origin, crop_pct=cfg.get("crop_pct"))
    return Built(net, info)  # a module is called on the images as they come (no resizing)


# ------------------------------------------------------------------------------------ shared helpers
def pretrained_or_random(load_pretrained: Callable[[], Any], load_random: Callable[[], Any], what: str,
                         pretrained: str | bool, hint: str, notes: list[str]) -> tuple[Any, bool]:
    """Published weights when they can be had; with ``pretrained="auto"`` a loud, recorded fallback
    to random weights otherwise (``True``: an error). Returns (model, whether weights were loaded)."""
    try:
        return load_pretrained(), True
    except Exception as err:  # noqa: BLE001 - offline, unknown tag, no weights published
        if pretrained is True or pretrained == "true":
            raise RuntimeError(f"could not load pretrained weights for {what}: {err}") from err
        message = (f"pretrained weights for {what} are not available ({type(err).__name__}: "
                   f"{str(err).splitlines()[0][:200]}); using RANDOM weights. {hint}")
        warnings.warn(message, stacklevel=4)
        notes.append(message)
        return load_random(), False


def load_weights_into(net: nn.Module, path: Path, spec: str, *, allow_pickle: bool = False) -> None:
    """Load a state-dict file into ``net`` (strict); a head of another size is resized to the file's."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    try:
        head_name, head = find_head(net)
    except ValueError:
        head_name, head = None, None
    head_weight = state.get(f"{head_name}.weight") if head_name is not None else None
    if head_weight is not None and head_weight.ndim == 2 and head_weight.shape[0] != head.out_features:
        resize_head(net, head_weight.shape[0])  # the checkpoint defines its own number of classes
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"weights {path} do not fit {spec}: {err}") from err
    if missing or unexpected:
        raise ValueError(f"weights {path} do not fit {spec}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    values = tuple(int(v) for v in size)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ValueError(f"input_size must be an int or (height, width), got {size!r}")
    return values  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ loading
def load_classifier(
    spec: str | nn.Module = "digits_cnn",
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    pretrained: str | bool = "auto",
    normalization: str | Sequence | dict | None = "weights",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_channels: int | None = None,
    input_size: int | Sequence[int] | None = None,
    allow_pickle: bool = False,
    class_names: ClassNames = None,
    templates: str | Sequence[str] | None = None,
    model_dir: str | Path | None = None,
) -> Classifier:
    """Build a :class:`Classifier` from a spec string or module (see the module docstring).

    Args:
        spec: model spec or an ``nn.Module`` (its normalisation: ``mean``/``std``, else what the
            module's timm config says, else ImageNet's with a warning).
        num_classes: resize the head to this many classes when it differs (with a warning).
        weights: a local state dict (``.pt``/``.pth``/``.safetensors``) loaded into the built
            architecture (read with ``weights_only=True`` unless ``allow_pickle``).
        pretrained: ``"auto"`` loads published weights when they can be had and otherwise warns
            loudly and records random weights; ``True`` makes that an error; ``False`` skips them.
        normalization: ``"weights"``, ``"imagenet"``, ``"half"`` or a (mean, std) pair (module docstring).
        mean, std: the normalisation the network expects (both or neither; same as a pair above).
        input_channels: channels the network takes (default: from its first ``Conv2d``).
        input_size: the network's input size (height, width), when its config does not say; image
            folders are resized and cropped to it.
        allow_pickle: allow loading files that need full unpickling (a whole pickled module as the
            spec, or a checkpoint with Python objects). Unpickling runs code from the file: only for
            files you trust. Without it such files are refused with a message on how to load a state dict.
        class_names: names of the classes, for specs with a text head (``clip:``); a list or a
            callable returning one (called only by those specs).
        templates: prompt templates of a CLIP head (``single``, ``imagenet80``, ``tip7`` or a list).
        model_dir: folder of downloaded checkpoints for ``robustbench:`` specs (robustbench's layout).
    """
    if isinstance(spec, Classifier):
        if mean is not None or std is not None:
            raise ValueError("the model is already a Classifier with its own normalisation "
                             f"(mean={spec.info.mean}, std={spec.info.std}); do not pass mean/std")
        return spec
    stated = stated_normalization(normalization, mean, std)
    path = Path(weights).expanduser() if weights is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if isinstance(spec, nn.Module):
        built = module_built(spec, type(spec).__name__, "module", "given")
    elif isinstance(spec, str):
        loader, rest = MODEL_SPECS.resolve(spec)
        request = SpecRequest(spec, num_classes=num_classes, weights=path, pretrained=pretrained,
                              class_names=class_names, templates=templates, allow_pickle=allow_pickle,
                              model_dir=model_dir)
        built = loader(rest, request)
    else:
        raise TypeError(f"spec must be a model spec string or an nn.Module, not {type(spec).__name__}")
    net, info = built.net, built.info
    if path is not None and not built.weights_loaded:
        load_weights_into(net, path, info.spec, allow_pickle=allow_pickle)
        info.weights = str(path)
        if info.normalization_source == "weights":  # the published weights' statistics no longer apply
            info.normalization_source = "model_config"

    found = first_conv_channels(net)
    if input_channels is not None:
        input_channels = int(input_channels)
        if found is not None and found != input_channels:  # stated wins (the first conv defined may not be the stem)
            message = (f"input_channels={input_channels} is used, but the first convolution defined in {info.spec} "
                       f"takes {found} channels")
            warnings.warn(message, UserWarning, stacklevel=2)
            info.notes.append(message)
        info.input_channels = input_channels
    elif found is not None:
        info.input_channels = found
    else:
        if stated is not None and stated[2] and len(stated[0]) > 1:
            info.input_channels = len(stated[0])
        else:
            info.input_channels = len(info.mean) if len(info.mean) != 3 else 3
        info.notes.append(f"no Conv2d found: input channels assumed {info.input_channels} "
                          f"(pass input_channels= / model_input_channels= to state them)")
    if input_size is not None:
        info.input_size = _as_size(input_size)

    if stated is not None:
        values_mean, values_std, exact = stated
        info.normalization_source = "given"
    else:
        values_mean, values_std, exact = info.mean, info.std, False
        if info.normalization_source == "guessed" and info.weights != "random":
            warnings.warn(_guess_warning(info.spec), UserWarning, stacklevel=2)
            info.notes.append("normalisation guessed: ImageNet statistics assumed")
    values_mean, values_std, note = fit_to_channels(tuple(values_mean), tuple(values_std), info.input_channels,
                                                    exact=exact, what=info.normalization_source)
    if note:
        info.notes.append(note)
    info.mean, info.std = values_mean, values_std

    if built.head_sized:
        pass
    elif num_classes is not None and resize_head(net, num_classes):
        message = f"classifier head of {info.spec} resized to {num_classes} classes (new head is randomly initialised)"
        warnings.warn(message, stacklevel=2)
        info.notes.append(message)
    if info.num_classes is None or not built.head_sized:
        info.num_classes = find_head(net)[1].out_features
    if built.wrap is not None:
        return built.wrap(net, info)
    return Classifier(net, info, fixed_input_size=built.fixed_input_size)


def available_specs() -> list[str]:
    """One help line per model-spec form (the registry's entries)."""
    return MODEL_SPECS.describe()


__all__ = ["Classifier", "IMAGENET_MEAN", "IMAGENET_STD", "ModelInfo", "NAMED_NORMALIZATIONS", "available_specs",
           "find_head", "first_conv_channels", "load_classifier", "load_weights_into", "module_built",
           "pretrained_or_random", "resize_head", "stated_normalization"]
