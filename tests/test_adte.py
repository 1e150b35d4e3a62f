"""ADTE on a tiny random CLIP: parity with a re-derivation of Jinx630/ADTE --
the pre-pass memory, the power iteration, the q_c map, the view score, the 6 kept views and the vote
-- the online estimate from the first sample, the bias file, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_clip import build_tiny_clip, write_image_folder
from tta.methods import build
from tta.models.clip import load_clip_classifier
from tta.objectives import adte_score
from tta.policies import LabelBias, TsallisRanking, load_bias_file, minmax_q_index, power_iteration

CLASSES = ["goldfish", "red fox", "tabby cat", "great white shark", "axolotl", "tench"]


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    # logit scale 100 as OpenAI CLIP's, so that some images pass the gap >= 1.0 test
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_adte"), seed=2, logit_scale=100.0)


def make_adte(spec: str, **kwargs):
    return build("adte", load_clip_classifier(spec[5:], class_names=CLASSES), **kwargs)


# ------------------------------------------------------------------ the official code, re-derived
def official_memory(view_logits_per_image, num_classes, memory_size=20, threshold=1.0):
    memory_bank = torch.zeros(num_classes, memory_size, num_classes)
    logit_gap = torch.full((num_classes, memory_size), -1.0)
    for logits in view_logits_per_image:
        origin = logits.mean(0)
        top_1, top_2 = torch.topk(origin, 2)[0]
        diff = top_1 - top_2
        if diff >= threshold:
            label = torch.argmax(origin)
            slot = torch.argmin(logit_gap[label])
            memory_bank[label][slot] = origin
            logit_gap[label][slot] = diff
    return memory_bank, logit_gap


def official_compute_P(memory_bank, logit_gap):
    K = memory_bank.shape[0]
    P = torch.zeros(K, K)
    for j in range(K):
        valid = (logit_gap[j] != -1).nonzero(as_tuple=True)[0]
        samples = memory_bank[j][valid]
        if len(samples) > 0:
            P[:, j] = torch.softmax(samples, dim=1).sum(0) / len(samples)
    return P


def official_estimate_q(P, epsilon=1e-4, n=500):
    q = torch.ones(P.shape[0]) / P.shape[0]
    for _ in range(n):
        q_new = P @ q
        q_new = q_new / torch.norm(q_new)
        if torch.norm(q_new - q) < epsilon:
            break
        q = q_new
    return q


def official_min_max(data, a=0.01, b=0.9):
    lo, hi = torch.min(data), torch.max(data)
    if hi - lo == 0:
        return torch.full_like(data, a)
    return a + (data - lo) * (b - a) / (hi - lo)


def official_vote(logits, scale_w, top=0.1):
    probs = logits.softmax(1)
    score = torch.sum(torch.pow(probs, scale_w) / (1 - scale_w), dim=1)
    keep = torch.argsort(score, descending=False)[:max(int(score.size()[0] * top), 1)]
    return logits[keep].softmax(1).sum(0), keep


# ------------------------------------------------------------------ tests
def test_memory_overwrite_rule_and_bias_match_the_official_code():
    gen = torch.Generator().manual_seed(0)
    num_classes, slots = 5, 3
    images = [torch.randn(8, num_classes, generator=gen) * 4 for _ in range(60)]
    images[0] = torch.zeros(8, num_classes)  # a gap of 0: not written
    bias = LabelBias(num_classes, memory_size=slots)
    written = torch.stack([bias.observe(x) for x in images])
    memory, gaps = official_memory(images, num_classes, slots)
    torch.testing.assert_close(bias.memory, memory)
    torch.testing.assert_close(bias.gaps, gaps)
    assert not written[0] and int(written.sum()) > 3 * slots  # full classes had slots overwritten
    assert int(bias.entries) == int((gaps != -1).sum())
    P = official_compute_P(memory, gaps)
    torch.testing.assert_close(bias.confusion(), P)
    q = official_estimate_q(P)
    torch.testing.assert_close(power_iteration(P), q)
    b = torch.log(q.clamp_min(1e-12))
    torch.testing.assert_close(bias.log_bias(), b)
    q_index = minmax_q_index(b)
    torch.testing.assert_close(q_index, official_min_max(b))
    assert float(q_index.min()) == pytest.approx(0.01) and float(q_index.max()) == pytest.approx(0.9)


def test_unconditional_overwrite_of_the_smallest_gap():
    bias = LabelBias(3, memory_size=2)
    for gap in (5.0, 3.0, 1.5):  # class 0 each time; the third replaces the gap-3 slot though it is smaller
        bias.observe(torch.tensor([[gap, 0.0, -1.0]]))
    assert sorted(bias.gaps[0].tolist()) == [1.5, 5.0]
    assert bias.gaps[1:].eq(-1).all()


def test_power_iteration_returns_the_iterate_before_convergence():
    P = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    torch.testing.assert_close(power_iteration(P, check_every=1), official_estimate_q(P))
    torch.testing.assert_close(power_iteration(P, max_iter=3), official_estimate_q(P, n=3))
    flat = minmax_q_index(torch.zeros(4))
    assert flat.tolist() == pytest.approx([0.01] * 4)


def test_view_score_selection_and_vote(tiny_spec):
    method = make_adte(tiny_spec, bias="uniform")
    b = torch.log(torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]))
    method.use_bias(b)
    scale_w = official_min_max(b)
    torch.testing.assert_close(method.ranking.q_index, scale_w)
    x = torch.rand(2, 3, 32, 32)
    out = method(x, ids=[3, 4])
    logits = method.view_logits(x, [3, 4])
    assert logits.shape == (2, 64, len(CLASSES))
    for i in range(2):
        p_bar, keep = official_vote(logits[i], scale_w)
        assert len(keep) == 6
        weights = method.ranking.select(logits[i])
        assert set(weights.nonzero().flatten().tolist()) == set(keep.tolist())
        torch.testing.assert_close(out[i].exp() * 6, p_bar, atol=1e-5, rtol=1e-5)
        assert out[i].argmax() == p_bar.argmax()
    probs = logits[0].softmax(-1)
    torch.testing.assert_close(adte_score(probs, scale_w), (probs.pow(scale_w) / (1 - scale_w)).sum(-1))
    # label adjustment votes with softmax(z - b)
    adjusted = make_adte(tiny_spec, bias="uniform", label_adjust=True)
    adjusted.use_bias(b)
    kept = method.ranking.select(logits[0]).bool()
    expected = (logits[0][kept] - b).softmax(-1).sum(0)
    torch.testing.assert_close(adjusted(x, ids=[3, 4])[0].exp() * 6, expected, atol=1e-5, rtol=1e-5)
    # fixed-q Tsallis and Shannon scores
    same_q = TsallisRanking(len(CLASSES), score="tsallis", q=0.1)
    torch.testing.assert_close(same_q.score(logits[0]), (1 - probs.pow(0.1).sum(-1)) / (0.1 - 1))
    shannon = TsallisRanking(len(CLASSES), score="shannon")
    torch.testing.assert_close(shannon.score(logits[0]), -(probs * torch.log(probs + 1e-8)).sum(-1))


def test_prepass_then_saved_bias_is_reused(tiny_spec, tmp_path):
    x = torch.rand(8, 3, 32, 32)
    q_path = tmp_path / "bias.pt"
    method = make_adte(tiny_spec, num_views=16, q_path=str(q_path), prepass_data=[x[:4], x[4:]])
    out = method(x[:3], ids=[0, 1, 2])
    assert torch.isfinite(out).all() and q_path.is_file()
    counters = method.stats()["counters"]
    assert counters["prepass_images"] == 8 and counters["views"] == 16 * (8 + 3)
    # the pre-pass equals the re-derivation on the same (pre-pass) views
    from tta.methods.adte import PREPASS_SALT

    view_logits = torch.cat([method.view_logits(x[:4], list(range(4)), salt=PREPASS_SALT),
                             method.view_logits(x[4:], list(range(4, 8)), salt=PREPASS_SALT)])
    memory, gaps = official_memory(list(view_logits), len(CLASSES))
    assert int((gaps != -1).sum()) > 0
    b = torch.log(official_estimate_q(official_compute_P(memory, gaps)).clamp_min(1e-12))
    saved = load_bias_file(q_path)
    torch.testing.assert_close(saved["default"], b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.ranking.q_index, official_min_max(b), atol=1e-5, rtol=1e-5)
    again = make_adte(tiny_spec, num_views=16, q_path=str(q_path))  # no data: the file is read
    torch.testing.assert_close(again(x[:3], ids=[0, 1, 2]), out)
    assert again.stats()["counters"]["prepass_images"] == 0
    with pytest.raises(ValueError, match="pre-pass"):
        make_adte(tiny_spec, num_views=16)(x[:1])


def test_online_bias_works_from_the_first_sample(tiny_spec):
    method = make_adte(tiny_spec, num_views=16, bias="online", gap=0.0)  # gap 0: every image enters the memory
    torch.testing.assert_close(method.ranking.q_index, torch.full((len(CLASSES),), 0.01))
    x = torch.rand(6, 3, 32, 32)
    out = method(x, ids=list(range(6)))
    assert torch.isfinite(out).all()
    assert int(method.estimator.entries) > 0
    assert float(method.ranking.q_index.max()) == pytest.approx(0.9)
    method.reset()
    assert int(method.estimator.entries) == 0 and float(method.ranking.q_index.max()) == pytest.approx(0.01)


@pytest.mark.slow
def test_cli_adte(tiny_spec, tmp_path):
    root = write_image_folder(tmp_path / "data", ["goldfish", "red_fox", "tabby_cat"], per_class=2)
    out = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", "-m", f"model={tiny_spec}", "method=adte", "method.num_views=8",
           "method.bias=prepass,online", f"method.q_path={tmp_path / 'q.pt'}", "data=image_folder",
           f"data.root={root}", "data.resize=32", "data.crop=32", "progress=false", f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {json.loads(p.read_text())["method"]["bias"]: json.loads(p.read_text())
               for p in sorted(out.glob("*/run.json"))}
    assert sorted(records) == ["online", "prepass"]
    assert records["prepass"]["counts"]["counters"]["prepass_images"] == 6
    assert records["online"]["counts"]["counters"]["prepass_images"] == 0
    assert records["prepass"]["method"]["bias_domains"] == ["image_folder"]
    for record in records.values():
        assert record["results"]["domains"]["image_folder"]["n"] == 6 and record["counts"]["counters"]["backwards"] == 0
    assert (tmp_path / "q.pt").is_file() and "image_folder" in load_bias_file(tmp_path / "q.pt")
