"""C-TPT on a tiny random CLIP: parity with a re-derivation of hee-suk-yoon/C-TPT (the dispersion
term of ``ClipTestTimeTuning.inference``, the loss of ``test_time_tuning``, the released ECE), the
dispersion term as an option of TPT and DiffTPT, the refused combinations, and the command line."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny_clip import build_tiny_clip, write_image_folder
from tpt_reference import CLASSES, OfficialPromptCLIP, official_ctpt
from tta.methods import build
from tta.metrics import DomainMetrics
from tta.models.clip import load_clip_classifier
from tta.objectives import text_feature_dispersion, weighted_marginal_entropy


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_ctpt"), seed=1)


def make(spec: str, name: str = "ctpt", **kwargs):
    return build(name, load_clip_classifier(spec[5:], class_names=CLASSES), **kwargs)


# ------------------------------------------------------------------ the official code, re-derived
def ece_loss(num_bins, confidences, correct):
    """``ECE_Loss`` (``tpt_classification.py:43-76``)."""
    bounds = torch.linspace(0, 1, num_bins + 1)
    acc, conf, count = [0] * num_bins, [0] * num_bins, [0] * num_bins
    for idx in range(len(confidences)):
        for b, (lower, upper) in enumerate(zip(bounds[:-1], bounds[1:])):
            if lower.item() < confidences[idx] <= upper.item():
                count[b] += 1
                acc[b] += correct[idx]
                conf[b] += confidences[idx]
    for b in range(num_bins):
        if count[b]:
            acc[b], conf[b] = acc[b] / count[b], conf[b] / count[b]
    return sum(abs(acc[b] - conf[b]) * count[b] / len(confidences) for b in range(num_bins))


# ------------------------------------------------------------------ tests
def test_dispersion_is_the_released_formula():
    t = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    expected = torch.stack([torch.linalg.norm(t[c] - t.mean(0)) for c in range(7)]).mean()
    torch.testing.assert_close(text_feature_dispersion(t), expected)


def test_one_image_matches_the_official_step(tiny_spec):
    method = make(tiny_spec, num_views=20)
    assert method.dispersion == 50.0 and method.steps == 1 and not method.base_views.augmix
    x = torch.rand(1, 3, 32, 32)
    views = method.views(x, ids=[4])[0]
    ours = method(x, ids=[4])
    clip = load_clip_classifier(tiny_spec[5:], class_names=CLASSES).net
    official = OfficialPromptCLIP(clip.clip.requires_grad_(False), clip.tokenizer, CLASSES, l2_norm_cal=True)
    optimizer = torch.optim.AdamW([official.ctx], 5e-3)
    expected, selected, loss = official_ctpt(official, views, optimizer, optimizer.state_dict(),
                                             torch.amp.GradScaler("cpu", init_scale=1000), 50.0)
    assert len(selected) == 2
    # the loss of the step, from our model's pieces at the initial prompt: kept views, entropy, dispersion
    tuned = method.model.net.prompt.ctx.detach().clone()
    method.reset_episode()
    with torch.no_grad():
        text = method.model.text_features()
        logits = method.model.logits_from_features(method.model.encode_image(views), text)
        weights = method.policies[0].select(logits)
        ours_loss = weighted_marginal_entropy(logits, weights) - 50.0 * text_feature_dispersion(text)
    assert set(weights.nonzero().flatten().tolist()) == set(selected.tolist())
    torch.testing.assert_close(ours_loss, loss.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        method.model.net.prompt.ctx.copy_(tuned)
    torch.testing.assert_close(method.model.net.prompt.ctx.detach(), official.ctx.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # the term moved the prompt: TPT's step lands elsewhere
    tpt = make(tiny_spec, "tpt", num_views=20)
    tpt(x, ids=[4])
    assert not torch.allclose(tpt.model.net.prompt.ctx, method.model.net.prompt.ctx, atol=1e-6)
    assert method.hparams()["dispersion"] == 50.0 and method.stats()["counters"]["steps"] == 1


def test_dispersion_as_a_term_of_tpt_and_difftpt(tiny_spec):
    x = torch.rand(1, 3, 32, 32)
    ctpt = make(tiny_spec, num_views=20, dispersion=20.0)
    tpt = make(tiny_spec, "tpt", num_views=20, dispersion=20.0)
    torch.testing.assert_close(tpt(x, ids=[2]), ctpt(x, ids=[2]))
    plain = make(tiny_spec, "difftpt", num_views=15, num_diffusion=0)
    dispersed = make(tiny_spec, "difftpt", num_views=15, num_diffusion=0, dispersion=20.0)
    plain(x, ids=[2])
    dispersed(x, ids=[2])
    assert dispersed.hparams()["dispersion"] == 20.0
    assert not torch.allclose(plain.model.net.prompt.ctx, dispersed.model.net.prompt.ctx, atol=1e-6)


def test_impossible_combinations_name_both(tiny_spec):
    for name, kwargs in (("adte", {"bias": "uniform"}), ("zero", {}), ("tda", {})):
        with pytest.raises(ValueError, match=f"dispersion.*'{name}'"):
            make(tiny_spec, name, dispersion=20.0, **kwargs)
    with pytest.raises(ValueError, match="dispersion.*'tpt'.*params='ln'"):
        make(tiny_spec, "tpt", params="ln", dispersion=20.0)
    with pytest.raises(ValueError, match="ctpt needs"):
        make(tiny_spec, dispersion=0.0)


def test_paper_ece_is_the_released_ece():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=gen) * 2
    logits[:10] = torch.tensor([math.log(4.0), 0.0, 0.0, 0.0, 0.0])  # confidence exactly 0.5: a bin edge
    labels = torch.randint(0, 5, (200,), generator=gen)
    metrics = DomainMetrics(torch.device("cpu"), paper_ece=(20, True))
    metrics.update(logits[:120], labels[:120])
    metrics.update(logits[120:], labels[120:])
    probs = logits.double().softmax(-1)
    conf, pred = probs.max(-1)
    expected = ece_loss(20, conf.float().tolist(), (pred == labels).tolist())
    result = metrics.result()
    assert result["paper_ece"] == pytest.approx(expected, abs=1e-6)
    assert "paper_ece" not in DomainMetrics(torch.device("cpu")).result() and "ece" in result
    # a bin edge decides: 10 right at confidence exactly 0.5 (bin (0.45, 0.5]), 10 wrong just below
    edge = torch.tensor([[math.log(4.0), 0.0, 0.0, 0.0, 0.0]] * 10 + [[math.log(3.6), 0.0, 0.0, 0.0, 0.0]] * 10)
    labels = torch.tensor([0] * 10 + [1] * 10)
    metrics = DomainMetrics(torch.device("cpu"), paper_ece=(20, True))
    metrics.update(edge, labels)
    conf = edge.float().log_softmax(1).max(1)[0].exp()
    expected = ece_loss(20, conf.tolist(), (edge.argmax(1) == labels).tolist())
    assert metrics.result()["paper_ece"] == pytest.approx(expected, abs=1e-6) and expected < 0.05


@pytest.mark.slow
def test_cli_ctpt(tiny_spec, tmp_path):
    root = write_image_folder(tmp_path / "data", ["goldfish", "red_fox", "tabby_cat"], per_class=2)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", f"model={tiny_spec}", "method=ctpt", "method.num_views=8",
           "data=image_folder", f"data.root={root}", "data.resize=32", "data.crop=32", "progress=false",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    domain = record["results"]["domains"]["image_folder"]
    assert domain["n"] == 6 and 0 <= domain["paper_ece"] <= 1 and "ece" in domain
    assert record["counts"]["counters"]["steps"] == 6 and record["method"]["dispersion"] == 50.0


def test_protocols_carry_lambda_and_augmix_per_group():
    from tta import protocols
    from tta.run import method_defaults

    defaults = method_defaults("ctpt")
    assert defaults["dispersion"] == 50.0 and defaults["augmix"] is False
    for name in ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"):
        kwargs, origins = protocols.resolve("ctpt", name, 200, defaults, {})
        assert kwargs["dispersion"] == 20.0 and kwargs["augmix"] is True and origins["dispersion"] == "protocol"
    kwargs, _ = protocols.resolve("ctpt", "imagenet", 1000, defaults, {})
    assert kwargs["dispersion"] == 50.0 and kwargs["augmix"] is False
