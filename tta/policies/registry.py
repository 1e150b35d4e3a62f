"""The policy registry (a leaf: policy modules register here without importing the package).

``build(name, **kwargs)`` passes ``num_classes`` only to the policies whose constructor takes it,
so a caller (a method) can always offer the number of classes and policies that do not use it do
not have to accept it. Any other unknown keyword is an error.
"""
from __future__ import annotations

import inspect
from typing import Any

from ..registry import Registry
from .base import Policy

POLICIES: Registry[Policy] = Registry("policy")
register = POLICIES.register
available = POLICIES.available

#: keywords a caller may offer every policy; passed only to the constructors that take them
CONTEXT_KEYWORDS = ("num_classes",)


def accepts(factory: Any, keyword: str) -> bool:
    """Whether ``factory(**{keyword: ...})`` is accepted (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature (a builtin): offer it
        return True
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build(name: str, **kwargs: Any) -> Policy:
    """Build a registered policy by name; ``num_classes`` is passed only where the constructor takes it."""
    factory = POLICIES.get(name)
    for keyword in CONTEXT_KEYWORDS:
        if keyword in kwargs and not accepts(factory, keyword):
            del kwargs[keyword]
    return factory(**kwargs)
