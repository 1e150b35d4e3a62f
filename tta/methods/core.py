"""The small core every method shares: model, parameters, optimizer, guarded step, counters,
policies, state and reset.

Two families build on it (:mod:`tta.methods.batch`: Tent ... EATA-C, which learn from the samples
of a batch; :mod:`tta.methods.views`: TPT, DiffTPT, C-TPT, ADTE, ZERO, TDA, which work on the views
of one image).
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

import contextlib
import copy
import functools
import threading
import time
import warnings
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..compiling import eager_boundary
from ..models.classifier import Classifier, load_classifier
from ..models.params import configure_model
from ..objectives.update import GuardedStep
from ..policies import POLICIES, BatchContext, Policy, build as build_policy, check_compatible
from .checks import INPUT_TOLERANCE, check_batch, parse_input_range, plain_state
from .counters import Counters
from .inputs import RunInput
from .lr_rule import model_family, niu_learning_rate
from .periodic import ResetClock
from .speed import SpeedOptions, resolve as resolve_speed
from .registry import METHODS

NONFINITE_MODES = ("raise", "skip")

# ---------------------------------------------------------------------- skipping an empty selection
#: ``skip_empty`` modes of the batch family (:meth:`Method.plan_skip`)
SKIP_EMPTY_MODES = ("never", "always", "auto")
#: ``"auto"`` where a read syncs (CUDA): batches between two reads of the counters (one sync each)
SKIP_EMPTY_WINDOW = 32
#: ``"auto"`` where a read syncs: the share of empty selections over the last window that turns the
#: per-batch read on (below it the step stays sync-free)
SKIP_EMPTY_MIN_RATE = 0.1


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a device value on the host costs nothing: the CPU (no queue to drain)."""
    return device.type == "cpu"


@eager_boundary  # in a compiled step, the read runs eagerly (a graph break), not traced
def nothing_selected(weights: torch.Tensor) -> bool:
    """Whether no sample has a positive weight: read on the host (a sync on a GPU)."""
    return not bool((weights > 0).any())


def check_skip_empty(mode: Any) -> str:
    """``mode`` if it is one of :data:`SKIP_EMPTY_MODES`, else a ``ValueError`` (a bool included: SAR's
    and wisdom of crowds' former ``skip_empty=True`` is now ``step_on_empty=False``)."""
    if isinstance(mode, bool) or mode not in SKIP_EMPTY_MODES:
        hint = (" (SAR's and crowds' former skip_empty=True, 'no update on an empty selection', is now "
                "step_on_empty=False)") if isinstance(mode, bool) else ""
        raise ValueError(f"skip_empty must be one of {SKIP_EMPTY_MODES}, not {mode!r}{hint}")
    return mode


@contextlib.contextmanager
def preserved_buffers(networks: Iterable[nn.Module]):
    """Put every buffer of ``networks`` back as it was when the block ends (device copies, no host
    sync): a forward that writes running statistics leaves no trace (:meth:`Method.predict_only`)."""
    saved = [(net, {name: b.clone() for name, b in net.named_buffers()}) for net in networks]
    try:
        yield
    finally:
        with torch.no_grad():
            for net, buffers in saved:
                current = dict(net.named_buffers())
                for name, value in buffers.items():
                    if name in current and current[name].shape == value.shape:
                        current[name].copy_(value)
                    else:  # a forward that replaced the buffer object: restore the saved one by name
                        owner, _, leaf = name.rpartition(".")
                        setattr(net.get_submodule(owner) if owner else net, leaf, value)


