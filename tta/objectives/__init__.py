"""Objectives: the formulas methods and policies share, each written once.

* :mod:`.entropy` -- Shannon entropies (per sample, of the mean prediction, weighted), the
  selection-weighted mean and the diversity term;
* :mod:`.tsallis` -- ADTE's Tsallis view scores;
* :mod:`.dispersion` -- C-TPT's text-feature dispersion (a prompt-tuning objective term);
* :mod:`.vote` -- ZERO's zero-temperature vote over the kept views, with its tie rule;
* :mod:`.selection` -- keep counts and rank-based masks of the selection policies;
* :mod:`.update` -- the guarded optimizer step; :mod:`.sam` -- SAM's perturbation;
  :mod:`.fisher` -- EATA's Fisher anchor.
"""
from __future__ import annotations

from .dispersion import text_feature_dispersion
from .entropy import (diversity, marginal_entropy, shannon_entropy, shannon_entropy_of_probs, weighted_marginal_entropy,
                      weighted_mean)
from .fisher import FisherAnchor, estimate_fisher
from .sam import SAMPerturbation
from .selection import floor_fraction, lowest_k_mask, rank_among, top_fraction, views_kept
from .tsallis import adte_score, tsallis_entropy
from .update import GuardedStep
from .vote import break_vote_ties, zero_temperature_votes, zero_vote

__all__ = ["FisherAnchor", "GuardedStep", "SAMPerturbation", "adte_score", "diversity", "estimate_fisher",
           "floor_fraction", "lowest_k_mask", "marginal_entropy", "rank_among", "shannon_entropy",
           "shannon_entropy_of_probs", "top_fraction", "tsallis_entropy", "views_kept", "weighted_marginal_entropy",
           "weighted_mean", "break_vote_ties", "zero_temperature_votes", "zero_vote",
           "text_feature_dispersion"]
