"""Accuracy over a long stream: running-window curves with periodic resets marked.

CCC's figures (Press et al., NeurIPS 2023) plot accuracy over a running window of 781 batches
(about 50,000 images at batch 64; the maintainer in oripress/CCC#10). Runs that record per-batch
counts (``run.json``'s ``batches``: correct predictions and samples per batch; the ``ccc`` setting
records them) get such a curve: :func:`running_window` is the accuracy over the last ``window``
batches (over the batches so far while fewer than ``window`` have passed), sample-weighted. A
method with a periodic reset (``reset_every``, e.g. RDumb) is reset before every ``reset_every``-th
batch (:mod:`tta.methods.periodic`); :func:`reset_batches` gives those positions for the figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def running_window(correct: Sequence[int], samples: Sequence[int], window: int) -> np.ndarray:
    """Accuracy (%) over the last ``window`` batches at every batch (fewer at the start)."""
    correct = np.asarray(correct, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    if len(correct) == 0:
        return np.zeros(0)
    window = max(1, int(window))
    c, s = np.concatenate([[0.0], np.cumsum(correct)]), np.concatenate([[0.0], np.cumsum(samples)])
    end = np.arange(1, len(correct) + 1)
    start = np.maximum(0, end - window)
    return 100.0 * (c[end] - c[start]) / np.maximum(s[end] - s[start], 1.0)


def window_of(record: dict[str, Any]) -> int:
    return int(((record.get("stream") or {}).get("ccc") or {}).get("window_batches") or 781)


def reset_batches(record: dict[str, Any]) -> list[int]:
    """Batch numbers (0-based) before which a ``reset_every`` method was reset (offline protocol;
    under a stream rate only adapted batches count, so the positions are not recorded)."""
    every = int((record.get("method") or {}).get("reset_every") or 0)
    total = len((record.get("batches") or {}).get("samples") or [])
    if not every or (record.get("stream_rate") or None):
        return []
    return list(range(every, total, every))


def curve_label(record: dict[str, Any]) -> str:
    config = record.get("config", {})
    method = (record.get("method") or {}).get("method") or config.get("method", {}).get("name", "?")
    extra = config.get("policies", {}).get("extra") or []
    return method + ("+" + "+".join(extra) if extra else "")


def curve_chart(records: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """One running-window curve per configuration (mean over its seeds, each on its own stream),
    resets as dotted vertical lines; ``False`` (nothing written) when no record has per-batch counts."""
    runs = [r for r in records if (r.get("batches") or {}).get("samples")]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = {}
    for record in runs:
        groups.setdefault(curve_label(record), []).append(record)
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    windows = set()
    for k, (label, members) in enumerate(groups.items()):
        curves = [running_window(r["batches"]["correct"], r["batches"]["samples"], window_of(r)) for r in members]
        windows.update(window_of(r) for r in members)
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        color = f"C{k % 10}"
        suffix = f" ({len(members)} seeds)" if len(members) > 1 else ""
        ax.plot(np.arange(length), mean, color=color, linewidth=1.2, label=f"{label}{suffix}")
        for position in reset_batches(members[0]):
            if position < length:
                ax.axvline(position, color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel("batch")
    ax.set_ylabel(f"accuracy (%), running window of {'/'.join(str(w) for w in sorted(windows))} batches")
    ax.set_ylim(0, 100)
    ax.set_title(title + " (dotted: periodic resets)" if any(reset_batches(r) for r in runs) else title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def curve_summary(record: dict[str, Any]) -> str:
    """One line: the stream, its accuracy over the whole stream, and the window's last value."""
    info = (record.get("stream") or {}).get("ccc") or {}
    batches = record.get("batches") or {}
    if not info or not batches.get("samples"):
        return ""
    total = sum(batches["samples"])
    accuracy = 100.0 * sum(batches["correct"]) / max(total, 1)
    cut = (f", truncated: {total:,} of the reference's {info.get('reference_length', 0):,} images"
           if info.get("truncated") else "")
    resets = reset_batches(record)
    return (f"{info.get('benchmark', 'ccc')} {info.get('difficulty')}, speed {info.get('speed')}, walk target "
            f"{info.get('target_accuracy')} % ({info.get('calibration', {}).get('origin')} calibration): accuracy over "
            f"the stream {accuracy:.1f} % ({len(batches['samples'])} batches{cut}); running window "
            f"{window_of(record)} batches" + (f"; {len(resets)} periodic resets" if resets else ""))
