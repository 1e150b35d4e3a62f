"""CLIP wrapper, image-folder datasets and views, on a tiny random open_clip model (offline).

The model is built from a config, saved to a temporary folder and loaded back through
``clip:<arch>/<file>``, the path ``clip:ViT-B-16/openai`` takes (tests/tiny_clip.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_clip import ARCH, build_tiny_clip, write_image_folder
from tta.augment.views import ViewGenerator, augmix_view, resize_center_crop, resized_crop_params
from tta.models import configure_model, load_classifier
from tta.models.clip import ClipClassifier, load_clip_classifier, parse_clip_spec, text_tower
from tta.models.clip_classnames import IMAGENET_A_WNIDS, IMAGENET_CLASSES, IMAGENET_R_WNIDS, IMAGENET_WNIDS
from tta.models.clip_templates import TIP_ADAPTER_7, get_templates

CLASSES = ["red_fox", "tabby cat", "goldfish"]


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder") / "data", ["goldfish", "red_fox", "tabby_cat"], 2)


def reference_logits(clip, tokenizer, names, templates, x):
    """CLIP zero-shot logits written the plain way: full 77-token prompts through open_clip."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        image = F.normalize(clip.encode_image((x - mean) / std), dim=-1)
        heads = []
        for name in names:
            feats = F.normalize(clip.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            heads.append(F.normalize(feats.mean(0), dim=-1))
        return clip.logit_scale.exp() * image @ torch.stack(heads).T


def test_spec_parsing():
    assert parse_clip_spec("ViT-B-16/openai") == ("ViT-B-16", "openai")
    assert parse_clip_spec("ViT-B/16/openai") == ("ViT-B-16", "openai")
    assert parse_clip_spec("RN50") == ("RN50", None)
    assert parse_clip_spec("tiny//tmp/x/w.pt") == ("tiny", "/tmp/x/w.pt")
    with pytest.raises(ValueError):
        parse_clip_spec("")


def test_loads_by_spec_and_matches_plain_clip(tiny_spec):
    model = load_classifier(tiny_spec)  # no class names: the 1,000 ImageNet names
    assert isinstance(model, ClipClassifier) and model.num_classes == 1000
    assert model.info.source == "open_clip" and model.info.input_size == (32, 32)
    assert model.info.weights.endswith("tiny_clip.pt") and model.net.class_names == IMAGENET_CLASSES
    clf = load_clip_classifier(tiny_spec[5:], class_names=CLASSES, templates="tip7")
    x = torch.rand(3, 3, 32, 32)
    names = [n.replace("_", " ") for n in CLASSES]  # CLIP/TPT/ADTE read "_" in class names as a space
    ref = reference_logits(clf.net.clip, clf.net.tokenizer, names, TIP_ADAPTER_7, x)
    torch.testing.assert_close(clf(x), ref, atol=2e-5, rtol=1e-5)
    # images of another size are resized (short side, bicubic) and centre-cropped first
    big = torch.rand(2, 3, 40, 48)
    torch.testing.assert_close(clf(big), clf(resize_center_crop(big, 32)))
    feats = clf.features(x)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(clf.logits_from_features(feats), clf(x))


def test_truncated_text_encoding_is_identical(tiny_spec):
    clf = load_clip_classifier(tiny_spec[5:], class_names=CLASSES)
    tower = text_tower(clf.net.clip)
    assert tower.truncatable
    tokens = clf.net.tokenizer(["a photo of a goldfish.", "itap of a red fox.", "a bad photo of the tabby cat."])
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_tokens(tokens, truncate=True), clf.net.clip.encode_text(tokens),
                                   atol=1e-5, rtol=1e-5)
    assert clf.net.prompt.length < 20  # cut after the longest EOT instead of 77 tokens


def test_prompt_learner_starts_at_the_zero_shot_head(tiny_spec):
    clf = load_clip_classifier(tiny_spec[5:], class_names=CLASSES)
    net = clf.net
    tokens = net.tokenizer(["a photo of a"])
    with torch.no_grad():
        expected = net.clip.token_embedding(tokens)[0, 1:5]
    assert net.prompt.n_ctx == 4 and net.prompt.ctx.shape == expected.shape
    torch.testing.assert_close(net.prompt.ctx.detach(), expected)
    frozen = net.text_features().clone()
    named = configure_model(net, "prompt", batch_stats=False)
    assert [n for n, _ in named] == ["prompt.ctx"] and net.text_mode == "prompt"
    with torch.no_grad():
        torch.testing.assert_close(net.text_features(), frozen, atol=1e-5, rtol=1e-5)
    assert sum(p.requires_grad for p in net.parameters()) == 1


