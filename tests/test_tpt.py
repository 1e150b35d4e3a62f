"""TPT on a tiny random CLIP: parity with a re-derivation of azshue/TPT (docs/methods/tpt.md), the
episodic reset, the never-reset loss scaler, the tsallis policy, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_clip import build_tiny_clip, write_image_folder
from tpt_reference import CLASSES, OfficialPromptCLIP, official_avg_entropy, official_select, official_tpt
from tta.methods import build
from tta.models.clip import load_clip_classifier
from tta.objectives import weighted_marginal_entropy
from tta.policies import TPTConfidence


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_tpt"), seed=1)


def make_tpt(spec: str, **kwargs):
    return build("tpt", load_clip_classifier(spec[5:], class_names=CLASSES), **kwargs)


def test_marginal_entropy_and_selection_match_tpt():
    logits = torch.randn(64, 7) * 3
    kept, idx = official_select(logits, 0.1)
    weights = TPTConfidence(fraction=0.1).select(logits)
    assert int(weights.sum()) == 6 and set(weights.nonzero().flatten().tolist()) == set(idx.tolist())
    torch.testing.assert_close(weighted_marginal_entropy(logits, weights), official_avg_entropy(kept))


def test_one_image_matches_the_official_step(tiny_spec):
    method = make_tpt(tiny_spec, num_views=20)
    group = method.optimizer.param_groups[0]
    assert isinstance(method.optimizer, torch.optim.AdamW)  # torch.optim.AdamW(params, lr): PyTorch's defaults
    assert group["lr"] == 5e-3 and group["weight_decay"] == 0.01 and group["betas"] == (0.9, 0.999)
    assert group["eps"] == 1e-8 and not group["amsgrad"]
    assert method.steps == 1 and method.selection == 0.1 and method.num_views == 20
    assert make_tpt(tiny_spec).num_views == 64 and float(method.scaler.scale) == 1000.0
    x = torch.rand(1, 3, 32, 32)
    views = method.views(x, ids=[7])[0]
    ours = method(x, ids=[7])
    tuned = method.model.net.prompt.ctx.detach().clone()

    clip = load_clip_classifier(tiny_spec[5:], class_names=CLASSES).net
    official = OfficialPromptCLIP(clip.clip.requires_grad_(False), clip.tokenizer, CLASSES)
    optimizer = torch.optim.AdamW([official.ctx], 5e-3)
    state = optimizer.state_dict()
    scaler = torch.amp.GradScaler("cpu", init_scale=1000)
    with torch.no_grad():
        zero_shot = official(views[:1])
    expected, selected, loss = official_tpt(official, views, optimizer, state, scaler)
    assert len(selected) == 2
    assert not torch.allclose(official.ctx.detach(), official.ctx_init_state)       # the step moved the prompt
    torch.testing.assert_close(tuned, official.ctx.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, zero_shot, atol=1e-4)
    counters = method.stats()["counters"]
    assert counters["views"] == 20 and counters["text_forwards"] == 2 and counters["steps"] == 1
    assert counters["forwards"] == 1  # view 0's features are reused for the prediction


def test_several_steps_reuse_the_first_selection_as_tpt(tiny_spec):
    """``tta_steps`` > 1: the views kept at the first step are reused, AdamW's state carries over
    between the steps of one image, and the prediction uses the prompt after the last step."""
    method = make_tpt(tiny_spec, num_views=30, steps=3)
    x = torch.rand(1, 3, 32, 32)
    views = method.views(x, ids=[5])[0]
    ours = method(x, ids=[5])
    clip = load_clip_classifier(tiny_spec[5:], class_names=CLASSES).net
    official = OfficialPromptCLIP(clip.clip.requires_grad_(False), clip.tokenizer, CLASSES)
    optimizer = torch.optim.AdamW([official.ctx], 5e-3)
    expected, selected, _ = official_tpt(official, views, optimizer, optimizer.state_dict(),
                                         torch.amp.GradScaler("cpu", init_scale=1000), steps=3)
    assert len(selected) == 3 and int(optimizer.state[official.ctx]["step"]) == 3
    torch.testing.assert_close(method.model.net.prompt.ctx.detach(), official.ctx.detach(), atol=5e-6, rtol=0)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert method.stats()["counters"]["steps"] == 3


def test_episodic_reset_and_the_scaler_that_is_not_reset(tiny_spec):
    x = torch.rand(3, 3, 32, 32)
    method = make_tpt(tiny_spec, num_views=10)
    together = method(x, ids=[0, 1, 2])
    init = method.model.net.prompt.ctx_init_state
    for i in range(3):  # a prompt tuned on one image does not leak into the next
        alone = make_tpt(tiny_spec, num_views=10)(x[i:i + 1], ids=[i])
        torch.testing.assert_close(together[i:i + 1], alone)
    assert int(method.scaler.growth_tracker) == 3 and float(method.scaler.scale) == 1000.0
    method.reset()
    torch.testing.assert_close(method.model.net.prompt.ctx.detach(), init)
    assert int(method.scaler.growth_tracker) == 3                                      # kept, as in TPT
    assert all(float(v.abs().sum()) == 0 for s in method.optimizer.state.values() for v in s.values())
    # an overflow: the scaled loss is inf, the step is skipped, the scale backs off, zero-shot prediction
    method.scaler.scale.fill_(3e38)
    skipped = method(x[:1], ids=[0])
    torch.testing.assert_close(skipped, method.model(x[:1]).detach())
    assert float(method.scaler.scale) == float(torch.tensor(3e38) * 0.5) and method.stats()["counters"]["skipped_nonfinite"] == 1


def test_tsallis_policy_replaces_the_confidence_selection(tiny_spec):
    method = make_tpt(tiny_spec, num_views=10, extra_policies=["tsallis"])
    assert [p.name for p in method.policies] == ["tsallis"]
    out = method(torch.rand(2, 3, 32, 32), ids=[0, 1])
    assert out.shape == (2, len(CLASSES)) and torch.isfinite(out).all()
    ranking = method.policies[0]
    assert ranking.online and ranking.seen == 2 and torch.isfinite(ranking.q_index).all()  # online bias, 2 images
    by_option = make_tpt(tiny_spec, num_views=10, score="tsallis")
    assert [p.name for p in by_option.policies] == ["tsallis"]


@pytest.mark.slow
def test_cli_tpt(tiny_spec, tmp_path):
    root = write_image_folder(tmp_path / "data", ["goldfish", "red_fox", "tabby_cat"], per_class=2)
    out = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", "-m", f"model={tiny_spec}", "method=tpt", "method.num_views=8",
           "policies.extra=[],[tsallis]", "data=image_folder", f"data.root={root}", "data.resize=32", "data.crop=32",
           "progress=false", f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    assert len(records) == 2
    for record in records:
        counters = record["counts"]["counters"]
        assert record["results"]["domains"]["image_folder"]["n"] == 6
        assert counters["episodes"] == 6 and counters["views"] == 48 and counters["steps"] == 6
        assert record["method"]["optimizer"]["lr"] == 5e-3 and record["method"]["params"] == "prompt"
    assert sorted(r["method"]["policies"][0]["name"] for r in records) == ["tpt_confidence", "tsallis"]
