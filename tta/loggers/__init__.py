"""Run loggers: follow a benchmark run or a sweep in TensorBoard, Weights & Biases or MLflow.

    python -m tta.run logger=tensorboard                  # <run folder>/tensorboard/
    python -m tta.run logger=[wandb,mlflow]               # several at once
    WANDB_MODE=offline python -m tta.run -m logger=wandb method=tent,eata   # a sweep: one W&B group

Every backend takes the same five calls (:class:`RunLogger`): the resolved configuration, the
benchmark protocol and the method's hyperparameters once (:meth:`RunLogger.log_hparams`); a point
of per-batch curves every ``log_every`` batches (:meth:`RunLogger.log_metrics`: the engine reads
the device counters at the progress bar's cadence, never in the step, :func:`tta.engine.run`); the
per-domain summary rows at the end (:meth:`RunLogger.log_summary`); the results table and figure
(:meth:`RunLogger.log_artifact`); :meth:`RunLogger.close`.

Each backend lives in its own module and imports its library only when it is built: importing
``tta`` imports none of them, and a missing library is an ``ImportError`` naming the extra to
install (``pip install "tta-toolkit[tensorboard]"``, ``[wandb]``, ``[mlflow]``).
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: logger name -> (module, class, the library it imports, the extra that installs it)
BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "tensorboard": ("tta.loggers.tensorboard_logger", "TensorBoardLogger", "tensorboard", "tensorboard"),
    "wandb": ("tta.loggers.wandb_logger", "WandbLogger", "wandb", "wandb"),
    "mlflow": ("tta.loggers.mlflow_logger", "MLflowLogger", "mlflow", "mlflow"),
}


class RunLogger:
    """What the run hands a logger (every method a no-op here; a backend overrides them).

    Args of the backends: ``out_dir`` (the run folder), ``name`` (the run's name), ``group`` (the
    sweep it belongs to, or ``None``), ``group_dir`` (the sweep folder, or ``None``), ``project``
    (W&B project, MLflow experiment) and the backend's own options.
    """

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's configuration (nested dicts are flattened to ``a/b/c`` keys)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One point of the per-batch curves, at batch ``step`` (numbers only; ``None`` is left out)."""

    def log_summary(self, summary: Mapping[str, float]) -> None:
        """The run's final numbers (per-domain rows and means), as flat ``name: value`` pairs."""

    def log_artifact(self, path: str | Path) -> None:
        """A file of the run folder (``results.md``, ``results.png``, ``run.json``)."""

    def close(self, failed: bool = False) -> None:
        """Flush and end the run (``failed``: the run raised)."""


class Loggers(RunLogger):
    """Several loggers behind one: every call goes to each, in order."""

    def __init__(self, loggers: Sequence[RunLogger]):
        self.loggers = list(loggers)

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_hparams(hparams)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        clean = numbers(metrics)
        for logger in self.loggers:
            logger.log_metrics(step, clean)

    def log_summary(self, summary: Mapping[str, float]) -> None:
        clean = numbers(summary)
        for logger in self.loggers:
            logger.log_summary(clean)

    def log_artifact(self, path: str | Path) -> None:
        for logger in self.loggers:
            logger.log_artifact(path)

    def close(self, failed: bool = False) -> None:
        for logger in self.loggers:
            logger.close(failed)


def parse_names(spec: str | Iterable[str] | None) -> list[str]:
    """``None``/``[]`` -> ``[]``; ``"tensorboard"``, ``"tensorboard,wandb"`` or a list -> names,
    each checked against :data:`BACKENDS`."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}: choose from {sorted(BACKENDS)} (e.g. logger=[tensorboard,wandb])")
    return list(dict.fromkeys(names))


def build(backend: str, **options: Any) -> RunLogger:
    """One backend by name; its library is imported here (an ``ImportError`` naming the extra)."""
    name = backend
    module_name, class_name, library, extra = BACKENDS[name]
    try:
        importlib.import_module(library)
    except ImportError as error:
        raise ImportError(f"logger={name} needs the {library!r} package: pip install \"tta-toolkit[{extra}]\"") from error
    return getattr(importlib.import_module(module_name), class_name)(**options)


def build_loggers(spec: str | Iterable[str] | None, *, out_dir: str | Path, name: str, group: str | None = None,
                  group_dir: str | Path | None = None, project: str = "tta",
                  options: Mapping[str, Mapping[str, Any]] | None = None) -> Loggers | None:
    """The loggers ``spec`` names (``None`` when it names none), each given the run folder, the run's
    name, its sweep (``group``, ``group_dir``), the project and ``options[<name>]``."""
    names = parse_names(spec)
    if not names:
        return None
    options = options or {}
    built: list[RunLogger] = []
    try:
        for backend in names:
            built.append(build(backend, out_dir=Path(out_dir), name=name, group=group,
                               group_dir=None if group_dir is None else Path(group_dir), project=project,
                               **dict(options.get(backend) or {})))
    except BaseException:
        for logger in built:
            logger.close(failed=True)
        raise
    return Loggers(built)


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (lists are kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, full, sep))
        else:
            out[full] = value
    return out


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numbers of ``values`` as floats (``None``, strings and bools left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))}


def summary_rows(results: Mapping[str, Any], selection: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The run's results as flat summary pairs: ``domain/<domain>/<metric>`` per domain row,
    ``mean/<metric>`` for the mean (and any other top-level block a setting adds), and for methods
    with selection stages ``selection/<stage>/kept_pct`` and ``selection/<stage>/precision`` (pooled)."""
    out: dict[str, Any] = {}
    for block, value in results.items():
        if block == "domains" and isinstance(value, Mapping):
            for domain, row in value.items():
                out.update(flatten(row, f"domain/{domain}") if isinstance(row, Mapping) else {})
        elif isinstance(value, Mapping):
            out.update(flatten(value, str(block)))
        else:
            out[str(block)] = value
    if selection:
        for stage, entry in (selection.get("policies") or {}).items():
            mean = entry.get("mean") or {}
            out[f"selection/{stage}/kept_pct"] = None if mean.get("kept_frac") is None else 100 * mean["kept_frac"]
            out[f"selection/{stage}/precision"] = mean.get("precision")
        learned = (selection.get("learned") or {}).get("mean") or {}
        out["selection/learned/kept_pct"] = None if learned.get("kept_frac") is None else 100 * learned["kept_frac"]
        out["selection/learned/precision"] = learned.get("precision")
    return numbers(out)


def plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened hyperparameters as ``str``/``int``/``float``/``bool`` values (lists and ``None`` as text)."""
    out = {}
    for key, value in flatten(hparams).items():
        out[key] = value if isinstance(value, (str, int, float, bool)) else ("null" if value is None else str(value))
    return out


__all__ = ["BACKENDS", "Loggers", "RunLogger", "build", "build_loggers", "flatten", "numbers", "parse_names",
           "plain_hparams", "summary_rows"]
