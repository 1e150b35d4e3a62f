"""Test-time adaptation methods, registered by name.

    method = tta.methods.build("eata", model, num_classes=1000, extra_policies=["plpd"], lr=1e-3)
    logits = method(x)      # predict on x with the current state, then adapt on x
    tta.methods.available()

Layout: :mod:`.core` (the :class:`Method` core every method shares; :mod:`.checks`, what it checks
before anything changes), two families over it
(:mod:`.batch` and :mod:`.views`), the recipes (one module per paper), :mod:`.inputs` (what a
method declares it needs from the run), :mod:`.lr_rule` (the SAR/DeYO learning-rate rule) and the
leaf :mod:`.registry`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .batch import BatchMethod
from .checks import check_batch
from .core import Method
from .inputs import INPUT_KINDS, RunInput
from .lr_rule import model_family, niu_learning_rate
from .registry import METHODS, available, register
from .views import ViewMethod

# Importing the recipes registers them.
from . import baselines, cotta, crowds, deyo, eata, eata_c, lame, rdumb, roid, rotta, sar, sotta  # noqa: E402,F401  (batch family)
from . import adte, ctpt, difftpt, tda, tpt, zero  # noqa: E402,F401  (view family, CLIP)


def build(name: str, model: nn.Module | str, **overrides: Any) -> Method:
    """Build a registered method around ``model``; keyword arguments override its defaults."""
    return METHODS.get(name)(model, **overrides)


__all__ = ["BatchMethod", "INPUT_KINDS", "METHODS", "Method", "RunInput", "ViewMethod", "available", "build",
           "check_batch", "model_family", "niu_learning_rate", "register"]
