"""Tables and figures from run records, and the merge of a sweep.

    python -m tta.report <sweep dir or run dirs...> [--out DIR] [--metric accuracy] [--pivot setting,model]

finds every ``run.json`` below the given folders and writes ``report.md``: one table (runs x domains,
mean last), a table of what each learning method learned from (the fraction of samples its
selection kept and the precision of their pseudo-labels, stage by stage), and with ``--pivot`` a
matrix of the mean (rows: methods, columns: the values of the pivot keys), and for runs under a stream
rate (``eval.stream_rate``, :mod:`tta.stream_rate`) their accuracy next to the same configuration's
offline accuracy. Runs that differ only in
their seed are one row: mean ± sample standard deviation over the seeds, the number of seeds, the
best value of each column in bold and ``≈`` on values within the seed spread of the best
(:mod:`tta.aggregate`). Figures: ``report.png`` (the mean per row) and ``selection.png``
(precision of the learned-from samples against the fraction kept, per method).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .aggregate import Cell, Stat, determined_by, group_cells, marks
from .curves import curve_chart
from .record import read_json


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def domain_table(results: dict[str, Any], selection: dict[str, Any] | None = None) -> str:
    """Markdown table of one run: domain x {source, adapted} accuracy (%), mean last.

    With the run's ``selection`` (run.json), two more columns: the percentage of samples the method
    learned from (``kept %``) and the accuracy of their predictions (``precision``: how often the
    pseudo-label it learns from is right)."""
    learned = (selection or {}).get("learned") or {}
    columns = "| domain | source | adapted | Δ |" + (" kept % | precision |" if learned else "")
    rows = [columns, "|---|---:|---:|---:|" + ("---:|---:|" if learned else "")]
    items = list(results["domains"].items()) + [("**mean**", results["mean"])]
    for name, r in items:
        src, acc = r.get("source_accuracy"), r.get("accuracy")
        delta = f"{100 * (acc - src):+.1f}" if src is not None and acc is not None else "–"
        row = f"| {name} | {_pct(src)} | {_pct(acc)} | {delta} |"
        if learned:
            sel = learned["mean"] if name == "**mean**" else learned.get("domains", {}).get(name, {})
            row += f" {_pct(sel.get('kept_frac'))} | {_pct(sel.get('precision'))} |"
        rows.append(row)
    return "\n".join(rows)


def stream_rate_summary(rate: dict[str, Any] | None) -> str:
    """One line about a run's stream-rate evaluation (run.json's ``stream_rate``; empty when offline)."""
    if not rate:
        return ""
    total = rate["batches_adapted"] + rate["batches_skipped"]
    if rate.get("mode") == "declared":
        cost = f"declared relative cost C = {rate['relative_cost']:g}"
    else:
        m = rate.get("measured_cost") or {}
        cost = ("measured relative cost C: median {median:.2f} (quartiles {q25:.2f}-{q75:.2f}, min {min:.2f}, "
                "max {max:.2f})").format(**m) if m else "no batch adapted"
    return (f"stream rate η = {rate['eta']:g} (Alfarra et al., ICML 2024): {cost}; {rate['batches_adapted']} of "
            f"{total} batches adapted, {rate['batches_skipped']} predicted without adapting")


def bar_chart(results: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars per domain: source vs adapted accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["domains"]) + ["mean"]
    rows = list(results["domains"].values()) + [results["mean"]]
    adapted = [100 * r.get("accuracy", 0.0) for r in rows]
    source = [100 * r.get("source_accuracy", 0.0) for r in rows]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names)), 3.8))
    ax.bar([x - 0.2 for x in xs], source, width=0.4, label="source", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], adapted, width=0.4, label="adapted", color="#1f77b4")
    ax.set_xticks(list(xs), [n.split("/")[0] for n in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_label(record: dict[str, Any]) -> str:
    config = record.get("config", {})
    method = record.get("method", {}).get("method") or config.get("method", {}).get("name", "?")
    extra = config.get("policies", {}).get("extra") or []
    label = method + ("+" + "+".join(extra) if extra else "")
    seed = config.get("seed")
    return f"{label} (seed {seed})" if seed not in (None, 0) else label


def find_runs(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name == "run.json":
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("run.json"), key=_natural))
    if not found:
        raise FileNotFoundError(f"no run.json found under {', '.join(map(str, paths))}")
    return found


def unfinished_runs(paths: Sequence[Path],
                    records: Sequence[tuple[Path, dict[str, Any]]] = ()) -> list[tuple[str, str, str]]:
    """Runs below ``paths`` that did not finish, as ``(folder, status, detail)``: ``failed`` (a
    ``run.json`` with ``"status": "failed"``: the error) and ``incomplete`` (a run folder with
    ``.hydra/`` but no ``run.json``: killed, or still running; a ``checkpoint.pt`` there means
    ``resume=true`` continues it)."""
    out: list[tuple[str, str, str]] = []
    for path, record in records:
        status = record.get("status", "finished")
        if status != "finished":
            error = record.get("error") or {}
            detail = f"{error.get('type', '?')}: {error.get('message', '')}".strip()
            out.append((str(path.parent), status, detail.splitlines()[0][:200] if detail else ""))
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            continue
        for hydra in sorted(path.rglob(".hydra"), key=_natural):
            folder = hydra.parent
            if hydra.is_dir() and not (folder / "run.json").is_file() and not (folder / "multirun.yaml").is_file():
                left = "checkpoint.pt left: resume=true continues it" if (folder / "checkpoint.pt").is_file() else \
                    "no run.json and no checkpoint"
                out.append((str(folder), "incomplete", left))
    return out


def not_finished_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """Markdown list of the runs that did not finish (empty string when all did)."""
    if not rows:
        return ""
    lines = [f"## runs that did not finish ({len(rows)}; not in the tables above)", "",
             "| run folder | status | detail |", "|---|---|---|"]
    lines += [f"| {folder} | {status} | {detail.replace('|', '/')} |" for folder, status, detail in rows]
    return "\n".join(lines)


def _natural(path: Path) -> list[Any]:
    """Sort key: numbers as numbers (a sweep's job 10 after job 9)."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _pct0(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}"


def _has_seeds(cells: Sequence[Cell]) -> bool:
    return any(len(c.records) > 1 for c in cells)


def _marked(stats: list[Stat], groups: list[str], seeds: bool, higher: bool = True) -> list[str]:
    """Each stat formatted; with seeds, the best of each group in bold and ``≈`` within its spread."""
    texts = [s.format() for s in stats]
    if not seeds:
        return texts
    for group in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == group]
        for i, mark in zip(members, marks([stats[i] for i in members], higher_is_better=higher)):
            if mark == "best":
                texts[i] = f"**{texts[i]}**"
            elif mark == "tie":
                texts[i] = f"{texts[i]} ≈"
    return texts


