"""RDumb: ETA with a full reset every 1,000 batches (Press et al., NeurIPS 2023).

Paper: "RDumb: A simple approach that questions our progress in continual test-time adaptation",
https://arxiv.org/abs/2306.05401. Official code: https://github.com/oripress/CCC (``models/rdumb.py``);
docs/methods/rdumb.md.
"""
from __future__ import annotations

from typing import Any

from .eata import ETA
from .registry import register


@register("rdumb")
class RDumb(ETA):
    """RDumb: ETA put back to its source state every ``reset_every`` batches (oripress/CCC @ 656dec3).

    Per batch, as ``RDumb.forward`` (``models/rdumb.py`` lines 45-100): when 1,000 batches have passed
    since the last reset (``total_steps % 1000 == 0``, lines 50-54; a no-op at the first batch), the
    model weights **and the optimizer state** are reloaded from the copies saved after configuration
    and the running mean prediction ``m`` is dropped; then exactly :class:`~tta.methods.eata.ETA`'s
    step (entropy filter ``H < 0.4 ln C``, redundancy ``|cos(m, p)| < 0.05``, loss
    ``mean_kept(exp(E0 - H) H)``, one SGD step only when a sample is kept); pre-update logits returned.

    The reset is the core's ``reset_every`` option (:mod:`tta.methods.periodic`), which every method
    has; RDumb is ETA with it set to 1,000. Defaults (``models/rdumb.py``): SGD, lr 2.5e-4 (line 38,
    fixed, not a rule of the batch size or the architecture), momentum 0.9, no Nesterov, no weight
    decay; ``e_margin`` 0.4 (line 25), ``d_margin`` 0.05 (lines 26-28); period 1,000 (line 50).

    Decisions:

    * ``E0 = 0.4 ln C``: the official line 25 hard-codes ``ln 1000`` (ImageNet/CCC, where they are
      equal); mariodoebler/test-time-adaptation's RDumb uses ``ln C`` too.
    * parameters: ``norm`` (BN + LN + GN affine) as for ETA; the official collects BatchNorm2d affine
      only (``models/functional.py`` lines 13-30), the same set on a BatchNorm network;
      ``params="bn"`` is the official choice exactly.
    * the period counts batches (calls), as the official ``total_steps`` and the reference framework's
      ``performed_updates``; with ``steps > 1`` a batch still counts once.
    """

    paper = "Press et al., NeurIPS 2023 (oripress/CCC)"

    def __init__(self, model, *, reset_every: int = 1000, **kwargs: Any):
        super().__init__(model, reset_every=reset_every, **kwargs)

    def default_lr(self, batch_size: int) -> float:
        """2.5e-4 for any batch size and architecture (``models/rdumb.py`` line 38)."""
        return 2.5e-4


__all__ = ["RDumb"]
