"""TDA: training-free dynamic adapter (Karmanov et al., CVPR 2024; kdiAAA/TDA @ e697fb0,
docs/methods/tda.md).

Online over the stream on a frozen CLIP: nothing is trained, but two caches of image features
persist from image to image (``reset`` clears them). Per test image, in the stream's order
(``run_test_tda``, ``tda_runner.py:67-103``; ``get_clip_logits``, ``utils.py:64-91``):

1. its views' L2-normalised features ``f_v`` and logits ``z_v`` with the frozen zero-shot head.
   ImageNet: one view, the image itself. The natural shifts (A, V2, R, Sketch): 64 views (the
   original + 63 AugMix crops) of which the ``int(64 * 0.1) = 6`` with the lowest entropy are kept;
   ``f`` = the mean of their features (**not** renormalised), ``z`` = the mean of their logits;
2. ``loss`` = the entropy of the mean softmax of the kept views (one view: its entropy),
   ``prob_map`` = that mean softmax, pseudo-label ``c = argmax z``;
3. **positive cache** (:class:`~tta.methods.cache.ClassCache`): offer ``(f, loss)`` to class ``c``
   (up to 3 entries per class, the lowest-entropy ones);
4. **negative cache**: if ``0.2 < loss / log2(C) < 0.5`` (an entropy in nats divided by log base 2
   of C, as released: ``utils.py:19-21``), offer ``(f, loss, prob_map)`` to class ``c`` (2 per class);
5. the prediction: ``z + 2.0 * exp(-5 (1 - f K_pos^T)) L_pos - 0.117 * exp(-1 (1 - f K_neg^T)) M_neg``
   with ``L_pos`` the one-hot labels of the positive entries and ``M_neg = 0.03 < prob_map < 1`` of
   the negative ones.

**Order**: the caches are updated (3, 4) *before* the prediction (5), as in the released loop, so
the current image can match its own entry (affinity ``f . f``; 1 for a single view).

``method(x)`` returns the final logits of step 5. Images of a batch are processed one after the other
(a Python loop over the images is inherent: each image's prediction depends on the cache the images
before it left); inside the loop nothing waits for the device.

**Admission gate** (``admission``): sample-level policies (``entropy_margin``, ``eata_weight``...)
computed on the images' aggregated logits ``z`` can gate cache admission: an image whose weight is 0
enters neither cache (it is still predicted with the caches). The policies see the whole batch
before any of its images updates the caches (with ``batch_size=1``, image by image). A policy that
needs the frozen source model gets the model itself (TDA's CLIP is frozen); one that needs to
re-forward a transformed batch (``plpd``) gets the zero-shot head. ``positive_admitted``,
``negative_admitted`` and ``admission_gated`` in the counters say how many offers each cache took and
how many images the gate kept out. Off by default (TDA admits every image).

Defaults are the ImageNet configuration (``configs/imagenet.yaml``); the natural shifts differ in
views and in the positive cache's ``alpha``/``beta`` (``configs/imagenet_{a,v,r,s}.yaml``): the
``imagenet_a``, ``imagenet_v2``, ``imagenet_r`` and ``imagenet_sketch`` protocols carry them
(:mod:`tta.protocols`). The fine-grained sets' values are on the page.

Deviations (documented, by necessity or as options):

* fp32 cache maths by default (the released code runs fp16 CLIP weights, fp16 features and fp16
  cache values); ``amp=true`` runs bf16 autocast.
* The logit scale is the model's (``logit_scale.exp()``; 100 for OpenAI's CLIPs, the released
  hard-coded ``100.``).
* Views are seeded per (``seed``, image id, view index); the released AugMix views are drawn in the
  data-loader workers.
* Ties in the view entropy follow ``torch.argsort``; ties in the cache order follow a stable sort.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..objectives import weighted_marginal_entropy
from ..policies import BatchContext, Policy, TPTConfidence, build as build_policy, check_compatible
from .cache import ClassCache
from .registry import METHODS, register
from .views import ViewMethod


@register("tda")
class TDA(ViewMethod):
    """TDA on a frozen CLIP model (``model=clip:...``); see the module docstring.

    Args:
        num_views: views per image incl. the original (ImageNet 1; the natural shifts 64, ``utils.py:94-105, 127-139``).
        augmix: AugMix on the crops (the natural shifts: ``AugMixAugmenter(n_views=63, augmix=True)``).
        selection: kept fraction of the views when there are several (0.1, ``utils.py:78``).
        pos_capacity, pos_alpha, pos_beta: positive cache (3, 2.0, 5.0; ``configs/imagenet.yaml``).
        neg_capacity, neg_alpha, neg_beta: negative cache (2, 0.117, 1.0; ``configs/imagenet.yaml``).
        neg_entropy: the band ``(lower, upper)`` of ``loss / log2(C)`` for negative admission (0.2, 0.5).
        neg_mask: the bounds of the negative cache's class mask (0.03, 1.0).
        positive, negative: use each cache (both on everywhere in the released configs).
        admission: sample-level policies gating cache admission (see the module docstring; none).
        admission_kwargs: their keyword arguments, by name.
        templates: zero-shot head templates (default: the model's). The released code uses ``tip7``
            for ImageNet, A and V2 and ``imagenet80`` for R and Sketch (``datasets/*.py``); the
            ``imagenet*`` protocols set them.
        view_batch: views per image-encoder call.
        seed: base seed of the views.
    """

    paper = "Karmanov et al., CVPR 2024 (kdiAAA/TDA)"
    default_params = "ln"
    learns = False
    supports_vote = False

    def __init__(self, model, *, num_views: int = 1, augmix: bool = False, selection: float = 0.1,
                 pos_capacity: int = 3, pos_alpha: float = 2.0, pos_beta: float = 5.0,
                 neg_capacity: int = 2, neg_alpha: float = 0.117, neg_beta: float = 1.0,
                 neg_entropy: Sequence[float] = (0.2, 0.5), neg_mask: Sequence[float] = (0.03, 1.0),
                 positive: bool = True, negative: bool = True, admission: Sequence[str] = (),
                 admission_kwargs: dict[str, dict[str, Any]] | None = None, templates: str | None = None,
                 view_batch: int = 1024, seed: int = 0, **kwargs: Any):
        super().__init__(model, num_views=num_views, augmix=augmix, seed=seed, **kwargs)
        if templates is not None:
            self.model.set_head(templates=templates)
        self.selection = float(selection)
        self.view_batch = max(int(view_batch), self.num_views)
        self.use_positive, self.use_negative = bool(positive), bool(negative)
        self.neg_entropy = (float(neg_entropy[0]), float(neg_entropy[1]))
        dim = int(self.model.text_features().shape[-1])
        self.positive = ClassCache(self.num_classes, dim, pos_capacity, pos_alpha, pos_beta)
        self.negative = ClassCache(self.num_classes, dim, neg_capacity, neg_alpha, neg_beta, keep_probs=True,
                                   mask=(float(neg_mask[0]), float(neg_mask[1])))
        self.admission = torch.nn.ModuleList(self._admission_policies(admission, admission_kwargs or {}))
        for name in ("positive_admitted", "negative_admitted", "admission_gated"):
            self.counters.add(name, 0)

    def _admission_policies(self, names: Sequence[str], kwargs: dict[str, dict[str, Any]]) -> list[Policy]:
        policies = []
        for spec in names:
            policy = spec if isinstance(spec, Policy) else build_policy(spec, num_classes=self.num_classes,
                                                                         **kwargs.get(spec, {}))
            fitting = [n for n in METHODS.available() if METHODS.get(n).policy_level == policy.level
                       and set(policy.needs) <= METHODS.get(n).provides and n != self.name]
            check_compatible(policy, level="samples", provides={"source", "model"}, method=f"{self.name} (admission)",
                             alternatives=fitting)
            policies.append(policy)
        return policies

    def default_policies(self) -> list[Policy]:
        """The confident-view filter of the multi-view setting (one view: it keeps that view)."""
        return [TPTConfidence(fraction=self.selection)]

    def combine_policies(self, own: list[Policy], extra: list[Policy]) -> list[Policy]:
        """One view ranking: an extra ranking replaces the entropy filter; nothing else combines."""
        for policy in extra:
            if not policy.ranks_views:
                raise ValueError(f"policy {policy.name!r} cannot be combined with method 'tda' as a view policy: TDA "
                                 f"ranks views with one ranking (an extra ranking such as 'tsallis' replaces its "
                                 f"own); a sample-level policy can gate its cache admission (admission=[...])")
        return super().combine_policies(own, extra)

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def encode_views(self, x: torch.Tensor, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features (N, V, D) and logits (N, V, C) of the views of a batch."""
        plan = self.views.plan(ids, x.shape[-2], x.shape[-1])
        per_call = max(self.view_batch // self.num_views, 1)
        text = self.model.text_features()
        feats, logits = [], []
        for start in range(0, x.shape[0], per_call):
            stop = min(start + per_call, x.shape[0])
            views = self.views(x, plan=plan, images=slice(start, stop)).flatten(0, 1)
            self.counters.add("forwards", 1)
            self.counters.add("views", views.shape[0])
            f = self.model.encode_image(views)
            feats.append(f.float().view(stop - start, self.num_views, -1))
            logits.append(self.model.logits_from_features(f, text).float().view(stop - start, self.num_views, -1))
        return torch.cat(feats), torch.cat(logits)

    def admission_gate(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Per-image bool (N,) of the admission policies on the aggregated logits, or ``None``."""
        if not len(self.admission):
            return None
        ctx = BatchContext(x, logits, self.model, source_model=lambda: self.model)
        weights = torch.ones(logits.shape[0], device=logits.device)
        for policy in self.admission:
            weights = weights * policy(ctx, weights > 0)
        gate = weights > 0
        self.counters.add("admission_gated", (~gate).sum())
        return gate

    @torch.no_grad()
    def forward(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None,
                domain: str | None = None) -> torch.Tensor:
        ids = self.begin_image_batch(x, ids)
        feats, logits = self.encode_views(x, ids)                     # (N, V, D), (N, V, C)
        ranking = self.policies[0]
        weights = ranking.select(logits)                                # (N, V)
        self.count_policy(self.policy_keys[0], weights.numel(), (weights > 0).sum())
        kept = weights.sum(dim=1, keepdim=True)
        feature = (feats * weights.unsqueeze(-1)).sum(dim=1) / kept     # the mean, not renormalised
        z = (logits * weights.unsqueeze(-1)).sum(dim=1) / kept
        prob_map = (logits.softmax(dim=-1) * weights.unsqueeze(-1)).sum(dim=1) / kept
        label = z.argmax(dim=-1)
        gate = self.admission_gate(x, z)
        log2_classes = math.log2(self.num_classes)
        outputs = []
        for i in range(x.shape[0]):                                     # the caches carry from image to image
            loss = weighted_marginal_entropy(logits[i], weights[i])
            allowed = None if gate is None else gate[i]
            if self.use_positive:
                self.counters.add("positive_admitted", self.positive.admit(label[i], feature[i], loss, gate=allowed))
            if self.use_negative:
                band = (loss / log2_classes > self.neg_entropy[0]) & (loss / log2_classes < self.neg_entropy[1])
                band = band if allowed is None else band & allowed
                self.counters.add("negative_admitted",
                                  self.negative.admit(label[i], feature[i], loss, prob_map[i], gate=band))
            out = z[i:i + 1].clone()                                     # predicted after the update (as released)
            if self.use_positive:
                out = out + self.positive.logits(feature[i:i + 1])
            if self.use_negative:
                out = out - self.negative.logits(feature[i:i + 1])
            outputs.append(out)
        return torch.cat(outputs)

    def reset(self) -> None:
        """A new domain: both caches empty (and the admission policies' state)."""
        self.positive.clear()
        self.negative.clear()
        for policy in [*self.policies, *self.admission]:
            policy.reset()
        self.reset_state()

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out.update(selection=self.selection, positive={"enabled": self.use_positive, **self.positive.hparams()},
                   negative={"enabled": self.use_negative, **self.negative.hparams(),
                             "entropy": list(self.neg_entropy)},
                   admission=[{"name": p.name, **p.hparams()} for p in self.admission],
                   templates=self.model.net.template_spec)
        return out


__all__ = ["TDA"]