def _group_of(cell: Cell, skip: Sequence[str] = ()) -> str:
    """Cells compared with each other: those that differ only in the method (and the ``skip`` keys)."""
    return repr(sorted((k, str(v)) for k, v in cell.descriptor.items() if k != "method" and k not in skip))


SEED_LEGEND = ("mean ± sample standard deviation over the seeds; **bold**: the best in its column among rows that "
               "differ only in the method; ≈: differs from that best by no more than the larger of the two standard "
               "deviations (the seeds cannot tell them apart)")


def sweep_table(records: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """Markdown: one row per configuration, one column per domain, then the mean; first row the source
    model. Runs that differ only in their seed share a row (mean ± std, a ``seeds`` column, marks)."""
    domains: list[str] = []
    for record in records:
        for name in record["results"]["domains"]:
            if name not in domains:
                domains.append(name)
    cells, keys = group_cells(records)
    seeds = _has_seeds(cells)
    has_source_run = any(record.get("method", {}).get("method") == "source" for record in records)
    with_source = metric == "accuracy" and "source_accuracy" in records[0]["results"]["mean"] and not has_source_run
    source_column = with_source and bool(keys)  # the source model differs between rows (model, setting, ...)
    short = [d.split("/")[0] for d in domains]
    header = ("| run | " + " | ".join(short) + " | mean |" + (" source |" if source_column else "")
              + (" seeds |" if seeds else ""))
    rows = [header, "|---|" + "---:|" * (len(domains) + 1 + source_column + seeds)]
    first = cells[0]
    if with_source and not source_column:
        texts = [first.metric("source_accuracy", d).format() for d in domains]
        texts.append(first.metric("source_accuracy").format())
        rows.append("| source | " + " | ".join(texts) + " |" + (f" {len(first.records)} |" if seeds else ""))
    groups = [_group_of(c) for c in cells]
    columns = [_marked([c.metric(metric, domain) for c in cells], groups, seeds, higher=metric == "accuracy")
               for domain in [*domains, None]]
    for i, cell in enumerate(cells):
        row = f"| {cell.label} | " + " | ".join(col[i] for col in columns) + " |"
        row += f" {cell.metric('source_accuracy').format()} |" if source_column else ""
        rows.append(row + (f" {len(cell.records)} |" if seeds else ""))
    return "\n".join(rows) + (f"\n\n{SEED_LEGEND}" if seeds else "")


def selection_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per learning configuration, the percentage of samples it learned from (``kept %``),
    the precision of their pseudo-labels, the accuracy on the samples it dropped, and the kept
    percentage after each selection stage (pooled over domains; mean ± std over seeds). Configurations
    that train from a sample memory get a second table: the percentage of the stream admitted, the
    samples evicted and trained on (per run), and the precision of the pseudo-labels trained on."""
    cells, _ = group_cells(records)
    cells = [c for c in cells if c.learns]
    if not cells:
        return ""
    seeds = _has_seeds(cells)
    rows = ["| run | kept % | precision | dropped, accuracy | kept % after each stage |" + (" seeds |" if seeds else ""),
            "|---|---:|---:|---:|---|" + ("---:|" if seeds else "")]
    for cell in cells:
        stages = " → ".join(f"{k} {cell.selection('kept_frac', stage=k).format()}" for k in cell.stages) or "(every sample)"
        row = (f"| {cell.label} | {cell.selection('kept_frac').format()} | {cell.selection('precision').format()} | "
               f"{cell.selection('dropped_accuracy').format()} | {stages} |")
        rows.append(row + (f" {len(cell.records)} |" if seeds else ""))
    memory = [c for c in cells if c.has_memory]
    if memory:  # methods that train from a sample memory: what entered, what left, what it taught
        rows += ["", "| run (sample memory) | admitted % | evicted | trained on | memory precision |"
                 + (" seeds |" if seeds else ""), "|---|---:|---:|---:|---:|" + ("---:|" if seeds else "")]
        for cell in memory:
            row = (f"| {cell.label} | {cell.memory('admitted_frac').format()} | {cell.memory('evicted').format(1, 0)} | "
                   f"{cell.memory('trained').format(1, 0)} | {cell.memory('precision').format()} |")
            rows.append(row + (f" {len(cell.records)} |" if seeds else ""))
    return "\n".join(rows)


def _column_title(keys: Sequence[str], values: tuple[str, ...]) -> str:
    """A pivot column's title: the first key's value, then ``key=value`` for the others, leaving out
    unset or off values (``eval.stream_rate`` 0: the offline protocol) — e.g. ``reset_each_shift``,
    ``reset_each_shift · stream_rate=1``."""
    parts = [values[0]] + [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in zip(keys[1:], values[1:])
                           if value not in ("None", "0", "0.0", "False")]
    return " · ".join(parts)


def pivot_table(records: list[dict[str, Any]], columns: Sequence[str], metric: str = "accuracy") -> str:
    """Markdown matrix: rows = configurations without the ``columns`` keys (e.g. methods), columns = the
    values of ``columns`` (e.g. ``setting``, ``model``); each entry the mean ``metric`` over domains
    (mean ± std over seeds), then, for learning methods, ``kept % / precision`` of the learned-from samples.

    A key whose value is fixed by the column (``data.subset`` set for ``bs1`` only) does not split the
    rows; the legend lists it. Without ``source`` runs, a first row gives the frozen source model's
    accuracy (``source_accuracy`` of the runs in that column)."""
    cells, keys = group_cells(records)
    unknown = [k for k in columns if k not in keys]
    if unknown:
        raise ValueError(f"pivot keys {unknown} do not vary in these runs; keys that do: {', '.join(keys) or 'none'}")
    col_of = {id(c): tuple(str(c.descriptor.get(k)) for k in columns) for c in cells}
    fixed = {k: v for k, v in determined_by([c.full for c in cells], list(columns)).items()
             if not any(k.startswith(f"{c}.") for c in columns)}  # e.g. data.subset set for bs1 only
    row_keys = [k for k in keys if k not in columns and k not in fixed]
    col_values: list[tuple[str, ...]] = []
    row_values: list[tuple[str, ...]] = []
    table: dict[tuple[tuple[str, ...], tuple[str, ...]], Cell] = {}
    for cell in cells:
        col = col_of[id(cell)]
        row = (cell.descriptor["method"],) + tuple(f"{k}={cell.descriptor.get(k)}" for k in row_keys)
        col_values += [col] if col not in col_values else []
        row_values += [row] if row not in row_values else []
        table[(row, col)] = cell
    if columns[0] == "setting":  # the settings in the order they are declared (tta.data.settings), then as met
        from .data.settings import SETTING_DEFAULTS
        order = list(SETTING_DEFAULTS)
        col_values.sort(key=lambda c: order.index(c[0]) if c[0] in order else len(order))
    # stable: methods keep their order of first appearance within each group of other keys, and the
    # cross combinations (a method with another's policy: "tent+rotta_memory") come after the methods
    row_values.sort(key=lambda r: (r[1:], "+" in r[0]))
    seeds = _has_seeds(cells)
    texts: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}
    for col in col_values:
        present = [r for r in row_values if (r, col) in table]
        stats = [table[(r, col)].metric(metric) for r in present]
        marked = _marked(stats, [repr(r[1:]) for r in present], seeds, higher=metric == "accuracy")
        for r, text in zip(present, marked):
            cell = table[(r, col)]
            if cell.learns:
                kept, precision = cell.selection("kept_frac").mean, cell.selection("precision").mean
                text += f" · {_pct0(kept)}/{_pct0(precision)}"
            texts[(r, col)] = text
    if metric == "accuracy" and not any(r[0] == "source" for r in row_values):
        for group in dict.fromkeys(r[1:] for r in row_values):
            source = ("source (frozen)",) + group
            for col in col_values:
                first = next((table[(r, col)] for r in row_values if r[1:] == group and (r, col) in table), None)
                if first is not None:
                    texts[(source, col)] = first.metric("source_accuracy").format()
            row_values.insert(next(i for i, r in enumerate(row_values) if r[1:] == group), source)
    header = "| run | " + " | ".join(_column_title(columns, c) for c in col_values) + " |"
    rows = [header, "|---|" + "---:|" * len(col_values)]
    for r in row_values:
        rows.append(f"| {' · '.join(r)} | " + " | ".join(texts.get((r, c), "–") for c in col_values) + " |")
    legend = (f"each entry: mean {metric} (%) over domains" + (" (" + SEED_LEGEND + ")" if seeds else "")
              + "; for learning methods then · kept % / precision % of the samples learned from (means over seeds)")
    by_value: dict[tuple[str, str], list[str]] = {}  # one note per (key, value), naming all its columns
    for k, values in fixed.items():
        for col, v in values.items():
            if v is not None:
                by_value.setdefault((k, str(v)), []).append(_column_title(columns, tuple(str(x) for x in json.loads(col))))
    notes = [f"{k}={v} for {', '.join(cols)}" for (k, v), cols in by_value.items()]
    if notes:
        legend += "; set per column: " + ", ".join(notes)
    return "\n".join(rows) + "\n\n" + legend


def sweep_chart(records: list[dict[str, Any]], path: Path, metric: str = "accuracy") -> None:
    """One bar per configuration: the mean of ``metric`` over domains (error bars: std over seeds),
    with the source model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, _ = group_cells(records)
    labels = [c.label for c in cells]
    stats = [c.metric(metric) for c in cells]
    values = [float("nan") if s.mean is None else 100 * s.mean for s in stats]
    errors = [0.0 if s.std is None else 100 * s.std for s in stats]
    fig, ax = plt.subplots(figsize=(min(40.0, max(5.0, 0.45 * len(labels))), 4.0))
    ax.bar(range(len(labels)), values, yerr=errors if any(errors) else None, color="#1f77b4", capsize=2)
    first = records[0]["results"]["mean"]
    if metric == "accuracy" and "source_accuracy" in first:
        ax.axhline(100 * first["source_accuracy"], color="#9aa5b1", linestyle="--", label="source")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"mean {metric}" + (" (%)" if metric in ("accuracy", "ece") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_chart(records: list[dict[str, Any]], path: Path) -> bool:
    """Per learning configuration: the precision of the samples it learned from against the fraction
    of samples kept (pooled over domains; mean over seeds, error bars: std). One colour per method,
    one panel per model when the runs use several. Returns ``False`` (no file) when no run learned."""
    cells, keys = group_cells(records)
    cells = [c for c in cells if c.learns]
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(str(c.descriptor.get("model")) for c in cells)) if "model" in keys else [None]
    methods = list(dict.fromkeys(c.descriptor["method"] for c in cells))
    settings = list(dict.fromkeys(str(c.descriptor.get("setting")) for c in cells)) if "setting" in keys else [None]
    colours = plt.get_cmap("tab10")
    shapes = "osD^vP*Xh<>"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 4.2), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for cell in cells:
            if panel is not None and str(cell.descriptor.get("model")) != panel:
                continue
            kept, precision = cell.selection("kept_frac"), cell.selection("precision")
            if kept.mean is None or precision.mean is None:
                continue
            m = methods.index(cell.descriptor["method"])
            shape = shapes[settings.index(str(cell.descriptor.get("setting"))) % len(shapes)] if settings != [None] else "o"
            ax.errorbar(100 * kept.mean, 100 * precision.mean, xerr=None if kept.std is None else 100 * kept.std,
                        yerr=None if precision.std is None else 100 * precision.std, fmt=shape, color=colours(m % 10),
                        markersize=6, capsize=2, alpha=0.85)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(0, 130)
        ax.set_xticks([0, 1, 10, 100], ["0", "1", "10", "100"])
        ax.set_ylim(0, 102)
        ax.set_xlabel("samples learned from (%)")
        ax.set_title(panel or "", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision of their pseudo-labels (%)")
    handles = [plt.Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=m) for i, m in enumerate(methods)]
    if settings != [None]:
        handles += [plt.Line2D([], [], color="#555555", marker=shapes[i % len(shapes)], linestyle="", label=s)
                    for i, s in enumerate(settings)]
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _eta(cell: Cell) -> float:
    value = cell.full.get("eval.stream_rate")
    return float(value) if value else 0.0


