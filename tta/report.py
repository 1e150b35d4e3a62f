"""Tables and figures from run records, and the merge of a sweep.

    python -m tta.report <sweep dir or run dirs...> [--out DIR] [--metric accuracy]

finds every ``run.json`` below the given folders and writes one table (methods/policies x domains,
mean last) as ``report.md``, and a bar chart of the means as ``report.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

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
            found.extend(sorted(path.rglob("run.json")))
    if not found:
        raise FileNotFoundError(f"no run.json found under {', '.join(map(str, paths))}")
    return found


def sweep_table(records: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """Markdown: one row per run, one column per domain, then the mean; first row the source model."""
    domains: list[str] = []
    for record in records:
        for name in record["results"]["domains"]:
            if name not in domains:
                domains.append(name)
    short = [d.split("/")[0] for d in domains]
    header = "| run | " + " | ".join(short) + " | mean |"
    rows = [header, "|---|" + "---:|" * (len(domains) + 1)]
    first = records[0]["results"]
    has_source_run = any(record.get("method", {}).get("method") == "source" for record in records)
    if metric == "accuracy" and "source_accuracy" in first["mean"] and not has_source_run:
        cells = [_pct(first["domains"].get(d, {}).get("source_accuracy")) for d in domains]
        rows.append("| source | " + " | ".join(cells) + f" | {_pct(first['mean']['source_accuracy'])} |")
    for record in records:
        res = record["results"]
        cells = [_pct(res["domains"].get(d, {}).get(metric)) for d in domains]
        rows.append(f"| {run_label(record)} | " + " | ".join(cells) + f" | {_pct(res['mean'].get(metric))} |")
    return "\n".join(rows)


def sweep_chart(records: list[dict[str, Any]], path: Path, metric: str = "accuracy") -> None:
    """One bar per run: the mean of ``metric`` over domains (with the source model first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [run_label(r) for r in records]
    values = [100 * r["results"]["mean"].get(metric, float("nan")) for r in records]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(labels)), 3.6))
    ax.bar(range(len(labels)), values, color="#1f77b4")
    first = records[0]["results"]["mean"]
    if metric == "accuracy" and "source_accuracy" in first:
        ax.axhline(100 * first["source_accuracy"], color="#9aa5b1", linestyle="--", label="source")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"mean {metric}" + (" (%)" if metric in ("accuracy", "ece") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tta.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="sweep folders, run folders or run.json files")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md/.png (default: first path)")
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "ece", "nll"])
    args = parser.parse_args(argv)
    records = [read_json(p) for p in find_runs(args.paths)]
    table = sweep_table(records, args.metric)
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table + "\n")
    sweep_chart(records, out / "report.png", args.metric)
    print(table)
    print(f"\nwrote {out / 'report.md'} and {out / 'report.png'}")


if __name__ == "__main__":
    main()
