"""End to end through the CLI: every setting on tiny ImageNet-C (released and on the fly) and CIFAR-10-C.

One Hydra multirun process per dataset runs all settings in sequence (a process costs ~5 s of
imports, a tiny job ~1 s). Threads are pinned to one per process: the tests share a small machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import WNIDS, make_cifar_c, make_cifar_npy, make_imagenet_c, make_imagenet_val

SETTINGS = ["reset_each_shift", "continual", "mixed_domains", "gradual", "label_shift", "bs1", "open_set",
            "forgetting", "long_stream"]
MAX_SAMPLES = 48
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


def run_cli(args: list[str], sweep: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tta.run", *args, "progress=false", f"hydra.sweep.dir={sweep}",
               f"hydra.run.dir={sweep}"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_all_settings(data_args: list[str], sweep: Path, settings=SETTINGS) -> dict[str, dict]:
    run_cli(["-m", *data_args, f"setting={','.join(settings)}", f"max_samples={MAX_SAMPLES}"], sweep)
    records = {}
    for path in sorted(sweep.glob("*/run.json")):
        record = json.loads(path.read_text())
        records[record["config"]["setting"]["name"]] = record
    assert sorted(records) == sorted(settings)
    return records


def check_records(records: dict[str, dict], corruptions: list[str], *, seed: int = 0) -> None:
    for name, record in records.items():
        stream, results = record["stream"], record["results"]
        assert stream["setting"] == name and stream["seed"] == seed, name
        assert len(stream["order_hash"]) == 16 and len(stream["plan_hash"]) == 16
        assert 0 < stream["num_samples"] <= MAX_SAMPLES
        assert results["domains"] and 0 <= results["mean"]["accuracy"] <= 1, name
        assert stream["bad_images"]["count"] == 0
    assert records["reset_each_shift"]["stream"]["order_hash"] == records["continual"]["stream"]["order_hash"]
    assert list(records["mixed_domains"]["results"]["domains"]) == ["mixed"]
    assert records["gradual"]["stream"]["domains"][:3] == [f"{corruptions[0]}/{s}" for s in (1, 2, 3)]
    assert records["bs1"]["stream"]["batch_size"] == 1
    bs1 = records["bs1"]["stream"]
    assert records["bs1"]["counts"]["counters"]["batches"] == bs1["num_samples"] - bs1["bad_images"]["skipped_samples"]
    assert "auroc" in records["open_set"]["results"]["mean"]
    assert all(d["ood_n"] > 0 for d in records["open_set"]["results"]["domains"].values())
    forgetting = records["forgetting"]["results"]["forgetting"]
    assert {"clean_accuracy_before", "clean_accuracy_after", "clean_accuracy_drop"} <= set(forgetting)
    assert not any(k.startswith("clean@") for k in records["forgetting"]["results"]["domains"])
    assert records["long_stream"]["stream"]["num_samples"] == MAX_SAMPLES
    assert records["label_shift"]["stream"]["label_order"] == "imbalance"


IMAGENET_MODEL = ["model=timm:test_resnet", "model_pretrained=false", f"data.classes=[{','.join(WNIDS)}]",
                  "data.corruptions=[gaussian_noise,brightness]", "data.crop=64"]


@pytest.mark.slow
def test_cli_imagenet_c_released_every_setting(tmp_path):
    root = make_imagenet_c(tmp_path / "imagenet-c")
    clean = make_imagenet_val(tmp_path / "imagenet")
    records = run_all_settings(["data=imagenet_c", f"data.root={root}", f"data.clean_root={clean}",
                                "data.num_workers=0", *IMAGENET_MODEL], tmp_path / "sweep")
    check_records(records, ["gaussian_noise", "brightness"])
    assert records["reset_each_shift"]["stream"]["domains"] == ["gaussian_noise/5", "brightness/5"]


@pytest.mark.slow
def test_cli_imagenet_c_onthefly_every_setting(tmp_path):
    root = make_imagenet_val(tmp_path / "imagenet", nested=False)
    (root / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    records = run_all_settings(["data=imagenet_c_onthefly", f"data.root={root}", "data.resize=72",
                                "data.num_workers=1", "seed=3", *IMAGENET_MODEL], tmp_path / "sweep")
    for record in records.values():  # the broken file is skipped, counted once and listed
        bad = record["stream"]["bad_images"]
        assert bad["count"] == 1 and bad["files"][0]["path"].endswith("broken.JPEG")
        record["stream"]["bad_images"]["count"] = 0
    check_records(records, ["gaussian_noise", "brightness"], seed=3)


@pytest.mark.slow
def test_cli_cifar10_c_every_setting(tmp_path):
    root = make_cifar_c(tmp_path / "CIFAR-10-C", n=6)
    clean = make_cifar_npy(tmp_path / "cifar10", n=6)
    records = run_all_settings(["data=cifar10_c", f"data.root={root}", f"data.clean_root={clean}",
                                "data.corruptions=[gaussian_noise,brightness]", "model=digits_cnn",
                                "data.batch_size=16"], tmp_path / "sweep")
    check_records(records, ["gaussian_noise", "brightness"])


def test_cli_errors_name_the_expected_files(tmp_path):
    result = run_cli(["data=imagenet_c", f"data.root={tmp_path / 'missing'}", *IMAGENET_MODEL], tmp_path / "run",
                     check=False)
    assert result.returncode != 0
    assert "missing is not a folder" in result.stderr and "<corruption>/<severity>/<wnid>" in result.stderr