def test_prompt_learner_counts_context_words_as_tpt(tiny_spec):
    """TPT: ``n_ctx = len(ctx_init.split(" "))`` and ``ctx = embedding[0, 1:1 + n_ctx]``; the prompt is
    ``prefix + ctx + embedding[:, 1 + n_ctx:]``. "itap of a" is 3 words but 4 BPE tokens ("it", "ap"):
    3 learnable vectors, the 4th token ("a") stays fixed in the suffix, in front of the class name."""
    clf = load_clip_classifier(tiny_spec[5:], class_names=CLASSES, ctx_init="itap_of_a")
    net = clf.net
    init_tokens = net.tokenizer(["itap of a"])
    assert int(init_tokens[0].argmax()) - 1 == 4  # 4 tokens between SOT and EOT
    prompts = net.tokenizer([f"itap of a {n.replace('_', ' ')}." for n in CLASSES])
    with torch.no_grad():
        emb = net.clip.token_embedding(prompts)
        expected_ctx = net.clip.token_embedding(init_tokens)[0, 1:4]
    assert net.prompt.n_ctx == 3 and net.prompt.ctx.shape == expected_ctx.shape
    torch.testing.assert_close(net.prompt.ctx.detach(), expected_ctx)
    suffix = net.prompt.token_suffix
    torch.testing.assert_close(suffix, emb[:, 4:4 + suffix.shape[1]])  # starts with the fixed token "a"
    configure_model(net, "prompt", batch_stats=False)
    with torch.no_grad():  # the initial prompt is the zero-shot head of the same sentence
        frozen = F.normalize(net.clip.encode_text(prompts), dim=-1)
        torch.testing.assert_close(net.text_features(), frozen, atol=1e-5, rtol=1e-5)
    learn_all = load_clip_classifier(tiny_spec[5:], class_names=CLASSES, ctx_init="itap_of_a", ctx_tokens="all")
    assert learn_all.net.prompt.n_ctx == 4  # the option: every token of ctx_init learns
    with pytest.raises(ValueError, match="CLS"):
        load_clip_classifier(tiny_spec[5:], class_names=CLASSES, ctx_init="a_photo_of_a_[CLS]")


def test_parameter_presets(tiny_spec):
    clf = load_clip_classifier(tiny_spec[5:], class_names=CLASSES)
    ln = [n for n, _ in clf.net.adaptable_params("ln")]
    norm = [n for n, _ in clf.net.adaptable_params("norm")]
    assert ln and ln == norm and all(n.startswith("clip.visual.") for n in ln)
    assert any("ln_post" in n for n in ln) and any("ln_1" in n for n in ln)
    before = clf.net.text_features().clone()
    named = configure_model(clf.net, "ln")
    assert clf.net.text_mode == "frozen" and len(named) == len(ln)
    with torch.no_grad():
        named[0][1].add_(1.0)  # an image-side change keeps the cached text head valid
    assert torch.equal(clf.net.text_features(), before)
    with pytest.raises(ValueError, match="unknown parameter preset"):
        clf.net.adaptable_params("nope")


def test_templates_and_errors(tiny_spec, tmp_path):
    assert len(get_templates("imagenet80")) == 80 and get_templates("single") == ["a photo of a {}."]
    assert get_templates("adte") == TIP_ADAPTER_7
    with pytest.raises(ValueError, match="needs their names"):
        load_clip_classifier(tiny_spec[5:], num_classes=3)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip_classifier(f"{ARCH}/{tmp_path}/missing.pt")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip_classifier("no-such-arch/openai")


def test_class_lists():
    assert len(IMAGENET_CLASSES) == 1000 and IMAGENET_CLASSES[0] == "tench"
    assert IMAGENET_WNIDS == sorted(IMAGENET_WNIDS) and len(set(IMAGENET_WNIDS)) == 1000
    assert len(IMAGENET_A_WNIDS) == 200 and len(IMAGENET_R_WNIDS) == 200
    from tta.data import load_data_config, num_classes_of
    from tta.data.folders import clip_class_names

    a, r, v2 = (load_data_config(n) for n in ("imagenet_a", "imagenet_r", "imagenet_v2"))
    assert a["classes"] == IMAGENET_A_WNIDS and r["classes"] == IMAGENET_R_WNIDS
    assert clip_class_names(a)[:2] == ["stingray", "goldfinch"] and num_classes_of(a) == 200
    assert v2["classes"][10] == "10" and clip_class_names(v2) == IMAGENET_CLASSES
    assert clip_class_names(load_data_config("imagenet")) == IMAGENET_CLASSES


