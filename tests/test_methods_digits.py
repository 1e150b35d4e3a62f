"""Real signal: every selection method recovers accuracy on digits-C at severity 5, and learns.

The embedded source model (a small BatchNorm CNN) is evaluated on three corruptions, reset per
corruption, batches of 64. BN adaptation (``norm``) alone recovers most of the gap to the clean
accuracy, so beating the frozen source model proves little: each method must match ``norm`` (within
one point) *and* have learned: optimizer steps taken, samples kept by its policies (counted), and
adapted parameters that moved away from the source weights. EATA gets its Fisher from the clean
training split, as ``python -m tta.run method=eata`` does.
"""
from __future__ import annotations

import pytest
import torch

import tta.methods as methods
from tta import engine
from tta.data.benchmarks import build_stream
from tta.data.configs import load_data_config
from tta.data.digits import load_digits_split
from tta.models import load_classifier

CORRUPTIONS = ["gaussian_noise", "defocus_blur", "contrast"]
MARGIN = 0.15  # above the source model
NORM_TOLERANCE = 0.01  # at most one point below BN adaptation

@pytest.fixture(scope="module")
def stream():
    config = dict(load_data_config("digits_c"))
    config["corruptions"] = CORRUPTIONS
    built, options = build_stream(config, severity=5, seed=0, batch_size=64)
    return list(built), options  # corrupt once, reuse for every method


def baseline_accuracy(name: str, stream) -> float:
    batches, options = stream
    method = methods.build(name, load_classifier("digits_cnn"), batch_size=64)
    out = engine.run(method, batches, progress=False, device="cpu", **options)
    return out["results"]["mean"]["accuracy"]


@pytest.fixture(scope="module")
def source_accuracy(stream):
    return baseline_accuracy("source", stream)


@pytest.fixture(scope="module")
def norm_accuracy(stream):
    return baseline_accuracy("norm", stream)


def test_tent_learns_and_matches_norm_on_one_corruption():
    """The quick tier's real signal: Tent on gaussian noise alone beats the source model by the margin,
    matches ``norm`` and takes steps that move its parameters."""
    config = dict(load_data_config("digits_c"))
    config["corruptions"] = ["gaussian_noise"]
    built, options = build_stream(config, severity=5, seed=0, batch_size=64)
    batches = list(built)
    source = baseline_accuracy("source", (batches, options))
    norm = baseline_accuracy("norm", (batches, options))
    method = methods.build("tent", load_classifier("digits_cnn"), batch_size=64)
    before = [p.detach().clone() for p in method.adapted_parameters()]
    out = engine.run(method, batches, progress=False, device="cpu", **options)
    accuracy = out["results"]["mean"]["accuracy"]
    assert accuracy >= source + MARGIN and accuracy >= norm - NORM_TOLERANCE, (accuracy, source, norm)
    assert out["stats"]["counters"]["steps"] == len(batches)
    assert any(not torch.equal(p.detach(), q) for p, q in zip(method.adapted_parameters(), before))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tent", "eta", "eata", "sar", "deyo", "crowds", "eata_c"])
def test_method_learns_and_matches_norm_on_digits_c(name, stream, source_accuracy, norm_accuracy):
    batches, options = stream
    kwargs = {}
    if name in ("eata", "eata_c"):
        images, _ = load_digits_split("train")
        kwargs["fisher_data"] = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    method = methods.build(name, load_classifier("digits_cnn"), batch_size=64, **kwargs)
    source = [p.detach().clone() for p in method.adapted_parameters()]
    out = engine.run(method, batches, progress=False, device="cpu", **options)  # the last domain is not reset
    accuracy = out["results"]["mean"]["accuracy"]
    assert accuracy >= source_accuracy + MARGIN, (name, accuracy, source_accuracy)
    assert accuracy >= norm_accuracy - NORM_TOLERANCE, (name, accuracy, norm_accuracy)
    counters, policies = out["stats"]["counters"], out["stats"]["policies"]
    assert counters["skipped_nonfinite"] == 0 and counters["batches"] == len(batches)
    assert counters["steps"] >= 1 and counters["kept"] >= 1, counters
    for key in method.policy_keys:  # every policy saw samples and kept some, never more than it saw
        assert 0 < policies[f"{key}_kept"] <= policies[f"{key}_seen"] <= counters["samples"], (key, policies)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(method.adapted_parameters(), source))
    assert moved > 0, f"{name}: no adapted parameter moved"
