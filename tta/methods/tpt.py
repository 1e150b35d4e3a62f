"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022; azshue/TPT @ 63ecbac, docs/methods/tpt.md).

Per test image, episodically:

1. reset the context vectors and the AdamW state to their initial values (the ``GradScaler`` is
   **not** reset: its scale and growth counter carry over from image to image, as in the original);
2. make 64 views (the original + 63 random resized crops with flips; AugMix only with
   ``augmix=True``, the fine-grained datasets), encode them in one batch;
3. for ``steps`` (1) iterations: logits of all views with the current prompt; on the first step keep
   the ``int(64 * 0.1) = 6`` lowest-entropy views (the selection is reused on later steps); loss =
   entropy of the mean probability of the kept views (computed in log space); a scaled backward
   (loss scale 1000 initially), unscale, skip on inf/NaN, AdamW (lr 5e-3, weight decay 0.01) step
   on the context, scale update;
4. predict on view 0 with the tuned prompt (no grad). This is the logit the engine scores.
   With ``vote=True`` (ZERO's aggregation, :mod:`tta.objectives.vote`) the prediction is instead
   the zero-temperature vote of the views kept at the first step, their logits taken with the tuned
   prompt (ties broken by the other views in the order of the ranking's score on those logits);
   ``method(x)`` then returns log vote shares.

With ``dispersion=lambda`` the loss of step 3 is C-TPT's: the marginal entropy minus ``lambda``
times the dispersion of that step's normalised text features (:mod:`tta.methods.ctpt`).

Implementation notes:

* The image encoder is frozen while the prompt adapts, so the view features are computed once and
  view 0's features are reused for the prediction: 64 image-encoder passes per image instead of the
  original's 65, identical features. Text features: one pass with grad per step and one without for
  the prediction, over prompts cut after the longest EOT token.
* The loss scaler runs on the device (``torch._amp_foreach_non_finite_check_and_unscale_`` and
  ``torch._amp_update_scale_``, what ``torch.amp.GradScaler`` calls): no host sync per image. With
  bf16 autocast or fp32 it is numerically a no-op (set ``grad_scale=0`` to switch it off), with fp16
  it is TPT's ``GradScaler(init_scale=1000)``.
* Selection is a policy over views (:class:`~tta.policies.TPTConfidence`): ``score="shannon"`` is TPT's
  ``select_confident_samples``; ``score="tsallis"`` (or ``policies.extra=[tsallis]``) ranks views
  with ADTE's score instead. Keeping ``max(int(V * 0.1), 1)`` views makes small view counts work
  (identical to TPT for V >= 10).
* ``method(x)`` takes a batch and tunes on each image on its own (a Python loop over images is
  inherent to TPT); inside the loop nothing waits for the device. Views are seeded per
  (``seed``, image id, view index): the engine hands over the stream's sample ids.
* Other parameter presets (``params=ln``: image LayerNorms) work too; the image features are then
  recomputed after each step.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..objectives import text_feature_dispersion, weighted_marginal_entropy
from ..policies import Policy, TPTConfidence, TsallisRanking
from .registry import register
from .views import ViewMethod

SCORES = ("shannon", "tsallis")


class DeviceGradScaler(torch.nn.Module):
    """``torch.amp.GradScaler`` without host syncs: scale, unscale + inf check, and the scale update
    (growth 2.0 every 2000 clean steps, backoff 0.5) all on the device. Its state is buffers, so it
    moves and saves with the method; nothing resets it."""

    def __init__(self, init_scale: float = 1000.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        super().__init__()
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.register_buffer("scale", torch.full((1,), float(init_scale)))
        self.register_buffer("growth_tracker", torch.zeros((1,), dtype=torch.int32))

    def unscale_(self, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        """Divide the gradients by the scale in place; returns ``found_inf`` (1,) float."""
        found_inf = torch.zeros((1,), device=self.scale.device)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.scale.double().reciprocal().float())
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, self.growth_factor, self.backoff_factor,
                                 self.growth_interval)


@register("tpt")
class TPT(ViewMethod):
    """Test-time prompt tuning on a CLIP model (``model=clip:...``); see the module docstring.

    Args:
        num_views: views per image incl. the original (64).
        selection: kept fraction of views (TPT ``selection_p`` 0.1).
        score: ``shannon`` (TPT) or ``tsallis`` (ADTE's view ranking, online label bias).
        lr, weight_decay, optimizer: AdamW 5e-3, 0.01 (PyTorch's default that TPT keeps).
        steps: tuning steps per image (``tta_steps`` 1).
        augmix: TPT's AugMix on the crops (the fine-grained sets; off for ImageNet and its variants).
        grad_scale: initial loss scale of the (never reset) scaler; 0 turns it off.
        seed: base seed of the views (per image id and view index).
        params: ``prompt`` (the context vectors, TPT) or a CLIP preset such as ``ln``.
        vote: predict by ZERO's vote of the kept views instead of on view 0 (off: TPT).
        dispersion: C-TPT's ``lambda``: the loss minus ``lambda`` times the text-feature dispersion
            (0: TPT; :mod:`tta.methods.ctpt`).
    """

    paper = "Shu et al., NeurIPS 2022 (azshue/TPT)"
    default_params = "prompt"
    default_optimizer = "adamw"

    def __init__(self, model, *, num_views: int = 64, selection: float = 0.1, score: str = "shannon",
                 lr: float = 5e-3, weight_decay: float = 0.01, optimizer: str = "adamw", params: str = "prompt",
                 steps: int = 1, augmix: bool = False, grad_scale: float = 1000.0, seed: int = 0, **kwargs: Any):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {score!r}")
        super().__init__(model, num_views=num_views, augmix=augmix, seed=seed, lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, params=params, steps=steps, **kwargs)
        if self.optimizer is None:
            raise ValueError(f"parameter preset {self.params_preset!r} selects no parameters to tune")
        self.selection, self.score_name = float(selection), score
        self.scaler = DeviceGradScaler(grad_scale) if grad_scale and grad_scale > 0 else None
        self.prompt_only = self.params_preset == "prompt"
        for name in ("text_forwards", "episodes"):
            self.counters.add(name, 0)

    def default_policies(self) -> list[Policy]:
        """TPT's confidence selection (or ADTE's score with ``score="tsallis"``); an extra view
        ranking replaces it."""
        if self.score_name == "shannon":
            return [TPTConfidence(fraction=self.selection)]
        return [TsallisRanking(fraction=self.selection, num_classes=self.num_classes, score="adte")]

    def default_lr(self, batch_size: int) -> float:
        return 5e-3

    # ------------------------------------------------------------------ the episodic loop
    def forward(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None,
                domain: str | None = None) -> torch.Tensor:
        ids = self.begin_image_batch(x, ids)
        n = x.shape[0]
        plan = self.views.plan(ids, x.shape[-2], x.shape[-1])  # all random draws of the batch, on the CPU
        outputs = [self.tune_and_predict(self.views(x, plan=plan, images=slice(i, i + 1))[0]) for i in range(n)]
        return torch.cat(outputs)

    def _encode(self, views: torch.Tensor) -> torch.Tensor:
        self.counters.add("forwards", 1)
        self.counters.add("views", views.shape[0])
        if self.prompt_only:
            with torch.no_grad():
                return self.model.encode_image(views)
        return self.model.encode_image(views)

    def _text(self) -> torch.Tensor:
        self.counters.add("text_forwards", 1)
        return self.model.text_features()

    def tune_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        """TPT on one image's views (V, 3, S, S), view 0 the original: returns (1, C) logits."""
        self.reset_episode()
        self.counters.add("episodes", 1)
        image = self._encode(views)
        weights = None
        for step in range(self.steps):
            if step > 0 and not self.prompt_only:
                image = self._encode(views)
            text = self._text()
            logits = self.model.logits_from_features(image, text)
            if weights is None:  # the selection is made on the first step and reused (TPT)
                weights = self.select(self.context(views, logits))
            loss = weighted_marginal_entropy(logits, weights)
            if self.dispersion:  # C-TPT: minus lambda times the text-feature dispersion of this step's prompt
                loss = loss - self.dispersion * text_feature_dispersion(text.float())
            self.scaled_step(loss, weights)
        with torch.no_grad():
            if self.vote:  # ZERO's vote of the views kept at the first step, with the tuned prompt
                if not self.prompt_only:
                    image = self._encode(views)
                final = self.model.logits_from_features(image, self._text()).float()
                return self.vote_over_views(final, weights)[None]
            if not self.prompt_only:
                image = self._encode(views[:1])
            return self.model.logits_from_features(image[:1], self._text()).float()

    def scaled_step(self, loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Backward of the (scaled) loss and a guarded AdamW step, skipped on inf/NaN (GradScaler)."""
        if self.scaler is None:
            return self.step(loss, weights)
        self._observe_loss(loss)
        (loss.float() * self.scaler.scale.squeeze(0)).backward()
        params = self.adapted_parameters()
        found_inf = self.scaler.unscale_(params)
        clean = (found_inf == 0).squeeze(0) & loss.detach().isfinite()
        kept = (weights > 0).sum()
        ok = self.update(None, clean & (kept > 0))
        self.scaler.update(found_inf)
        self.record_step(ok, kept)
        return ok

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out.update(selection=self.selection, score=self.score_name, grad_scale=(float(self.scaler.scale) if self.scaler is not None else None),
                   prompt_tokens=self.model.net.prompt.length if self.model.net.prompt is not None else None)
        return out