def test_image_folder_loader(image_root, tmp_path):
    from PIL import Image
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    from tta.data import build_stream, load_data_config

    config = {**load_data_config("image_folder"), "root": str(image_root), "resize": 32, "crop": 32}
    stream, _ = build_stream(config, seed=0, shuffle=False, decode="cpu", num_workers=0)
    batches = list(stream)
    assert [b.domain for b in batches] == ["image_folder"] and batches[0].images.shape == (6, 3, 32, 32)
    assert batches[0].labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the same pixels as TPT's Resize(32, bicubic) + CenterCrop(32) on the PIL image, up to rounding
    pil = Image.open(image_root / "goldfish" / "img0.png").convert("RGB")
    ref = np.asarray(CenterCrop(32)(Resize(32, InterpolationMode.BICUBIC)(pil)), dtype=np.float32)
    ref = torch.from_numpy(ref).permute(2, 0, 1) / 255
    assert (batches[0].images[0] - ref).abs().max() <= 3 / 255
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        build_stream({**config, "root": str(tmp_path / "missing_folder")})
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_stream(load_data_config("imagenet_a"))


def test_views_are_seeded_per_image_and_view():
    gen = ViewGenerator(num_views=6, size=16, seed=3)
    x = torch.rand(3, 3, 24, 24)
    views = gen(x, ids=[10, 11, 12])
    assert views.shape == (3, 6, 3, 16, 16) and 0 <= views.min() and views.max() <= 1
    torch.testing.assert_close(views[:, 0], resize_center_crop(x, 16))
    torch.testing.assert_close(gen(x[1:2], ids=[11])[0], views[1])          # independent of the batch
    assert not torch.equal(gen(x, ids=[10, 11, 12], salt=1), views)          # another pass draws anew
    assert not torch.equal(views[0, 1], views[0, 2])
    # RandomResizedCrop.get_params re-derived: first valid of 10 tries, else the central crop
    u = torch.rand(5, 10, 4, dtype=torch.float64)
    params = resized_crop_params(u, 24, 30)
    for row, p in zip(u, params):
        expected = None
        for s, r, a, b in row.tolist():
            target = 24 * 30 * (0.08 + s * 0.92)
            ratio = torch.exp(torch.tensor(-0.2876820724517809 + r * 0.5753641449035618, dtype=torch.float64)).item()
            w, h = round((target * ratio) ** 0.5), round((target / ratio) ** 0.5)
            if 0 < w <= 30 and 0 < h <= 24:
                expected = [int(a * (24 - h + 1)), int(b * (30 - w + 1)), h, w]
                break
        assert p.tolist() == expected
    impossible = resized_crop_params(torch.ones(1, 10, 4, dtype=torch.float64) * 0.999, 4, 400)
    assert impossible[0].tolist() == [0, 197, 4, 5]  # the fallback: the widest allowed crop, centred


def test_augmix_views():
    gen = ViewGenerator(num_views=4, size=16, augmix=True, seed=0)
    views = gen(torch.rand(2, 3, 20, 20), ids=[1, 2])
    assert views.shape == (2, 4, 3, 16, 16) and views.min() >= 0 and views.max() <= 1
    crop = torch.rand(3, 16, 16)
    mixed_only = [0.5, 0.5, 0.5, 1.0 - 1e-12] + [0.0] * 30  # m ~ 1: the (quantised) crop itself
    torch.testing.assert_close(augmix_view(crop, mixed_only), (crop * 255).round() / 255, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_cli_batch_methods_on_clip(tiny_spec, image_root, tmp_path):
    """Tent and ETA (with the crowds policy) adapt the image LayerNorms of a CLIP model from the CLI."""
    out = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", "-m", f"model={tiny_spec}", "method=tent,eta", "policies.extra=[],[crowds]",
           "method.params=ln", "data=image_folder", f"data.root={image_root}", "data.resize=32", "data.crop=32",
           "batch_size=3", "progress=false", f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/run.json"))]
    assert len(records) == 4
    for record in records:
        assert record["model"]["source"] == "open_clip" and record["results"]["domains"]["image_folder"]["n"] == 6
        assert record["method"]["params"] == "ln" and record["method"]["num_adapted_tensors"] > 0
        assert record["counts"]["counters"]["batches"] == 2
    assert {r["method"]["method"] for r in records} == {"tent", "eta"}
    assert any(p["name"] == "crowds" for r in records for p in r["method"]["policies"])
