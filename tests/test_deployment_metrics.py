"""Deployment metrics: the step monitor in the method core (tta/monitor.py) and the Prometheus
exporter (tta/serve/metrics.py), checked against values computed here from what the method returned."""
from __future__ import annotations

import math

import pytest
import torch

import tta
from tta.data.digits import load_digits_split
from tta.models import load_classifier
from tta.monitor import effective_classes, watch


def batches(n: int, size: int = 16) -> list[torch.Tensor]:
    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(3)
    noisy = (images[: n * size] + 0.3 * torch.randn(images[: n * size].shape, generator=g)).clamp(0, 1)
    return list(noisy.split(size))


def test_monitor_snapshot_equals_the_statistics_of_the_returned_predictions():
    adapted = tta.adapt(load_classifier("digits_cnn"), "tent")
    keys = set(adapted.state_dict())
    monitor = watch(adapted)
    assert watch(adapted) is monitor
    assert set(adapted.state_dict()) == keys  # not part of the saved state
    outs = [adapted(x).detach() for x in batches(3)]
    snap = monitor.snapshot(adapted)
    logits = torch.cat(outs).double()
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    histogram = torch.bincount(logits.argmax(1), minlength=10).tolist()
    assert snap["calls"] == 3 and len(snap["latency_s"]) == 3 and all(s > 0 for s in snap["latency_s"])
    assert snap["samples_predicted"] == 48 and snap["predicted"] == histogram
    assert snap["entropy"] == pytest.approx(entropy.mean().item(), rel=1e-5)
    # Tent's loss is the mean entropy of the prediction it returns (one forward): the window's mean loss
    assert snap["loss"] == pytest.approx(torch.stack([e.mean() for e in entropy.split(16)]).mean().item(), rel=1e-5)
    p = torch.tensor(histogram, dtype=torch.float64) / 48
    assert snap["effective_classes"] == pytest.approx(math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()))
    assert snap["counters"]["batches"] == 3 and snap["counters"]["samples"] == 48
    assert snap["seconds_since_checkpoint"] is None
    # the next window starts empty
    again = monitor.snapshot()
    assert again["samples_predicted"] == 0 and again["entropy"] is None and again["latency_s"] == []
    monitor.mark_checkpoint()
    assert 0 <= monitor.snapshot()["seconds_since_checkpoint"] < 5
    assert effective_classes([5, 5, 0]) == pytest.approx(2.0) and effective_classes([7]) == pytest.approx(1.0)


def test_a_monitored_state_loads_into_an_unmonitored_method_and_back():
    a = tta.adapt(load_classifier("digits_cnn"), "tent", guard="reset_on_collapse")
    watch(a)
    for x in batches(2):
        a(x)
    b = tta.adapt(load_classifier("digits_cnn"), "tent", guard="reset_on_collapse")
    b.load_state_dict(a.state_dict())
    watch(b).snapshot()
    b.load_state_dict(a.state_dict())
    assert b.stats()["counters"] == a.stats()["counters"]


def test_prometheus_exporter_publishes_the_method_counters_in_its_own_registry():
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from tta.serve.metrics import MetricsExporter

    adapted = tta.adapt(load_classifier("digits_cnn"), "tent", guard={"min_effective_classes": 10, "warmup": 1})
    exporter = MetricsExporter(adapted)
    bad = batches(1)[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    adapted.nonfinite = "skip"
    for x in [*batches(4), bad]:
        adapted(x)
    exporter.update()
    exporter.mark_checkpoint()
    samples = {}
    for family in text_string_to_metric_families(exporter.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    value = lambda name, **labels: samples[(name, tuple(sorted(labels.items())))]  # noqa: E731
    counters = adapted.stats()["counters"]
    assert value("tta_samples_seen_total") == counters["samples"] == 80
    assert value("tta_batches_total") == 5
    assert value("tta_samples_learned_total") == counters["kept"] > 0
    assert value("tta_updates_applied_total") == counters["steps"] == 4
    assert value("tta_updates_skipped_total", reason="nonfinite") == 1
    assert value("tta_updates_skipped_total", reason="empty") == 0
    assert value("tta_guard_resets_total") == counters["guard_resets"] >= 1  # every class must be predicted
    assert value("tta_step_latency_seconds_count") == 5
    assert value("tta_step_latency_seconds_bucket", le="+Inf") == 5
    assert 0 < value("tta_prediction_entropy_nats") < math.log(10)
    assert 1 <= value("tta_effective_classes") <= 10
    assert value("tta_seconds_since_checkpoint") == 0 and value("tta_last_checkpoint_timestamp_seconds") > 0
    assert REGISTRY.get_sample_value("tta_samples_seen_total") is None  # not the global registry
