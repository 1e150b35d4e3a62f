"""MLflow backend of the run loggers (:mod:`tta.loggers`).

One MLflow run per ``tta`` run in the experiment ``project``; a sweep's runs are children of one
parent run (tag ``mlflow.parentRunId``; the parent is found or made by its tag ``tta.sweep``, the
sweep folder). Without ``tracking_uri`` (or ``MLFLOW_TRACKING_URI``) the store is local:
``file:<sweep folder or run folder>/mlruns``, which ``mlflow-skinny`` reads and writes (MLflow 3
keeps its file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``, which this
backend sets for a ``file:`` store it uses). Hyperparameters are params (values cut to
MLflow's length limit), the per-batch curves metrics with ``step=batch``, the summary rows metrics
without a step, and the table and figure artifacts. Read them back with ``mlflow.tracking.MlflowClient``.

The parent is looked up, then made: jobs of a launcher that starts them at the same moment in
parallel processes may each make one (all tagged with the same ``tta.sweep``, so they stay
findable); Hydra's default launcher runs jobs one after the other and makes exactly one.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from . import RunLogger, plain_hparams

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param's value
PARAM_KEY_LIMIT = 250
BATCH_LIMIT = 100  # params per log_batch call


def local_store(folder: Path) -> str:
    return (Path(folder).resolve() / "mlruns").as_uri()


class MLflowLogger(RunLogger):
    """Args: ``tracking_uri`` (``None``: ``MLFLOW_TRACKING_URI``, else a local file store in the
    sweep or run folder); the others as :class:`~tta.loggers.RunLogger`."""

    def __init__(self, *, out_dir: Path, name: str, group: str | None = None, group_dir: Path | None = None,
                 project: str = "tta", tracking_uri: str | None = None):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store(group_dir or out_dir)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        tags = {"mlflow.runName": name, "tta.run_dir": str(Path(out_dir).resolve())}
        if group:
            tags["tta.sweep"] = group
            tags["mlflow.parentRunId"] = self._parent(group)
        self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def _parent(self, group: str) -> str:
        """The sweep's parent run (made once, found by its tags afterwards)."""
        quoted = group.replace("'", "\\'")
        found = self.client.search_runs([self.experiment_id],
                                        f"tags.`tta.sweep` = '{quoted}' and tags.`tta.sweep_parent` = 'true'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        parent = self.client.create_run(self.experiment_id, run_name=group,
                                        tags={"tta.sweep": group, "tta.sweep_parent": "true", "mlflow.runName": group})
        self.client.set_terminated(parent.info.run_id)
        return parent.info.run_id

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        params = [Param(k[:PARAM_KEY_LIMIT], str(v)[:PARAM_VALUE_LIMIT]) for k, v in plain_hparams(hparams).items()]
        for start in range(0, len(params), BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=params[start:start + BATCH_LIMIT])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for start in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[start:start + 1000])

    def log_summary(self, summary: Mapping[str, float]) -> None:
        self.log_metrics(0, summary)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
