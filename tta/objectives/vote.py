"""ZERO's zero-temperature vote over the kept views of an image (Farina et al., NeurIPS 2024;
FarinaMatteo/zero @ c609f7c, ``ttas/zero.py:79-95``, ``utils/tools.py:205-218``).

* :func:`zero_temperature_votes` -- ``sum_{kept v} softmax(z_v / T)`` in the limit ``T -> 0``: each
  kept view gives one vote to its argmax class, split equally between classes that tie exactly
  within the view (the limit of the softmax; the official code divides by the float epsilon of the
  logits' dtype, which is that limit up to rounding);
* :func:`break_vote_ties` -- when several classes share the most votes, the winner is the argmax of
  the first view *outside* the kept set, in confidence order, whose argmax is one of the tied
  classes (the official ``greedy_break``); it receives one more vote. When no such view exists the
  winner is the tied class with the largest logit in the most confident view outside the kept set
  (the most confident view overall when every view is kept). The official fallback
  (``break_sample_tie``) writes ``logit[~ties] = -inf`` on an *integer* index tensor: ``~t`` is
  ``-t - 1``, so it masks the classes ``C - 1 - t`` instead of the non-tied ones and can return a
  class that is not tied at all; this one restricts the argmax to the tied classes, as intended.

Everything is masks and gathers over ``(..., V, C)``: no host sync, no loop over images.
"""
from __future__ import annotations

import torch


def zero_temperature_votes(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Votes ``(..., C)`` of the views with a non-zero weight; ``logits`` (..., V, C), ``weights`` (..., V)."""
    top = logits == logits.amax(dim=-1, keepdim=True)
    share = top.float() / top.sum(dim=-1, keepdim=True).float()
    return (share * (weights > 0).unsqueeze(-1).float()).sum(dim=-2)


def break_vote_ties(votes: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
                    scores: torch.Tensor) -> torch.Tensor:
    """``votes`` with one more vote for the tie winner where the most-voted class is not unique.

    ``scores`` (..., V): the views' confidence scores, lower = more confident (the ranking's score);
    the views outside the kept set (``weights == 0``) are visited in that order.
    """
    tied = votes == votes.amax(dim=-1, keepdim=True)                            # (..., C)
    has_tie = tied.sum(dim=-1) > 1                                              # (...)
    order = scores.argsort(dim=-1, stable=True)                                # views, most confident first
    preds = logits.argmax(dim=-1).gather(-1, order)                            # (..., V) in confidence order
    outside = (weights <= 0).gather(-1, order)
    hit = outside & tied.gather(-1, preds)
    first_hit = hit.float().argmax(dim=-1, keepdim=True)                        # the first True (0 if none)
    greedy = preds.gather(-1, first_hit).squeeze(-1)
    fallback_view = order.gather(-1, outside.float().argmax(dim=-1, keepdim=True))  # first view outside, or the best
    index = fallback_view.unsqueeze(-1).expand(*fallback_view.shape, logits.shape[-1])
    fallback_logits = logits.gather(-2, index).squeeze(-2)
    fallback = fallback_logits.masked_fill(~tied, float("-inf")).argmax(dim=-1)
    winner = torch.where(hit.any(dim=-1), greedy, fallback)
    classes = torch.arange(votes.shape[-1], device=votes.device)
    return votes + (has_tie.unsqueeze(-1) & (classes == winner.unsqueeze(-1))).to(votes.dtype)


def zero_vote(logits: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """ZERO's prediction as log vote shares ``(..., C)``: the votes of the kept views, ties broken
    (:func:`break_vote_ties`), divided by their sum; classes without a vote get the log of the
    smallest float32 (finite, so NLL and ECE stay defined). The argmax is ZERO's prediction."""
    votes = break_vote_ties(zero_temperature_votes(logits, weights), logits, weights, scores)
    shares = votes / votes.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return shares.clamp_min(torch.finfo(torch.float32).tiny).log()


__all__ = ["break_vote_ties", "zero_temperature_votes", "zero_vote"]
