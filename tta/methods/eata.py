"""ETA and EATA: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022).

Paper: "Efficient Test-Time Model Adaptation without Forgetting", https://arxiv.org/abs/2204.02610.
Official code: https://github.com/mr-eggplant/EATA (``eata.py``, ``main.py``); docs/methods/eata.md.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..objectives import weighted_mean
from ..objectives.fisher import FisherAnchor, check_fisher_data
from ..policies import BatchContext, EATAWeight, EntropyMargin, Policy, Redundancy
from .batch import BatchMethod
from .inputs import RunInput
from .registry import register


@register("eta")
class ETA(BatchMethod):
    """ETA: EATA without the Fisher anti-forgetting term (Niu et al., ICML 2022; mr-eggplant/EATA).

    Per batch, as ``forward_and_adapt_eata`` with ``fishers=None``: one forward; keep
    ``H < e_margin * ln C`` (strict; 0.4 ln C as EATA's ``main.py``), then, once the running mean
    prediction ``m`` exists, ``|cos(m, p)| < d_margin`` (0.05); update ``m`` (EMA 0.9) from the kept
    probabilities; loss ``mean_kept(exp(E0 - H) * H)`` with ``E0 = e_margin * ln C``; one SGD step
    (momentum 0.9, lr 2.5e-4 at bs 64 for ResNets) only if a sample is kept; pre-update logits.
    Policies: ``entropy_margin`` -> ``redundancy`` -> ``eata_weight``.

    Decisions:

    * parameters: ``norm`` (BN + LN + GN affine), the SAR/DeYO repositories' EATA copies. On a
      BatchNorm-only network (ResNet-50) this is exactly the official ``bn`` collection; it also
      lets ETA/EATA run on ViT and GN models as those repositories do. ``params="bn"``: EATA's own.
    * ``m`` is not cleared by ``reset()`` (official behaviour); ``method.policies[1].clear()`` does.
    * ``E0`` for the weight equals the filter margin (EATA uses one ``e_margin`` for both).
    * counters: the official ``num_samples_update_1/2`` are the ``entropy_margin_kept`` and
      ``redundancy_kept`` policy counters.
    """

    paper = "Niu et al., ICML 2022 (mr-eggplant/EATA)"
    default_params = "norm"

    def __init__(self, model, *, e_margin: float = 0.4, d_margin: float = 0.05, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.e_margin, self.d_margin = float(e_margin), float(d_margin)

    def default_policies(self) -> list[Policy]:
        return [EntropyMargin(fraction=self.e_margin),
                Redundancy(d_margin=self.d_margin, num_classes=self.num_classes),
                EATAWeight(e0_fraction=self.e_margin)]

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "e_margin": self.e_margin,
                "e_margin_nats": self.e_margin * math.log(self.num_classes), "d_margin": self.d_margin}


@register("eata")
class EATA(ETA):
    """EATA: ETA plus the Fisher (EWC) anchor ``fisher_alpha * sum F (theta - theta0)^2``
    (Niu et al., ICML 2022; mr-eggplant/EATA).

    The Fisher comes from clean data, estimated as EATA's ``main.py`` (see
    :mod:`tta.objectives.fisher`): ``fisher_size`` (2000) images, batches of the stream's batch size,
    pseudo-label cross-entropy, BatchNorm on batch statistics, squared batch gradients summed and
    divided by the number of batches. ``fisher_alpha`` (beta) = 2000. Give either

    * ``fisher_data``: a tensor of clean images in [0, 1], or an iterable of image batches or
      ``(images, labels)`` batches (labels are ignored: EATA uses pseudo-labels). The first
      ``fisher_size`` images are used, so shuffle beforehand as the official code does. The Fisher
      is estimated at the first forward (on the device the model is on by then; autocast off)
      or when :meth:`compute_fisher` is called; or
    * ``fisher_path``: a file written by :meth:`save_fisher`. One made for another model raises a
      ``ValueError`` naming the adapted parameters it lacks. Given together with ``fisher_data``,
      an existing file is loaded (the data is not used); a path that does not exist yet gets the
      Fisher estimated from ``fisher_data`` written there (atomically), so the runs of a sweep with
      one ``method.fisher_path`` estimate it once (``hparams()``: ``source: data`` and
      ``saved_to``, later ``source: file`` and ``path``).

    Without either, construction raises a ``ValueError`` (use ``eta``, or ``fisher_alpha=0``).
    The penalty sums over the adapted parameters (all of which have an entry), vectorised with
    ``torch._foreach`` ops. ``reset()`` keeps the Fisher (computed once, as the official code).
    """

    paper = "Niu et al., ICML 2022 (mr-eggplant/EATA)"
    input_keywords = ("fisher_data",)

    @classmethod
    def run_inputs(cls, hparams: dict[str, Any]) -> list[RunInput]:
        """Clean images for the Fisher, unless ``fisher_path`` exists or ``fisher_alpha`` is 0."""
        path = hparams.get("fisher_path")
        if hparams.get("fisher_alpha", 2000.0) == 0 or (path and Path(str(path)).expanduser().is_file()):
            return []
        hint = (f"method.fisher_path={path} does not exist yet and would be computed from them" if path else
                "or pass method.fisher_path=<Fisher file> (saved there by a first run that had the clean images, "
                "or by EATA.save_fisher())")
        return [RunInput("clean_images", keyword="fisher_data", options={"num_samples": int(hparams.get("fisher_size") or 2000)},
                         hint=hint)]

    def __init__(self, model, *, fisher_alpha: float = 2000.0, fisher_size: int = 2000,
                 fisher_path: str | None = None, fisher_data: Any = None, fisher_strict: bool = True,
                 **kwargs: Any):
        super().__init__(model, **kwargs)
        self.fisher_size = int(fisher_size)
        self.fisher_batch_size = self.batch_size
        self.fisher = FisherAnchor(self.param_names, self.adapted_parameters(), fisher_alpha)
        self._fisher_data = None
        self._fisher_save_path: Path | None = None
        if fisher_path and (fisher_data is None or Path(fisher_path).expanduser().is_file()):
            self.fisher.load(fisher_path, strict=fisher_strict)
        elif fisher_data is not None:
            check_fisher_data(fisher_data)  # uint8 / NaN / 0..255 images: a clear error now, not a silent non-finite Fisher
            self._fisher_data = fisher_data
            if fisher_path:  # not there yet: computed from fisher_data, then saved there (a sweep computes it once)
                self._fisher_save_path = Path(fisher_path).expanduser()
        elif fisher_alpha != 0:
            raise ValueError(
                f"{self.name} needs clean data for its Fisher regulariser: pass fisher_data=<clean images or "
                f"batches> or fisher_path=<file saved by save_fisher()> (CLI: data.clean_root=<clean images>, or "
                f"method.fisher_path=...); or use method 'eta' / fisher_alpha=0 to run without it")

    def compute_fisher(self, data: Any = None) -> None:
        """Estimate the Fisher now from ``data`` (default: the ``fisher_data`` given at construction).
        With ``fisher_path`` given at construction but not existing then, the Fisher is saved there."""
        data = data if data is not None else self._fisher_data
        if data is None:
            raise ValueError("no Fisher data: pass it here or as fisher_data= at construction")
        self.fisher.estimate(self.model, data, fisher_size=self.fisher_size, batch_size=self.fisher_batch_size)
        self._fisher_data = None
        if self._fisher_save_path is not None:
            path, self._fisher_save_path = self._fisher_save_path, None
            if not path.is_file():  # a parallel run of the same sweep may have written it meanwhile
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
                self.fisher.save(partial)
                os.replace(partial, path)  # atomic: a concurrent reader never sees half a file
            self.fisher.info["saved_to"] = str(path)

    def save_fisher(self, path: str | Path) -> None:
        """Write the Fisher and its anchor (by parameter name) for ``fisher_path=`` later."""
        self.ensure_fisher()
        self.fisher.save(path)

    def ensure_fisher(self) -> None:
        """Estimate the pending Fisher before the first update (theta0 = the source weights), unless
        one was loaded since (``load_state_dict``). Checked once: no host sync afterwards."""
        if self._fisher_data is not None:
            if self.fisher.is_ready:
                self._fisher_data = None
            else:
                self.compute_fisher()

    def before_step(self) -> None:
        self.ensure_fisher()
        super().before_step()

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_fisher()
        return super().adapt(x)

    def objective(self, ctx: BatchContext, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(ctx.entropy, weights) + self.fisher().to(ctx.logits.device)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "fisher_size": self.fisher_size, **self.fisher.hparams()}
