"""The method registry (a leaf module: recipes register here without importing the package)."""
from __future__ import annotations

from ..registry import Registry

METHODS: Registry = Registry("method")
register = METHODS.register
available = METHODS.available

__all__ = ["METHODS", "available", "register"]
