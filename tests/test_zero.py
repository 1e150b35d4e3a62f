"""ZERO on a tiny random CLIP: parity with a re-derivation of FarinaMatteo/zero (``ttas/zero.py``,
``ttas/base.py``, ``utils/tools.py``) -- the kept views, the zero-temperature vote, the greedy tie
rule -- the vote as an aggregation option of TPT and ADTE, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny_clip import build_tiny_clip, write_image_folder
from tta.methods import build
from tta.models.clip import load_clip_classifier
from tta.objectives import shannon_entropy, zero_vote

CLASSES = ["goldfish", "red fox", "tabby cat", "great white shark", "axolotl", "tench"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_zero"), seed=2, logit_scale=100.0)


def make(spec: str, name: str = "zero", **kwargs):
    return build(name, load_clip_classifier(spec[5:], class_names=CLASSES), **kwargs)


# ------------------------------------------------------------------ the official code, re-derived
def official_confidence_filter(logits, probs, top):
    batch_entropy = -(probs * probs.log()).sum(1)
    full_idx = torch.argsort(batch_entropy, descending=False)
    filt_idx = full_idx[:int(batch_entropy.size()[0] * top)]
    return logits[filt_idx], filt_idx, full_idx


def official_greedy_break(ties, logits, fallback):
    ties_tensor = torch.tensor(ties, dtype=torch.int)
    for pred in torch.argmax(logits, dim=1):
        if pred in ties_tensor:
            return pred
    return fallback(ties, logits[0])


def corrected_fallback(ties, logit):
    """The intended ``break_sample_tie``: argmax among the tied classes."""
    idx = torch.tensor([int(t) for t in ties])
    masked = torch.full_like(logit, float("-inf"))
    masked[idx] = logit[idx]
    return torch.argmax(masked)


def released_fallback(ties, logit):
    """``break_sample_tie`` as released: ``~`` on an int tensor is ``-t - 1``."""
    logit = logit.clone()
    logit[~torch.tensor(ties, dtype=torch.int)] = -torch.inf
    return torch.argmax(logit)


def official_vote(l, sorted_idx, k, fallback=corrected_fallback):
    """Lines 79-98 of ``Zero.zero``: the vote of the ``k`` first views of ``sorted_idx`` and the greedy
    tie break over the rest; returns ``p_bar`` (C,) and whether there was a tie."""
    l_filt = l[sorted_idx[:k]]
    zero_temp = torch.finfo(l_filt.dtype).eps
    p_bar = (l_filt / zero_temp).softmax(1).sum(0)
    max_counts, scalar_pred = torch.max(p_bar, dim=-1)
    ties = [scalar_pred]
    for i in range(len(p_bar)):
        if i == scalar_pred:
            continue
        if p_bar[i] == max_counts:
            ties.append(i)
    if len(ties) > 1:
        scalar_pred = official_greedy_break(ties, l[sorted_idx][k:], fallback)
        p_bar[scalar_pred] += 1
    return p_bar, len(ties) > 1


def official_zero(l, temp, gamma=0.3, fallback=corrected_fallback):
    """``Zero.zero`` on unscaled logits ``l`` (V, C): ``p_bar`` (C,), the kept indices, whether tied."""
    p = (l / temp).softmax(1)
    _, kept, sorted_idx = official_confidence_filter(l, p, gamma)
    p_bar, tied = official_vote(l, sorted_idx, int(l.size(0) * gamma), fallback)
    return p_bar, kept, tied


# ------------------------------------------------------------------ the vote and its tie rule
def test_vote_and_tie_rule_match_the_official_code():
    """Integer logits over few classes force ties between classes (and inside views); the vote,
    the greedy break and the winner's extra vote equal the official ones in every case."""
    gen = torch.Generator().manual_seed(0)
    cases = ties = 0
    for _ in range(300):
        num_views = int(torch.randint(4, 12, (1,), generator=gen))
        num_classes = int(torch.randint(2, 5, (1,), generator=gen))
        l = torch.randint(0, 4, (num_views, num_classes), generator=gen).double() / 10
        flat = l.amax(1) == l.amin(1)                          # a uniform view: give it a winner
        l[flat, 0] += 0.1
        l = l * (1 + torch.rand(num_views, 1, generator=gen, dtype=torch.float64))  # distinct view entropies
        p_bar, kept, tied = official_zero(l, 0.01, gamma=0.3)
        weights = torch.zeros(num_views)
        weights[kept] = 1
        scores = shannon_entropy(l * 100, dim=-1)
        ours = zero_vote(l, weights, scores).exp()
        expected = p_bar / p_bar.sum()
        torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=0)
        assert ours.argmax() == p_bar.argmax()
        cases += 1
        ties += tied
    assert cases == 300 and ties > 20  # the tie rule was exercised


def test_released_fallback_can_pick_a_class_that_is_not_tied():
    """No view outside the kept set votes for a tied class: ours takes the tied class with the largest
    logit in the most confident other view; the released ``logit[~ties]`` masks classes 4 and 3
    instead of 2, 3 and 4, and gives the extra vote to class 2, which had none."""
    l = torch.tensor([[0.9, 0.0, 0.0, 0.1, 0.0], [0.0, 0.9, 0.0, 0.1, 0.0], [0.0, 0.1, 0.5, 0.0, 0.0],
                      [0.0, 0.1, 0.4, 0.0, 0.0]], dtype=torch.float64)
    p_bar, kept, tied = official_zero(l, 0.01, gamma=0.5)
    assert sorted(kept.tolist()) == [0, 1] and tied
    released, _, _ = official_zero(l, 0.01, gamma=0.5, fallback=released_fallback)
    assert released.tolist() == [1, 1, 1, 0, 0]             # the bug: a class with no vote gets the extra one
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0])
    ours = zero_vote(l, weights, shannon_entropy(l * 100, dim=-1))
    assert int(ours.argmax()) == int(p_bar.argmax()) == 1   # tied classes 0 and 1: the larger logit of view 2
    torch.testing.assert_close(ours.exp(), (p_bar / p_bar.sum()).float())


