"""A step's statistics, kept on the device and read by the caller at its own cadence.

The one place where what each call of a method did becomes available for logging and metrics
(:mod:`tta.loggers` for runs, :mod:`tta.serve.metrics` for a deployment), without a host
synchronisation in the step::

    monitor = tta.monitor.watch(adapted)     # attach (once); adapted(x) now also feeds it
    ...
    snap = monitor.snapshot()                # one read of the device values, when *you* choose

Per call of the method (:meth:`tta.methods.core.Method.__call__`) the monitor adds, on the device,
the mean per-sample entropy of the returned prediction (nats), the predicted-class histogram
(``argmax``; rows with a non-finite entropy are left out of both) and, from the guarded step (:meth:`~tta.methods.core.Method.step`), the loss (finite
losses only); on the host it times the call (``time.perf_counter`` around it: on a GPU that is the
time to queue the call's work, unless something in it synchronises). :meth:`StepMonitor.snapshot`
reads the device values and the method's counters (two host reads) and returns totals and, for
the window since the previous snapshot, the mean entropy, the mean loss, the effective number of
predicted classes ``exp(H(histogram))`` (the collapse guard's signal, :mod:`tta.guard`, on the
window's hard predictions) and the call latencies. :meth:`StepMonitor.mark_checkpoint` records
when the caller last saved the state.

Its buffers are not persistent: a method's ``state_dict()`` is the same with or without a monitor,
and the collapse guard's reset leaves them alone.
"""
from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the core looks the monitor up by name: no import cycle
    from .methods.core import Method


class StepMonitor(nn.Module):
    """Device accumulators of the method's calls, read by :meth:`snapshot` (module docstring).

    Args:
        num_classes: the method's number of classes (the histogram's length).
        keep_latencies: the most call latencies kept between two snapshots (older ones are dropped
            from the list, still counted in the totals).
    """

    def __init__(self, num_classes: int, keep_latencies: int = 100_000):
        super().__init__()
        self.num_classes = int(num_classes)
        self.keep_latencies = int(keep_latencies)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("predicted", torch.zeros(self.num_classes, dtype=torch.long), persistent=False)
        self.register_buffer("loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("losses", torch.zeros((), dtype=torch.long), persistent=False)
        self._host_lock = threading.Lock()
        self._latencies: list[float] = []
        self._calls = 0
        self._latency_sum = 0.0
        self._last: dict[str, Any] | None = None  # the previous snapshot's totals (the window's start)
        self._checkpoint_time: float | None = None
        self._started = time.time()

    # ------------------------------------------------------------------ fed by the method (no host sync)
    def observe(self, logits: Any, seconds: float) -> None:
        """One call's prediction (``(N, C)`` logits) and its host time."""
        if torch.is_tensor(logits) and logits.dim() == 2 and logits.shape[1] == self.num_classes:
            with torch.no_grad():
                logits = logits.detach().float()
                log_p = logits.log_softmax(dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1)
                finite = torch.isfinite(entropy)  # a row of a non-finite batch (nonfinite="skip") is not counted
                self.entropy_sum += torch.where(finite, entropy, torch.zeros_like(entropy)).sum().to(self.entropy_sum.dtype)
                self.predicted.index_add_(0, logits.argmax(dim=1), finite.long())
        with self._host_lock:
            self._calls += 1
            self._latency_sum += seconds
            if len(self._latencies) < self.keep_latencies:
                self._latencies.append(seconds)

    def observe_loss(self, loss: Any) -> None:
        """The loss the guarded step optimises (a non-finite one is not counted)."""
        if torch.is_tensor(loss) and loss.numel() == 1:
            with torch.no_grad():
                value = loss.detach().reshape(()).to(self.loss_sum.dtype)
                finite = torch.isfinite(value)
                self.loss_sum += torch.where(finite, value, torch.zeros_like(value))
                self.losses += finite.long()

    def mark_checkpoint(self, when: float | None = None) -> None:
        """The caller saved the method's state now (or at ``when``, seconds since the epoch)."""
        self._checkpoint_time = time.time() if when is None else float(when)

    # ------------------------------------------------------------------ read by the caller
    def snapshot(self, method: "Method | None" = None) -> dict[str, Any]:
        """Totals since attaching and the window since the previous snapshot (one read of the
        device values, one of ``method``'s counters when given; no op is queued in the step).

        Keys: ``calls``, ``latency_s`` (this window's call times, seconds), ``latency_sum_s``;
        ``samples_predicted``, ``entropy`` (mean per-sample entropy in the window, nats; ``None``
        without predictions), ``effective_classes`` (``exp(H)`` of the window's predicted-class
        histogram), ``loss`` (mean finite loss of the window's steps; ``None`` without any),
        ``predicted`` (the window's histogram), ``seconds_since_checkpoint`` (``None``: never
        saved), and ``counters`` / ``policies`` (``method.stats()``) when ``method`` is given.
        """
        values = torch.cat([self.entropy_sum.reshape(1), self.loss_sum.reshape(1),
                            self.losses.reshape(1).to(torch.float64),
                            self.predicted.to(torch.float64)]).cpu().tolist()
        with self._host_lock:
            latencies, self._latencies = self._latencies, []
            calls, latency_sum = self._calls, self._latency_sum
        totals = {"entropy_sum": values[0], "loss_sum": values[1], "losses": int(values[2]),
                  "predicted": [int(v) for v in values[3:]]}
        last = self._last or {"entropy_sum": 0.0, "loss_sum": 0.0, "losses": 0, "predicted": [0] * self.num_classes}
        self._last = totals
        window = [a - b for a, b in zip(totals["predicted"], last["predicted"])]
        n = sum(window)
        losses = totals["losses"] - last["losses"]
        out: dict[str, Any] = {
            "calls": calls, "latency_s": latencies, "latency_sum_s": latency_sum,
            "samples_predicted": n, "samples_predicted_total": sum(totals["predicted"]),
            "entropy": (totals["entropy_sum"] - last["entropy_sum"]) / n if n else None,
            "effective_classes": effective_classes(window) if n else None,
            "loss": (totals["loss_sum"] - last["loss_sum"]) / losses if losses else None,
            "predicted": window,
            "seconds_since_checkpoint": None if self._checkpoint_time is None else time.time() - self._checkpoint_time,
            "seconds_since_start": time.time() - self._started,
        }
        if method is not None:
            stats = method.stats()
            out["counters"], out["policies"] = stats["counters"], stats["policies"]
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_host_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._host_lock = threading.Lock()


def effective_classes(histogram: list[int]) -> float:
    """``exp(H(p))`` of a class histogram: the number of classes, had they been equally frequent."""
    total = float(sum(histogram))
    entropy = -sum((c / total) * math.log(c / total) for c in histogram if c > 0)
    return math.exp(entropy)


def watch(method: "Method") -> StepMonitor:
    """The method's :class:`StepMonitor`, attached on first use (a submodule ``step_monitor``, on
    the method's device); every later call of the method feeds it."""
    with method.lock:
        monitor = method._modules.get("step_monitor")
        if monitor is None:
            monitor = StepMonitor(method.num_classes)
            monitor.to(method.counters.batches.device)
            method.step_monitor = monitor
        return monitor


__all__ = ["StepMonitor", "effective_classes", "watch"]
