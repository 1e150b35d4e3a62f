"""tta: test-time adaptation for vision models.

Online, batch-by-batch adaptation of any timm / torchvision classifier or open_clip model, with
interchangeable sample-selection policies (EATA, DeYO, ADTE, wisdom of crowds, DiffTPT)::

    import tta
    adapted = tta.adapt(model, method="eata", fisher_data=clean_batches)
    logits = adapted(images)          # images in [0, 1]; predicts, then adapts online
    adapted.reset()                   # back to the source state
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from torch import nn

from . import methods, policies, protocols
from .methods import Method
from .models.classifier import Classifier, load_classifier

__version__ = "0.1.0"


def adapt(model: nn.Module | str, method: str = "tent", *, extra_policies: Sequence[str] = (), inplace: bool = False,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None, protocol: str | None = None,
          guard: str | Mapping[str, Any] | None = None, fast: bool = False, **overrides: Any) -> Method:
    """Wrap ``model`` so that it adapts online while it predicts.

    Args:
        model: an ``nn.Module`` classifier (expects normalised input), a :class:`Classifier`, or a
            model spec string (``timm:...``, ``torchvision:...``, ``clip:...``).
        method: a registered method name (``tta.methods.available()``).
        extra_policies: sample-selection policies added to the method's own.
        inplace: adapt ``model`` itself; by default a deep copy adapts and ``model`` stays untouched.
        mean, std: the normalisation ``model`` expects (default ImageNet); the returned module takes
            images in [0, 1].
        protocol: a benchmark protocol (``"cifar"``, ``"imagenet"``; :mod:`tta.protocols`): the reference
            code's values for that benchmark, under ``overrides``. ``None``: the method's defaults (the
            ImageNet values); a threshold tuned for 1,000 classes (EATA's ``d_margin``) left at its default
            on a model with fewer than 100 classes then warns once.
        guard: collapse protection for long deployments (:mod:`tta.guard`): ``"reset_on_collapse"``
            resets to the source state when the predictions collapse onto a few classes, or a dict
            of thresholds (``{"min_effective_classes": 3, "warmup": 20}``). Off by default (the
            papers' behaviour); resets are counted in ``stats()["counters"]["guard_resets"]``.
        fast: the fast preset (:mod:`tta.methods.speed`): bf16 autocast, channels_last for CNNs and a
            compiled adaptation step. The first calls compile (seconds to minutes), a batch of a new
            size compiles once more. Off by default: fp32 and eager, as the papers ran.
        overrides: hyperparameters of the method (``lr=``, ``steps=``, ...), and the input checks:
            ``input_range=None`` accepts images outside [0, 1], ``nonfinite="skip"`` predicts on
            batches with NaN/Inf and drops their update.

    Returns:
        A :class:`~tta.methods.Method` (an ``nn.Module``): ``logits = adapted(x)``, and

        * **input checks**: a batch that is not float ``(N, C, H, W)`` of the model's dtype and
          device, holds NaN/Inf, or lies outside [0, 1] (by more than 1e-3) raises ``ValueError``
          before any weight or counter moves; a non-finite loss or an empty selection skips the
          update on the device;
        * **save / restore / rollback**: ``state = adapted.state_dict()`` (tensors and plain
          containers: ``torch.save`` it, load it with ``torch.load(f, weights_only=True)``),
          ``adapted.load_state_dict(state)`` (never unpickles: a state that holds anything else
          raises ``ValueError``), ``adapted.reset()`` (back to the source state);
        * **threads**: calls, ``reset()``, ``state_dict()`` and ``load_state_dict()`` hold the
          method's re-entrant lock (``adapted.lock``), so concurrent callers are served one at a
          time, each seeing the state the previous call left.
    """
    if isinstance(model, nn.Module) and not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, nn.Module) and not isinstance(model, Classifier):
        model = load_classifier(model, mean=mean, std=std)
    if isinstance(model, str) and overrides.get("num_classes") is None:
        model = load_classifier(model)  # what the method would do: its class count decides class-dependent values
    num_classes = overrides.get("num_classes") or model.num_classes
    overrides = protocols.for_adapt(method, protocol, num_classes, overrides)
    adapted = methods.build(method, model, extra_policies=list(extra_policies), **overrides)
    if guard is not None:
        from .guard import attach_guard

        attach_guard(adapted, guard)
    if fast:
        adapted.prepare(fast=True)
    return adapted


__all__ = ["Classifier", "Method", "adapt", "load_classifier", "methods", "policies", "__version__"]
