"""DeYO: destroy your object (Lee et al., ICLR 2024 spotlight).

Paper: "Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled
Factors", https://arxiv.org/abs/2403.07366. Official code: https://github.com/Jhyun17/DeYO
(``methods/deyo.py``, ``config.py``, ``main.py``); docs/methods/deyo.md.
"""
from __future__ import annotations

import math
from typing import Any

from ..policies import PLPD, EntropyMargin, Policy
from .batch import BatchMethod
from .registry import register


@register("deyo")
class DeYO(BatchMethod):
    """DeYO (Lee et al., ICLR 2024; Jhyun17/DeYO ``forward_and_adapt_deyo``, all flags on).

    Per batch: one forward; ``S1 = {H < deyo_margin * ln C}`` (strict; 0.5 ln C); destroy ``x[S1]``
    (``aug_type`` ``patch`` with a 4x4 grid by default; ``pixel``; ``occ`` 112 px at (56, 56) on
    224 px, scaled with the image), forward it without grad (BatchNorm statistics of ``S1`` only);
    ``PLPD = p[y] - p'[y]``; ``S2 = S1 and {PLPD > plpd_threshold}`` (strict; 0.2, the config
    default and the wild-setting value; DeYO's script uses 0.3 for R-50 BN in the mild setting);
    loss ``mean_S2((exp(E0 - H) + exp(PLPD)) * H)`` with ``E0 = margin_e0 * ln C`` (0.4 ln C);
    one SGD step (momentum 0.9) only if ``S2`` is non-empty; pre-update full-batch logits.
    Policies: ``entropy_margin`` -> ``plpd`` (see :class:`~tta.policies.PLPD` for where the
    transform is applied).

    Host syncs: **one per batch**, where every other batch method has none. The official code
    forwards the destroyed ``x[S1]``, so BatchNorm normalises them with the statistics of ``S1``
    alone; forwarding a subset needs its size on the host. Forwarding the whole batch instead would
    change those statistics (and cost the forward of the dropped samples), so the read stays. The
    permutations are drawn on the CPU as the official code and copied to the device without a
    sync. Under ``compile`` that re-forward runs eagerly (its size varies per batch).

    Defaults: parameters ``sar`` (as DeYO's ``collect_params``); lr by the SAR/DeYO rule, doubled at
    bs 1; no EMA, no reset, no Fisher. ``filter_ent=False``/``filter_plpd=False`` drop a filter
    (the official flags); ``reweight_ent``/``reweight_plpd`` the weight terms. ``transform_seed`` gives the
    destroying transform its own CPU generator (default: the global CPU RNG with the official calls,
    ``torch.rand(N, 16).argsort(-1)`` for ``patch`` and ``torch.randperm(H*W)`` for ``pixel``, on
    any device). Waterbirds / ColoredMNIST settings (``lr_mul`` 5, other margins) are not defaults.

    Documented deviations, none of which changes anything on 224-px square inputs (ImageNet-C):
    ``occ`` scales its 112-px window at (56, 56) with the image (the official slice is absolute, so
    on 32-px images it would occlude nothing); ``patch`` resizes each side on its own for sides not
    divisible by ``patch_len`` (the official code squares the image) with antialiasing (torchvision
    >= 0.17's tensor default; the pinned torchvision 0.11 did not antialias).
    """

    paper = "Lee et al., ICLR 2024 (Jhyun17/DeYO)"
    default_params = "sar"
    double_lr_at_bs1 = True

    def __init__(self, model, *, deyo_margin: float = 0.5, margin_e0: float = 0.4, plpd_threshold: float = 0.2,
                 aug_type: str = "patch", patch_len: int = 4, occlusion_size: int = 112, row_start: int = 56,
                 column_start: int = 56, reweight_ent: bool = True, reweight_plpd: bool = True,
                 filter_ent: bool = True, filter_plpd: bool = True, transform_seed: int | None = None,
                 **kwargs: Any):
        super().__init__(model, **kwargs)
        self.deyo_margin, self.margin_e0, self.plpd_threshold = float(deyo_margin), float(margin_e0), float(plpd_threshold)
        self.filter_ent, self.filter_plpd = bool(filter_ent), bool(filter_plpd)
        self._plpd_kwargs = dict(aug_type=aug_type, patch_len=patch_len, occlusion_size=occlusion_size,
                                 row_start=row_start, column_start=column_start, reweight_ent=reweight_ent,
                                 reweight_plpd=reweight_plpd, e0_fraction=margin_e0, seed=transform_seed)

    def default_policies(self) -> list[Policy]:
        own: list[Policy] = []
        if self.filter_ent:
            own.append(EntropyMargin(fraction=self.deyo_margin))
        # filter_plpd=False: the official keeps PLPD >= -2, i.e. every sample (PLPD >= -1 always)
        threshold = self.plpd_threshold if self.filter_plpd else -2.0
        own.append(PLPD(threshold=threshold, **self._plpd_kwargs))
        return own

    def hparams(self) -> dict[str, Any]:
        c = self.num_classes
        return {**super().hparams(), "deyo_margin": self.deyo_margin, "deyo_margin_nats": self.deyo_margin * math.log(c),
                "margin_e0": self.margin_e0, "margin_e0_nats": self.margin_e0 * math.log(c),
                "plpd_threshold": self.plpd_threshold, "filter_ent": self.filter_ent, "filter_plpd": self.filter_plpd}
