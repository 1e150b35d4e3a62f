"""The small core every method shares: model, parameters, optimizer, guarded step, counters,
policies, state and reset.

Two families build on it (:mod:`tta.methods.batch`: Tent ... EATA-C, which learn from the samples
of a batch; :mod:`tta.methods.views`: TPT, DiffTPT, ADTE, which work on the views of one image).
A recipe (one method) sets its class defaults, returns its own policies from
:meth:`Method.default_policies` and, when its update is not the family's default, overrides
the family's step.

**Construction order.** The policies are assembled once the *whole* constructor chain has run
(:meth:`Method.__init_subclass__` wraps each subclass ``__init__``), so a recipe sets its
fields after ``super().__init__()`` like any module, and :meth:`default_policies` can read them.
The method's own policies come first, then ``extra_policies``; each is checked against the
family's level (samples of a batch, or views of one image) and the signals the family provides,
and an impossible combination raises a ``ValueError`` naming both.

**State.** ``state_dict()`` holds tensors and plain containers only (the optimizer state is stored
as its own ``state_dict()``), so a saved state loads with ``torch.load(..., weights_only=True)``
and :meth:`load_state_dict` never unpickles anything.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..models.classifier import Classifier, load_classifier
from ..models.params import configure_model
from ..objectives.update import GuardedStep
from ..policies import POLICIES, BatchContext, Policy, build as build_policy, check_compatible
from .inputs import RunInput
from .lr_rule import model_family, niu_learning_rate

NONFINITE_MODES = ("raise", "skip")


class Counters(nn.Module):
    """Run counters kept on the device (read them with :meth:`as_dict`, which syncs once)."""

    def __init__(self, names: Iterable[str] = ()):
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


def _plain(value: Any, where: str) -> Any:
    """``value`` if it is made of tensors and plain containers only (what ``weights_only`` loads)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, where) for k, v in value.items()}
    raise ValueError(f"{where}: expected tensors and plain containers, found {type(value).__name__}; "
                     f"refusing to load it (tta never unpickles a saved state)")


