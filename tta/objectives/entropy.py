"""Entropy objectives (in nats, always from logits)."""
from __future__ import annotations

import math

import torch


def shannon_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``H(softmax(z)) = -sum_c p_c log p_c``, computed as the official Tent code does."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean prediction ``H(mean_i softmax(z_i))``, computed in log space (TPT)."""
    log_p = logits.float().log_softmax(dim=1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_{i: w_i > 0} w_i * v_i``: the loss of Tent/ETA/EATA/SAR/DeYO over the kept samples.

    Divides by the number of kept samples (not by the sum of weights), as the official code does.
    An empty selection gives 0 instead of NaN, so logs stay clean; the caller skips the step.
    """
    kept = (weights > 0).sum().clamp(min=1)
    return (weights * values).sum() / kept


def margin_from_fraction(fraction: float, num_classes: int) -> float:
    """An entropy margin given as a fraction of ``ln C`` (e.g. EATA's 0.4 ln C)."""
    return fraction * math.log(num_classes)
