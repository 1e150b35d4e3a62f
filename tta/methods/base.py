"""The method abstraction: parameters to adapt + objective + policies + optimizer + reset rule.

``method(x)`` predicts on a batch and then adapts on it (online). It returns the logits of the
forward pass *before* that batch's update, as the original Tent/EATA/SAR/DeYO code does.
"""
from __future__ import annotations

import copy
import io
import warnings
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..models.classifier import Classifier, load_classifier
from ..models.params import configure_model, has_batchnorm
from ..objectives.entropy import weighted_mean
from ..objectives.update import GuardedStep
from ..policies import POLICIES, Policy
from ..policies import build as build_policy
from ..policies.base import BatchContext

NONFINITE_MODES = ("raise", "skip")


class Counters(nn.Module):
    """Run counters kept on the device (read them with :meth:`as_dict`, which syncs once)."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        for name in names:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    def add(self, name: str, value: torch.Tensor | int) -> None:
        if name not in self._buffers:
            device = value.device if torch.is_tensor(value) else self._device()
            self.register_buffer(name, torch.zeros((), dtype=torch.long, device=device))
        self._buffers[name] += value

    def _device(self) -> torch.device:
        return next(iter(self._buffers.values())).device if self._buffers else torch.device("cpu")

    def as_dict(self) -> dict[str, int]:
        if not self._buffers:
            return {}
        values = torch.stack([b.cpu() for b in self._buffers.values()]).tolist()
        return dict(zip(self._buffers.keys(), values))


def check_batch(x: torch.Tensor, channels: int = 3, nonfinite: str = "raise") -> None:
    """Raise a clear ``ValueError`` for a batch no method should learn from.

    Shape, dtype and emptiness are checked from metadata. Finiteness costs one host sync and is
    checked when ``nonfinite="raise"``; with ``"skip"`` a non-finite batch is predicted but its
    update is dropped on the device and counted.
    """
    if not torch.is_tensor(x):
        raise ValueError(f"expected a tensor batch of images, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: a batch needs at least one image")
    if x.shape[1] != channels:
        raise ValueError(f"expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
    if nonfinite == "raise" and not bool(torch.isfinite(x).all()):
        raise ValueError("batch contains NaN or Inf values; nothing was updated "
                         "(pass nonfinite='skip' to predict anyway and count the skipped update)")


def model_family(model: Classifier) -> str:
    """``"vit"`` for transformer-style models, else ``"cnn"`` (picks the paper's learning-rate rule).

    Looks for timm/torchvision ViT attributes; a CLIP model's image tower counts by its own type.
    """
    clip = getattr(model.net, "clip", None)
    nets = [model.net, getattr(clip, "visual", None)]
    for net in filter(None, nets):
        if hasattr(net, "patch_embed") or hasattr(net, "blocks") or hasattr(net, "transformer"):
            return "vit"
    return "cnn"


def niu_learning_rate(family: str, batch_size: int, double_at_bs1: bool) -> float:
    """The learning-rate rule of the SAR and DeYO code (also used there for Tent and EATA).

    ResNet: 2.5e-4 for bs >= 32, else 2.5e-4 / 64 * bs * 2. ViT: 1e-3 / 64 * bs.
    SAR and DeYO double it again at bs = 1 (SAR commit a266f7d).
    """
    if family == "vit":
        lr = 1e-3 / 64 * batch_size
    else:
        lr = 2.5e-4 if batch_size >= 32 else 2.5e-4 / 64 * batch_size * 2
    if batch_size == 1 and double_at_bs1:
        lr *= 2
    return lr


def make_optimizer(name: str, params: Sequence[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


class Method(nn.Module):
    """Base class of every online test-time adaptation method.

    Subclasses are recipes: they set the class defaults below and, when their update is not
    "entropy of the kept samples, one optimizer step", override :meth:`adapt`.

    Args:
        model: a :class:`~tta.models.Classifier` or anything :func:`~tta.models.load_classifier` takes.
        num_classes: number of classes (default: the model head's).
        params: parameter preset to adapt (``bn``, ``norm``, ``sar``, ``all``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate; ``None`` applies the paper's rule for ``batch_size`` and the model family.
        batch_size: the stream's batch size (only used by the learning-rate rule).
        momentum, weight_decay: optimizer settings.
        steps: optimisation steps per batch.
        episodic: reset to the source state before every batch.
        extra_policies: policy names (or built policies) applied after the method's own. Each
            policy sees the samples still alive; the weights multiply, and the loss is the mean over
            the samples with a non-zero weight. A policy built by name takes its class's
            ``extra_defaults`` (``plpd``: a pure filter, ``reweight=False``, so DeYO's weights do
            not multiply e.g. EATA's); ``policy_kwargs`` override them. A policy that needs the
            frozen source model (``crowds``) makes the method keep one (moved with the method).
        policy_kwargs: keyword arguments for extra policies, by name.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for batches with NaN/Inf.
    """

    #: one line: the paper and the code it follows
    paper: ClassVar[str] = ""
    default_params: ClassVar[str] = "norm"
    default_optimizer: ClassVar[str] = "sgd"
    learns: ClassVar[bool] = True
    batch_stats: ClassVar[bool] = True
    double_lr_at_bs1: ClassVar[bool] = False

    def __init__(self, model: Classifier | nn.Module | str, *, num_classes: int | None = None,
                 params: str | None = None, optimizer: str | None = None, lr: float | None = None,
                 batch_size: int = 64, momentum: float = 0.9, weight_decay: float = 0.0, steps: int = 1,
                 episodic: bool = False, extra_policies: Sequence[str | Policy] = (),
                 policy_kwargs: dict[str, dict[str, Any]] | None = None, nonfinite: str = "raise"):
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, not {nonfinite!r}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.model = load_classifier(model, num_classes=num_classes)
        self.num_classes = num_classes or self.model.num_classes
        self.steps, self.episodic, self.nonfinite = steps, episodic, nonfinite
        self.params_preset = params or self.default_params
        self.bn_warned = False
        named = configure_model(self.model.net, self.params_preset, batch_stats=self.batch_stats)
        if not self.learns:
            self.model.net.requires_grad_(False)
            named = []
        self.param_names = [n for n, _ in named]
        policy_kwargs = policy_kwargs or {}
        own = list(self.default_policies())
        extra = [p if isinstance(p, Policy) else
                 build_policy(p, num_classes=self.num_classes,
                              **{**getattr(POLICIES.get(p), "extra_defaults", {}), **policy_kwargs.get(p, {})})
                 for p in extra_policies]
        self.policies = nn.ModuleList(own + extra)
        self.source = None
        if any("source" in p.needs for p in self.policies):
            self.source = [copy.deepcopy(self.model).requires_grad_(False)]  # a list: not a submodule
        self.lr = lr if lr is not None else self.default_lr(batch_size)
        self.optimizer_name = optimizer or self.default_optimizer
        self.optimizer = (make_optimizer(self.optimizer_name, [p for _, p in named], self.lr, momentum, weight_decay)
                          if named else None)
        self.update = GuardedStep(self.optimizer) if self.optimizer else None
        names = ["batches", "samples", "forwards", "backwards", "steps", "kept", "skipped_empty", "skipped_nonfinite"]
        self.counters = Counters(names)
        self.policy_counters = Counters([f"{k}_{what}" for k in self.policy_keys for what in ("seen", "kept")])
        self._initial_state = self._capture_state()

    @property
    def policy_keys(self) -> list[str]:
        """Counter key of each policy: its name, suffixed ``_2``, ``_3``, ... when a name repeats (e.g. a
        second ``entropy_margin``), so the official counts (EATA's ``num_samples_update_1/2``) stay
        separate. Derived from the current ``policies`` (subclasses may replace the list)."""
        keys: list[str] = []
        for policy in self.policies:
            key, k = policy.name, 2
            while key in keys:
                key, k = f"{policy.name}_{k}", k + 1
            keys.append(key)
        return keys

    def _apply(self, fn, *args, **kwargs):
        """``.to()``/``.cuda()``/``.double()`` also move the frozen source model (held in a list so
        that it is not a submodule: not in ``state_dict``, not in ``parameters()``)."""
        out = super()._apply(fn, *args, **kwargs)
        for source in getattr(self, "source", None) or ():
            source._apply(fn, *args, **kwargs)
        return out

    # ------------------------------------------------------------------ recipe hooks
    def default_policies(self) -> list[Policy]:
        """The method's own policies, in order (default: none, i.e. learn from every sample)."""
        return []

    def default_lr(self, batch_size: int) -> float:
        return niu_learning_rate(model_family(self.model), batch_size, self.double_lr_at_bs1)

    def objective(self, ctx: BatchContext, weights: torch.Tensor) -> torch.Tensor:
        """Loss to minimise: the weighted mean entropy over the kept samples."""
        return weighted_mean(ctx.entropy, weights)

    def reset_state(self) -> None:
        """Method-specific state to clear on reset (beyond model, optimizer and policies)."""

    # ------------------------------------------------------------------ the online step
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, nonfinite=self.nonfinite)
        if x.shape[0] == 1 and not self.bn_warned and self.batch_stats and has_batchnorm(self.model.net):
            warnings.warn("batch size 1 with BatchNorm: test-batch statistics come from a single image and are "
                          "degenerate (it still runs)", stacklevel=2)
            self.bn_warned = True
        if self.episodic:
            self.reset()
        self.counters.add("batches", 1)
        self.counters.add("samples", x.shape[0])
        logits = None
        for _ in range(self.steps):
            logits = self.adapt(x)
        return logits

    def begin_image_batch(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None):
        """For methods that work image by image (TPT, ADTE): check and count the batch, and return
        the sample ids that seed each image's views (the engine's, or running numbers)."""
        check_batch(x, nonfinite=self.nonfinite)
        n = x.shape[0]
        start = getattr(self, "images_seen", 0)
        if ids is None:
            ids = list(range(start, start + n))
        self.images_seen = start + n
        self.counters.add("batches", 1)
        self.counters.add("samples", n)
        return ids

    def context(self, x: torch.Tensor, logits: torch.Tensor) -> BatchContext:
        source = (lambda: self.source[0]) if self.source else None
        return BatchContext(x, logits, self.model, source)

    def select(self, ctx: BatchContext) -> torch.Tensor:
        """Multiply the policies' weights; each policy sees which samples are still alive."""
        weights = torch.ones(ctx.batch_size, device=ctx.logits.device)
        for key, policy in zip(self.policy_keys, self.policies):
            alive = weights > 0
            weights = weights * policy(ctx, alive)
            self.policy_counters.add(f"{key}_seen", alive.sum())
            self.policy_counters.add(f"{key}_kept", (weights > 0).sum())
        return weights

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One step: forward, select, weighted entropy, guarded update. Returns pre-update logits."""
        if not self.learns:
            with torch.no_grad():
                logits = self.model(x)
            self.counters.add("forwards", 1)
            return logits
        logits = self.model(x)
        self.counters.add("forwards", 1)
        ctx = self.context(x, logits)
        weights = self.select(ctx)
        loss = self.objective(ctx, weights)
        self.step(loss, weights)
        return logits.detach()

    def step(self, loss: torch.Tensor | None, weights: torch.Tensor, require_nonempty: bool = True) -> torch.Tensor:
        """Guarded optimizer step, skipped on the device for an empty selection or a non-finite loss.

        ``require_nonempty=False`` steps on an empty selection too (for methods whose official code
        does: SAR's second step, wisdom-of-crowds' diversity term); such steps are counted in
        ``empty_selection_steps``. ``loss=None``: the gradients are already there.
        """
        kept = (weights > 0).sum()
        nonempty = kept > 0
        ok = self.update(loss, nonempty if require_nonempty else torch.ones_like(nonempty))
        self.counters.add("backwards", 1)
        self.counters.add("steps", ok)
        self.counters.add("kept", kept * ok)
        if require_nonempty:
            self.counters.add("skipped_empty", ~nonempty)
            self.counters.add("skipped_nonfinite", nonempty & ~ok)
        else:
            self.counters.add("empty_selection_steps", ~nonempty & ok)
            self.counters.add("skipped_nonfinite", ~ok)
        return ok

    # ------------------------------------------------------------------ state
    def _capture_state(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
        }

    def reset(self) -> None:
        """Back to the source state: model weights, optimizer state and the method's own state."""
        self.model.load_state_dict(self._initial_state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._initial_state["optimizer"])
        for policy in self.policies:
            policy.reset()
        self.reset_state()

    def get_extra_state(self) -> Any:
        if self.optimizer is None:
            return None
        buffer = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buffer)
        return buffer.getvalue()

    def set_extra_state(self, state: Any) -> None:
        if state is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(torch.load(io.BytesIO(state), weights_only=False))

    def stats(self) -> dict[str, Any]:
        """Counters and per-policy seen/kept counts (one host sync)."""
        return {"counters": self.counters.as_dict(), "policies": self.policy_counters.as_dict()}

    def hparams(self) -> dict[str, Any]:
        """The resolved hyperparameters, for the run record."""
        out = {"method": self.name, "paper": self.paper, "params": self.params_preset, "num_adapted_tensors": len(self.param_names),
               "num_adapted_values": int(sum(p.numel() for p in self.adapted_parameters())),
               "steps": self.steps, "episodic": self.episodic, "nonfinite": self.nonfinite,
               "policies": [{"name": p.name, **p.hparams()} for p in self.policies]}
        if self.optimizer is not None:
            group = self.optimizer.param_groups[0]
            out["optimizer"] = {"name": self.optimizer_name, "lr": self.lr,
                                **{k: group[k] for k in ("momentum", "weight_decay", "betas") if k in group}}
        return out

    def adapted_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]] if self.optimizer else []

    name: ClassVar[str] = "method"

