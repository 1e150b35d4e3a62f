"""C-TPT: calibrated test-time prompt tuning (Yoon et al., ICLR 2024; hee-suk-yoon/C-TPT @ 085e6c2,
docs/methods/ctpt.md).

TPT (:class:`~tta.methods.tpt.TPT`, reused as it is) with one more term in the loss: per test image,
episodically,

1. reset the context vectors and the AdamW state (the loss scaler carries over, as in TPT;
   ``tpt_classification.py:242, 383-389``);
2. 64 views (the original + 63 random resized crops with flips; AugMix per dataset group, below);
3. one step: logits of the views with the current prompt, the ``int(64 * 0.1) = 6`` lowest-entropy
   views, and the loss

   ``L = H(mean softmax of the 6) - lambda * ATFD``,  ``ATFD = mean_c || t_c - mean_c' t_c' ||_2``

   over the L2-normalised text features ``t_c`` of that step's prompt
   (:func:`~tta.objectives.dispersion.text_feature_dispersion`; ``clip/custom_clip.py:319-330``,
   ``tpt_classification.py:155-160``); a scaled backward and an AdamW step (lr 5e-3, weight decay 0.01);
4. predict on view 0 with the tuned prompt.

Defaults per dataset group (the released scripts):

* ImageNet and the fine-grained sets (``test_tpt_ctpt_fg.sh``): ``lambda = 50``, AugMix
  only for the fine-grained sets (``augmix = len(set_id) > 1``, ``tpt_classification.py:270-271``),
  so ImageNet gets crops and flips: the defaults here;
* the natural shifts A, R, Sketch (K), V2 (``test_tpt_ctpt_ds.sh``): ``lambda = 20`` and
  ``--I_augmix``, which turns AugMix on for them (``augmix = len(set_id) >= 1``,
  ``tpt_classification.py:266-268``) -- unlike TPT's own protocol. The ``imagenet_a``,
  ``imagenet_r``, ``imagenet_sketch`` and ``imagenet_v2`` protocols carry these values.

Calibration: the released code reports the expected calibration error with 20 equal-width bins,
a sample in bin ``(lower, upper]`` (``tpt_classification.py:43-76``). A run records it as
``paper_ece`` next to the toolkit's ``ece`` (15 bins), both from the one implementation in
:mod:`tta.metrics` (:attr:`paper_ece`). The released ``main`` unpacks ``Calculator``'s ``None``
after printing and exits with an error; nothing of the kind here.

The dispersion term itself is an option of every prompt-tuning view method
(``method=tpt method.dispersion=50``, ``method=difftpt method.dispersion=20``); ``ctpt`` is TPT with
C-TPT's defaults.
"""
from __future__ import annotations

from typing import Any

from .registry import register
from .tpt import TPT


@register("ctpt")
class CTPT(TPT):
    """TPT with C-TPT's dispersion term (see the module docstring).

    Args:
        dispersion: ``lambda`` (50: ImageNet and the fine-grained sets, ``test_tpt_ctpt_fg.sh``;
            the natural shifts' 20 comes with their protocols).
        augmix: AugMix on the crops (off for ImageNet; on for the natural shifts and fine-grained sets).
        Other arguments as :class:`~tta.methods.tpt.TPT` (64 views, ``selection`` 0.1, AdamW 5e-3 with
        weight decay 0.01, one step, loss scale 1000 never reset).
    """

    paper = "Yoon et al., ICLR 2024 (hee-suk-yoon/C-TPT)"
    #: the released ECE: 20 equal-width bins, a confidence in ``(lower, upper]``
    paper_ece = (20, True)

    def __init__(self, model, *, dispersion: float = 50.0, augmix: bool = False, **kwargs: Any):
        if not dispersion:
            raise ValueError("ctpt needs a dispersion weight (C-TPT's lambda > 0); dispersion=0 is method=tpt")
        super().__init__(model, dispersion=dispersion, augmix=augmix, **kwargs)


__all__ = ["CTPT"]
