"""TDA on a tiny random CLIP: parity with a re-derivation of kdiAAA/TDA (``tda_runner.py``,
``utils.py``) -- the cache contents after every image, the negative band and mask, the cache logits,
the update-before-predict order -- in the single-view (ImageNet) and multi-view (natural shifts)
settings; the state round trip, the admission gate, and the command line."""
from __future__ import annotations

import io
import json
import math
import operator
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny_clip import build_tiny_clip, write_image_folder
from tta.methods import build
from tta.models.clip import load_clip_classifier

CLASSES = ["goldfish", "red fox", "tabby cat", "great white shark", "axolotl", "tench"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
POS = {"shot_capacity": 3, "alpha": 2.0, "beta": 5.0}
NEG = {"shot_capacity": 2, "alpha": 0.117, "beta": 1.0, "entropy_threshold": {"lower": 0.2, "upper": 0.5},
       "mask_threshold": {"lower": 0.03, "upper": 1.0}}


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_tda"), seed=2, logit_scale=100.0)


def make(spec: str, **kwargs):
    return build("tda", load_clip_classifier(spec[5:], class_names=CLASSES), **kwargs)


# ------------------------------------------------------------------ the official code, re-derived
def softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def avg_entropy(outputs):
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def get_clip_logits(image_features, clip_weights):
    """``utils.py:64-91`` from normalised view features."""
    clip_logits = 100. * image_features @ clip_weights
    if image_features.size(0) > 1:
        batch_entropy = softmax_entropy(clip_logits)
        selected_idx = torch.argsort(batch_entropy, descending=False)[:int(batch_entropy.size()[0] * 0.1)]
        output = clip_logits[selected_idx]
        image_features = image_features[selected_idx].mean(0).unsqueeze(0)
        clip_logits = output.mean(0).unsqueeze(0)
        loss = avg_entropy(output)
        prob_map = output.softmax(1).mean(0).unsqueeze(0)
        pred = int(output.mean(0).unsqueeze(0).topk(1, 1, True, True)[1].t())
    else:
        loss = softmax_entropy(clip_logits)
        prob_map = clip_logits.softmax(1)
        pred = int(clip_logits.topk(1, 1, True, True)[1].t()[0])
    return image_features, clip_logits, loss, prob_map, pred


def update_cache(cache, pred, features_loss, shot_capacity, include_prob_map=False):
    item = features_loss if not include_prob_map else features_loss[:2] + [features_loss[2]]
    if pred in cache:
        if len(cache[pred]) < shot_capacity:
            cache[pred].append(item)
        elif features_loss[1] < cache[pred][-1][1]:
            cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
    else:
        cache[pred] = [item]


def compute_cache_logits(image_features, cache, alpha, beta, num_classes, neg_mask_thresholds=None):
    cache_keys, cache_values = [], []
    for class_index in sorted(cache.keys()):
        for item in cache[class_index]:
            cache_keys.append(item[0])
            cache_values.append(item[2] if neg_mask_thresholds else class_index)
    cache_keys = torch.cat(cache_keys, dim=0).permute(1, 0)
    if neg_mask_thresholds:
        cache_values = torch.cat(cache_values, dim=0)
        cache_values = ((cache_values > neg_mask_thresholds[0]) & (cache_values < neg_mask_thresholds[1])).float()
    else:
        cache_values = F.one_hot(torch.Tensor(cache_values).to(torch.int64), num_classes=num_classes).float()
    affinity = image_features @ cache_keys
    return alpha * ((-1) * (beta - beta * affinity)).exp() @ cache_values


def official_step(features, clip_weights, pos_cache, neg_cache):
    """One iteration of ``run_test_tda`` (``tda_runner.py:79-93``)."""
    image_features, clip_logits, loss, prob_map, pred = get_clip_logits(features, clip_weights)
    prop_entropy = float(loss / math.log2(clip_weights.size(1)))
    update_cache(pos_cache, pred, [image_features, loss], POS["shot_capacity"])
    if NEG["entropy_threshold"]["lower"] < prop_entropy < NEG["entropy_threshold"]["upper"]:
        update_cache(neg_cache, pred, [image_features, loss, prob_map], NEG["shot_capacity"], True)
    final_logits = clip_logits.clone()
    if pos_cache:
        final_logits += compute_cache_logits(image_features, pos_cache, POS["alpha"], POS["beta"], len(CLASSES))
    if neg_cache:
        final_logits -= compute_cache_logits(image_features, neg_cache, NEG["alpha"], NEG["beta"], len(CLASSES),
                                             (NEG["mask_threshold"]["lower"], NEG["mask_threshold"]["upper"]))
    return final_logits


def official_weights(spec):
    clip = load_clip_classifier(spec[5:], class_names=CLASSES).net
    with torch.no_grad():
        text = F.normalize(clip.clip.encode_text(clip.tokenizer([f"a photo of a {n}." for n in CLASSES])), dim=-1)
    return clip.clip, text.t()


def assert_same_cache(ours, cache, with_probs=False):
    for c in range(len(CLASSES)):
        entries = cache.get(c, [])
        assert int(ours.count[c]) == len(entries)
        for k, item in enumerate(entries):
            torch.testing.assert_close(ours.entropy[c, k], item[1].reshape(()), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.features[c, k], item[0][0], atol=1e-5, rtol=1e-5)
            if with_probs:
                torch.testing.assert_close(ours.probs[c, k], item[2][0], atol=1e-5, rtol=1e-5)


def run_both(spec, method, x):
    clip, clip_weights = official_weights(spec)
    pos_cache, neg_cache = {}, {}
    negatives = 0
    for i in range(x.shape[0]):
        ours = method(x[i:i + 1], ids=[i])
        views = method.views(x[i:i + 1], ids=[i])[0]
        with torch.no_grad():
            features = F.normalize(clip.encode_image((views - MEAN) / STD), dim=-1)
            expected = official_step(features, clip_weights, pos_cache, neg_cache)
        assert_same_cache(method.positive, pos_cache)
        assert_same_cache(method.negative, neg_cache, with_probs=True)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
        negatives = sum(len(v) for v in neg_cache.values())
    return pos_cache, negatives


def test_single_view_stream_matches_the_official_loop(tiny_spec):
    method = make(tiny_spec)
    assert method.num_views == 1 and method.positive.capacity == 3 and method.negative.capacity == 2
    x = torch.rand(14, 3, 32, 32)
    pos_cache, negatives = run_both(tiny_spec, method, x)
    assert max(len(v) for v in pos_cache.values()) == 3 and negatives > 0   # a full class and the negative band
    counters = method.stats()["counters"]
    assert counters["positive_admitted"] > sum(len(v) for v in pos_cache.values())  # replacements happened


def test_multi_view_stream_matches_the_official_loop(tiny_spec):
    method = make(tiny_spec, num_views=20, augmix=True, pos_alpha=2.0, pos_beta=5.0)
    run_both(tiny_spec, method, torch.rand(6, 3, 32, 32))


def test_update_comes_before_the_prediction(tiny_spec):
    """The first image of the stream already matches itself: +alpha on its own pseudo-class."""
    method = make(tiny_spec, negative=False)
    x = torch.rand(1, 3, 32, 32)
    zero_shot = method.model(x)
    out = method(x, ids=[0])
    bonus = torch.zeros_like(zero_shot)
    bonus[0, zero_shot.argmax()] = 2.0
    torch.testing.assert_close(out, zero_shot + bonus, atol=1e-4, rtol=1e-5)


def test_state_round_trip_and_reset(tiny_spec):
    method = make(tiny_spec)
    x = torch.rand(8, 3, 32, 32)
    method(x[:6], ids=list(range(6)))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"positive.features", "positive.entropy", "positive.count", "negative.probs"} <= set(state)
    restored = make(tiny_spec)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x[6:], ids=[6, 7]), method(x[6:], ids=[6, 7]))
    method.reset()
    assert int(method.positive.size) == 0 and int(method.negative.size) == 0
    torch.testing.assert_close(method(x[:1], ids=[0]), make(tiny_spec)(x[:1], ids=[0]))


