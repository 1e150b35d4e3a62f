"""The baselines: the frozen source model, BN adaptation, and Tent."""
from __future__ import annotations

from .batch import BatchMethod
from .registry import register


@register("source")
class Source(BatchMethod):
    """The unadapted source model, evaluated as trained (BatchNorm uses its running statistics)."""

    paper = "no adaptation"
    learns = False
    batch_stats = False

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.model.eval()


@register("norm")
class BatchNormAdapt(BatchMethod):
    """Test-batch normalisation statistics, no parameter update.

    Schneider et al., "Improving robustness against common corruptions by covariate shift
    adaptation" (NeurIPS 2020) and Nado et al. (2020); the "BN" row of the Tent paper. BatchNorm
    layers normalise with the statistics of the current test batch, nothing else changes.
    """

    paper = "Schneider et al. 2020 / Nado et al. 2020 (test-batch BN statistics)"
    learns = False


@register("tent")
class Tent(BatchMethod):
    """Tent: fully test-time adaptation by entropy minimization (Wang et al., ICLR 2021).

    As the official code (DequanWang/tent): BatchNorm on test-batch statistics, mean Shannon
    entropy over the whole batch, one optimizer step per batch, pre-update logits returned,
    online (no reset) unless ``episodic``. Parameters: the SAR repository's variant by default
    (``params="norm"``: all BN/LN/GN affine, so ViTs and GN models work); ``params="bn"`` is the
    original Tent (BN only). Optimizer: SGD, momentum 0.9, lr by the SAR/EATA ImageNet rule
    (2.5e-4 at bs 64 for ResNets, 1e-3 at bs 64 for ViTs); Tent's CIFAR-10-C config uses
    ``optimizer="adam", lr=1e-3``. ``steps > 1`` returns the last step's logits, as the official loop.

    Deviation (all methods): the official Tent has no guard, so a non-finite loss or gradient
    corrupts the weights; here such a step is undone on the device and counted in
    ``skipped_nonfinite`` (finite batches are unaffected).
    """

    paper = "Wang et al., ICLR 2021 (DequanWang/tent)"
