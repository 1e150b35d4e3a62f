"""Tsallis view scores of ADTE (Jinx630/ADTE ``ttas/zero.py``), from probabilities over the last dimension.

* :func:`adte_score` -- ``sum_c p_c^{q_c} / (1 - q_c)`` with a class-specific index ``q_c``
  (exactly ADTE's formula; it is not a class-wise Tsallis entropy: it differs from
  ``sum_c (p_c - p_c^{q_c}) / (q_c - 1)`` by a term that depends on the view);
* :func:`tsallis_entropy` -- the Tsallis entropy with one index ``q``, ``(1 - sum_c p_c^q) / (q - 1)``
  (ADTE's ``--same_q``).

Lower is more confident for both, as for the Shannon entropy.
"""
from __future__ import annotations

import torch


def adte_score(probs: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """ADTE's view score ``sum_c p_c^{q_c} / (1 - q_c)`` over the last dimension (``q_c`` in (0, 1))."""
    return (probs.pow(q_index) / (1 - q_index)).sum(-1)


def tsallis_entropy(probs: torch.Tensor, q: float) -> torch.Tensor:
    """Tsallis entropy with one index: ``(1 - sum_c p_c^q) / (q - 1)`` over the last dimension (``q != 1``)."""
    return (1 - probs.pow(q).sum(-1)) / (q - 1)
