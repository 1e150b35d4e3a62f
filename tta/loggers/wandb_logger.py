"""Weights & Biases backend of the run loggers (:mod:`tta.loggers`).

One W&B run per ``tta`` run, under ``<run folder>/wandb``; a sweep's runs share a W&B ``group``
(the sweep folder). ``WANDB_MODE=offline`` writes everything locally (``wandb sync`` uploads it
later); the hyperparameters are the run's ``config``, the per-batch curves ``run.log(..., step=batch)``,
the summary rows ``run.summary``, and the table and figure are saved with the run's files.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import wandb

from . import RunLogger, flatten


class WandbLogger(RunLogger):
    """Args: ``entity``, ``mode`` (``None``: W&B's own default / ``WANDB_MODE``), ``tags``, ``dir``
    (default: the run folder); the others as :class:`~tta.loggers.RunLogger`."""

    def __init__(self, *, out_dir: Path, name: str, group: str | None = None, group_dir: Path | None = None,
                 project: str = "tta", entity: str | None = None, mode: str | None = None,
                 tags: list[str] | None = None, dir: str | None = None):
        self.out_dir = Path(out_dir)
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, mode=mode,
                              tags=list(tags) if tags else None, dir=str(dir or out_dir), reinit="create_new",
                              job_type="sweep" if group else "run")

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.run.config.update(flatten(hparams), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=int(step))

    def log_summary(self, summary: Mapping[str, float]) -> None:
        self.run.summary.update(dict(summary))

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        files = Path(self.run.dir)  # the run's files folder: synced with the run
        shutil.copy2(path, files / path.name)
        self.run.save(str(files / path.name), base_path=str(files), policy="end")

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
