"""The policy abstraction: per-batch context in, per-sample weight out.

A policy reads a :class:`BatchContext` and returns a weight per sample (0 = excluded). A method
multiplies the weights of its policies in order; each policy is told which samples are still
alive, so expensive signals (the frozen source model's logits, the logits of an object-destroyed
view) are computed only for those, once per batch, and shared through the context.

Every policy declares its contract with the methods:

* ``level``: what its "samples" are -- ``"samples"`` (it ranks or weights the samples of a batch:
  Tent, EATA, SAR, DeYO, ...) or ``"views"`` (it ranks the views of *one* image: TPT, DiffTPT, ADTE, ZERO, ...);
* ``needs``: the signals it asks the method's context for, among :data:`SIGNALS` -- ``"source"``
  (logits of the frozen source model), ``"model"`` (re-forwarding a transformed batch through the
  adapted model) and ``"embeddings"`` (image embeddings of the views).

:func:`~tta.policies.compatibility.check_compatible` turns a mismatch into a ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..objectives.entropy import shannon_entropy

#: what a policy ranks: the samples of a batch, or the views of one image
LEVELS = ("samples", "views")
#: the signals a policy may need from the method's context, with what each one is
SIGNALS: dict[str, str] = {
    "source": "the frozen source model (its logits on each batch)",
    "model": "to re-forward a transformed batch through the adapted model",
    "embeddings": "image embeddings of the views",
    "memory": "a sample memory to train from (the batch family's default step)",
}


class BatchContext:
    """Signals of one batch, each computed lazily and at most once.

    Args:
        x: the input batch (images in [0, 1]).
        logits: the adapted model's logits on ``x`` (with grad when the method learns).
        model: the adapted model (a callable from images to logits).
        source_model: a callable returning the frozen source model, built on first use.
    """

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor],
                 source_model: Callable[[], nn.Module] | None = None, **extras: Any):
        self.x = x
        self.logits = logits
        self.model = model
        self._source_model = source_model
        self._cache: dict[str, Any] = {}
        self.extras = extras

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """The value of ``compute()`` under ``key``, computed on the first request only."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # plain properties over ``cached``: the lock of functools' cached property (Python < 3.12) is not
    # traceable by ``torch.compile``, so a compiled step would fall back to eager there
    @property
    def entropy(self) -> torch.Tensor:
        """Per-sample Shannon entropy of the adapted logits (differentiable), computed once."""
        return self.cached("entropy", lambda: shannon_entropy(self.logits, dim=1))

    @property
    def probs(self) -> torch.Tensor:
        """Detached softmax probabilities of the adapted logits, computed once."""
        return self.cached("probs", lambda: self.logits.detach().float().softmax(dim=1))

    def source_logits(self) -> torch.Tensor:
        """Logits of the frozen source model on the whole batch (no grad), computed once."""
        if self._source_model is None:
            raise RuntimeError("this method has no frozen source model for the policy that asked for it")

        def compute() -> torch.Tensor:
            with torch.no_grad():
                return self._source_model()(self.x)

        return self.cached("source_logits", compute)


class Policy(nn.Module):
    """Base class: ``weight = policy(ctx, alive)``; state lives in buffers so it saves and moves.

    Subclasses implement :meth:`forward` and declare ``level`` and ``needs`` (see the module
    docstring). ``reset()`` is called when the method resets; only state that the paper's code
    resets should be cleared there. A constructor takes ``num_classes`` only if it uses it
    (:func:`tta.policies.build` passes it to those only).
    """

    #: the registered name (set by the registry)
    name: ClassVar[str] = "policy"
    #: ``"samples"`` (ranks or weights the samples of a batch) or ``"views"`` (the views of one image)
    level: ClassVar[str] = "samples"
    #: the signals the policy needs from the method's context (keys of :data:`SIGNALS`); a class
    #: attribute, which an instance may override when its needs depend on its settings
    needs: tuple[str, ...] = ()
    #: constructor defaults used when a method builds the policy by name as an *extra* policy
    #: (``extra_policies=[name]``); ``policy_kwargs`` override them
    extra_defaults: ClassVar[dict[str, Any]] = {}
    #: a view-ranking stage (keeps the most confident views of an image); an extra ranking given to a
    #: view method replaces the method's own ranking stage
    ranks_views: ClassVar[bool] = False
    #: with no sample alive the policy changes no state and gives every sample a finite weight (0 for
    #: those not alive), so its factor changes no weight: where reading that costs nothing (the CPU),
    #: a method skips the call (:meth:`tta.methods.core.Method.select`)
    inert_when_empty: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.level not in LEVELS:
            raise TypeError(f"{cls.__name__}.level must be one of {LEVELS}, not {cls.level!r}")
        unknown = [s for s in cls.needs if s not in SIGNALS]
        if unknown:
            raise TypeError(f"{cls.__name__}.needs names unknown signals {unknown}; known: {sorted(SIGNALS)}")

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:
        """Clear per-stream state that the original code clears on reset (default: nothing)."""

    def clear(self) -> None:
        """Clear *all* per-stream state, also what the original code keeps across its reset (a full
        reset, ``reset_every``; default: :meth:`reset`)."""
        self.reset()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        return {}