class Method(nn.Module):
    """Base of every online test-time adaptation method (see the module docstring).

    Args:
        model: a :class:`~tta.models.Classifier` or anything :func:`~tta.models.load_classifier` takes.
        num_classes: number of classes (default: the model head's).
        params: parameter preset to adapt (``bn``, ``norm``, ``sar``, ``all``; CLIP: ``prompt``, ``ln``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate; ``None`` applies the method's rule (:meth:`default_lr`).
        batch_size: the stream's batch size (only used by the learning-rate rule).
        momentum, weight_decay: optimizer settings.
        steps: optimisation steps per batch (per image for the view family).
        episodic: reset to the source state before every batch.
        extra_policies: policy names (or built policies) applied after the method's own. A policy
            built by name takes its class's ``extra_defaults`` (``plpd``: a pure filter), then
            ``policy_kwargs[name]``.
        policy_kwargs: keyword arguments for extra policies, by name.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for batches with NaN/Inf.
    """

    #: the registered name (set by the registry)
    name: ClassVar[str] = "method"
    #: one line: the paper and the code it follows
    paper: ClassVar[str] = ""
    default_params: ClassVar[str] = "norm"
    default_optimizer: ClassVar[str] = "sgd"
    #: whether the method updates parameters at all
    learns: ClassVar[bool] = True
    #: BatchNorm layers normalise with test-batch statistics
    batch_stats: ClassVar[bool] = True
    #: the SAR/DeYO learning-rate rule doubles at batch size 1
    double_lr_at_bs1: ClassVar[bool] = False
    #: what the policies of this family rank: ``"samples"`` of a batch or ``"views"`` of one image
    policy_level: ClassVar[str] = "samples"
    #: the signals the family's policy context can compute (``Policy.needs``)
    provides: ClassVar[frozenset[str]] = frozenset()
    #: constructor keywords that carry run inputs (:mod:`tta.methods.inputs`), not hyperparameters
    input_keywords: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in vars(cls):
            return
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args: Any, **kw: Any) -> None:
            original(self, *args, **kw)
            if type(self).__init__ is __init__:  # the outermost constructor has finished
                self._assemble_policies()

        cls.__init__ = __init__

    def __init__(self, model: Classifier | nn.Module | str, *, num_classes: int | None = None,
                 params: str | None = None, optimizer: str | None = None, lr: float | None = None,
                 batch_size: int = 64, momentum: float = 0.9, weight_decay: float = 0.0, steps: int = 1,
                 episodic: bool = False, extra_policies: Sequence[str | Policy] = (),
                 policy_kwargs: Mapping[str, Mapping[str, Any]] | None = None, nonfinite: str = "raise"):
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, not {nonfinite!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = load_classifier(model, num_classes=num_classes)
        self.num_classes = num_classes or self.model.num_classes
        self.steps, self.episodic, self.nonfinite = int(steps), bool(episodic), nonfinite
        self.batch_size = int(batch_size)
        self.params_preset = params or self.default_params
        named = configure_model(self.model.net, self.params_preset, batch_stats=self.batch_stats)
        if not self.learns:
            self.model.net.requires_grad_(False)
            named = []
        self.param_names = [n for n, _ in named]
        self._extra_policy_specs = list(extra_policies)
        self._policy_kwargs = {k: dict(v) for k, v in (policy_kwargs or {}).items()}
        self.policies = nn.ModuleList()
        self.lr = float(lr) if lr is not None else self.default_lr(self.batch_size)
        self.optimizer_name = optimizer or self.default_optimizer
        self.optimizer = (make_optimizer(self.optimizer_name, [p for _, p in named], self.lr, momentum, weight_decay)
                          if named else None)
        self.update = GuardedStep(self.optimizer) if self.optimizer else None
        names = ["batches", "samples", "forwards", "backwards", "steps", "kept", "skipped_empty", "skipped_nonfinite"]
        self.counters = Counters(names)
        self.policy_counters = Counters()
        self._initial_state = self._capture_state()
        if type(self).__init__ is Method.__init__:
            self._assemble_policies()

    # ------------------------------------------------------------------ recipe hooks
    @classmethod
    def run_inputs(cls, hparams: Mapping[str, Any]) -> list[RunInput]:
        """What a method built with ``hparams`` needs from the run (:mod:`tta.methods.inputs`)."""
        return []

    def default_policies(self) -> list[Policy]:
        """The method's own policies, in order (default: none, i.e. learn from every sample)."""
        return []

    def default_lr(self, batch_size: int) -> float:
        """The paper's learning rate: the SAR/DeYO rule for the model's family (:mod:`.lr_rule`)."""
        return niu_learning_rate(model_family(self.model.net), batch_size, self.double_lr_at_bs1)

    def reset_state(self) -> None:
        """Method-specific state to clear on reset (beyond model, optimizer and policies)."""

    def combine_policies(self, own: list[Policy], extra: list[Policy]) -> list[Policy]:
        """The method's policies followed by the extra ones (a family may replace some of its own)."""
        return own + extra

    def on_policies_assembled(self) -> None:
        """Called once the policies are in place (e.g. to build what a policy needs)."""

    # ------------------------------------------------------------------ policies
    def _build_extra(self, spec: str | Policy) -> Policy:
        if isinstance(spec, Policy):
            return spec
        defaults = getattr(POLICIES.get(spec), "extra_defaults", {})  # e.g. plpd: a pure filter when added
        return build_policy(spec, num_classes=self.num_classes, **{**defaults, **self._policy_kwargs.get(spec, {})})

    def _assemble_policies(self) -> None:
        extra = [self._build_extra(p) for p in self._extra_policy_specs]
        for policy in extra:
            check_compatible(policy, level=self.policy_level, provides=set(self.provides), method=self.name)
        own = list(self.default_policies())
        self.policies = nn.ModuleList(self.combine_policies(own, extra))
        for key in self.policy_keys:
            for what in ("seen", "kept"):
                self.policy_counters.add(f"{key}_{what}", 0)
        self.policy_counters.to(self.counters.batches.device)
        self.on_policies_assembled()

    @property
    def policy_keys(self) -> list[str]:
        """Counter key of each policy: its name, suffixed ``_2``, ``_3``, ... when a name repeats (e.g. a
        second ``entropy_margin``), so the official counts (EATA's ``num_samples_update_1/2``) stay
        separate."""
        keys: list[str] = []
        for policy in self.policies:
            key, k = policy.name, 2
            while key in keys:
                key, k = f"{policy.name}_{k}", k + 1
            keys.append(key)
        return keys

    def count_policy(self, key: str, seen: torch.Tensor | int, kept: torch.Tensor | int) -> None:
        self.policy_counters.add(f"{key}_seen", seen)
        self.policy_counters.add(f"{key}_kept", kept)

    # ------------------------------------------------------------------ the step
    def select(self, ctx: BatchContext) -> torch.Tensor:
        """Multiply the policies' weights in order; each policy sees which samples (or views) are
        still alive. Counts what each policy saw and kept, on the device."""
        weights = torch.ones(ctx.batch_size, device=ctx.logits.device)
        for key, policy in zip(self.policy_keys, self.policies):
            alive = weights > 0
            weights = weights * policy(ctx, alive)
            self.count_policy(key, alive.sum(), (weights > 0).sum())
        return weights

    def count_batch(self, x: torch.Tensor) -> None:
        self.counters.add("batches", 1)
        self.counters.add("samples", x.shape[0])

    def record_step(self, ok: torch.Tensor, kept: torch.Tensor, *, nonempty: torch.Tensor | None = None,
                    require_nonempty: bool = True, backwards: int = 1) -> None:
        """Count one guarded update: ``ok`` (the step was kept) and ``kept`` (samples learned from).

        With ``require_nonempty`` an empty selection is a skipped step (``skipped_empty``); without
        it (the official SAR / wisdom-of-crowds code still steps then) it is counted in
        ``empty_selection_steps``. ``nonempty`` defaults to ``kept > 0`` (SAR: its second selection).
        """
        nonempty = kept > 0 if nonempty is None else nonempty
        self.counters.add("backwards", backwards)
        self.counters.add("steps", ok)
        self.counters.add("kept", kept * ok)
        if require_nonempty:
            self.counters.add("skipped_empty", ~nonempty)
            self.counters.add("skipped_nonfinite", nonempty & ~ok)
        else:
            self.counters.add("empty_selection_steps", ~nonempty & ok)
            self.counters.add("skipped_nonfinite", ~ok)

    def step(self, loss: torch.Tensor | None, weights: torch.Tensor, require_nonempty: bool = True) -> torch.Tensor:
        """Guarded optimizer step, skipped on the device for an empty selection or a non-finite loss.

        ``require_nonempty=False`` steps on an empty selection too. ``loss=None``: the gradients are
        already there. Returns the device bool "the step was kept".
        """
        kept = (weights > 0).sum()
        gate = kept > 0 if require_nonempty else torch.ones((), dtype=torch.bool, device=kept.device)
        ok = self.update(loss, gate)
        self.record_step(ok, kept, require_nonempty=require_nonempty)
        return ok

    def check_input(self, x: torch.Tensor) -> None:
        check_batch(x, channels=getattr(self.model, "input_channels", 3), nonfinite=self.nonfinite)

    # ------------------------------------------------------------------ the run
    def networks(self) -> list[nn.Module]:
        """The classifiers this method runs (the adapted one, plus any frozen copy a family keeps)."""
        return [self.model]

    def prepare(self, *, device: torch.device | str, channels_last: bool = False, compile: bool = False) -> "Method":
        """Move to ``device`` and apply the speed options to every network the method runs."""
        self.to(device)
        for model in self.networks():  # a frozen copy gets the same kernels, so first-batch ties stay exact
            if channels_last:
                model.to(memory_format=torch.channels_last)
            if compile:
                model.net.compile()
        return self

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
        """The optimizer state as tensors and plain containers (loadable with ``weights_only=True``)."""
        if self.optimizer is None:
            return None
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def set_extra_state(self, state: Any) -> None:
        if state is None or self.optimizer is None:
            return
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError(f"unexpected method extra state of type {type(state).__name__} (a state saved by an "
                             f"older tta holds a pickled optimizer, which tta refuses to unpickle: re-save it)")
        self.optimizer.load_state_dict(_plain(state["optimizer"], "optimizer state"))

    def input_records(self) -> dict[str, Any]:
        """What the run record keeps about the run inputs the method was handed (default: nothing)."""
        return {}

    def stats(self) -> dict[str, Any]:
        """Counters and per-policy seen/kept counts (one host sync)."""
        return {"counters": self.counters.as_dict(), "policies": self.policy_counters.as_dict()}

    def hparams(self) -> dict[str, Any]:
        """The resolved hyperparameters, for the run record."""
        out = {"method": self.name, "paper": self.paper, "params": self.params_preset,
               "num_adapted_tensors": len(self.param_names),
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

    def warn_once(self, key: str, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, stacklevel=3)


__all__ = ["Counters", "Method", "NONFINITE_MODES", "check_batch", "make_optimizer"]