def _stream_rate_stat(cell: Cell, what: str) -> Stat:
    """Over the seeds: the median measured relative cost (or the declared one) or the share of batches
    missed, from each run's ``stream_rate`` record."""
    def value(record: dict[str, Any]) -> float | None:
        rate = record.get("stream_rate") or {}
        if what == "cost":
            return rate.get("relative_cost") or (rate.get("measured_cost") or {}).get("median")
        total = rate.get("batches_adapted", 0) + rate.get("batches_skipped", 0)
        return rate.get("batches_skipped", 0) / total if total else None
    return Stat.of(value(r) for r in cell.records)


def stream_rate_table(records: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """Markdown: each stream-rate configuration (``eval.stream_rate`` > 0, :mod:`tta.stream_rate`) next to
    the same configuration run offline (every batch adapted), when the records hold it: the two means
    of ``metric``, their difference, the relative cost C (declared, or the median measured per adapted
    batch; mean over seeds) and the share of batches missed. Empty when no run used a stream rate."""
    cells, keys = group_cells(records)
    rated = [c for c in cells if _eta(c) > 0]
    if not rated:
        return ""

    def base(cell: Cell) -> str:
        return json.dumps(sorted((k, str(v)) for k, v in cell.full.items() if not k.startswith("eval.")))

    offline = {base(c): c for c in cells if _eta(c) == 0}
    label_keys = [k for k in keys if not k.startswith("eval.")]
    seeds = _has_seeds(cells)
    rows = ["| run | η | offline | stream rate | Δ | C | missed % |" + (" seeds |" if seeds else ""),
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if seeds else "")]
    for cell in rated:
        label = " · ".join([str(cell.descriptor["method"])] + [f"{k}={cell.descriptor.get(k)}" for k in label_keys])
        rate = cell.metric(metric)
        twin = offline.get(base(cell))
        off = twin.metric(metric) if twin is not None else None
        delta = "–"
        if off is not None and off.mean is not None and rate.mean is not None:
            delta = f"{100 * (rate.mean - off.mean):+.1f}"
        cost = _stream_rate_stat(cell, "cost")
        cost_text = "–" if cost.mean is None else f"{cost.mean:.2f}"
        declared = any((r.get("stream_rate") or {}).get("mode") == "declared" for r in cell.records)
        rows.append(f"| {label} | {_eta(cell):g} | {off.format() if off is not None else '–'} | {rate.format()} | "
                    f"{delta} | {cost_text}{' (declared)' if declared else ''} | "
                    f"{_pct(_stream_rate_stat(cell, 'missed').mean)} |" + (f" {len(cell.records)} |" if seeds else ""))
    legend = (f"mean {metric} (%) over domains, offline (every batch adapted) and under the stream rate η (Alfarra et "
              "al., ICML 2024: after each adapted batch, ceil(η·C) − 1 batches are predicted without adapting); "
              "C: relative cost of an adapted batch (adapt and predict time over a plain forward), declared or the "
              "median measured")
    return "\n".join(rows) + "\n\n" + legend


