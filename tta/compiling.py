"""Eager boundaries inside a compiled step, without importing the compiler until something compiles.

``torch.compiler.disable`` imports ``torch._dynamo`` (about 2.7 s on a small CPU) the moment it
decorates a function. Used as a decorator on a class body, it makes every ``import tta`` -- every CLI
start, ``--help`` included -- pay for compilation machinery that an eager run never touches.
:func:`eager_boundary` marks the function instead, and the marked functions are wrapped with
``torch.compiler.disable`` only when :func:`arm` is called, which :func:`tta.methods.speed.compile_fn`
does before it compiles anything. Until then a marked function is called directly.

This module is a leaf: it imports nothing from ``tta``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

#: one cell per marked function: ``[function to call, the original function]``
_CELLS: list[list[Callable[..., Any]]] = []
_armed = False


def eager_boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: ``fn`` runs eagerly even when called from a compiled step (a graph break there, not
    a trace), as ``torch.compiler.disable`` would, but ``torch._dynamo`` is imported only once
    something is compiled (:func:`arm`)."""
    cell = [fn, fn]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return cell[0](*args, **kwargs)

    _CELLS.append(cell)
    if _armed:
        _disable(cell)
    return call


def _disable(cell: list[Callable[..., Any]]) -> None:
    import torch

    cell[0] = torch.compiler.disable(cell[1])


def arm() -> None:
    """Put every marked function behind ``torch.compiler.disable`` (imports ``torch._dynamo``);
    called before anything is compiled. Idempotent."""
    global _armed
    if _armed:
        return
    for cell in _CELLS:
        _disable(cell)
    _armed = True


def armed() -> bool:
    """Whether the marked functions are behind ``torch.compiler.disable`` yet."""
    return _armed


__all__ = ["arm", "armed", "eager_boundary"]
