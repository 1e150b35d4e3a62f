"""Deployment metrics of an adapting model, for Prometheus (``prometheus_client``, own registry).

    exporter = MetricsExporter(adapted)          # attaches a tta.monitor.StepMonitor to the method
    ... adapted(x) ...                           # the step only adds to device accumulators
    exporter.update()                            # at your cadence: one read of the device values
    text = exporter.text()                       # the exposition format (or serve exporter.registry)

The method's step never waits for the metrics: :meth:`MetricsExporter.update` reads the
:class:`~tta.monitor.StepMonitor` snapshot and the counters when the caller chooses (after a
batch, every few batches, before a scrape), and a scrape only formats the values read last.
Published (``namespace`` ``tta`` by default):

=============================================  ========  ===================================================
name                                           type      meaning
=============================================  ========  ===================================================
``tta_samples_seen_total``                     counter   images predicted (and offered to adaptation)
``tta_samples_learned_total``                  counter   images the applied updates learned from (kept)
``tta_batches_total``                          counter   calls of the method (batches)
``tta_updates_applied_total``                  counter   optimizer steps applied
``tta_updates_skipped_total{reason}``          counter   steps skipped: ``empty`` selection, ``nonfinite`` loss
``tta_guard_resets_total``                     counter   collapse-guard resets to the source state
``tta_prediction_entropy_nats``                gauge     mean per-sample entropy of the predictions since the last update
``tta_effective_classes``                      gauge     exp(entropy) of the predicted-class histogram since the last update
``tta_loss``                                   gauge     mean finite loss of the steps since the last update
``tta_step_latency_seconds``                   histogram host time of each call of the method
``tta_last_checkpoint_timestamp_seconds``      gauge     when the state was last saved (0: never)
``tta_seconds_since_checkpoint``               gauge     seconds since then at the last update (``+Inf``: never)
=============================================  ========  ===================================================

The counters are the method's own (``stats()["counters"]``), part of its saved state: a state
restored after a restart continues them (a restore to an older state is a counter reset to
Prometheus).
"""
from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

try:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('the deployment metrics need prometheus_client: pip install "tta-toolkit[prometheus]"') from error

from ..monitor import watch

if TYPE_CHECKING:
    from ..methods.core import Method

#: step latency buckets (seconds): a CPU batch of a small model to a large ViT batch
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_COUNTERS = (  # (metric, help, counter key)
    ("samples_seen", "Images predicted (and offered to adaptation).", "samples"),
    ("samples_learned", "Images the applied updates learned from (kept by the selection).", "kept"),
    ("batches", "Calls of the adapting method (batches).", "batches"),
    ("updates_applied", "Optimizer steps applied.", "steps"),
    ("guard_resets", "Collapse-guard resets to the source state.", "guard_resets"),
)


class MetricsExporter:
    """Publish an adapting method's statistics in its own Prometheus registry (module docstring).

    Args:
        method: the adapting method (``tta.adapt(...)``); a step monitor is attached to it.
        namespace: metric name prefix.
        registry: a ``CollectorRegistry`` to register into (default: a new one, never the global one).
        buckets: the latency histogram's buckets (seconds).
    """

    def __init__(self, method: "Method", *, namespace: str = "tta", registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        self.method = method
        self.monitor = watch(method)
        self.namespace = namespace
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {"counters": {}, "entropy": math.nan, "effective_classes": math.nan,
                                        "loss": math.nan, "checkpoint": 0.0, "since_checkpoint": math.inf}
        self.latency = Histogram(f"{namespace}_step_latency_seconds", "Host time of each call of the adapting method.",
                                 buckets=tuple(buckets), registry=self.registry)
        self.registry.register(_Collector(self))
        self.update()

    def update(self) -> dict[str, Any]:
        """Read the method's counters and the monitor's window (under the method's lock: a
        consistent point between two calls) and set every metric; returns the snapshot."""
        with self.method.lock:
            snap = self.monitor.snapshot(self.method)
        for seconds in snap["latency_s"]:
            self.latency.observe(seconds)
        checkpoint = self.monitor._checkpoint_time
        with self._lock:
            values = self._values
            values["counters"] = dict(snap["counters"])
            for key in ("entropy", "effective_classes", "loss"):
                if snap[key] is not None:  # a window without predictions (or steps) keeps the last value
                    values[key] = snap[key]
            values["checkpoint"] = checkpoint or 0.0
            values["since_checkpoint"] = math.inf if checkpoint is None else time.time() - checkpoint
        return snap

    def mark_checkpoint(self) -> None:
        """The caller saved the method's state now."""
        self.monitor.mark_checkpoint()
        with self._lock:
            self._values["checkpoint"] = self.monitor._checkpoint_time
            self._values["since_checkpoint"] = 0.0

    def text(self) -> str:
        """The Prometheus exposition text of the registry (the values of the last :meth:`update`)."""
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Any]:
        ns = self.namespace
        with self._lock:
            values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._values.items()}
        counters = values["counters"]
        for name, doc, key in _COUNTERS:
            family = CounterMetricFamily(f"{ns}_{name}", doc)
            family.add_metric([], float(counters.get(key, 0)))
            yield family
        skipped = CounterMetricFamily(f"{ns}_updates_skipped", "Optimizer steps skipped, by reason.", labels=["reason"])
        skipped.add_metric(["empty"], float(counters.get("skipped_empty", 0)))
        skipped.add_metric(["nonfinite"], float(counters.get("skipped_nonfinite", 0)))
        yield skipped
        for name, doc, key in (
                ("prediction_entropy_nats", "Mean per-sample prediction entropy since the last update (nats).", "entropy"),
                ("effective_classes", "exp(entropy) of the predicted-class histogram since the last update.",
                 "effective_classes"),
                ("loss", "Mean finite loss of the steps since the last update.", "loss"),
                ("last_checkpoint_timestamp_seconds", "When the adapted state was last saved (0: never).", "checkpoint"),
                ("seconds_since_checkpoint", "Seconds since the adapted state was last saved, at the last update "
                                             "(+Inf: never).", "since_checkpoint")):
            yield GaugeMetricFamily(f"{ns}_{name}", doc, value=float(values[key]))


class _Collector:
    """The registry's view of a :class:`MetricsExporter` (the values of its last update)."""

    def __init__(self, exporter: MetricsExporter):
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        return self.exporter.collect()


__all__ = ["LATENCY_BUCKETS", "MetricsExporter"]