def report_text(records: list[dict[str, Any]], metric: str = "accuracy", pivot: Sequence[str] = ()) -> str:
    """The whole ``report.md``: the sweep table, the pivot matrix (``pivot`` keys) and the selection table."""
    parts = [sweep_table(records, metric)]
    if pivot:
        parts.append(f"## {metric} by {', '.join(pivot)}\n\n" + pivot_table(records, pivot, metric))
    rated = stream_rate_table(records, metric)
    if rated:
        parts.append("## offline and under a stream rate\n\n" + rated)
    selection = selection_table(records)
    if selection:
        parts.append("## what each method learned from (pooled over domains)\n\n" + selection)
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tta.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="sweep folders, run folders or run.json files")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md/.png (default: first path)")
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "ece", "nll"])
    parser.add_argument("--pivot", default="", help="comma-separated keys whose values become the columns of a "
                        "matrix, e.g. setting,model (rows: the methods)")
    args = parser.parse_args(argv)
    try:
        loaded = [(p, read_json(p)) for p in find_runs(args.paths)]
    except FileNotFoundError:
        loaded = []
    records = [r for _, r in loaded if r.get("status", "finished") == "finished"]  # failed runs: listed below
    missing = not_finished_table(unfinished_runs(args.paths, loaded))
    if not records:
        raise SystemExit(f"no finished run.json found under {', '.join(map(str, args.paths))}"
                         + (f"\n\n{missing}" if missing else ""))
    pivot = [k for k in args.pivot.split(",") if k]
    try:
        table = report_text(records, args.metric, pivot) + (f"\n\n{missing}" if missing else "")
    except ValueError as error:  # e.g. a pivot key that does not vary: the message says which keys do
        raise SystemExit(f"python -m tta.report: {error}") from None
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table + "\n")
    sweep_chart(records, out / "report.png", args.metric)
    figures = [out / "report.png"] + ([out / "selection.png"] if selection_chart(records, out / "selection.png") else [])
    figures += [out / "ccc.png"] if curve_chart(records, out / "ccc.png", "running-window accuracy") else []
    print(table)
    print(f"\nwrote {out / 'report.md'} and {' and '.join(str(f) for f in figures)}")


if __name__ == "__main__":
    main()
