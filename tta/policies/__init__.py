"""Sample-selection policies: which test samples a method learns from, and how much.

``tta.policies.build(name, num_classes=..., **kwargs)`` and ``tta.policies.available()``.
"""
from __future__ import annotations

from ..registry import Registry
from .base import BatchContext, Policy

POLICIES: Registry[Policy] = Registry("policy")
register = POLICIES.register
available = POLICIES.available


def build(name: str, **kwargs) -> Policy:
    """Build a registered policy by name."""
    return POLICIES.get(name)(**kwargs)


# Importing the policy modules registers them.
from . import crowds, deyo, eata, entropy  # noqa: E402,F401
from . import cosine_filter  # noqa: E402,F401
from . import tsallis  # noqa: E402,F401  (view ranking: tpt_confidence, tsallis)


__all__ = ["BatchContext", "Policy", "POLICIES", "available", "build", "register"]
