"""Entropy objectives, in nats: the one implementation of each entropy formula of the toolkit.

* :func:`shannon_entropy` -- per-sample entropy from logits, ``-sum_c softmax(z)_c log_softmax(z)_c``:
  the literal expression of Tent, EATA, SAR, DeYO (``softmax_entropy``), TPT and DiffTPT
  (``select_confident_samples``);
* :func:`shannon_entropy_of_probs` -- ``-sum_c p_c log(p_c + 1e-8)`` from probabilities, the
  smoothed form ADTE/ZERO rank views with (numerically distinct from the above, kept as theirs);
* :func:`marginal_entropy` / :func:`weighted_marginal_entropy` -- entropy of the (weighted) mean
  prediction, computed in log space (TPT's ``avg_entropy``; the diversity term of SWR/OSTTA);
* :func:`weighted_mean` -- the selection-weighted loss of the batch methods.

Tsallis scores are in :mod:`tta.objectives.tsallis`.
"""
from __future__ import annotations

import math

import torch


def shannon_entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``H(softmax(z)) = -sum_c softmax(z)_c * log_softmax(z)_c`` over ``dim`` (the class dimension).

    The official expression of Tent/EATA/SAR/DeYO (``-(x.softmax(1) * x.log_softmax(1)).sum(1)``)
    and of TPT/DiffTPT's view confidence. Differentiable; computed in the dtype of ``logits``
    (callers that rank views pass ``logits.float()``, as TPT).
    """
    return -(logits.softmax(dim) * logits.log_softmax(dim)).sum(dim)


def shannon_entropy_of_probs(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-sum_c p_c log(p_c + eps)`` over the last dimension, from probabilities (ADTE/ZERO's Shannon
    view score without ``--use_adte``; ``eps = 1e-8`` as theirs)."""
    return -(probs * torch.log(probs + eps)).sum(-1)


def _entropy_of_log_mean(log_mean: torch.Tensor) -> torch.Tensor:
    """``-sum_c m_c log m_c`` from ``log m`` (C,), clamped at the dtype minimum (TPT's ``avg_entropy``)."""
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean prediction ``H(mean_i softmax(z_i))`` over the N rows of (N, C) logits,
    in log space: ``log m = logsumexp_i(log_softmax(z_i)) - ln N``."""
    log_p = logits.float().log_softmax(dim=1)
    return _entropy_of_log_mean(torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0]))


def weighted_marginal_entropy(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Entropy of the weighted mean probability over views, in log space (TPT's ``avg_entropy``).

    ``log p_bar = logsumexp_v(log_softmax(z_v) + log w_v) - log(sum_v w_v)``, clamped at the dtype
    minimum, ``H = -sum_c p_bar_c log p_bar_c``. With 0/1 weights this is exactly TPT's loss on the
    kept views (``logsumexp`` over the ``k`` kept views minus ``ln k``); views with weight 0 do not
    contribute. ``logits`` (V, C), ``weights`` (V,).
    """
    log_p = logits.float().log_softmax(dim=-1)
    w = weights.float().to(log_p.device)
    log_w = torch.where(w > 0, w.clamp_min(torch.finfo(torch.float32).tiny).log(), torch.full_like(w, -torch.inf))
    total = w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return _entropy_of_log_mean(torch.logsumexp(log_p + log_w[:, None], dim=0) - total.log())


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
