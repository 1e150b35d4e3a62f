"""The online loop: predict -> select -> update, batch by batch, metrics on the device.

    results = tta.engine.run(method, stream, source_model=frozen_copy)

Per batch the engine calls every method the same way, ``method(x, ids=..., domain=...)`` (which
returns the logits of that batch's prediction and adapts; sample ids and the domain name are there
for the methods that use them), optionally runs the frozen source model on the same batch for ``source_accuracy``, and
accumulates accuracy, NLL and ECE on the device, and for methods that learn from the samples of a batch
the selection diagnostics of each policy stage (:class:`~tta.metrics.SelectionMetrics`: kept, and how
many of the kept were predicted right; the returned ``selection``). The host reads them at the end of each domain and
every ``log_every`` batches for the progress bar, and, with a run ``logger`` (:mod:`tta.loggers`),
for one point of per-batch curves (:func:`progress_point`).

With ``stream_rate=eta > 0`` the loop follows the stream-rate protocol (:mod:`tta.stream_rate`;
Alfarra et al., ICML 2024): after each adapted batch the method misses ``ceil(eta * C) - 1``
batches, ``C`` its relative cost (measured, or declared with ``relative_cost``), and a missed batch
is predicted by ``method.predict_only(x)`` (no update, no state change). Accuracy counts every batch.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .checkpoint import RunProgress
from .data.stream import Batch
from .metrics import DomainMetrics, SelectionMetrics, mean_over_domains, selection_summary
from .methods import Method
from .stream_rate import StreamRate


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory: the GPU allocator's peak on CUDA, and the process's peak resident set size."""
    import resource

    out = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if device.type == "cuda":
        out["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def check_labels(labels: torch.Tensor, num_classes: int, open_set: bool = False) -> None:
    """Labels must be integers in [0, C) (-1 marks out-of-distribution samples in open-set streams).

    Checked on the CPU copy when the stream provides one; on a device tensor this is a host sync.
    """
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    low = -1 if open_set else 0
    if not labels.numel():
        return
    values = labels.numpy() if labels.device.type == "cpu" else labels  # a host array: no tensor op, no sync
    seen_min, seen_max = int(values.min()), int(values.max())
    if seen_min < low or seen_max >= num_classes:
        raise ValueError(f"labels out of range: expected values in [{low}, {num_classes - 1}], "
                         f"got min {seen_min}, max {seen_max}")


class _PointClock:
    """Wall time per batch between two logged points (read after the point's host reads, so on a
    GPU it is the time the batches took, not the time to queue them)."""

    def __init__(self, start: float, done: int):
        self.time, self.batch = start, done

    def tick(self, batch: int) -> float:
        now = time.perf_counter()
        per_batch = (now - self.time) / max(batch - self.batch, 1)
        self.time, self.batch = now, batch
        return per_batch


def progress_point(method: Method, monitor: Any, domain: DomainMetrics, selection: SelectionMetrics | None,
                   batch_seconds: float) -> dict[str, float]:
    """One point of the per-batch curves (``batch/...``; the logger's cadence, a few host reads):
    the current domain's running ``accuracy`` (%), per selection stage the running ``kept_pct`` and
    ``precision`` (%), the window's mean ``loss``, mean prediction ``entropy`` (nats),
    ``effective_classes`` (exp of the entropy of the predicted-class histogram), the method's mean
    call time ``step_time_ms`` and the wall ``batch_time_ms``, and the counters ``steps``,
    ``skipped`` (empty or non-finite) and ``guard_resets``."""
    snap = monitor.snapshot(method)
    out: dict[str, Any] = {"batch/accuracy": 100 * domain.running_accuracy(), "batch/loss": snap["loss"],
                           "batch/entropy": snap["entropy"], "batch/effective_classes": snap["effective_classes"],
                           "batch/batch_time_ms": 1000 * batch_seconds}
    if snap["latency_s"]:
        out["batch/step_time_ms"] = 1000 * sum(snap["latency_s"]) / len(snap["latency_s"])
    counters = snap["counters"]
    out["batch/steps"] = counters.get("steps")
    out["batch/skipped"] = counters.get("skipped_empty", 0) + counters.get("skipped_nonfinite", 0)
    if "guard_resets" in counters:
        out["batch/guard_resets"] = counters["guard_resets"]
    if selection is not None:
        result = selection.result()
        for key, rates in [*result["stages"].items(), ("learned", result["learned"])]:
            if rates.get("kept_frac") is not None:
                out[f"batch/kept_pct/{key}"] = 100 * rates["kept_frac"]
            if rates.get("precision") is not None:
                out[f"batch/precision/{key}"] = 100 * rates["precision"]
    return {k: float(v) for k, v in out.items() if v is not None}


def domain_point(name: str, domain: DomainMetrics) -> dict[str, float]:
    """A finished domain's row (``domain_end/<domain>/<metric>``: accuracy, NLL, ECE, ...), logged
    at the batch where it ends (one host read, at the domain boundary)."""
    return {f"domain_end/{name}/{key}": value for key, value in domain.result().items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def run(
    method: Method,
    stream: Iterable[Batch],
    *,
    source_model: nn.Module | None = None,
    reset_each_domain: bool = True,
    device: torch.device | str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    fast: bool = False,
    progress: bool = True,
    log_every: int = 10,
    open_set: bool = False,
    check_label_range: bool = True,
    resume: Mapping[str, Any] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    stream_rate: float = 0.0,
    relative_cost: float | None = None,
    logger: Any | None = None,
    per_batch_accuracy: bool = False,
) -> dict[str, Any]:
    """Adapt ``method`` online over ``stream`` and return results, counters and timings.

    Args:
        source_model: the frozen source model, evaluated on the same batches (``source_accuracy``).
        reset_each_domain: reset the method when the domain changes (``reset_each_shift``);
            ``False`` adapts continually.
        amp: bf16 autocast; channels_last / compile: speed options. fast: all three (channels_last
            for CNNs only; :mod:`tta.methods.speed`). What was used is returned under ``speed``.
        checkpoint: called with the run's progress (:meth:`tta.checkpoint.RunProgress.state_dict`)
            every ``checkpoint_every`` batches (0: never) and at the end of every domain.
        resume: such a progress: continue from there (metrics, order hash, stream position and
            wall time so far; the caller restores the method's state and the RNG states).
        stream_rate: ``eta`` of the stream-rate protocol (:mod:`tta.stream_rate`); 0 (default): the
            offline protocol, every batch adapted. relative_cost: a declared ``C`` (no timing);
            ``None``: measured per adapted batch. What happened is returned under ``stream_rate``.
        logger: a run logger (:class:`tta.loggers.RunLogger`): every ``log_every`` batches, at the
            progress bar's cadence, a point of per-batch curves (:func:`progress_point`, read from
            the device accumulators there, never in the step: a :class:`~tta.monitor.StepMonitor`
            is attached to the method for the loss, entropy and predicted classes), and at the end
            the summary rows (:func:`tta.loggers.summary_rows`).
        per_batch_accuracy: also return each batch's number of correct predictions and samples
            (``batches``: for running-window curves, the ``ccc`` setting), counted on the device
            and read once at the end (and at checkpoints).
    """
    device = torch.device(device) if device is not None else next(method.parameters()).device
    method.prepare(device=device, channels_last=channels_last, compile=compile, fast=fast)
    amp = amp or method.speed.amp  # the frozen source model too
    channels_last = channels_last or method.speed.channels_last
    if source_model is not None:
        source_model.to(device).eval().requires_grad_(False)
        if channels_last:
            source_model.to(memory_format=torch.channels_last)
    tracker = RunProgress(device, resume, checkpoint=checkpoint, every=checkpoint_every)
    rate = StreamRate(stream_rate, relative_cost) if stream_rate else None
    if rate is not None and "stream_rate" in tracker.extra:
        rate.load_state_dict(tracker.extra["stream_rate"])
    batches = _BatchCounts(tracker.extra.get("batches")) if per_batch_accuracy else None
    if rate is not None or batches is not None:
        tracker.extra_state = lambda: {**({"stream_rate": rate.state_dict()} if rate is not None else {}),
                                       **({"batches": batches.state_dict()} if batches is not None else {})}
    metrics: dict[str, DomainMetrics] = tracker.metrics
    # selection diagnostics: methods that learn from the samples of a batch (not the per-image view family)
    track_selection = bool(getattr(method, "learns", False)) and getattr(method, "policy_level", "") == "samples"
    selection: dict[str, SelectionMetrics] = tracker.selection
    order = tracker.order
    total = len(stream) if hasattr(stream, "__len__") else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=tracker.position, desc=method.name, unit="batch", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    current = tracker.current
    point = _PointClock(start, tracker.done) if logger is not None else None
    monitor = None
    if logger is not None:
        from .monitor import watch

        monitor = watch(method)
    step = tracker.done  # batches done (the logged points' step)
    for i, batch in enumerate(tracker.batches(stream), start=tracker.done):
        step = i + 1
        if check_label_range and batch.labels.device.type == "cpu":
            check_labels(batch.labels, method.num_classes, open_set)
        if batch.domain != current:
            tracker.domain_end(stream, current)
            if logger is not None and current is not None:  # the finished domain's row, as it ends
                logger.log_metrics(i, domain_point(current, metrics[current]))
            if current is not None and reset_each_domain:
                method.reset()
                if rate is not None:
                    rate.reset()  # a new episode: the reference runs each domain in its own process
            current = batch.domain
            metrics.setdefault(current, DomainMetrics(device, paper_ece=getattr(method, "paper_ece", None)))
        order.update(batch.domain, batch.ids)
        x = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        adapted = True
        with _autocast(device, amp):
            if rate is None:
                logits = method(x, ids=batch.ids, domain=batch.domain)
            elif rate.adapts():
                logits = rate.adapt_timed(lambda: method(x, ids=batch.ids, domain=batch.domain),
                                          lambda: method.predict_only(x), device, current)
            else:  # missed: predicted by the current model, nothing changes
                logits = method.predict_only(x)
                rate.missed(i, current)
                adapted = False
            source_logits = None
            if source_model is not None:
                with torch.no_grad():
                    source_logits = source_model(x)
        metrics[current].update(logits, labels, source_logits)
        if batches is not None:
            batches.update(logits, labels)
        if track_selection and adapted:  # the method's stage masks of this batch, on the device
            stages = method.__dict__.pop("last_selection", None) or {}
            selection.setdefault(current, SelectionMetrics(device)).update(stages, logits, labels)
            memory = method.__dict__.pop("last_memory", None)  # a sample memory's events of this batch
            if memory is not None:
                selection[current].update_memory(memory, labels)
        tracker.batch_done(stream, current)  # the stream position; a checkpoint every ``checkpoint_every``
        if bar is not None:
            bar.update(1)
            if (i + 1) % log_every == 0:
                bar.set_postfix(domain=current, acc=f"{metrics[current].running_accuracy():.3f}")
        if point is not None and (i + 1) % log_every == 0:  # the host reads the device values here only
            logger.log_metrics(i + 1, progress_point(method, monitor, metrics[current],
                                                     selection.get(current) if track_selection else None,
                                                     point.tick(i + 1)))
    tracker.domain_end(stream, current)  # the last domain's end
    if logger is not None and current in metrics:
        logger.log_metrics(step, domain_point(current, metrics[current]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = tracker.wall_before + time.perf_counter() - start  # earlier sessions of a resumed run included
    if bar is not None:
        bar.close()
    domains = {name: m.result() for name, m in metrics.items()}
    summarize = getattr(stream, "summarize", None)  # a setting may score its domains its own way (forgetting)
    results = summarize(domains) if callable(summarize) else {"mean": mean_over_domains(domains), "domains": domains}
    selection_record = selection_summary(selection) if track_selection else None
    if logger is not None:
        from .loggers import summary_rows

        logger.log_summary({**summary_rows(results, selection_record), "wall_time_s": wall})
    return {
        "results": results,
        "stats": method.stats(),
        "order_hash": order.hexdigest(),
        "wall_time_s": wall,
        "peak_memory_mb": peak_memory_mb(device),
        "speed": {**method.speed.as_dict(), "amp": amp, "channels_last": channels_last},
        "selection": selection_record,
        "stream_rate": rate.record() if rate is not None else None,
        "batches": batches.state_dict() if batches is not None else None,
    }


class _BatchCounts:
    """Correct predictions and samples per batch: device counts, read on the host only on request."""

    def __init__(self, saved: Mapping[str, Any] | None = None):
        self.correct: list[Any] = list((saved or {}).get("correct") or [])  # ints, then device tensors
        self.samples: list[int] = list((saved or {}).get("samples") or [])
        self._read = len(self.correct)  # entries before this one are ints already

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct.append((logits.argmax(1) == labels).sum())
        self.samples.append(int(labels.shape[0]))

    def state_dict(self) -> dict[str, list[int]]:
        if self._read < len(self.correct):  # one transfer for the counts since the last read
            self.correct[self._read:] = [int(v) for v in torch.stack(self.correct[self._read:]).tolist()]
            self._read = len(self.correct)
        return {"correct": list(self.correct), "samples": list(self.samples)}
