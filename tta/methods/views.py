"""The per-image view family: methods that work on the views of one test image at a time (TPT,
DiffTPT, C-TPT, ADTE, ZERO, TDA), on a CLIP model.

The family owns what these methods share:

* the views: a :class:`~tta.augment.views.ViewGenerator` (the original + random resized crops with
  flips, AugMix optionally), seeded per (``seed``, sample id, view index) so a run is reproducible
  whatever the batch size; the engine hands the stream's sample ids to every method;
* diffusion views as an input (:mod:`tta.methods.inputs`): given ``diffusion_views=`` at
  construction they are added to the crops (``diffusion_mode="add"``, DiffTPT's layout) or replace
  them (``"replace"``);
* the per-image (episodic) reset of the tuned parameters and the optimizer state;
* view-level policies: a policy of this family ranks the views of one image. An extra view ranking
  (``extra_policies=["tsallis"]``) replaces the method's own ranking stage;
* the aggregation of the kept views into the prediction: each method has its own (TPT and DiffTPT
  predict on the original view with the tuned prompt, ADTE averages the kept views' softmax), and
  ``vote=True`` replaces it with ZERO's zero-temperature vote over the kept views
  (:func:`~tta.objectives.vote.zero_vote`; ties broken by the views outside the kept set, in the
  order of the ranking's score). The vote is ZERO's own aggregation (:mod:`tta.methods.zero`);
* the prompt-tuning objective's extra term: ``dispersion=lambda`` subtracts ``lambda`` times C-TPT's
  text-feature dispersion (:func:`~tta.objectives.dispersion.text_feature_dispersion`) from the
  loss of a method that tunes the prompt (TPT, DiffTPT; C-TPT's own term, :mod:`tta.methods.ctpt`).
  A method that tunes no prompt (ADTE, ZERO, TDA, or TPT with ``params=ln``) refuses it with a
  ``ValueError`` naming both.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from ..augment.diffusion import DiffusionViews
from ..augment.mixed_views import MODES as DIFFUSION_MODES
from ..augment.mixed_views import DiffusionViewGenerator
from ..augment.views import ViewGenerator, resize_center_crop
from ..models.clip import ClipClassifier
from ..objectives import shannon_entropy, zero_vote
from ..policies import BatchContext, Policy
from .core import Method
from .inputs import DIFFUSION_KEYWORDS, RunInput


class ViewMethod(Method):
    """Base of the view family (see the module docstring).

    Args:
        num_views: views per image, the original included (crops + original).
        augmix: AugMix on the crops (TPT's fine-grained setting).
        seed: base seed of the views.
        diffusion_views: a :class:`~tta.augment.diffusion.DiffusionViews` source (optional).
        image_names: sample ids -> view-cache image names for the diffusion views (default ``#<id>``).
        diffusion_mode: ``add`` the diffusion views to the crops, or ``replace`` the crops.
        vote: aggregate the kept views by ZERO's zero-temperature vote (see the module docstring).
        dispersion: the weight ``lambda`` of C-TPT's dispersion term (0: off; see the module docstring).
        Other arguments as :class:`~tta.methods.core.Method`.
    """

    policy_level: ClassVar[str] = "views"
    provides: ClassVar[frozenset[str]] = frozenset({"embeddings"})
    batch_stats: ClassVar[bool] = False
    input_keywords: ClassVar[tuple[str, ...]] = DIFFUSION_KEYWORDS
    #: diffusion views used per image (``None``: all the source makes)
    num_diffusion: int | None = None
    #: views per image-encoder call of :meth:`view_logits` (memory bound)
    view_batch: int = 1024
    #: whether the method can aggregate its kept views by a vote (a method whose prediction is not
    #: an aggregation of views, such as TDA's cache logits, says no)
    supports_vote: ClassVar[bool] = True

    def __init__(self, model, *, num_views: int = 64, augmix: bool = False, seed: int = 0,
                 diffusion_views: DiffusionViews | None = None,
                 image_names: Callable[[Sequence[int]], list[str]] | None = None, diffusion_mode: str = "add",
                 vote: bool = False, dispersion: float = 0.0, **kwargs: Any):
        if vote and not self.supports_vote:
            raise ValueError(f"vote=True (ZERO's vote over the kept views) cannot be combined with method "
                             f"{self.name!r}: its prediction is not an aggregation of kept views")
        if dispersion and not self.learns:
            raise ValueError(f"the dispersion term (C-TPT, dispersion={dispersion}) cannot be combined with method "
                             f"{self.name!r}: it tunes no prompt (use tpt, difftpt or ctpt)")
        super().__init__(model, **kwargs)
        if dispersion and self.params_preset != "prompt":
            raise ValueError(f"the dispersion term (C-TPT, dispersion={dispersion}) cannot be combined with method "
                             f"{self.name!r} with params={self.params_preset!r}: it acts on the tuned prompt's text "
                             f"features (params=prompt)")
        self.vote = bool(vote)
        self.dispersion = float(dispersion)
        if not isinstance(self.model, ClipClassifier):
            raise ValueError(f"{self.name} needs a CLIP model: pass model=clip:<arch>/<weights> (tta.models.clip)")
        if diffusion_mode not in DIFFUSION_MODES:
            raise ValueError(f"diffusion_mode must be one of {DIFFUSION_MODES}, not {diffusion_mode!r}")
        self.model.eval()  # CLIP is evaluated in eval mode (the ResNet CLIPs' BatchNorms keep their statistics)
        self.base_views = ViewGenerator(int(num_views), self.model.input_size[0], augmix=augmix, seed=seed)
        self.views: ViewGenerator | DiffusionViewGenerator = self.base_views
        self._diffusion = (diffusion_views, image_names, diffusion_mode)
        self.images_seen = 0
        self.counters.add("views", 0)

    @classmethod
    def run_inputs(cls, hparams: Mapping[str, Any]) -> list[RunInput]:
        return [RunInput("diffusion_views", keyword="diffusion_views", required=False)]

    def on_policies_assembled(self) -> None:
        diffusion, names, mode = self.__dict__.pop("_diffusion", (None, None, "add"))
        if diffusion is not None:  # after the recipe's constructor: it may fix num_diffusion
            self.use_diffusion_views(diffusion, names=names, mode=mode)

    # ------------------------------------------------------------------ views
    @property
    def num_views(self) -> int:
        """Views per image, the original included (crops, and diffusion views when given)."""
        return self.views.num_views

    def use_diffusion_views(self, diffusion: DiffusionViews, *, names: Callable[[Sequence[int]], list[str]] | None = None,
                            mode: str = "add") -> None:
        """Make the views from the crops and ``diffusion`` (``names``: sample ids -> cache image names)."""
        self.views = DiffusionViewGenerator(self.base_views, diffusion, mode=mode, num_diffusion=self.num_diffusion,
                                            names=names)
        self.num_diffusion = self.views.num_diffusion
        self.counters.add("diffusion_views", 0)

    @property
    def has_diffusion_views(self) -> bool:
        return isinstance(self.views, DiffusionViewGenerator)

    def begin_image_batch(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None) -> list[int]:
        """Check and count the batch; the sample ids that seed each image's views (the stream's, or
        running numbers)."""
        self.check_input(x)
        self.periodic_reset()  # reset_every (tta.methods.periodic)
        n = x.shape[0]
        if ids is None:
            ids = list(range(self.images_seen, self.images_seen + n))
        self.images_seen += n
        self.count_batch(x)
        if self.has_diffusion_views:
            self.counters.add("diffusion_views", n * self.views.num_diffusion)
        return ids.tolist() if torch.is_tensor(ids) else [int(i) for i in ids]

    @torch.no_grad()
    def view_logits(self, x: torch.Tensor, ids: Sequence[int] | torch.Tensor, salt: int = 0) -> torch.Tensor:
        """Logits of the views of a batch with the current head: (N, V, C) float32, encoded
        ``view_batch`` views at a time (the training-free methods: ADTE, ZERO, TDA)."""
        plan = self.views.plan(ids, x.shape[-2], x.shape[-1], salt)
        per_call = max(self.view_batch // self.num_views, 1)
        text = self.model.text_features()
        out = []
        for start in range(0, x.shape[0], per_call):
            stop = min(start + per_call, x.shape[0])
            views = self.views(x, plan=plan, images=slice(start, stop)).flatten(0, 1)
            self.counters.add("forwards", 1)
            self.counters.add("views", views.shape[0])
            logits = self.model.logits_from_features(self.model.encode_image(views), text)
            out.append(logits.float().view(stop - start, self.num_views, -1))
        return torch.cat(out)

    # ------------------------------------------------------------------ aggregation
    def view_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence score of each view (lower = more confident): the score of the method's view
        ranking (its last ranking stage), else the Shannon entropy. Orders the views for the vote's
        tie rule."""
        rankings = [p for p in self.policies if p.ranks_views and hasattr(p, "score")]
        if rankings:
            return rankings[-1].score(logits.detach())
        return shannon_entropy(logits.detach().float(), dim=-1)

    def vote_over_views(self, logits: torch.Tensor, weights: torch.Tensor,
                        scores: torch.Tensor | None = None) -> torch.Tensor:
        """ZERO's vote of the views with a non-zero weight: log vote shares (..., C) of view logits
        (..., V, C) (:func:`~tta.objectives.vote.zero_vote`)."""
        scores = self.view_scores(logits) if scores is None else scores
        return zero_vote(logits.detach().float(), weights.detach(), scores)

    # ------------------------------------------------------------------ policies over views
    def combine_policies(self, own: list[Policy], extra: list[Policy]) -> list[Policy]:
        """An extra view ranking (``Policy.ranks_views``: TPT's confidence, ADTE's Tsallis score,
        DiffTPT's entropy stage) replaces the method's own ranking stage; other policies add up."""
        if any(p.ranks_views for p in extra):
            own = [p for p in own if not p.ranks_views]
        return own + extra

    def context(self, views: torch.Tensor, logits: torch.Tensor, **extras: Any) -> BatchContext:
        return BatchContext(views, logits, self.model, **extras)

    # ------------------------------------------------------------------ predicting without adapting
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """A missed image (:meth:`~tta.methods.core.Method.predict_only`): the model on the original
        view (resize + centre crop) with the parameters every image starts from, i.e. the zero-shot
        prediction (the official stream-rate code predicts a per-image method's missed batches,
        MEMO's, with the source model). The tuned parameters are swapped out and back (bitwise).
        TDA's caches are not read."""
        params = self.adapted_parameters()
        tuned = [p.detach().clone() for p in params]
        try:
            for p, p0 in zip(params, self._initial_state["params"]):
                p.copy_(p0)
            image = self.model.encode_image(resize_center_crop(x, self.base_views.size))
            return self.model.logits_from_features(image, self.model.text_features()).float()
        finally:
            for p, value in zip(params, tuned):
                p.copy_(value)

    # ------------------------------------------------------------------ per-image state
    def _capture_state(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.adapted_parameters()]}

    @torch.no_grad()
    def reset_episode(self) -> None:
        """Back to the initial tuned parameters and a fresh optimizer state (the per-image reset)."""
        for p, p0 in zip(self.adapted_parameters(), self._initial_state["params"]):
            p.copy_(p0)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()

    def reset(self) -> None:
        """Source state for a new domain: tuned parameters, optimizer state, policies, own state."""
        self.reset_episode()
        for policy in self.policies:
            policy.reset()
        self.reset_state()

    def input_records(self) -> dict[str, Any]:
        """The diffusion views: generation parameters, cache folder, hits and generated counts."""
        return {"diffusion_views": self.views.stats()} if self.has_diffusion_views else {}

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "num_views": self.num_views, "views": self.views.hparams(), "vote": self.vote,
                "dispersion": self.dispersion}


__all__ = ["ViewMethod"]
