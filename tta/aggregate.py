"""Runs of a sweep grouped into cells: the runs that differ only in their seed, with mean ± std.

A *cell* is one configuration of a sweep (method, extra policies, setting, model, ...); its runs are
the seeds. For each cell the report gives the mean and the sample standard deviation (``n - 1``)
over seeds, and the number of seeds. Two methods whose difference in a column is no larger than
the larger of their two standard deviations cannot be told apart with these seeds:
:func:`within_spread` says so, and the report marks them.

Everything here reads run records (``run.json`` as dicts) only.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

#: config keys that never make two runs different configurations (what is observed and where it is
#: written, not what is computed)
IGNORED = ("seed", "progress", "device", "hydra", "logger", "log_every", "logger_options", "checkpoint_every",
           "resume", "overwrite")


def _pooled_or_domain(block: dict[str, Any] | None, field_name: str, domain: str | None) -> Any:
    """``field_name`` of a diagnostics block (``{"mean": ..., "domains": {...}}``): pooled over domains
    (``domain=None``) or of one domain; ``None`` where the block or the value is missing."""
    if not block:
        return None
    block = block.get("mean") if domain is None else block.get("domains", {}).get(domain)
    return (block or {}).get(field_name)


@dataclass
class Stat:
    """Mean and sample standard deviation of one quantity over the seeds of a cell."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat":
        xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``72.7 ± 0.3`` (``–`` when missing; no ± for a single value)."""
        if self.mean is None:
            return "–"
        text = f"{scale * self.mean:.{digits}f}"
        return text if self.std is None else f"{text} ± {scale * self.std:.{digits}f}"


@dataclass
class Cell:
    """The runs of one configuration (its seeds)."""

    label: str
    descriptor: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    full: dict[str, Any] = field(default_factory=dict)  # every config key of the runs (:func:`descriptor`)

    @property
    def seeds(self) -> list[Any]:
        return [r.get("config", {}).get("seed") for r in self.records]

    def metric(self, metric: str = "accuracy", domain: str | None = None) -> Stat:
        """``metric`` of ``domain`` (``None``: the run's mean over domains) over the seeds."""
        def value(record: dict[str, Any]) -> float | None:
            results = record.get("results", {})
            block = results.get("mean", {}) if domain is None else results.get("domains", {}).get(domain, {})
            return block.get(metric)
        return Stat.of(value(r) for r in self.records)

    def selection(self, field_name: str, stage: str | None = None, domain: str | None = None) -> Stat:
        """A selection rate (``kept_frac``, ``precision``, ...) of the learned-from samples (``stage=None``)
        or of one stage, pooled over domains (``domain=None``) or of one domain, over the seeds."""
        def value(record: dict[str, Any]) -> float | None:
            selection = record.get("selection") or {}
            block = selection.get("learned") if stage is None else (selection.get("policies") or {}).get(stage)
            return _pooled_or_domain(block, field_name, domain)
        return Stat.of(value(r) for r in self.records)

    def memory(self, field_name: str, domain: str | None = None) -> Stat:
        """A sample memory's diagnostic (``admitted_frac``, ``evicted``, ``precision``, ...; run.json's
        ``selection.memory``), pooled over domains (``domain=None``) or of one domain, over the seeds."""
        return Stat.of(_pooled_or_domain((r.get("selection") or {}).get("memory"), field_name, domain)
                       for r in self.records)

    @property
    def has_memory(self) -> bool:
        return any(((r.get("selection") or {}).get("memory")) for r in self.records)

    @property
    def stages(self) -> list[str]:
        for record in self.records:
            selection = record.get("selection") or {}
            if selection.get("stages") is not None:
                return list(selection["stages"])
        return []

    @property
    def learns(self) -> bool:
        return any(r.get("selection") for r in self.records)


def method_label(record: dict[str, Any]) -> str:
    """The method and its extra policies: ``eata+plpd``."""
    config = record.get("config", {})
    method = (record.get("method") or {}).get("method") or (config.get("method") or {}).get("name", "?")
    extra = (config.get("policies") or {}).get("extra") or []
    return method + ("+" + "+".join(extra) if extra else "")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value}


