"""DiffTPT: TPT with diffusion-generated views (Feng et al., ICCV 2023; chunmeifeng/DiffTPT @ 03f1169,
docs/methods/difftpt.md).

Per test image, episodically (TPT's loop, :class:`~tta.methods.tpt.TPT`, reused as it is):

1. reset the context vectors and the AdamW state (the loss scaler carries over, as in TPT);
2. 128 views, in the official order: the original (Resize + CenterCrop), 64 random resized crops
   with flips (``AugMixAugmenter(n_views=64)``; AugMix with ``augmix=True``), 63 Stable Diffusion
   image variations (:class:`~tta.augment.diffusion.DiffusionViews`, generated offline or on first
   use and cached; each Resize(S, bicubic) + CenterCrop(S));
3. for ``steps`` = 4 iterations: logits of all 128 views with the current prompt; on the first step
   only, the selection (then fixed):

   - **cosine filter** (``cosine_filter``): cosine similarity between the logit vector of view 0
     and each of the other 127; the ``int(127 * 0.8)`` = 101 most similar, then view 0 prepended:
     102 candidates;
   - **entropy filter** (``difftpt_confidence``): the ``int(102 * 0.3)`` = 30 candidates with the
     lowest entropy;

   loss = entropy of the mean probability of the 30 (TPT's ``avg_entropy``), a scaled backward and
   an AdamW step (lr 5e-3, weight decay 0.01) on the context;
4. predict on view 0 with the tuned prompt.

Notes:

* The image encoder is frozen (only the prompt context learns), so the 128 view features are
  computed once per image and reused at the 4 steps and for the prediction. The official code
  re-encodes the views at every step (4 x 128 + 1 passes) and gets the same features; with another
  parameter preset (``params=ln``) the views are re-encoded at every step here too.
* The selection is a mask over the views (no index lists); the kept set equals the official index
  set (ties aside: the official ``argsort`` is not stable).
* Diffusion views are cached on disk by image name (:mod:`tta.augment.mixed_views`): the file path
  relative to the dataset root for an unmodified image file, as ``scripts/generate_diffusion_views.py``
  names them. On the command line ``augment.diffusion.*`` configures the source (default: the
  official ``lambdalabs/sd-image-variations-diffusers`` v2.0, 50 steps, guidance 3).
* For the official protocol, run on the full-resolution images (``data.resize=0 data.crop=0
  batch_size=1``): the crops are then cut from the original file and the diffusion views conditioned
  on it; with the default 224 stream both come from the stream's image (TPT's documented deviation).
* DiffTPT's evaluation runs on 1,000-image subsets: ``data.subset=1000`` (seeded, recorded).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..policies import CandidateConfidence, CosineFilter, Policy
from .inputs import RunInput
from .registry import register
from .tpt import TPT


@register("difftpt")
class DiffTPT(TPT):
    """TPT over original + augmented + diffusion views with DiffTPT's two-stage selection.

    Args:
        num_views: augmented (crop + flip) views besides the original (DiffTPT: 64, ``n_views = bs``).
        num_diffusion: diffusion views per image (``None``: all of ``diffusion_views.num_views``, 63
            by default; on the command line ``augment.diffusion.num_views``).
        cosine: kept fraction of the other views by cosine similarity to view 0 (``selection_cosine`` 0.8).
        cosine_on: ``logits`` (the released code) or ``embeddings`` (image embeddings).
        selection: kept fraction of the candidates by entropy (``selection_selfentro`` 0.3).
        steps: tuning steps per image (the script's ``tta_steps`` = 4).
        diffusion_views: the diffusion source (a run input, :mod:`tta.methods.inputs`); on the command
            line from ``augment.diffusion.*``. Needed unless ``num_diffusion=0``.
        image_names: sample ids -> view-cache image names (default: ``#<id>``; the CLI resolves ids to
            file paths through the stream, :class:`~tta.augment.mixed_views.StreamImageNames`).
        Other arguments as :class:`~tta.methods.tpt.TPT` (lr 5e-3, AdamW, ``augmix``, ``grad_scale``, ``seed``).
    """

    paper = "Feng et al., ICCV 2023 (chunmeifeng/DiffTPT)"

    @classmethod
    def run_inputs(cls, hparams: Mapping[str, Any]) -> list[RunInput]:
        required = hparams.get("num_diffusion", None) != 0
        return [RunInput("diffusion_views", keyword="diffusion_views", required=required,
                         hint="or num_diffusion=0 for TPT with DiffTPT's selection")]

    def __init__(self, model, *, num_views: int = 64, num_diffusion: int | None = None, cosine: float = 0.8,
                 cosine_on: str = "logits", selection: float = 0.3, steps: int = 4, **kwargs: Any):
        if kwargs.get("score", "shannon") != "shannon":
            raise ValueError("DiffTPT ranks its candidates by Shannon entropy; for another view ranking add it "
                             "as an extra policy (policies.extra=[tsallis])")
        super().__init__(model, num_views=int(num_views) + 1, selection=selection, steps=steps, **kwargs)
        self.num_augmented = int(num_views)
        self.num_diffusion = None if num_diffusion is None else int(num_diffusion)
        self.cosine, self.cosine_on = float(cosine), cosine_on

    def default_policies(self) -> list[Policy]:
        """The cosine filter, then the entropy stage (replaced by an extra view ranking)."""
        return [CosineFilter(ratio=self.cosine, on=self.cosine_on), CandidateConfidence(fraction=self.selection)]

    def forward(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None,
                domain: str | None = None) -> torch.Tensor:
        if self.num_diffusion != 0 and not self.has_diffusion_views:
            raise RuntimeError("DiffTPT needs diffusion views: pass diffusion_views=DiffusionViews(...) (on the "
                               "command line augment.diffusion.pipeline=...), or num_diffusion=0 for TPT with "
                               "DiffTPT's selection")
        return super().forward(x, ids=ids, domain=domain)

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out.update(num_augmented=self.num_augmented, num_diffusion=self.num_diffusion, cosine=self.cosine,
                   cosine_on=self.cosine_on)
        return out


__all__ = ["DiffTPT"]
