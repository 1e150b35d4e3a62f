"""LAME: Laplacian adjusted maximum-likelihood estimation (Boudiaf et al., CVPR 2022).

Paper: "Parameter-free Online Test-time Adaptation", https://arxiv.org/abs/2201.05718.
Official code: https://github.com/fiveai/LAME (``src/adaptation/lame.py``); docs/methods/lame.md.
"""
from __future__ import annotations

from typing import Any

import torch

from ..models.classifier import find_head
from ..objectives.laplacian import AFFINITIES, affinity, lame_unary, laplacian_optimization, normalized
from .batch import BatchMethod
from .registry import register


@register("lame")
class LAME(BatchMethod):
    """LAME: no parameter update; the output of each batch is corrected by a Laplacian term over a
    graph of its features (fiveai/LAME @ d2e5f63, ``src/adaptation/lame.py``).

    Per batch, without gradient (``run_step``, lines 92-122): one forward of the frozen source model
    in ``eval()`` (BatchNorm on its source running statistics, ``non_adaptive.py`` line 25), giving
    the probabilities ``p`` and the penultimate features (the input of the classifier head);
    ``unary = -log(p + 1e-10)``; the affinity ``K`` of the L2-normalised features
    (:func:`tta.objectives.laplacian.affinity`); ``Y = laplacian_optimization(unary, K)``
    (:func:`tta.objectives.laplacian.laplacian_optimization`: at most 100 fixed-point iterations,
    lambda 1).

    **What it returns.** The reference returns ``Y``, probabilities. A method here returns logits,
    so LAME returns ``log Y``: its softmax is exactly the reference's ``Y`` (argmax, accuracy, NLL and
    calibration are those of ``Y``; softmaxing ``Y`` itself, as a framework that expects logits would,
    compresses its confidences). ``Y`` is clamped to the dtype's smallest normal number before the
    logarithm, so an entry that underflowed to 0 gives a finite logit.

    Defaults (``src/config/defaults.py`` lines 65-68, kept by ``configs/method/best/LAME``; the same in
    mariodoebler/test-time-adaptation ``conf.py`` lines 212-215): ``affinity="rbf"``, ``knn=5``,
    ``force_symmetry=False``; ``bound_lambda=1`` and ``max_steps=100`` (``lame.py`` line 125). The
    reference's ``LAME_SIGMA`` is read by no affinity it uses (``rbf`` takes sigma from the data), so
    it is not an option here.

    Decisions and deviations:

    * the early stop of the iterations is decided on the device (the same ``Y``; see
      :func:`~tta.objectives.laplacian.laplacian_optimization`);
    * ``rbf`` with ``sigma = 0`` (one image, identical features): NaN in the reference, the kernel's
      limit here (:func:`~tta.objectives.laplacian.affinity`);
    * features are captured by a hook on the head (the last ``nn.Linear``), so the step runs eagerly
      under ``compile=true``; the forward is the only network pass and the iterations are small.
    """

    paper = "Boudiaf et al., CVPR 2022 (fiveai/LAME)"
    #: nothing is learned: no signal for a policy to act on
    provides = frozenset()
    learns = False
    batch_stats = False

    def __init__(self, model, *, affinity: str = "rbf", knn: int = 5, force_symmetry: bool = False,
                 bound_lambda: float = 1.0, max_steps: int = 100, **kwargs: Any):
        super().__init__(model, **kwargs)
        if affinity not in AFFINITIES:
            raise ValueError(f"lame: unknown affinity {affinity!r}; use one of {AFFINITIES}")
        if int(knn) < 1 or int(max_steps) < 1:
            raise ValueError(f"lame: knn and max_steps must be at least 1, got {knn} and {max_steps}")
        self.affinity, self.knn, self.force_symmetry = affinity, int(knn), bool(force_symmetry)
        self.bound_lambda, self.max_steps = float(bound_lambda), int(max_steps)
        self.model.eval()
        find_head(self.model.net)  # a model without a linear head fails now, not at the first batch

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's input (penultimate features) and the logits, from one forward."""
        captured: list[torch.Tensor] = []
        handle = find_head(self.model.net)[1].register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return captured[0].flatten(1), logits

    def compile_step(self, mode: str | None = None) -> None:
        """Eager (the feature hook): the step is one forward and small matrix products."""
        self._calls, self._compiled_adapt, self._compiled_id = None, self.adapt, id(self)

    @torch.no_grad()
    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = self.features_and_logits(x)
        self.counters.add("forwards", 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 autocast: the iterations in fp32
        unary = lame_unary(logits.to(dtype).softmax(1))
        kernel = affinity(normalized(features.to(dtype)), self.affinity, self.knn)
        if self.force_symmetry:
            kernel = 0.5 * (kernel + kernel.t())
        y = laplacian_optimization(unary, kernel, self.bound_lambda, self.max_steps)
        return y.clamp_min(torch.finfo(y.dtype).tiny).log()

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "affinity": self.affinity, "knn": self.knn,
                "force_symmetry": self.force_symmetry, "bound_lambda": self.bound_lambda,
                "max_steps": self.max_steps, "returns": "log of LAME's probabilities Y"}


__all__ = ["LAME"]
