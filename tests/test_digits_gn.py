"""The GroupNorm digits-C source model (``model=digits_gn``): shipped, GroupNorm only, runs in every setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tta import methods
from tta.data.digits import load_digits_split
from tta.models import load_classifier
from tta.models.params import has_batchnorm

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["reset_each_shift", "continual", "mixed_domains", "gradual", "label_shift", "bs1", "open_set",
            "forgetting", "long_stream"]


def test_shipped_groupnorm_model_is_accurate_on_clean_digits():
    model = load_classifier("digits_gn")
    assert model.info.spec == "digits_gn" and model.info.weights == "digits_gn.safetensors"
    assert not has_batchnorm(model.net)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.net.modules()) == 5
    x, y = load_digits_split("test")
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.97, accuracy  # 98.6% when trained by scripts/train_digits_source.py --model digits_gn


def test_groupnorm_predictions_do_not_depend_on_the_batch():
    """What the wild settings test: no test-batch statistics, so ``norm`` is the source model and a
    sample's prediction is the same alone (batch size 1) or in a batch."""
    x, _ = load_digits_split("test")
    x = x[:16]
    norm = methods.build("norm", load_classifier("digits_gn"))
    with torch.no_grad():
        together = norm(x)
        alone = torch.cat([norm(x[i:i + 1]) for i in range(len(x))])
        source = load_classifier("digits_gn").eval()(x)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together, source, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_digits_gn_runs_in_every_setting(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tta.run", "-m", "model=digits_gn", "method=eta", f"setting={','.join(SETTINGS)}",
           "data.corruptions=[gaussian_noise,fog]", "max_samples=96", "progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["stream"]["setting"]: r for r in (json.loads(p.read_text()) for p in sweep.rglob("run.json"))}
    assert set(records) == set(SETTINGS)
    for name, record in records.items():
        assert record["model"]["spec"] == "digits_gn", name
        assert record["selection"]["stages"] == ["entropy_margin", "redundancy", "eata_weight"], name
        assert record["selection"]["learned"]["mean"]["n"] == record["stream"]["num_samples"], name
        if name != "forgetting":  # 96 samples are all clean images there: no corrupted domain is scored
            assert record["results"]["mean"]["accuracy"] > 0.1, name
    assert records["bs1"]["stream"]["batch_size"] == 1
    assert records["bs1"]["protocol"]["origins"]["batch_size"] == "setting"