def descriptor(record: dict[str, Any]) -> dict[str, Any]:
    """The configuration of a run as flat keys, without the seed: ``method`` (with extra policies),
    ``model`` (the spec actually loaded), ``setting`` and every other config key."""
    flat = _flatten(record.get("config", {}))
    for key in list(flat):
        if key.split(".")[0] in IGNORED:
            del flat[key]
    flat.pop("method.name", None)
    flat.pop("policies.extra", None)
    flat["method"] = method_label(record)
    flat["model"] = (record.get("model") or {}).get("spec") or flat.get("model")
    flat["setting"] = flat.pop("setting.name", None) or (record.get("stream") or {}).get("setting")
    if flat["setting"] != "ccc":  # the ccc options (top level, or a data config's) shape only that setting's stream
        for key in [k for k in flat if k.startswith(("ccc.", "data.ccc."))]:
            del flat[key]
    else:  # ... which walks its own corruptions and severities
        flat.pop("data.corruptions", None)
        flat.pop("severity", None)
    return flat


def _determined(key: str, by: Sequence[str], group: Sequence[dict[str, Any]]) -> bool:
    """Whether ``key`` has one value for every combination of the values of ``by`` in ``group``."""
    seen: dict[str, str] = {}
    for d in group:
        ident = json.dumps([d.get(k) for k in by], default=str)
        value = json.dumps(d.get(key), default=str)
        if seen.setdefault(ident, value) != value:
            return False
    return True


def varying_keys(descriptors: Sequence[dict[str, Any]]) -> list[str]:
    """Keys (other than ``method``) that tell the cells of one method apart, fewest first: a key whose
    value follows from keys already listed (``setting.batch_size`` from ``setting``; ``data.subset``
    when only the ``bs1`` runs set it) is left out, and so are ``method.*`` keys that differ only
    *between* methods."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for d in descriptors:
        by_method.setdefault(d["method"], []).append(d)
    first = ("model", "setting")  # a stable, readable order
    keys: list[str] = []
    for group in by_method.values():
        varying = sorted({k for d in group for k in d if k != "method"
                          and len({json.dumps(x.get(k), default=str) for x in group}) > 1},
                         key=lambda k: (k not in first, first.index(k) if k in first else 0, k.count("."), k))
        kept: list[str] = []
        for key in varying:
            if not kept or not _determined(key, kept, group):
                kept.append(key)
        keys += [k for k in kept if k not in keys]
    return [k for k in first if k in keys] + sorted(k for k in keys if k not in first)


def determined_by(descriptors: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Keys outside ``keys`` that vary and whose value follows from ``keys``:
    ``{key: {json list of the values of keys: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    names = {k for d in descriptors for k in d} - set(keys) - {"method"}
    for key in sorted(names):
        if key.startswith("method."):
            continue
        if len({json.dumps(d.get(key), default=str) for d in descriptors}) < 2:
            continue
        if _determined(key, list(keys), descriptors):
            out[key] = {json.dumps([d.get(k) for k in keys], default=str): d.get(key) for d in descriptors}
    return out


def group_cells(records: Sequence[dict[str, Any]]) -> tuple[list[Cell], list[str]]:
    """Cells in order of first appearance, and the keys (besides ``method``) that label them."""
    descriptors = [descriptor(r) for r in records]
    keys = varying_keys(descriptors)
    cells: dict[str, Cell] = {}
    for record, desc in zip(records, descriptors):
        identity = json.dumps(desc, sort_keys=True, default=str)
        if identity not in cells:
            parts = [desc["method"]] + [f"{k}={desc.get(k)}" for k in keys]
            cells[identity] = Cell(" · ".join(str(p) for p in parts), {k: desc.get(k) for k in ["method", *keys]},
                                   full=desc)
        cells[identity].records.append(record)
    return list(cells.values()), keys


def within_spread(a: Stat, b: Stat) -> bool:
    """Whether ``a`` and ``b`` differ by no more than the larger of their standard deviations (so the
    seeds cannot tell them apart). ``False`` when either has no spread (fewer than two seeds)."""
    if a.mean is None or b.mean is None or a.std is None or b.std is None:
        return False
    return abs(a.mean - b.mean) <= max(a.std, b.std)


def marks(stats: Sequence[Stat], higher_is_better: bool = True) -> list[str]:
    """Per entry: ``"best"``, ``"tie"`` (within the spread of the best: :func:`within_spread`) or ``""``."""
    present = [(i, s) for i, s in enumerate(stats) if s.mean is not None]
    out = [""] * len(stats)
    if len(present) < 2:
        return out
    best_i, best = (max if higher_is_better else min)(present, key=lambda item: item[1].mean)
    out[best_i] = "best"
    for i, s in present:
        if i != best_i and within_spread(s, best):
            out[i] = "tie"
    return out


__all__ = ["Cell", "IGNORED", "Stat", "descriptor", "determined_by", "group_cells", "marks", "method_label",
           "varying_keys", "within_spread"]
