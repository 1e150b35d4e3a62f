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


__all__ = ["BatchContext", "Policy", "POLICIES", "available", "build", "register"]
