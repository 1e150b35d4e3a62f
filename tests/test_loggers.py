"""Run loggers (tta/loggers): a digits-C run logged to TensorBoard, W&B (offline) and MLflow (a local
file store), read back with each library's own reader: hyperparameters, per-batch curves, the
per-domain summary rows, the table and the figure; a sweep groups its runs."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tta.loggers import build, build_loggers, parse_names, summary_rows

RUN = ["data.corruptions=[shot_noise,fog]", "max_samples=1438", "batch_size=64", "method=eata",
       "source_accuracy=false", "log_every=2", "checkpoint_every=0"]  # 719 images per domain: 12 batches each


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    import tta
    from tta.run import register_configs

    register_configs()
    with initialize_config_dir(str(Path(tta.__file__).parent / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=["progress=false", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


# ------------------------------------------------------------------------------------------ quick
def test_logger_names_are_checked_and_a_missing_library_names_its_extra(monkeypatch, tmp_path):
    assert parse_names(None) == [] and parse_names([]) == []
    assert parse_names("tensorboard,wandb") == ["tensorboard", "wandb"]
    assert parse_names(["mlflow", "mlflow"]) == ["mlflow"]
    with pytest.raises(ValueError, match="unknown logger.*'neptune'"):
        parse_names(["neptune"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r'logger=wandb needs the .wandb. package: pip install "tta-toolkit\[wandb\]"'):
        build("wandb", out_dir=tmp_path, name="x")
    assert build_loggers([], out_dir=tmp_path, name="x") is None


def test_summary_rows_flatten_domains_means_and_selection():
    results = {"mean": {"accuracy": 0.8, "ece": 0.1}, "domains": {"fog/5": {"accuracy": 0.7, "nll": None}}}
    selection = {"policies": {"entropy_margin": {"mean": {"kept_frac": 0.25, "precision": 0.9}}},
                 "learned": {"mean": {"kept_frac": 0.25, "precision": None}}}
    rows = summary_rows(results, selection)
    assert rows == {"mean/accuracy": 0.8, "mean/ece": 0.1, "domain/fog/5/accuracy": 0.7,
                    "selection/entropy_margin/kept_pct": 25.0, "selection/entropy_margin/precision": 0.9,
                    "selection/learned/kept_pct": 25.0}


@pytest.mark.slow
def test_importing_tta_imports_no_logger_or_serving_library():
    code = ("import sys, tta, tta.loggers, tta.monitor, tta.engine, tta.run\n"
            "bad = [m for m in ('tensorboard', 'wandb', 'mlflow', 'prometheus_client', 'ray') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ readers
def wandb_records(run_dir: Path) -> list:
    """The records of a W&B offline run (``run-<id>.wandb``: a LevelDB-style log of ``wandb.proto``
    ``Record`` messages, 32 KiB blocks, 7-byte chunk headers), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def wandb_run(run_dir: Path) -> dict:
    history, summary, config, run = [], {}, {}, None
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return {"history": history, "summary": summary, "config": config, "run": run}


# ------------------------------------------------------------------------------------------ one run, three loggers
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    import torch

    from tta.run import execute

    out = tmp_path_factory.mktemp("logged") / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = execute(compose(*RUN, "logger=[tensorboard,wandb,mlflow]"), out)
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out, record


@pytest.mark.slow
def test_tensorboard_reads_back_hparams_curves_and_summaries(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, record = logged_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    accuracy = events.Scalars("batch/accuracy")
    assert [e.step for e in accuracy] == list(range(2, 25, 2))  # every 2 batches of 24
    for tag in ("batch/loss", "batch/entropy", "batch/effective_classes", "batch/step_time_ms", "batch/batch_time_ms",
                "batch/kept_pct/entropy_margin", "batch/precision/entropy_margin", "batch/kept_pct/learned"):
        assert tag in scalars and len(events.Scalars(tag)) >= 11, tag
    assert all(0 <= e.value <= 100 for e in accuracy)
    for domain, row in record["results"]["domains"].items():
        (summary,) = events.Scalars(f"summary/domain/{domain}/accuracy")
        assert summary.value == pytest.approx(row["accuracy"], rel=1e-6)
    ends = [events.Scalars(f"domain_end/{domain}/accuracy") for domain in record["results"]["domains"]]
    assert sorted(e.step for (e,) in ends) == [12, 24]  # each domain's row as it ends (12 batches each)
    (mean,) = events.Scalars("summary/mean/accuracy")
    assert mean.value == pytest.approx(record["results"]["mean"]["accuracy"], rel=1e-6)
    # hyperparameters: the HParams plugin's session start holds the resolved configuration and protocol
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["config/method/name"].string_value == "eata"
    assert start.hparams["config/batch_size"].number_value == 64
    assert start.hparams["method/method"].string_value == "eata"
    assert any(key.startswith("protocol/") for key in start.hparams)
    assert "results/text_summary" in events.Tags()["tensors"] and "results" in events.Tags()["images"]


@pytest.mark.slow
def test_wandb_offline_run_reads_back_hparams_curves_and_summaries(logged_run):
    out, record = logged_run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = wandb_run(run_dir)
    assert run["config"]["config/method/name"] == "eata" and run["config"]["config/batch_size"] == 64
    assert "protocol/name" in run["config"] or any(k.startswith("protocol/") for k in run["config"])
    points = [h for h in run["history"] if "batch/accuracy" in h]
    assert [h["_step"] for h in points] == list(range(2, 25, 2))
    assert all("batch/kept_pct/entropy_margin" in h and "batch/entropy" in h for h in points)
    assert sum("batch/loss" in h for h in points) >= 10  # a window whose batches all skipped their step has none
    for domain, row in record["results"]["domains"].items():
        assert run["summary"][f"domain/{domain}/accuracy"] == pytest.approx(row["accuracy"], rel=1e-9)
    assert {"results.md", "results.png", "run.json"} <= {p.name for p in (run_dir / "files").iterdir()}


@pytest.mark.slow
def test_mlflow_local_store_reads_back_hparams_curves_and_summaries(logged_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out, record = logged_run
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tta").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["config/method/name"] == "eata" and run.data.params["config/batch_size"] == "64"
    history = client.get_metric_history(run.info.run_id, "batch/accuracy")
    assert sorted(m.step for m in history) == list(range(2, 25, 2))
    assert len(client.get_metric_history(run.info.run_id, "batch/precision/entropy_margin")) == 12
    for domain, row in record["results"]["domains"].items():
        assert run.data.metrics[f"domain/{domain}/accuracy"] == pytest.approx(row["accuracy"], rel=1e-9)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"results.md", "results.png", "run.json"}


@pytest.mark.slow
def test_a_sweep_groups_its_runs(tmp_path):
    """``-m`` with two jobs: one W&B group (the sweep folder) and one MLflow parent run for both."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "MLFLOW_ALLOW_FILE_STORE": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tta.run", "-m", f"hydra.sweep.dir={sweep}", "progress=false",
           "data.corruptions=[fog]", "max_samples=128", "batch_size=64", "source_accuracy=false", "log_every=1",
           "checkpoint_every=0", "logger=[wandb,mlflow]", "method=tent,norm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = {wandb_run(d)["run"].run_group for d in sweep.glob("*/wandb/offline-run-*")}
    assert groups == {str(sweep)}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(sweep / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tta").experiment_id])
    parents = [r for r in runs if r.data.tags.get("tta.sweep_parent") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["config/method/name"] for r in children} == {"tent", "norm"}
