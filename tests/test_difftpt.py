"""DiffTPT (docs/methods/difftpt.md): the cosine filter, the 128-view layout, the two-stage selection,
4 steps with the selection fixed after the first, per-image reset, diffusion views for TPT/ADTE,
seeded subsets, and the command line end to end (a second run generates nothing).

Offline: a tiny open_clip model (tests/tiny_clip.py) and a tiny Stable Diffusion image-variation
pipeline (tests/tiny_diffusion.py) saved to temporary folders, loaded back by the same code path as
the real weights.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_clip import build_tiny_clip, write_image_folder
from tiny_diffusion import build_image_variation_pipeline
from tta import methods, policies
from tta.augment.mixed_views import DiffusionViewGenerator, StreamImageNames
from tta.provide import RunParts, provide_inputs
from tta.augment.views import ViewGenerator, resize_center_crop
from tta.policies import BatchContext

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("difftpt")
    spec = build_tiny_clip(root / "clip")
    pipe = build_image_variation_pipeline(root / "pipe")
    data = write_image_folder(root / "data", CLASSES, per_class=4)
    return {"spec": spec, "pipe": pipe, "data": data, "root": root}


def clip_model(assets):
    from tta.models.clip import load_clip_classifier

    return load_clip_classifier(assets["spec"][5:], class_names=CLASSES)


# ------------------------------------------------------------------ reference selection (docs/methods/difftpt.md)
def official_selection(logits: torch.Tensor, cosine: float = 0.8, entropy: float = 0.3) -> set[int]:
    """Steps 2 and 3 of docs/methods/difftpt.md with index lists, as the released code does it: cosine of view 0's
    logit vector to each other view, the top int(127 * 0.8) descending, view 0 prepended; then the
    int(102 * 0.3) lowest-entropy candidates. Returns the kept view indices."""
    sims = torch.stack([torch.nn.CosineSimilarity(dim=0)(logits[0], logits[i]) for i in range(1, len(logits))])
    top = (torch.argsort(sims, descending=True)[: int(sims.shape[0] * cosine)] + 1).tolist()
    candidates = [0] + top
    z = logits[candidates]
    ent = -(z.softmax(1) * z.log_softmax(1)).sum(1)
    keep = torch.argsort(ent)[: int(len(candidates) * entropy)].tolist()
    return {candidates[i] for i in keep}


def official_cosine(logits: torch.Tensor, ratio: float = 0.8) -> set[int]:
    sims = torch.stack([torch.nn.CosineSimilarity(dim=0)(logits[0], logits[i]) for i in range(1, len(logits))])
    return {0} | set((torch.argsort(sims, descending=True)[: int(sims.shape[0] * ratio)] + 1).tolist())


def select(logits: torch.Tensor, *names: str, **ctx_extras) -> torch.Tensor:
    ctx = BatchContext(torch.zeros(len(logits), 3, 2, 2), logits, None, **ctx_extras)
    weights = torch.ones(len(logits))
    for name in names:
        weights = weights * policies.build(name, num_classes=logits.shape[1])(ctx, weights > 0)
    return weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_filter_on_logits_keeps_view0_and_the_top_80_percent(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(128, 200, generator=g) * 4 + torch.randn(1, 200, generator=g) * 3
    weights = select(logits, "cosine_filter")
    assert int(weights.sum()) == 102 == 1 + int(127 * 0.8) and weights[0] == 1
    assert set(torch.nonzero(weights).flatten().tolist()) == official_cosine(logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_stage_selection_is_30_of_102_as_released(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(128, 200, generator=g) * 4 + torch.randn(1, 200, generator=g) * 3
    weights = select(logits, "cosine_filter", "difftpt_confidence")
    assert int(weights.sum()) == 30 == int(102 * 0.3)
    assert set(torch.nonzero(weights).flatten().tolist()) == official_selection(logits)


def test_cosine_filter_on_embeddings_and_with_dead_views():
    g = torch.Generator().manual_seed(5)
    logits, feats = torch.randn(11, 7, generator=g), torch.randn(11, 16, generator=g)
    on_emb = policies.build("cosine_filter", on="embeddings")
    ctx = BatchContext(torch.zeros(11, 3, 2, 2), logits, None, image_features=feats)
    weights = on_emb(ctx, torch.ones(11, dtype=torch.bool))
    assert set(torch.nonzero(weights).flatten().tolist()) == official_cosine(feats)
    # views killed by an earlier policy do not count: 8 alive others -> int(8 * 0.8) = 6, plus view 0
    alive = torch.ones(11, dtype=torch.bool)
    alive[[3, 7]] = False
    kept = policies.build("cosine_filter")(BatchContext(None, logits, None), alive)
    assert int(kept.sum()) == 7 and kept[0] == 1 and kept[3] == 0 and kept[7] == 0
    with pytest.raises(ValueError, match="on must be"):
        policies.build("cosine_filter", on="pixels")


# ------------------------------------------------------------------ the method, with a stub diffusion source
class StubDiffusion:
    """The DiffusionViews interface with constant-colour views: view k of any image has value (k + 1) / 100."""

    def __init__(self, num_views: int, resolution: int = 24):
        self.num_views, self.resolution = num_views, resolution
        self.key_params = {"pipeline": "stub"}
        self.stats = {"cache_hits": 0, "generated": 0, "invalid": 0}
        self.calls: list[list[str]] = []

    def __call__(self, images, ids):
        self.calls.append(list(ids))
        self.stats["generated"] += len(ids) * self.num_views
        value = (torch.arange(self.num_views, dtype=torch.float32) + 1) / 100
        return value.view(1, -1, 1, 1, 1).expand(len(ids), -1, 3, self.resolution, self.resolution).clone()


def spy_views(method) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    original = method.tune_and_predict

    def tune_and_predict(views):
        seen.append(views.detach().clone())
        return original(views)

    method.tune_and_predict = tune_and_predict
    return seen


def test_default_layout_is_original_64_crops_63_diffusion_views(assets):
    model = clip_model(assets)
    method = methods.build("difftpt", model, num_classes=3, diffusion_views=StubDiffusion(63))
    hp = method.hparams()
    assert (hp["num_views"], hp["num_augmented"], hp["num_diffusion"], hp["steps"]) == (128, 64, 63, 4)
    assert hp["optimizer"]["name"] == "adamw" and hp["optimizer"]["lr"] == 5e-3
    assert [p["name"] for p in hp["policies"]] == ["cosine_filter", "difftpt_confidence"]
    seen = spy_views(method)
    method.steps = 1  # the layout only
    x = torch.rand(1, 3, 40, 48)
    method(x, ids=torch.tensor([7]))
    views = seen[0]
    size = model.input_size[0]
    assert views.shape == (128, 3, size, size)
    assert torch.allclose(views[0], resize_center_crop(x, size)[0])  # view 0: the original
    crops = ViewGenerator(65, size, seed=0)(x, ids=[7])[0]  # DiffTPT's AugMixAugmenter(n_views=64)
    assert torch.allclose(views[:65], crops)
    for k in range(63):  # then the 63 diffusion views in order, resized to the model's resolution
        assert torch.allclose(views[65 + k], torch.full_like(views[65 + k], (k + 1) / 100), atol=1e-6)


def small_difftpt(assets, **kwargs):
    model = clip_model(assets)
    stub = StubDiffusion(kwargs.pop("num_diffusion_views", 9))
    return methods.build("difftpt", model, num_classes=3, num_views=kwargs.pop("num_views", 14),
                         diffusion_views=stub, **kwargs)


def test_four_steps_selection_fixed_after_the_first_and_official_on_first_logits(assets, monkeypatch):
    import tta.methods.tpt as tpt_module

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = tpt_module.weighted_marginal_entropy

    def spy(logits, weights):
        calls.append((logits.detach().clone(), weights.detach().clone()))
        return original(logits, weights)

    monkeypatch.setattr(tpt_module, "weighted_marginal_entropy", spy)
    method = small_difftpt(assets)  # 1 + 14 + 9 = 24 views: 1 + int(23 * 0.8) = 19 candidates, int(19 * 0.3) = 5
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(3))
    method(x, ids=torch.tensor([1, 2]))
    assert len(calls) == 8  # 4 steps per image
    counters = method.stats()["counters"]
    assert counters["backwards"] == 8 and counters["episodes"] == 2 and counters["views"] == 48
    for image in range(2):
        steps = calls[4 * image: 4 * image + 4]
        first_logits, first_weights = steps[0]
        assert set(torch.nonzero(first_weights).flatten().tolist()) == official_selection(first_logits)
        assert int(first_weights.sum()) == 5
        for logits, weights in steps[1:]:
            assert torch.equal(weights, first_weights)  # the indices are fixed after the first step
        assert not torch.allclose(steps[1][0], first_logits)  # while the prompt (so the logits) moved
    policy_counts = method.stats()["policies"]
    assert policy_counts["cosine_filter_kept"] == 2 * 19 and policy_counts["difftpt_confidence_kept"] == 2 * 5


def test_matches_a_plain_reimplementation_of_the_released_loop(assets):
    """Section 8 steps 1-6 written out with index lists and torch.optim.AdamW on the same views."""
    method = small_difftpt(assets, grad_scale=0)
    seen = spy_views(method)
    reference = copy.deepcopy(method.model)
    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(11))
    out = method(x, ids=torch.tensor([4]))
    views = seen[0]
    ctx = reference.net.prompt.ctx
    with torch.no_grad():
        ctx.copy_(reference.net.prompt.ctx_init_state)
    optimizer = torch.optim.AdamW([ctx], lr=5e-3)
    image = reference.encode_image(views).detach()
    chosen = None
    for _ in range(4):
        logits = reference.logits_from_features(image, reference.text_features())
        if chosen is None:
            chosen = sorted(official_selection(logits.detach()))
        z = logits[chosen]
        log_mean = torch.logsumexp(z.log_softmax(1), dim=0) - math.log(len(chosen))
        loss = -(log_mean.exp() * log_mean).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        expected = reference.logits_from_features(image[:1], reference.text_features())
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_prompt_and_optimizer_reset_between_images(assets):
    a = small_difftpt(assets)
    b = small_difftpt(assets)
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    both = a(x, ids=torch.tensor([10, 11]))
    alone = b(x[1:], ids=torch.tensor([11]))  # a fresh method on the second image only
    assert torch.allclose(both[1:], alone, atol=1e-6)
    assert not torch.allclose(a.model.net.prompt.ctx, a.model.net.prompt.ctx_init_state)  # it did tune
    a.reset_episode()
    assert torch.equal(a.model.net.prompt.ctx, a.model.net.prompt.ctx_init_state)


def test_without_diffusion_views_is_a_clear_error_unless_none_are_wanted(assets):
    method = methods.build("difftpt", clip_model(assets), num_classes=3, num_views=6)
    with pytest.raises(RuntimeError, match="diffusion views"):
        method(torch.rand(1, 3, 40, 48))
    method = methods.build("difftpt", clip_model(assets), num_classes=3, num_views=6, num_diffusion=0)
    assert method(torch.rand(1, 3, 40, 48)).shape == (1, 3)


# ------------------------------------------------------------------ diffusion views for TPT / ADTE
@pytest.mark.parametrize("mode,expected", [("add", 8 + 4), ("replace", 1 + 4)])
def test_diffusion_views_feed_tpt(assets, mode, expected):
    stub = StubDiffusion(4)
    method = methods.build("tpt", clip_model(assets), num_classes=3, num_views=8, diffusion_views=stub,
                           diffusion_mode=mode)
    assert isinstance(method.views, DiffusionViewGenerator) and method.num_views == expected
    seen = spy_views(method)
    method(torch.rand(2, 3, 40, 48), ids=torch.tensor([3, 4]))
    assert [v.shape[0] for v in seen] == [expected, expected]
    assert stub.calls == [["#3"], ["#4"]]  # one image at a time, named by sample id without a stream
    assert method.views.requested == 8


def test_the_provider_gives_adte_diffusion_views_and_records_them(assets, tmp_path):
    adte = methods.METHODS.get("adte")
    cfg = {"pipeline": str(assets["pipe"]), "num_views": 2, "steps": 2, "cache_dir": str(tmp_path), "mode": "add"}
    inputs = provide_inputs(adte, {"bias": "uniform"}, RunParts(device="cpu", augment={"diffusion": cfg}, progress=False))
    assert sorted(inputs) == ["diffusion_mode", "diffusion_views", "image_names"]
    method = methods.build("adte", clip_model(assets), num_classes=3, num_views=6, bias="uniform", **inputs)
    assert method.num_views == 8 and isinstance(method.views, DiffusionViewGenerator)
    out = method(torch.rand(2, 3, 40, 48), ids=torch.tensor([1, 2]))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    stats = method.input_records()["diffusion_views"]
    assert (stats["generated"], stats["cache_hits"], stats["requested"]) == (4, 0, 4)
    assert stats["steps"] == 2 and Path(stats["cache_dir"]).is_dir()
    tpt = methods.METHODS.get("tpt")
    assert provide_inputs(tpt, {}, RunParts(augment={"diffusion": {"pipeline": None}})) == {}
    with pytest.raises(ValueError, match="view-based"):
        provide_inputs(methods.METHODS.get("tent"), {}, RunParts(augment={"diffusion": cfg}))


# ------------------------------------------------------------------ sample names and subsets
def test_stream_names_are_relative_paths_with_the_stream_preprocessing(assets):
    from tta.data.benchmarks import build_stream

    config = {"name": "image_folder", "kind": "image_folder", "root": str(assets["data"]), "resize": 0,
              "crop": 0, "subset": 5, "subset_seed": 3}
    stream, _ = build_stream(config, seed=0, batch_size=1)
    names = StreamImageNames(stream)
    keys = stream.describe()["subset"]["keys"]
    seen = [names(batch.ids)[0] for batch in stream]
    assert sorted(seen) == sorted(keys) and all(k.split("/")[0] in CLASSES for k in keys)
    config.update(resize=32, crop=32)
    stream, _ = build_stream(config, seed=0, batch_size=4)
    batch = next(iter(stream))
    assert [n.split("@")[0] for n in names.__class__(stream)(batch.ids)] == batch.keys
    assert names.__class__(stream)(batch.ids)[0].endswith("@resize32-crop32-bicubic")


def test_corrupted_domains_are_named_by_domain():
    from tta.data.benchmarks import build_stream

    config = {"name": "digits_c", "kind": "digits_c", "corruptions": ["gaussian_noise", "fog"], "subset": 6}
    stream, _ = build_stream(config, seed=1, batch_size=64)
    names = StreamImageNames(stream)
    per_domain = {}
    for batch in stream:
        per_domain.setdefault(batch.domain, []).extend(names(batch.ids))
    assert set(per_domain) == {"gaussian_noise/5", "fog/5"}
    indices = [sorted(n.rsplit("#", 1)[1] for n in v) for v in per_domain.values()]
    assert indices[0] == indices[1] and len(indices[0]) == 6  # the same 6 samples in every domain
    assert all(n.startswith("gaussian_noise/5/#") for n in per_domain["gaussian_noise/5"])


def test_subset_is_seeded_recorded_and_reusable(tmp_path):
    from tta.data.benchmarks import build_stream

    base = {"name": "digits_c", "kind": "digits_c", "corruptions": ["shot_noise"]}
    a, _ = build_stream({**base, "subset": 10}, seed=0)
    b, _ = build_stream({**base, "subset": 10}, seed=0)
    c, _ = build_stream({**base, "subset": 10, "subset_seed": 1}, seed=0)
    keys = a.describe()["subset"]["keys"]
    assert len(keys) == 10 and keys == b.describe()["subset"]["keys"] != c.describe()["subset"]["keys"]
    assert a.describe()["subset"]["seed"] == 0 and c.describe()["subset"]["seed"] == 1
    full_ids = {int(i) for batch in build_stream(base, seed=0)[0] for i in batch.ids}
    sub_ids = [int(i) for batch in a for i in batch.ids]
    assert len(sub_ids) == 10 and set(sub_ids) <= full_ids  # the full run's sample ids (and corruption seeds)
    record = tmp_path / "run.json"
    record.write_text(json.dumps({"stream": a.describe()}))
    listing = tmp_path / "subset.txt"
    listing.write_text("# a list\n" + "\n".join(keys[:4]) + "\n")
    for file, n in ((record, 10), (listing, 4)):
        d, _ = build_stream({**base, "subset_file": str(file)}, seed=5)
        assert d.describe()["subset"]["keys"] == keys[:n] and d.num_samples == n
    listing.write_text("999999\n")
    with pytest.raises(ValueError, match="not in domain"):
        build_stream({**base, "subset_file": str(listing)}, seed=0)


# ------------------------------------------------------------------ pre-generation script -> run
def test_script_views_are_found_by_a_run_on_the_same_stream(assets, tmp_path):
    spec = importlib.util.spec_from_file_location("gen_views", REPO / "scripts" / "generate_diffusion_views.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cache = tmp_path / "cache"
    summary = script.main(["--root", str(assets["data"]), "--pipeline", str(assets["pipe"]), "--num-views", "2",
                           "--steps", "2", "--cache-dir", str(cache), "--device", "cpu", "--resize", "32",
                           "--crop", "32"])
    assert summary["processed"] == 12 and summary["generated_views"] == 24
    from tta.data.benchmarks import build_stream

    config = {"name": "image_folder", "kind": "image_folder", "root": str(assets["data"]), "resize": 32, "crop": 32}
    stream, _ = build_stream(config, seed=0, batch_size=4)
    cfg = {"pipeline": str(assets["pipe"]), "num_views": 2, "steps": 2, "cache_dir": str(cache)}
    inputs = provide_inputs(methods.METHODS.get("difftpt"), {},
                            RunParts(stream=stream, device="cpu", augment={"diffusion": cfg}, progress=False))
    method = methods.build("difftpt", clip_model(assets), num_classes=3, num_views=4, steps=1, **inputs)
    for batch in stream:
        method(batch.images, ids=batch.ids, domain=batch.domain)
    stats = method.input_records()["diffusion_views"]
    assert (stats["generated"], stats["cache_hits"], stats["requested"]) == (0, 24, 24)


# ------------------------------------------------------------------ the command line, twice
def run_cli(out: Path, *overrides: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tta.run", f"hydra.run.dir={out}", "progress=false", "device=cpu", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_cli_end_to_end_second_run_generates_nothing(assets, tmp_path):
    args = (f"model={assets['spec']}", "method=difftpt", f"augment.diffusion.pipeline={assets['pipe']}",
            "augment.diffusion.num_views=3", "augment.diffusion.steps=2",
            f"augment.diffusion.cache_dir={tmp_path / 'c'}",
            "data=image_folder", f"data.root={assets['data']}", "data.subset=8", "data.resize=32", "data.crop=32",
            "method.num_views=7")
    first = run_cli(tmp_path / "a", *args)
    second = run_cli(tmp_path / "b", *args)
    d1, d2 = first["inputs"]["diffusion_views"], second["inputs"]["diffusion_views"]
    assert (d1["generated"], d1["cache_hits"], d1["requested"]) == (8 * 3, 0, 8 * 3)
    assert (d2["generated"], d2["cache_hits"], d2["requested"]) == (0, 8 * 3, 8 * 3)
    assert first["stream"]["subset"]["keys"] == second["stream"]["subset"]["keys"]
    assert len(first["stream"]["subset"]["keys"]) == 8 and first["stream"]["num_samples"] == 8
    assert first["results"] == second["results"]  # accuracy, NLL and ECE to the last bit: the same logits
    assert first["method"]["method"] == "difftpt" and first["method"]["num_views"] == 1 + 7 + 3
    counters = first["counts"]["counters"]
    assert counters["episodes"] == 8 and counters["backwards"] == 8 * 4 and counters["diffusion_views"] == 24
