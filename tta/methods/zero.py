"""ZERO: test-time augmentation with a zero temperature (Farina et al., NeurIPS 2024;
FarinaMatteo/zero @ c609f7c, docs/methods/zero.md).

Training-free and episodic, on a frozen CLIP. Per test image:

1. 64 views: the original (resize + centre crop) and 63 random resized crops with flips, no AugMix
   (``data/augs.py:43-77``; ``num_views = 64`` hard-coded in ``ttas/zero.py:23``);
2. their logits with the frozen zero-shot head (``logit_scale`` 100 for the OpenAI CLIPs) and the
   Shannon entropy of each view's softmax (``confidence_filter``, ``ttas/base.py:56-62``);
3. keep the ``int(64 * 0.3) = 19`` views with the lowest entropy (``gamma = 0.3``,
   ``ttas/zero.py:24``; the original view is not forced in);
4. **vote at zero temperature**: each kept view votes for its argmax class (``ttas/zero.py:80-81``);
   the prediction is the most-voted class. Ties between classes are broken by the views that were
   *not* kept, in confidence order: the first whose argmax is a tied class wins (``greedy_break``,
   ``utils/tools.py:212-218``). See :mod:`tta.objectives.vote` for the one place where this differs
   from the released code (its fallback when no other view votes for a tied class indexes the
   classes with a bitwise NOT of an integer tensor and can pick a class that is not tied; here the
   fallback is the tied class with the largest logit in the most confident non-kept view).

``method(x)`` returns log vote shares (``log(votes / sum votes)``, the tie winner counted with its
extra vote, as the released ``p_bar``): their argmax is ZERO's prediction, and NLL and ECE stay
defined (classes without a vote get ``log`` of the smallest float32).

Notes:

* The view entropy is ``-sum softmax(z) log_softmax(z)`` (:class:`~tta.policies.TPTConfidence` with
  ``fraction=0.3``); the released ``-(p * p.log()).sum()`` is the same number, except that a
  probability that underflows to 0 makes it NaN there (the view then sorts last) and finite here.
* The released code runs CLIP in fp32 under fp16 autocast; here the run's dtype (``amp=true`` for
  bf16 autocast). Its vote divides fp16 logits by fp16's epsilon, so two classes whose fp16 logits
  are equal share a view's vote; here classes share a vote only when the logits are exactly equal in
  the dtype they are computed in.
* Text features: the model's zero-shot head ("a photo of a {}." by default, the released
  ``--ctx_init a_photo_of_a``); ``templates`` chooses another (``tip7``: ``--templates``).
* Views are seeded per (``seed``, image id, view index); the released code draws them in its data
  loader workers.
* ``extra_policies``: one view ranking (``tsallis``, ``tpt_confidence``) replaces the entropy ranking;
  other policies raise ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..policies import Policy, TPTConfidence
from .registry import register
from .views import ViewMethod


@register("zero")
class ZERO(ViewMethod):
    """ZERO on a frozen CLIP model (``model=clip:...``); see the module docstring.

    Args:
        num_views: views per image incl. the original (64, ``ttas/zero.py:23``).
        gamma: kept fraction of the views (0.3, ``ttas/zero.py:24``).
        vote: the zero-temperature vote (ZERO); ``False`` averages the kept views' softmax instead.
        templates: zero-shot head templates for this run (``single``, ``tip7``, ``imagenet80``;
            default: the model's).
        view_batch: views per image-encoder call (memory bound).
        seed: base seed of the views.
    """

    paper = "Farina et al., NeurIPS 2024 (FarinaMatteo/zero)"
    default_params = "ln"
    learns = False

    def __init__(self, model, *, num_views: int = 64, gamma: float = 0.3, vote: bool = True,
                 templates: str | None = None, view_batch: int = 1024, seed: int = 0, **kwargs: Any):
        super().__init__(model, num_views=num_views, seed=seed, vote=vote, **kwargs)
        if templates is not None:
            self.model.set_head(templates=templates)
        self.gamma = float(gamma)
        self.view_batch = max(int(view_batch), self.num_views)

    def default_policies(self) -> list[Policy]:
        """ZERO's confidence filter: the ``gamma`` views with the lowest entropy."""
        return [TPTConfidence(fraction=self.gamma)]

    def combine_policies(self, own: list[Policy], extra: list[Policy]) -> list[Policy]:
        """ZERO votes with one view ranking: an extra ranking replaces its own; nothing else combines."""
        for policy in extra:
            if not policy.ranks_views:
                raise ValueError(f"policy {policy.name!r} cannot be combined with method 'zero': ZERO votes with one "
                                 f"view ranking (an extra ranking such as 'tsallis' replaces its own)")
        return super().combine_policies(own, extra)

    @property
    def ranking(self) -> Policy:
        """The view ranking whose kept views vote."""
        return self.policies[0]

    def forward(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None,
                domain: str | None = None) -> torch.Tensor:
        ids = self.begin_image_batch(x, ids)
        logits = self.view_logits(x, ids)                              # (N, V, C)
        ranking = self.ranking
        if getattr(ranking, "online", False) and getattr(ranking, "kind", None) == "adte":
            # an online label bias depends on the images before: one image at a time
            alive = torch.ones(self.num_views, dtype=torch.bool, device=logits.device)
            weights = torch.stack([ranking(self.context(x, one), alive) for one in logits])
        else:
            weights = ranking.select(logits)                           # (N, V)
        self.count_policy(self.policy_keys[0], weights.numel(), (weights > 0).sum())
        if self.vote:
            return self.vote_over_views(logits, weights)
        probs = (logits.softmax(dim=-1) * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()

    def reset(self) -> None:
        """A new domain: the ranking's state (an online label bias) restarts."""
        for policy in self.policies:
            policy.reset()
        self.reset_state()

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out.update(gamma=self.gamma, templates=self.model.net.template_spec)
        return out


__all__ = ["ZERO"]
