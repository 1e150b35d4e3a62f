"""A periodic full reset (``reset_every``), an option of every method.

RDumb (Press et al., NeurIPS 2023; oripress/CCC ``models/rdumb.py`` lines 50-54) shows that ETA,
put back to its source state every 1,000 batches, holds up on long streams where continual methods
collapse. Here the rule is an option of every method: ``reset_every=N`` puts the method back to its
source state before every N-th batch (the batches counted since the last reset). A *full* reset:
the weights, the optimizer state and every moving average the policies and the method keep,
including those a method's own :meth:`~tta.methods.core.Method.reset` keeps on purpose (EATA's
running mean prediction survives ``reset()``, as in EATA's code; a periodic reset clears it, as
RDumb does, ``current_model_probs = None``).

The batches are counted in Python (no host sync); the count is also kept in a buffer, so a saved
state (``state_dict()``) resumes at the same point of the period.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ResetClock(nn.Module):
    """Counts batches since the last reset; :attr:`due` says when the period is over.

    Args:
        every: the period in batches (at least 1).
    """

    def __init__(self, every: int):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"reset_every must be at least 1 (0: never), got {every}")
        self.every = int(every)
        self.count = 0
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @property
    def due(self) -> bool:
        """Whether a full reset is due before the next batch (``every`` batches since the last one)."""
        return self.count >= self.every

    def advance(self) -> None:
        """Count one batch."""
        self.count += 1
        self.batches.fill_(self.count)  # a device write of a host value: no sync

    def restart(self) -> None:
        """Back to the start of a period (the method was reset)."""
        self.count = 0
        self.batches.zero_()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.count = int(self.batches)  # one host read when a state is loaded, never per batch

    def extra_repr(self) -> str:
        return f"every={self.every}"


__all__ = ["ResetClock"]
