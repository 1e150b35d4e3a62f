"""Test-time adaptation methods, registered by name.

    method = tta.methods.build("eata", model, num_classes=1000, extra_policies=["plpd"], lr=1e-3)
    logits = method(x)      # predict on x with the current state, then adapt on x
    tta.methods.available()
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from .base import Method, check_batch, niu_learning_rate

METHODS: Registry[Method] = Registry("method")
register = METHODS.register
available = METHODS.available


def build(name: str, model: nn.Module | str, **overrides: Any) -> Method:
    """Build a registered method around ``model``; keyword arguments override its defaults."""
    return METHODS.get(name)(model, **overrides)


# Importing the recipes registers them.
from . import baselines  # noqa: E402,F401
from . import crowds, deyo, eata, eata_c, sar  # noqa: E402,F401
from . import adte, tpt  # noqa: E402,F401  (CLIP: test-time prompt tuning, ADTE)
from . import difftpt  # noqa: E402,F401  (DiffTPT: TPT with diffusion views)

__all__ = ["METHODS", "Method", "available", "build", "check_batch", "niu_learning_rate", "register"]