def test_admission_gate_and_impossible_combinations(tiny_spec):
    x = torch.rand(6, 3, 32, 32)
    gated = make(tiny_spec, admission=["entropy_margin"], admission_kwargs={"entropy_margin": {"margin": 0.0}})
    out = gated(x, ids=list(range(6)))
    torch.testing.assert_close(out, gated.model(x))  # nothing admitted: zero-shot logits
    assert gated.stats()["counters"]["admission_gated"] == 6 and int(gated.positive.size) == 0
    wide = make(tiny_spec, admission=["entropy_margin"], admission_kwargs={"entropy_margin": {"margin": 100.0}})
    torch.testing.assert_close(wide(x, ids=list(range(6))), make(tiny_spec)(x, ids=list(range(6))))
    with pytest.raises(ValueError, match="'tda'"):
        make(tiny_spec, vote=True)
    with pytest.raises(ValueError, match="'tsallis'.*'tda"):
        make(tiny_spec, admission=["tsallis"])
    with pytest.raises(ValueError, match="'plpd'.*'tda'"):
        make(tiny_spec, extra_policies=["plpd"])


@pytest.mark.slow
def test_cli_tda(tiny_spec, tmp_path):
    root = write_image_folder(tmp_path / "data", ["goldfish", "red_fox", "tabby_cat"], per_class=3)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", f"model={tiny_spec}", "method=tda", "data=image_folder",
           f"data.root={root}", "data.resize=32", "data.crop=32", "progress=false", "batch_size=4",
           "method.admission=[entropy_margin]", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["results"]["domains"]["image_folder"]["n"] == 9
    counters = record["counts"]["counters"]
    assert counters["views"] == 9 and counters["backwards"] == 0 and counters["positive_admitted"] > 0
    assert record["method"]["positive"]["alpha"] == 2.0 and record["method"]["admission"][0]["name"] == "entropy_margin"


