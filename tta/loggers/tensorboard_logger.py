"""TensorBoard backend of the run loggers (:mod:`tta.loggers`): event files in ``<run folder>/tensorboard``.

Hyperparameters go to TensorBoard's HParams plugin (and, as JSON, to the text tab), the per-batch
curves and the summary rows are scalars (the summary at the run's last batch), ``results.md`` is
text and ``results.png`` an image. Read them back with
``tensorboard.backend.event_processing.event_accumulator.EventAccumulator``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from . import RunLogger, plain_hparams


class TensorBoardLogger(RunLogger):
    """Args: ``log_dir`` (default ``<out_dir>/tensorboard``); the others as :class:`~tta.loggers.RunLogger`."""

    def __init__(self, *, out_dir: Path, name: str, group: str | None = None, group_dir: Path | None = None,
                 project: str = "tta", log_dir: str | None = None):
        self.log_dir = Path(log_dir) if log_dir else Path(out_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.name, self.group = name, group
        self.last_step = 0

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        values = plain_hparams({**hparams, "run": {"name": self.name, "group": self.group or ""}})
        experiment, start, end = hparams_summary(values, {})
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        self.writer.add_text("hparams", "```json\n" + json.dumps(hparams, indent=1, default=str) + "\n```")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.last_step = max(self.last_step, int(step))

    def log_summary(self, summary: Mapping[str, float]) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(f"summary/{key}", value, global_step=self.last_step)

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".md", ".txt", ".json"):
            self.writer.add_text(path.stem, path.read_text())
        elif path.suffix == ".png":
            from matplotlib.image import imread

            image = imread(path)[..., :3]  # HWC floats in [0, 1]
            self.writer.add_image(path.stem, image, global_step=self.last_step, dataformats="HWC")

    def close(self, failed: bool = False) -> None:
        self.writer.flush()
        self.writer.close()
