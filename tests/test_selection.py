"""Selection diagnostics: what each policy stage saw and kept, and how many of those were predicted right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tta import engine, methods
from tta.data.stream import Batch
from tta.metrics import SelectionMetrics, selection_summary
from tta.models import load_classifier
from tta.models.digits import DigitsCNN
from tta.policies import Policy

REPO = Path(__file__).resolve().parents[1]


class KeepListed(Policy):
    """A policy with known decisions: keeps the listed positions of every batch."""

    name = "keep_listed"
    level = "samples"

    def __init__(self, keep: list[bool]):
        super().__init__()
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.bool))

    def forward(self, ctx, alive):
        return self.keep[: ctx.batch_size].to(torch.float32)


def logits_predicting(predictions: list[int], num_classes: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 5


def test_counts_of_a_batch_with_known_labels_and_decisions():
    #            sample: 0     1     2     3     4     5
    labels = torch.tensor([0, 1, -1, 3, 4, 5])           # sample 2 is out-of-distribution
    logits = logits_predicting([0, 1, 0, 3, 0, 5])       # right: 0, 1, 3, 5
    stage_a = torch.tensor([True, True, True, False, False, True])
    stage_b = torch.tensor([True, False, True, False, False, False])
    metrics = SelectionMetrics("cpu")
    assert metrics.update({"a": stage_a, "b": stage_b}, logits, labels)
    out = metrics.result()
    a, b, learned = out["stages"]["a"], out["stages"]["b"], out["learned"]
    # stage a saw all 6, kept 0 1 2 5 (right: 0 1 5), dropped 3 4 (right: 3)
    assert (a["seen"], a["kept"], a["kept_correct"], a["dropped_correct"], a["kept_ood"]) == (6, 4, 3, 1, 1)
    # stage b saw 0 1 2 5, kept 0 2 (right: 0), dropped 1 5 (both right)
    assert (b["seen"], b["kept"], b["kept_correct"], b["dropped_correct"], b["kept_ood"]) == (4, 2, 1, 2, 1)
    # learned from: b's kept against the whole batch; dropped 1 3 4 5 (right: 1 3 5)
    assert (learned["seen"], learned["kept"], learned["kept_correct"], learned["dropped_correct"]) == (6, 2, 1, 3)
    assert b["precision"] == 0.5 and b["kept_frac"] == 2 / 6 and b["pass_rate"] == 0.5
    assert b["dropped_accuracy"] == 1.0 and a["dropped_accuracy"] == 0.5
    # a second batch adds up; a mask that is not one flag per sample is refused without adding anything
    metrics.update({"a": stage_a, "b": stage_b}, logits, labels)
    assert not metrics.update({"a": torch.ones(3, dtype=torch.bool)}, logits, labels)
    out = metrics.result()
    assert out["n"] == 12 and out["stages"]["b"]["kept_correct"] == 2 and out["learned"]["dropped_correct"] == 6


def test_no_stage_means_every_sample_is_learned_from():
    metrics = SelectionMetrics("cpu")
    metrics.update({}, logits_predicting([1, 1, 2]), torch.tensor([1, 0, 2]))
    out = metrics.result()
    assert out["stages"] == {}
    assert out["learned"]["kept"] == 3 and out["learned"]["precision"] == 2 / 3
    assert out["learned"]["dropped_accuracy"] is None


def test_summary_pools_domains_and_warns_once_per_stage_under_one_percent():
    domains = {}
    for name, keep in (("d1", [True] * 4), ("d2", [False] * 4), ("d3", [False] * 4)):
        m = SelectionMetrics("cpu")
        m.update({"a": torch.tensor(keep)}, logits_predicting([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0]))
        domains[name] = m
    with pytest.warns(UserWarning, match=r"stage 'a' kept under 1% .* in 2 of 3 domain") as caught:
        summary = selection_summary(domains)
    assert len(caught) == 1 and summary["warnings"] == [str(caught[0].message)]
    mean = summary["policies"]["a"]["mean"]
    assert (mean["n"], mean["seen"], mean["kept"], mean["kept_correct"], mean["dropped_correct"]) == (12, 12, 4, 2, 4)
    assert summary["policies"]["a"]["domains"]["d2"]["precision"] is None
    assert summary["learned_from"] == "a" and summary["stages"] == ["a"]


def _stream(domains: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    for name, (images, labels) in domains.items():
        yield Batch(images, labels, name, torch.arange(len(labels)))


def test_engine_accumulates_the_stages_of_a_real_method():
    """Tent + two policies with known decisions, run by the engine: every count equals a hand count."""
    torch.manual_seed(0)
    model = load_classifier(DigitsCNN(), mean=(0.5,) * 3, std=(0.5,) * 3)
    a, b = [True, True, False, True, False, True, True, False], [True, False, False, True, False, True, False, False]
    method = methods.build("tent", model, extra_policies=[KeepListed(a), KeepListed(b)], lr=0.0)
    data = {f"d{i}": (torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))) for i in range(2)}
    forward, predictions_logits = method.forward, []

    def capture(x, **kw):
        logits = forward(x, **kw)
        predictions_logits.append(logits)
        return logits

    method.forward = capture
    out = engine.run(method, list(_stream(data)), progress=False)
    selection = out["selection"]
    assert selection["stages"] == ["keep_listed", "keep_listed_2"]
    for (name, (_, labels)), logits in zip(data.items(), predictions_logits):
        right = [int(p) == int(y) for p, y in zip(logits.argmax(1), labels)]
        stage_a = selection["policies"]["keep_listed"]["domains"][name]
        stage_b = selection["policies"]["keep_listed_2"]["domains"][name]
        assert stage_a["seen"] == 8 and stage_a["kept"] == sum(a)
        assert stage_a["kept_correct"] == sum(r for r, k in zip(right, a) if k)
        assert stage_a["dropped_correct"] == sum(r for r, k in zip(right, a) if not k)
        both = [x and y for x, y in zip(a, b)]
        assert stage_b["seen"] == sum(a) and stage_b["kept"] == sum(both)
        assert stage_b["kept_correct"] == sum(r for r, k in zip(right, both) if k)
        assert stage_b["dropped_correct"] == sum(r for r, ka, kb in zip(right, a, both) if ka and not kb)
        learned = selection["learned"]["domains"][name]
        assert learned["kept"] == sum(both) and learned["dropped_correct"] == sum(r for r, k in zip(right, both) if not k)
        assert out["results"]["domains"][name]["accuracy"] == sum(right) / 8
    policies = out["stats"]["policies"]  # the method's own counters agree
    assert policies["keep_listed_seen"] == selection["policies"]["keep_listed"]["mean"]["seen"] == 16
    assert policies["keep_listed_2_kept"] == selection["policies"]["keep_listed_2"]["mean"]["kept"]


def test_tent_learns_from_every_sample_so_its_precision_is_its_accuracy():
    model = load_classifier(DigitsCNN(), mean=(0.5,) * 3, std=(0.5,) * 3)
    data = {"d": (torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,)))}
    out = engine.run(methods.build("tent", model), list(_stream(data)), progress=False)
    learned = out["selection"]["learned"]["domains"]["d"]
    assert learned["kept_frac"] == 1.0 and learned["precision"] == out["results"]["domains"]["d"]["accuracy"]
    assert engine.run(methods.build("norm", model), list(_stream(data)), progress=False)["selection"] is None


LEARNING = {"tent": [], "eta": ["entropy_margin", "redundancy", "eata_weight"],
            "eata": ["entropy_margin", "redundancy", "eata_weight"],
            "eata_c": ["entropy_margin", "redundancy", "eata_weight"],
            "sar": ["entropy_margin", "entropy_margin_sam"], "deyo": ["entropy_margin", "plpd"], "crowds": ["crowds"]}


@pytest.mark.slow
def test_every_learning_method_on_digits_c_records_its_selection(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tta.run", "-m", f"method={','.join(['norm', *LEARNING])}",
           "data.corruptions=[gaussian_noise]", "max_samples=250", "progress=false",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["method"]["method"]: r for r in (json.loads(p.read_text()) for p in sweep.rglob("run.json"))}
    assert set(records) == {"norm", *LEARNING}
    assert records["norm"]["selection"] is None
    for name, stages in LEARNING.items():
        selection = records[name]["selection"]
        assert selection["stages"] == stages, name
        counters = records[name]["counts"]["policies"]
        for domain, result in records[name]["results"]["domains"].items():
            seen = result["n"]
            for key in stages:  # each stage sees what the one before it kept
                entry = selection["policies"][key]["domains"][domain]
                assert entry["seen"] == seen, (name, key)
                seen = entry["kept"]
            assert selection["learned"]["domains"][domain]["kept"] == seen
        for key in stages:
            if f"{key}_seen" in counters:
                assert counters[f"{key}_seen"] == selection["policies"][key]["mean"]["seen"], (name, key)
                assert counters[f"{key}_kept"] == selection["policies"][key]["mean"]["kept"], (name, key)
        assert 0 <= selection["learned"]["mean"]["kept_frac"] <= 1