def make_optimizer(name: str, params: Sequence[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "sgd":  # multi-tensor kernels on every device (torch's default only on CUDA): the same updates
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


@contextlib.contextmanager
def _learning_under_inference_mode():
    """Inference mode off and gradients on (a learning step inside a caller's ``torch.inference_mode()``)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _locked_reset(reset: Callable[..., Any]) -> Callable[..., Any]:
    """A method's ``reset`` holding its lock (see :attr:`Method.lock`), then clearing the collapse
    guard's signal (:mod:`tta.guard`): wrapped around every recipe's own ``reset`` too."""
    @functools.wraps(reset)
    def locked(self: "Method", *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            out = reset(self, *args, **kwargs)
            guard = self._modules.get("collapse_guard")
            if guard is not None:
                guard.clear()
            clock = self._modules.get("reset_clock")  # reset_every (tta.methods.periodic): a new period
            if clock is not None:
                clock.restart()
            return out

    locked.__tta_locked__ = True  # type: ignore[attr-defined]
    return locked


_LOCK_CREATION = threading.Lock()


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
        reset_every: a full reset (:meth:`full_reset`: weights, optimizer state and every moving
            average) before every ``reset_every``-th batch, as RDumb (:mod:`tta.methods.periodic`);
            0: never.
        extra_policies: policy names (or built policies) applied after the method's own. A policy
            built by name takes its class's ``extra_defaults`` (``plpd``: a pure filter), then
            ``policy_kwargs[name]``.
        policy_kwargs: keyword arguments for extra policies, by name.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for batches with NaN/Inf.
        input_range: the range images must lie in (``(0, 1)``: the wrapper normalises them itself);
            a batch outside it by more than :data:`INPUT_TOLERANCE` raises ``ValueError``.
            ``None`` turns the check off (see :func:`check_batch` for its cost).
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
    #: the paper's own ECE convention, reported as ``paper_ece`` next to ``ece`` (:mod:`tta.metrics`):
    #: ``(bins, upper_inclusive)``; ``None``: only the toolkit's 15-bin ECE
    paper_ece: ClassVar[tuple[int, bool] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "reset" in vars(cls) and not getattr(vars(cls)["reset"], "__tta_locked__", False):
            cls.reset = _locked_reset(vars(cls)["reset"])  # a recipe's reset() holds the lock too (thread model)
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
                 policy_kwargs: Mapping[str, Mapping[str, Any]] | None = None, nonfinite: str = "raise",
                 input_range: tuple[float, float] | None = (0.0, 1.0), reset_every: int = 0):
        super().__init__()
        self.input_range = parse_input_range(input_range)
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
        if int(reset_every) < 0:
            raise ValueError(f"reset_every must be 0 (never) or a number of batches, got {reset_every}")
        self.reset_every = int(reset_every)
        if self.reset_every:  # a submodule only when used: other methods' states keep their keys
            self.reset_clock = ResetClock(self.reset_every)
            self.counters.add("periodic_resets", 0)
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
            fitting = [name for name in METHODS.available() if METHODS.get(name).policy_level == policy.level
                       and set(policy.needs) <= METHODS.get(name).provides]
            check_compatible(policy, level=self.policy_level, provides=set(self.provides), method=self.name,
                             alternatives=fitting)
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

    # ------------------------------------------------------------------ skipping an empty selection
    #: ``"never"``, ``"always"`` or ``"auto"`` (:meth:`plan_skip`); the batch family takes it as an option
    skip_empty: str = "never"
    #: an empty selection is not learned from (``False``: the official SAR / crowds code still steps)
    requires_nonempty: bool = True
    #: this batch reads its selection's size on the host (set eagerly by :meth:`plan_skip`)
    _skip_now: bool = False
    #: the guarded step reads its decision on the host (a free read: the CPU; set by :meth:`plan_skip`)
    _host_guard: bool = False
    #: the read (an eager boundary, :mod:`tta.compiling`: a clean graph break in a compiled step, no trace)
    _read_empty: Callable[[torch.Tensor], bool] = staticmethod(nothing_selected)

    def plan_skip(self, device: torch.device) -> None:
        """Decide, once per batch and outside a compiled region, whether this batch reads the size of
        its selection on the host to skip the backward and the step of an empty one.

        ``"never"``: no read (the step stays free of host syncs). ``"always"``: read at every batch.
        Where reads are free and the mode is not ``"never"``, the guarded update also decides on the
        host (:class:`~tta.objectives.update.GuardedStep` ``host=True``: no snapshot, no undo).
        ``"auto"``: read where a read is free (:func:`reads_are_free`: the CPU); elsewhere read when at
        least :data:`SKIP_EMPTY_MIN_RATE` of the batches of the last window of
        :data:`SKIP_EMPTY_WINDOW` had an empty selection, measured by the counters the step keeps
        anyway and read once per window (never per batch). A compiled step sees the decision as a
        Python constant: one graph per decision."""
        mode = self.skip_empty
        free = reads_are_free(device)
        if mode == "never":
            now = False
        elif mode == "always" or free:
            now = True
        else:
            now = self._auto_skip()
        if now != self._skip_now:
            self._skip_now = now
        # the guarded step decides on the host too (not in a compiled step: a graph break costs more)
        host = mode != "never" and free and not self.speed.compile
        if host != self._host_guard:
            self._host_guard = host

    def _auto_skip(self) -> bool:
        seen = self.__dict__.get("_auto_seen", 0) + 1
        self.__dict__["_auto_seen"] = seen
        if seen % SKIP_EMPTY_WINDOW == 0:
            self.counters.flush()
            names = [n for n in ("batches", "skipped_empty", "empty_selection_steps") if n in self.counters._buffers]
            values = dict(zip(names, torch.stack([self.counters._buffers[n] for n in names]).tolist()))  # one sync
            batches, empty = values["batches"], values.get("skipped_empty", 0) + values.get("empty_selection_steps", 0)
            last_batches, last_empty = self.__dict__.get("_auto_last", (0, 0))
            self.__dict__["_auto_last"] = (batches, empty)
            window = batches - last_batches
            self.__dict__["_auto_on"] = window > 0 and (empty - last_empty) >= SKIP_EMPTY_MIN_RATE * window
        return bool(self.__dict__.get("_auto_on", False))

    def empty_selection(self, weights: torch.Tensor) -> bool:
        """``True`` when this batch reads its selection's size (:meth:`plan_skip`) and nothing was
        selected; the one host read of the skip (a graph break in a compiled step)."""
        return self._skip_now and self._read_empty(weights)

    def skip_step(self, weights: torch.Tensor, *, backwards: int = 1, kept: int | None = None) -> torch.Tensor:
        """What the guarded step leaves after an empty selection, without its backward and step: no
        gradients, weights and optimizer state untouched, and the same counters (``backwards``
        counts the update as attempted, as the unskipped step does; ``kept``: the selection's size,
        when read already). Returns the device bool "the step was kept" (false)."""
        if self.update is not None:
            self.update.clear_grads()
            ok = self.update.constant_flag(False)  # a shared constant (callers only read it)
        else:
            ok = torch.zeros((), dtype=torch.bool, device=weights.device)
        if kept is not None and self._host_guard:  # the size was read already: count with it
            self._record_step_on_host(False, kept, None, True, backwards)
        else:
            self.record_step(ok, (weights > 0).sum(), backwards=backwards)
        return ok
    # ------------------------------------------------------------------ periodic reset (reset_every)
    def full_reset(self) -> None:
        """Back to the source state including every moving average: :meth:`reset`, then each
        policy's :meth:`~tta.policies.Policy.clear` (state the paper's own reset keeps, e.g. EATA's
        running mean prediction)."""
        with self.lock:
            self.reset()
            for policy in self.policies:
                policy.clear()

    def periodic_reset(self) -> None:
        """Called by the families before each batch: a :meth:`full_reset` when ``reset_every``
        batches have passed since the last reset (counted on the host: no sync), counted in
        ``periodic_resets``."""
        clock = self._modules.get("reset_clock")
        if clock is None:
            return
        if clock.due:
            self.full_reset()
            self.counters.add("periodic_resets", 1)
        clock.advance()

    # ------------------------------------------------------------------ the step
    def select(self, ctx: BatchContext) -> torch.Tensor:
        """Multiply the policies' weights in order; each policy sees which samples (or views) are
        still alive. Counts what each policy saw and kept, on the device, and keeps this batch's
        kept-after-each-stage masks in ``last_selection`` (``{policy key: bool tensor}``, in order; a
        recipe with a selection outside its policies adds its own, e.g. SAR's second one) for the
        engine's selection diagnostics (:class:`tta.metrics.SelectionMetrics`)."""
        weights = torch.ones(ctx.batch_size, device=ctx.logits.device)
        self.last_selection: dict[str, torch.Tensor] = {}
        keys = self.policy_keys
        if not keys:
            if self._host_guard:
                self.__dict__["_host_kept"] = (weights, ctx.batch_size)
            return weights
        alive = weights > 0
        masks = [alive]  # alive before the first policy, then kept after each (= alive before the next)
        host = self._host_guard
        empty_from = None  # the stage from which nothing is alive (read on the host), while it lasts
        for i, (key, policy) in enumerate(zip(keys, self.policies)):
            if host and i and policy.inert_when_empty:  # reads are free: no sample alive, no call
                if empty_from is None and not bool(alive.any()):
                    empty_from = i
                if empty_from is not None:  # its factor (0 for every sample not alive) would change no weight
                    self.last_selection[key] = alive
                    masks.append(alive)
                    continue
            weights = weights * policy(ctx, alive)
            alive = weights > 0
            empty_from = None
            self.last_selection[key] = alive
            masks.append(alive)
        if self._host_guard:  # reads are free (the CPU): every stage's count in one read, added as numbers
            if empty_from is None:
                counts = torch.stack(masks).sum(dim=1).tolist()
            else:  # from stage empty_from on nothing is alive (read already): only the stages before are counted
                known = [ctx.batch_size] + (torch.stack(masks[1:empty_from]).sum(dim=1).tolist() if empty_from > 1 else [])
                counts = known + [0] * (len(masks) - len(known))
            self.__dict__["_host_kept"] = (weights, counts[-1])  # the step's kept count: no second read
            buffers = self.policy_counters._buffers
            for i, key in enumerate(keys):
                for name, value in ((f"{key}_seen", counts[i]), (f"{key}_kept", counts[i + 1])):
                    if value or name not in buffers:
                        self.policy_counters.add(name, value)
        else:
            for i, key in enumerate(keys):
                self.count_policy(key, masks[i].sum(), masks[i + 1].sum())
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
        if self._host_guard:  # the values are read for free: count with Python numbers (fewer ops, same counts)
            self._record_step_on_host(bool(ok), int(kept), None if nonempty is None else bool(nonempty),
                                      require_nonempty, backwards)
            return
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

    def _record_step_on_host(self, ok: bool, kept: int, nonempty: bool | None, require_nonempty: bool,
                             backwards: int) -> None:
        """:meth:`record_step` with host values: a counter moves only when its increment is not zero."""
        nonempty = kept > 0 if nonempty is None else nonempty
        increments = {"backwards": backwards, "steps": int(ok), "kept": kept * ok}
        if require_nonempty:
            increments.update(skipped_empty=int(not nonempty), skipped_nonfinite=int(nonempty and not ok))
        else:
            increments.update(empty_selection_steps=int(not nonempty and ok), skipped_nonfinite=int(not ok))
        buffers = self.counters._buffers
        for name, value in increments.items():
            if value or name not in buffers:
                self.counters.add(name, value)

    def step(self, loss: torch.Tensor | Callable[[], torch.Tensor] | None, weights: torch.Tensor,
             require_nonempty: bool | None = None) -> torch.Tensor:
        """Guarded optimizer step, skipped on the device for an empty selection or a non-finite loss.

        ``require_nonempty=False`` steps on an empty selection too (default:
        :attr:`requires_nonempty`). ``loss=None``: the gradients are already there; a callable: the
        loss, computed only when the step is not skipped. An empty selection known on the host
        (:meth:`plan_skip`) skips the loss, the backward and the step, with the same result
        (:meth:`skip_step`). Returns the device bool "the step was kept".
        """
        require_nonempty = self.requires_nonempty if require_nonempty is None else require_nonempty
        if self._host_guard:  # reads are free (the CPU): the whole decision on the host, fewer ops
            known = self.__dict__.pop("_host_kept", None)  # counted by select() for these weights
            kept_n = known[1] if known is not None and known[0] is weights else int((weights > 0).sum())
            if require_nonempty and kept_n == 0:
                return self.skip_step(weights, kept=0)
            loss = loss() if callable(loss) else loss
            self._observe_loss(loss)
            ok = self.update(loss, True, host=True)
            self._record_step_on_host(self.update.stepped, kept_n, None, require_nonempty, 1)
            return ok
        if require_nonempty and self.empty_selection(weights):
            return self.skip_step(weights)
        if callable(loss):
            loss = loss()
        self._observe_loss(loss)
        kept = (weights > 0).sum()
        gate = kept > 0 if require_nonempty else torch.ones((), dtype=torch.bool, device=kept.device)
        ok = self.update(loss, gate, host=self._host_guard)
        self.record_step(ok, kept, require_nonempty=require_nonempty)
        return ok

    def _observe_loss(self, loss: torch.Tensor | None) -> None:
        """Hand the step's loss to the attached :class:`~tta.monitor.StepMonitor`, if any (device ops only)."""
        monitor = self._modules.get("step_monitor")
        if monitor is not None and loss is not None:
            monitor.observe_loss(loss)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse a batch before any counter or weight moves (:func:`check_batch`): shape, dtype and
        device of the model's parameters, and, with one host sync, NaN/Inf (``nonfinite="raise"``)
        and values outside :attr:`input_range`."""
        param = self.__dict__.get("_first_param", False)
        if param is False:  # found once (a parameter moved by .to() is the same object); cleared by _apply
            param = self.__dict__["_first_param"] = next(self.model.parameters(), None)
        input_range = self.__dict__.get("input_range", (0.0, 1.0))
        values_checked = self.nonfinite == "raise" or input_range is not None
        # a batch of the metadata (shape, dtype, device) last accepted passes without the metadata checks
        signature = (x.shape, x.dtype, x.device) if type(x) is torch.Tensor and not values_checked else None
        if signature is not None and signature == self.__dict__.get("_accepted_input"):
            return
        check_batch(x, channels=getattr(self.model, "input_channels", 3), nonfinite=self.nonfinite,
                    input_range=input_range, tolerance=INPUT_TOLERANCE,
                    dtype=None if param is None else param.dtype, device=None if param is None else param.device)
        if signature is not None and param is not None and x.dtype is param.dtype:  # not an autocast exception
            self.__dict__["_accepted_input"] = signature

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_first_param", None)  # the input check looks it up again
        self.__dict__.pop("_accepted_input", None)
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ predicting without adapting
    def predict_only(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the method's current model on ``x``, with no update and no change of any
        method state: weights, optimizer state, moving averages, memories, policies, clocks and
        counters stay bitwise as they were (the batches a method too slow for the stream misses,
        :mod:`tta.stream_rate`; Alfarra et al., ICML 2024).

        The network runs in the mode the method's own forward leaves it in, so BatchNorm layers that
        normalise with test-batch statistics still do; any buffer the forward writes (running
        statistics of a BatchNorm in train mode with a momentum, a robust BatchNorm's estimates) is
        put back afterwards (:func:`preserved_buffers`: one device copy, no host sync). No input
        check and no collapse guard run. A family or recipe changes *what* predicts by overriding
        :meth:`predict_logits`."""
        with self.lock, torch.no_grad(), self.speed_context(x):
            if self.speed.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with preserved_buffers(self.networks()):
                return self.predict_logits(x)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """What :meth:`predict_only` runs (under ``no_grad``, buffers restored after): the adapted
        model's forward (the official stream-rate code's ``model.model(images)``)."""
        return self.model(x)

    # ------------------------------------------------------------------ the run
    def networks(self) -> list[nn.Module]:
        """The classifiers this method runs (the adapted one, plus any frozen copy a family keeps)."""
        return [self.model]

    #: the speed options in use (:mod:`tta.methods.speed`; set by :meth:`prepare`)
    speed: SpeedOptions = SpeedOptions()

    def prepare(self, *, device: torch.device | str | None = None, channels_last: bool = False, compile: bool = False,
                amp: bool = False, fast: bool = False, compile_mode: str | None = None) -> "Method":
        """Move to ``device`` (``None``: stay) and apply the speed options (:mod:`tta.methods.speed`).

        ``fast=True``: bf16 autocast, channels_last for CNNs and a compiled step. ``amp``: every call
        of the method runs under bf16 autocast. ``channels_last``: every network the method runs
        (a frozen copy gets the same kernels, so first-batch ties stay exact). ``compile``:
        :meth:`compile_step` (``compile_mode``: see :mod:`tta.methods.speed`). Options add to those
        of an earlier call; :attr:`speed` holds them. Returns the method.
        """
        current = self.speed  # options add to those of an earlier prepare (a compiled step stays compiled)
        options = resolve_speed(self.model.net, fast=fast, amp=amp or current.amp,
                                channels_last=channels_last or current.channels_last,
                                compile=compile or current.compile, compile_mode=compile_mode or current.compile_mode)
        if device is not None:
            self.to(device)
        if options.channels_last:
            for model in self.networks():
                model.to(memory_format=torch.channels_last)
        if options.compile and not current.compile:
            self.compile_step(options.compile_mode)
        self.speed = options
        return self

    def compile_step(self, mode: str | None = None) -> None:
        """``torch.compile`` what runs per batch (default: every network, in place); a family compiles
        its whole step (:meth:`tta.methods.batch.BatchMethod.compile_step`)."""
        for model in self.networks():
            model.net.compile(mode=mode)

    def speed_context(self, x: Any) -> contextlib.AbstractContextManager:
        """bf16 autocast on ``x``'s device when the method was prepared with ``amp``/``fast`` (every
        call of the method runs under it), else nothing."""
        if not self.speed.amp or not torch.is_tensor(x):
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ state
    def _capture_state(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
        }

    @_locked_reset
    def reset(self) -> None:
        """Back to the source state: model weights, optimizer state and the method's own state
        (the rollback of the save / restore / rollback API, see :meth:`state_dict`)."""
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
        """Load the optimizer state of :meth:`get_extra_state`. Anything but tensors and plain
        containers (an older tta's pickled optimizer bytes, an object) raises ``ValueError``: a
        state is never unpickled, so loading one cannot run code."""
        optimizer = self._checked_extra_state(state)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)

    def _checked_extra_state(self, state: Any) -> dict[str, Any] | None:
        """The optimizer state dict inside ``state`` (see :meth:`set_extra_state`), or a ``ValueError``."""
        if state is None:
            if self.optimizer is not None:
                raise ValueError(f"this {self.name} state holds no optimizer state, but {self.name} has an optimizer: "
                                 f"it was saved from another method or parameter preset; nothing was loaded")
            return None
        if self.optimizer is None:
            raise ValueError(f"this state holds an optimizer state, but {self.name} has no optimizer (it adapts "
                             f"nothing): it was saved from another method or parameter preset; nothing was loaded")
        if not isinstance(state, dict) or set(state) != {"optimizer"}:
            kind = type(state).__name__ + (f" with keys {sorted(map(str, state))}" if isinstance(state, dict) else "")
            hint = (" (bytes: an optimizer state pickled by tta < 0.2; loading it could run code, so tta refuses it: "
                    "re-save the state with this version)") if isinstance(state, (bytes, bytearray)) else ""
            raise ValueError(f"unexpected method extra state ({kind}): expected {{'optimizer': <optimizer "
                             f"state_dict of tensors and plain containers>}}; refusing to load it, nothing was "
                             f"loaded{hint}")
        optimizer = plain_state(state["optimizer"], "optimizer state")
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
                or not isinstance(optimizer.get("param_groups"), list):
            raise ValueError("optimizer state: expected a dict with 'state' (a dict) and 'param_groups' (a list); "
                             "nothing was loaded")
        return optimizer

    # ------------------------------------------------------------------ save / restore / threads
    @property
    def lock(self) -> threading.RLock:
        """The lock that serialises this method's online state (thread model).

        ``method(x)`` (check, predict, adapt, and the collapse guard), :meth:`reset`,
        :meth:`state_dict` and :meth:`load_state_dict` each hold it, so one adapted model can serve
        concurrent callers: their calls run one after the other, each seeing the state the previous
        one left (no interleaved half-updates, and the counters count exactly the calls made).
        Uncontended it costs well under a microsecond per call. It is re-entrant: hold it
        (``with adapted.lock:``) to make several calls one atomic unit, e.g. predict then save.
        Concurrent callers still share one state; give each stream its own ``tta.adapt`` copy
        to adapt them independently.
        """
        lock = self.__dict__.get("_lock")
        if lock is None:
            with _LOCK_CREATION:
                lock = self.__dict__.get("_lock")
                if lock is None:
                    lock = self.__dict__["_lock"] = threading.RLock()
        return lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            monitor = self._modules.get("step_monitor")  # tta.monitor: this call's statistics, on the device
            started = time.perf_counter() if monitor is not None else 0.0
            try:
                grad = self._grad_context()
                if self.speed.amp or grad is not None:
                    with self.speed_context(args[0] if args else kwargs.get("x")), grad or contextlib.nullcontext():
                        out = super().__call__(*args, **kwargs)
                else:  # no context to enter (the usual call): none made
                    out = super().__call__(*args, **kwargs)
            except BaseException:
                if self.optimizer is not None:  # a step cut short must not leave gradients for the next one
                    self.optimizer.zero_grad(set_to_none=True)
                raise
            guard = self._modules.get("collapse_guard")
            if guard is not None:
                guard.observe(self, out)
            if monitor is not None:
                monitor.observe(out, time.perf_counter() - started)
            return out

    def _grad_context(self) -> contextlib.AbstractContextManager | None:
        """Gradients on for the call of a method that learns, whatever the caller's mode: an evaluation
        loop under ``torch.no_grad()`` (the usual one) still adapts, as the official Tent/EATA/SAR/DeYO
        code ensures with ``@torch.enable_grad()`` on its step; under ``torch.inference_mode()`` the
        step runs with inference mode off (the returned logits are ordinary tensors). ``None`` (nothing
        to enter) when gradients are on already or the method does not learn."""
        if not self.learns or (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            return None
        if torch.is_inference_mode_enabled():
            return _learning_under_inference_mode()
        return torch.enable_grad()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_lock", None)  # a copy gets its own lock
        return state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The method's whole online state, to save (``torch.save``) and restore later.

        Model weights and buffers, the optimizer state (as its ``state_dict()``, under
        ``_extra_state``), the policies' and the method's buffers and the counters: tensors and
        plain containers only, so ``torch.load(f, weights_only=True)`` reads it and
        :meth:`load_state_dict` never unpickles anything. Save / restore / rollback::

            state = adapted.state_dict()        # save (copy it, or torch.save it: the tensors are live)
            adapted.load_state_dict(state)      # restore that point
            adapted.reset()                     # roll back to the source state
        """
        with self.lock:
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Restore a :meth:`state_dict` (from any source: it holds no code, and anything that is not
        tensors and plain containers raises ``ValueError``). Counters registered on the fly (a
        counter that appears only after some batch) are matched both ways; a collapse guard's signal
        (:mod:`tta.guard`) is kept when the state has none and ignored when this method has no guard."""
        with self.lock:
            state = dict(state_dict)
            for prefix, counters in (("counters.", self.counters), ("policy_counters.", self.policy_counters)):
                for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]]:
                    name = key[len(prefix):]
                    if name not in counters._buffers:
                        counters.add(name, torch.zeros((), dtype=torch.long, device=counters._device()))
                for name, buffer in counters._buffers.items():
                    state.setdefault(prefix + name, torch.zeros_like(buffer))
            guard = self._modules.get("collapse_guard")  # a guard's signal is not part of what is restored
            for key in [k for k in state if k.startswith("collapse_guard.")]:
                if guard is None:
                    del state[key]
            if guard is not None:
                for name, buffer in guard.state_dict().items():
                    state.setdefault("collapse_guard." + name, buffer.clone())
            if "_extra_state" in state:  # checked before anything is loaded: a refused state changes nothing
                self._checked_extra_state(state["_extra_state"])
            return super().load_state_dict(state, strict=strict, assign=assign)

    def input_records(self) -> dict[str, Any]:
        """What the run record keeps about the run inputs the method was handed (default: nothing)."""
        return {}

    def stats(self) -> dict[str, Any]:
        """Counters, forwards and backwards per batch (the cost of the method, comparable across
        methods), and per-policy seen/kept counts (one host sync)."""
        counters = self.counters.as_dict()
        batches = counters.get("batches", 0)
        per_batch = {k: round(counters[k] / batches, 4) for k in ("forwards", "backwards") if batches and k in counters}
        return {"counters": counters, "per_batch": per_batch, "policies": self.policy_counters.as_dict()}

    def hparams(self) -> dict[str, Any]:
        """The resolved hyperparameters, for the run record."""
        out = {"method": self.name, "paper": self.paper, "params": self.params_preset,
               "num_adapted_tensors": len(self.param_names),
               "num_adapted_values": int(sum(p.numel() for p in self.adapted_parameters())),
               "model_copies": len(self.networks()),  # networks held (adapted, frozen source, teacher, ...)
               "steps": self.steps, "episodic": self.episodic, "reset_every": self.reset_every,
               "nonfinite": self.nonfinite,
               "policies": [{"name": p.name, **p.hparams()} for p in self.policies]}
        if self._modules.get("collapse_guard") is not None:  # tta.guard, off unless attached
            out["guard"] = self.collapse_guard.hparams()
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


__all__ = ["Counters", "Method", "NONFINITE_MODES", "SKIP_EMPTY_MODES", "check_skip_empty", "make_optimizer",
           "preserved_buffers", "reads_are_free"]
