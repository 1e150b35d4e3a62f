"""The run counters of a method (``batches``, ``samples``, ``steps``, ``kept``, per-policy seen/kept, ...).

Kept as 0-dim ``long`` buffers so they save, load and move with the method's state; counts added as
host numbers are held in a dict until the counters are read, so counting costs no tensor op per
batch.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


class Counters(nn.Module):
    """Run counters kept on the device (read them with :meth:`as_dict`, which syncs once).

    A host number added outside a compiled region is held as a Python int until the counters are
    read (:meth:`flush`: by :meth:`as_dict`, the state dict, loading a state, or reading a counter as
    an attribute), then added to its buffer in one go: a batch's counts cost no tensor op and no
    NumPy call on any device. Device tensors (and anything added in a compiled step) go straight to
    the buffers, without a sync."""

    def __init__(self, names: Iterable[str] = ()):
        super().__init__()
        self.__dict__["_pending"] = {}
        for name in names:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    def add(self, name: str, value: torch.Tensor | int) -> None:
        buffers = self._buffers
        if name not in buffers:
            device = value.device if torch.is_tensor(value) else self._device()
            self.register_buffer(name, torch.zeros((), dtype=torch.long, device=device))
        if type(value) is int and not torch.compiler.is_compiling():  # a host number: held until read
            pending = self.__dict__["_pending"]
            pending[name] = pending.get(name, 0) + value
            return
        buffers[name] += value

    @torch.no_grad()
    def flush(self) -> None:
        """Add the host numbers held by :meth:`add` to their buffers (one op per counter that moved)."""
        pending = self.__dict__["_pending"]
        if pending and not torch.compiler.is_compiling():
            buffers = self._buffers
            for name, value in pending.items():
                if value:
                    buffers[name] += value
            pending.clear()

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__.get("_buffers", ()):  # a counter read as an attribute: its current value
            self.flush()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.flush()  # the loaded values replace whatever had been counted
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_pending", {})
        super().__setstate__(state)

    def _device(self) -> torch.device:
        return next(iter(self._buffers.values())).device if self._buffers else torch.device("cpu")

    def as_dict(self) -> dict[str, int]:
        self.flush()
        if not self._buffers:
            return {}
        values = torch.stack([b.cpu() for b in self._buffers.values()]).tolist()
        return dict(zip(self._buffers.keys(), values))


__all__ = ["Counters"]
