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
    keep = weights > 0
    kept = keep.sum().clamp(min=1)
    # ``where`` rather than a product: an excluded sample with a NaN/Inf value (e.g. one bad image
    # through a LayerNorm model) does not turn the loss of the kept ones into NaN.
    return torch.where(keep, weights * values, values.new_zeros(())).sum() / kept


def diversity(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """The diversity term ``-alpha * H(mean_i softmax(z_i))`` over the whole batch (SWR / OSTTA).

    Minimising it spreads the batch's mean prediction over the classes (anti-collapse). As in
    UniEnt's re-implementation of wisdom-of-crowds (``softmax_mean_entropy``), the mean is over
    every sample of the batch, selected or not. Computed in log space (finite for a zero mean).
    """
    return -alpha * marginal_entropy(logits)


def margin_from_fraction(fraction: float, num_classes: int) -> float:
    """An entropy margin given as a fraction of ``ln C`` (e.g. EATA's 0.4 ln C)."""
    return fraction * math.log(num_classes)