# ------------------------------------------------------------------ the method on a tiny CLIP
def official_logits(spec, views):
    clip = load_clip_classifier(spec[5:], class_names=CLASSES).net
    model, tokenizer = clip.clip, clip.tokenizer
    with torch.no_grad():
        z_txt = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in CLASSES])), dim=-1)
        z_img = F.normalize(model.encode_image((views - MEAN) / STD), dim=-1)
    return z_img @ z_txt.t(), 1 / model.logit_scale.exp()


def test_one_image_matches_the_official_zero(tiny_spec):
    method = make(tiny_spec)
    assert method.num_views == 64 and method.gamma == 0.3 and method.vote and method.optimizer is None
    x = torch.rand(2, 3, 32, 32)
    out = method(x, ids=[7, 8])
    assert out.shape == (2, len(CLASSES)) and torch.isfinite(out).all()
    counters = method.stats()
    assert counters["counters"]["views"] == 128 and counters["counters"]["backwards"] == 0
    assert counters["policies"]["tpt_confidence_kept"] == 38
    for i, image_id in enumerate([7, 8]):
        views = method.views(x[i:i + 1], ids=[image_id])[0]
        l, temp = official_logits(tiny_spec, views)
        p_bar, kept, _ = official_zero(l, temp)
        assert len(kept) == 19
        logits = method.view_logits(x[i:i + 1], [image_id])[0]
        assert set(method.ranking.select(logits).nonzero().flatten().tolist()) == set(kept.tolist())
        torch.testing.assert_close(out[i].exp(), p_bar / p_bar.sum(), atol=1e-6, rtol=0)
        assert out[i].argmax() == p_bar.argmax()
    state = method.state_dict()  # nothing learned: the state round-trips as it is
    method.load_state_dict(state)


def test_vote_is_an_aggregation_option_of_tpt_and_adte(tiny_spec):
    x = torch.rand(1, 3, 32, 32)
    # TPT + vote: the first-step kept views vote with the tuned prompt
    tpt = make(tiny_spec, "tpt", num_views=20, vote=True)
    out = tpt(x, ids=[3])
    views = tpt.views(x, ids=[3])[0]
    with torch.no_grad():
        image = tpt.model.encode_image(views)
        tuned = tpt.model.logits_from_features(image, tpt.model.text_features()).float()
        tpt.reset_episode()
        initial = tpt.model.logits_from_features(image, tpt.model.text_features()).float()
    kept = tpt.policies[0].select(initial)
    assert int(kept.sum()) == 2
    # TPT's kept views first (their order does not matter to the vote), then the others by entropy
    order = shannon_entropy(tuned, dim=-1).argsort(stable=True)
    sorted_idx = torch.cat([order[kept[order].bool()], order[~kept[order].bool()]])
    p_bar, _ = official_vote(tuned.double(), sorted_idx, 2)
    torch.testing.assert_close(out[0].exp(), (p_bar / p_bar.sum()).float())
    assert tpt.hparams()["vote"] is True and make(tiny_spec, "tpt", num_views=20).hparams()["vote"] is False
    # ADTE + vote: the same kept views as ADTE's soft vote, counted by argmax
    soft = make(tiny_spec, "adte", num_views=40, bias="uniform")
    hard = make(tiny_spec, "adte", num_views=40, bias="uniform", vote=True)
    logits = soft.view_logits(x, [5])[0]
    kept = soft.ranking.select(logits).bool()
    p_soft, p_hard = soft(x, ids=[5])[0].exp(), hard(x, ids=[5])[0].exp()
    torch.testing.assert_close(p_soft * kept.sum(), logits[kept].softmax(-1).sum(0), atol=1e-5, rtol=1e-5)
    order = soft.ranking.score(logits).argsort(stable=True)
    p_bar, _ = official_vote(logits.double(), order, 4)   # ADTE keeps int(40 * 0.1) = 4 views
    assert int(kept.sum()) == 4
    torch.testing.assert_close(p_hard, (p_bar / p_bar.sum()).float())


def test_impossible_combinations_name_both(tiny_spec):
    with pytest.raises(ValueError, match="'plpd'.*'zero'|'zero'.*'plpd'"):
        make(tiny_spec, extra_policies=["plpd"])
    with pytest.raises(ValueError, match="'cosine_filter'.*'zero'"):
        make(tiny_spec, extra_policies=["cosine_filter"])
    ranked = make(tiny_spec, num_views=16, extra_policies=["tsallis"])
    assert [p.name for p in ranked.policies] == ["tsallis"]
    assert torch.isfinite(ranked(torch.rand(2, 3, 32, 32), ids=[0, 1])).all()


@pytest.mark.slow
def test_cli_zero(tiny_spec, tmp_path):
    root = write_image_folder(tmp_path / "data", ["goldfish", "red_fox", "tabby_cat"], per_class=2)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", f"model={tiny_spec}", "method=zero", "method.num_views=8",
           "data=image_folder", f"data.root={root}", "data.resize=32", "data.crop=32", "progress=false",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["results"]["domains"]["image_folder"]["n"] == 6
    assert record["counts"]["counters"]["views"] == 48 and record["counts"]["counters"]["backwards"] == 0
    assert record["method"]["gamma"] == 0.3 and record["method"]["vote"] is True
