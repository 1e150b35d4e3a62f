"""The command line on the embedded digits-C benchmark: the numbers a new user sees first."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "tta.run", f"hydra.run.dir={out}", "progress=false", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
    record = json.loads((out / "run.json").read_text())
    record["_stdout"] = proc.stdout
    return record


@pytest.mark.slow
def test_default_run_tent_on_digits_c_recovers_accuracy(tmp_path):
    record = run_cli(tmp_path)
    mean = record["results"]["mean"]
    assert record["method"]["method"] == "tent"
    assert len(record["results"]["domains"]) == 15
    assert mean["accuracy"] >= mean["source_accuracy"] + 0.15, mean
    assert "| **mean** |" in record["_stdout"]
    # the run record of docs/design.md
    for key in ("config", "versions", "model", "stream", "counts", "wall_time_s", "results"):
        assert key in record
    assert record["model"]["mean"] == [0.5, 0.5, 0.5]
    assert record["stream"]["seed"] == 0 and len(record["stream"]["order_hash"]) == 16
    assert record["counts"]["counters"]["samples"] == 15 * 719


@pytest.mark.slow
def test_norm_method_recovers_at_least_ten_points(tmp_path):
    mean = run_cli(tmp_path, "method=norm")["results"]["mean"]
    assert mean["accuracy"] >= mean["source_accuracy"] + 0.10, mean


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["timm:test_resnet", "timm:test_vit"])
def test_any_timm_model_plugs_in(tmp_path, spec):
    record = run_cli(tmp_path, f"model={spec}", "model_pretrained=false", "data.corruptions=[gaussian_noise,fog]",
                     "severity=3")
    assert record["model"]["spec"] == spec
    assert any("resized to 10 classes" in n for n in record["model"]["notes"])
    assert set(record["results"]["domains"]) == {"gaussian_noise/3", "fog/3"}


@pytest.mark.slow
def test_same_seed_same_numbers_and_order(tmp_path):
    args = ("data.corruptions=[shot_noise]", "seed=3")
    a = run_cli(tmp_path / "a", *args)
    b = run_cli(tmp_path / "b", *args)
    c = run_cli(tmp_path / "c", "data.corruptions=[shot_noise]", "seed=4")
    assert a["results"] == b["results"]
    assert a["stream"]["order_hash"] == b["stream"]["order_hash"] != c["stream"]["order_hash"]


def test_bad_override_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tta.run", f"hydra.run.dir={tmp_path}", "method=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "nope" in proc.stderr


@pytest.mark.slow
def test_skip_empty_from_the_command_line_changes_only_the_work(tmp_path):
    """``method.skip_empty`` reaches the method, is recorded, and gives the same numbers either way."""
    args = ("method=eta", "data.corruptions=[shot_noise]", "batch_size=8")
    never = run_cli(tmp_path / "never", *args, "method.skip_empty=never")
    auto = run_cli(tmp_path / "auto", *args, "method.skip_empty=auto")
    assert never["method"]["skip_empty"] == "never" and auto["method"]["skip_empty"] == "auto"
    assert never["results"] == auto["results"]
    assert never["counts"] == auto["counts"]
    assert auto["counts"]["counters"]["skipped_empty"] > 0