def test_natural_shift_protocols_carry_the_per_dataset_values():
    from tta import protocols
    from tta.run import method_defaults

    defaults = method_defaults("tda")
    assert (defaults["num_views"], defaults["pos_alpha"], defaults["pos_beta"]) == (1, 2.0, 5.0)  # imagenet.yaml
    expected = {"imagenet_a": (2.0, 5.0, "tip7"), "imagenet_v2": (1.0, 8.0, "tip7"),
                "imagenet_r": (1.0, 8.0, "imagenet80"), "imagenet_sketch": (2.363, 7.45, "imagenet80")}
    for name, (alpha, beta, templates) in expected.items():
        kwargs, origins = protocols.resolve("tda", name, 200, defaults, {})
        got = (kwargs["num_views"], kwargs["augmix"], kwargs["pos_alpha"], kwargs["pos_beta"], kwargs["templates"])
        assert got == (64, True, alpha, beta, templates)
        assert origins["pos_alpha"] == "protocol"
    kwargs, _ = protocols.resolve("tda", "imagenet", 1000, defaults, {})
    assert kwargs["num_views"] == 1 and kwargs["neg_alpha"] == 0.117 and kwargs["templates"] == "tip7"


def test_tta_adapt_runs_the_three_clip_baselines(tiny_spec):
    """``tta.adapt`` on a CLIP classifier: ZERO, C-TPT and TDA, with the natural-shift protocol's values."""
    import tta

    clip = load_clip_classifier(tiny_spec[5:], class_names=CLASSES)
    x = torch.rand(2, 3, 32, 32)
    for name, kwargs in (("zero", {"num_views": 8}), ("ctpt", {"num_views": 8}), ("tda", {})):
        adapted = tta.adapt(clip, method=name, **kwargs)
        out = adapted(x)
        assert out.shape == (2, len(CLASSES)) and torch.isfinite(out).all(), name
    tda = tta.adapt(clip, method="tda", protocol="imagenet_r", num_views=8)
    assert tda.num_views == 8 and tda.positive.alpha == 1.0 and tda.positive.beta == 8.0 and tda.base_views.augmix
    tda(x)
    assert int(tda.positive.size) > 0
    ctpt = tta.adapt(clip, method="ctpt", protocol="imagenet_a", num_views=8)
    assert ctpt.dispersion == 20.0 and ctpt.base_views.augmix


def test_steady_state_of_tda_and_zero_has_no_host_sync(tiny_spec):
    """The caches update with gathers and indexed copies, the vote with masks: nothing is read on the
    host per image (counted with the dispatch-mode counter of ``test_host_sync``)."""
    from test_host_sync import SyncCounter

    x = torch.rand(3, 3, 32, 32)
    for name, kwargs in (("tda", {}), ("tda", {"num_views": 8, "admission": ["entropy_margin"]}),
                         ("zero", {"num_views": 8})):
        method = build(name, load_clip_classifier(tiny_spec[5:], class_names=CLASSES), nonfinite="skip",
                       input_range=None, **kwargs)
        method(x, ids=[0, 1, 2])
        with SyncCounter() as counter:
            method(x, ids=[3, 4, 5])
        assert not counter.sites, (name, counter.report())


def test_cache_admission_ties_follow_the_released_rule():
    """Equal entropies: a full class keeps its last entry (strict ``<``), and among equal entropies the
    older entry stays first (Python's stable ``sorted``); the same sequence through ``update_cache``."""
    from tta.methods.cache import ClassCache

    cache = ClassCache(num_classes=2, dim=3, capacity=2, alpha=1.0, beta=1.0)
    official: dict = {}
    offers = [(0, 1.0), (0, 1.0), (0, 1.0), (0, 0.5), (0, 1.0), (1, 2.0), (1, 3.0), (1, 3.0), (1, 2.5)]
    for step, (label, h) in enumerate(offers):
        feature = torch.full((3,), float(step))
        cache.admit(torch.tensor(label), feature, torch.tensor(h))
        update_cache(official, label, [feature[None], torch.tensor(h)], 2)
        for c in (0, 1):
            entries = official.get(c, [])
            assert int(cache.count[c]) == len(entries)
            assert [float(cache.features[c, k, 0]) for k in range(len(entries))] == [float(e[0][0, 0]) for e in entries]
            assert [float(cache.entropy[c, k]) for k in range(len(entries))] == [float(e[1]) for e in entries]
