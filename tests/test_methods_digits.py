"""Real signal: every selection method recovers accuracy on digits-C at severity 5.

The embedded source model (a small BatchNorm CNN) is evaluated on three corruptions, reset per
corruption, batches of 64; each method must beat the frozen source model by a clear margin. EATA
gets its Fisher from the clean training split, as ``python -m tta.run method=eata`` does.
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
MARGIN = 0.15

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stream():
    config = dict(load_data_config("digits_c"))
    config["corruptions"] = CORRUPTIONS
    built, options = build_stream(config, severity=5, seed=0, batch_size=64)
    return list(built), options  # corrupt once, reuse for every method


@pytest.fixture(scope="module")
def source_accuracy(stream):
    batches, options = stream
    method = methods.build("source", load_classifier("digits_cnn"), batch_size=64)
    out = engine.run(method, batches, progress=False, device="cpu", **options)
    return out["results"]["mean"]["accuracy"]


@pytest.mark.parametrize("name", ["eta", "eata", "sar", "deyo", "crowds"])
def test_method_beats_source_on_digits_c(name, stream, source_accuracy):
    batches, options = stream
    kwargs = {}
    if name == "eata":
        images, _ = load_digits_split("train")
        kwargs["fisher_data"] = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    method = methods.build(name, load_classifier("digits_cnn"), batch_size=64, **kwargs)
    out = engine.run(method, batches, progress=False, device="cpu", **options)
    accuracy = out["results"]["mean"]["accuracy"]
    assert accuracy >= source_accuracy + MARGIN, (name, accuracy, source_accuracy)
    counters = out["stats"]["counters"]
    assert counters["skipped_nonfinite"] == 0 and counters["batches"] == len(batches)
