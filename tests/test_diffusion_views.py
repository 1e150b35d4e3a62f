"""DiffTPT diffusion view source: seeding, caching, corruption handling, the generation script.

Everything runs offline on tiny random-weight pipelines (tests/tiny_diffusion.py) saved to a
temporary folder and loaded back through ``from_pretrained``. Two inference steps, 32 px.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_diffusion import build_image_variation_pipeline, build_img2img_pipeline
from tta.augment.diffusion import DiffusionViews, clip_condition, variation_seed
from tta.augment.view_cache import InvalidCacheEntry, ViewCache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "generate_diffusion_views.py"
NUM_VIEWS = 3


@pytest.fixture(scope="session")
def variation_pipeline(tmp_path_factory) -> Path:
    return build_image_variation_pipeline(tmp_path_factory.mktemp("sd_image_variation"))


def make_views(pipeline: Path, cache_dir: Path | None, **overrides) -> DiffusionViews:
    kwargs = dict(num_views=NUM_VIEWS, steps=2, cache_dir=cache_dir, batch_size=4, progress=False)
    return DiffusionViews(pipeline, **{**kwargs, **overrides})


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


def test_shape_range_and_cache_hit(variation_pipeline, tmp_path):
    x, ids = images(2), ["cls/a.jpg", "cls/b.jpg"]
    first = make_views(variation_pipeline, tmp_path)
    out = first(x, ids)
    assert out.shape == (2, NUM_VIEWS, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    assert torch.equal(out * 255, (out * 255).round())  # uint8 levels, as the cached PNGs
    assert first.stats == {"cache_hits": 0, "generated": 2 * NUM_VIEWS, "invalid": 0}
    assert first.spec.resolution == 32 and first.key_params["revision"] is None

    second = make_views(variation_pipeline, tmp_path)  # a fresh instance: reads the disk cache
    assert torch.equal(second(x, ids), out)
    assert second.stats == {"cache_hits": 2 * NUM_VIEWS, "generated": 0, "invalid": 0}
    assert "pipe" not in vars(second)  # a full cache hit never loads the pipeline
    assert second.missing("cls/a.jpg") == [] and second.missing("cls/new.jpg") == [0, 1, 2]


def test_bad_input_is_rejected(variation_pipeline):
    views = make_views(variation_pipeline, None)
    with pytest.raises(ValueError, match="unique"):
        views(images(2), ["a", "a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        views(images(1) * 2 - 1, ["a"])  # CLIP-normalised or [-1, 1] input by mistake
    with pytest.raises(ValueError, match="finite"):
        views(torch.full((1, 3, 8, 8), float("nan")), ["a"])


def test_seeded_per_image_and_variation(variation_pipeline):
    x = images(3)
    batched = make_views(variation_pipeline, None)(x, ["a", "b", "c"])
    alone = make_views(variation_pipeline, None, batch_size=1)(x[1:2], ["b"])
    reordered = make_views(variation_pipeline, None)(x.flip(0), ["c", "b", "a"])
    # Same noise per (id, k); batch composition may only move a pixel by one uint8 level.
    torch.testing.assert_close(alone[0], batched[1], atol=1.01 / 255, rtol=0)
    torch.testing.assert_close(reordered.flip(0), batched, atol=1.01 / 255, rtol=0)
    assert (batched[:, 0] - batched[:, 1]).abs().mean() > 0.01  # variations differ
    other_seed = make_views(variation_pipeline, None, seed=1)(x, ["a", "b", "c"])
    assert (other_seed - batched).abs().mean() > 0.01
    assert variation_seed(0, "b", 1) == variation_seed(0, "b", 1) != variation_seed(0, "b", 2)


def test_missing_or_corrupt_entries_are_regenerated(variation_pipeline, tmp_path):
    x, ids = images(1), ["img"]
    views = make_views(variation_pipeline, tmp_path)
    reference = views(x, ids)
    cache = views.cache
    truncated, deleted, tampered = (cache.path("img", k) for k in range(3))
    truncated.write_bytes(truncated.read_bytes()[:200])
    deleted.unlink()
    # A well-formed PNG that carries view 2's metadata but other pixels: caught by the checksum.
    with Image.open(tampered) as img:
        info, pixels = img.info, np.asarray(img).copy()
    pixels[0, 0] ^= 255
    _save_png_with_text(tampered, pixels, info)
    for k in (0, 2):
        with pytest.raises(InvalidCacheEntry):
            cache.load("img", k, 32)

    again = make_views(variation_pipeline, tmp_path)
    assert again.missing("img") == [0, 1, 2]
    assert torch.equal(again(x, ids), reference)
    assert again.stats == {"cache_hits": 0, "generated": 3, "invalid": 2}
    assert make_views(variation_pipeline, tmp_path)(x, ids).equal(reference)


def _save_png_with_text(path: Path, pixels: np.ndarray, text: dict) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.fromarray(pixels).save(path, pnginfo=info)


def test_key_parameters(variation_pipeline, tmp_path):
    x, ids = images(1), ["img"]
    make_views(variation_pipeline, tmp_path)(x, ids)
    for changed in ({"steps": 3}, {"seed": 5}, {"guidance_scale": 1.0}, {"resolution": 16}):
        views = make_views(variation_pipeline, tmp_path, **changed)
        views(x, ids)
        assert views.stats["generated"] == NUM_VIEWS, changed
    # Not part of the key: how many views are kept, batching, dtype.
    views = make_views(variation_pipeline, tmp_path, num_views=2, batch_size=1, dtype=torch.float32)
    assert views(x, ids).shape[1] == 2 and views.stats["generated"] == 0
    key_dirs = {p.name for p in tmp_path.iterdir()}
    assert len(key_dirs) == 5 and all(len(k) == 20 for k in key_dirs)
    config = json.loads((tmp_path / views.cache.key / "config.json").read_text())
    assert config["steps"] == 2 and config["pipeline_class"] == "StableDiffusionImageVariationPipeline"


def test_cache_key_is_stable():
    cache = ViewCache("/nonexistent", {"b": 1, "a": [2, 3]})
    assert cache.key == ViewCache("/nonexistent", {"a": [2, 3], "b": 1}).key
    assert cache.path("x/y.jpg", 7).name == "007.png"


def test_conditioning_matches_difftpt_transform():
    from torchvision import transforms

    official = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC, antialias=False),
        transforms.Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    ])
    x = images(2)
    torch.testing.assert_close(clip_condition(x), torch.stack([official(img) for img in x]))


def test_img2img_pipeline_is_detected(tmp_path, variation_pipeline):
    folder = build_img2img_pipeline(tmp_path / "img2img")
    views = make_views(folder, tmp_path / "cache", steps=3)
    assert views.spec.img2img and views.spec.strength == pytest.approx(0.8)  # diffusers' default
    out = views(images(2), ["a", "b"])
    assert out.shape == (2, NUM_VIEWS, 3, 32, 32) and views.stats["generated"] == 2 * NUM_VIEWS
    assert make_views(folder, tmp_path / "cache", steps=3, strength=0.5).key_params["strength"] == 0.5
    with pytest.raises(ValueError, match="strength"):
        _ = make_views(variation_pipeline, None, strength=0.5).spec


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_diffusion_views", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_subset_and_shards():
    script = _load_script()
    ids = [f"c{c}/{i}.png" for c in range(4) for i in range(6)]
    per_class = script.select(ids, None, 2, seed=0)
    assert len(per_class) == 8
    assert all(sum(i.startswith(f"c{c}/") for i in per_class) == 2 for c in range(4))
    subset = script.select(ids, 5, None, seed=3)
    assert len(subset) == 5 and subset == script.select(ids, 5, None, seed=3) != script.select(ids, 5, None, seed=4)
    shards = [per_class[s::3] for s in range(3)]
    assert sorted(sum(shards, [])) == per_class


@pytest.mark.slow
def test_script_resumes_after_a_stop(variation_pipeline, tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("cat/1.png", "cat/2.jpg", "dog/3.png", "dog/4.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + len(name), 40, 3), dtype=np.uint8)).save(root / name)
    args = ["--root", str(root), "--pipeline", str(variation_pipeline), "--num-views", str(NUM_VIEWS),
            "--steps", "2", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]

    # First run, in its own process, stops after one image (as if killed there).
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    run = subprocess.run([sys.executable, str(SCRIPT), *args, "--limit", "1"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first = json.loads(run.stdout.strip().splitlines()[-1])
    assert (first["processed"], first["unfinished"], first["generated_views"]) == (1, 3, NUM_VIEWS)

    # A view of the finished image is lost, and a killed write left a partial temporary file:
    # the rerun regenerates that view and the three other images, and ignores the stray file.
    script = _load_script()
    views = make_views(variation_pipeline, tmp_path / "cache")
    lost = views.cache.path("cat/1.png", 1)
    lost.unlink()
    lost.with_name(f".{lost.name}.999.deadbeef.tmp").write_bytes(b"\x89PNG partial")
    second = script.main(args)
    assert (second["complete"], second["processed"], second["unfinished"]) == (0, 4, 0)
    assert second["generated_views"] == 3 * NUM_VIEWS + 1 and second["cached_views"] == NUM_VIEWS - 1

    third = script.main(args)
    assert (third["complete"], third["processed"], third["generated_views"]) == (4, 0, 0)
    assert views(images(1), ["dog/4.png"]).shape == (1, NUM_VIEWS, 3, 32, 32)
    assert views.stats["generated"] == 0


@pytest.mark.slow
def test_script_killed_midway_finishes_the_rest_without_redoing_work(variation_pipeline, tmp_path):
    """SIGKILL the generator once its first views are on disk; the rerun only does what is missing."""
    import signal
    import time

    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    names = [f"c{i % 3}/{i}.png" for i in range(24)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / name)
    cache = tmp_path / "cache"
    args = ["--root", str(root), "--pipeline", str(variation_pipeline), "--num-views", str(NUM_VIEWS),
            "--steps", "12", "--batch-size", "1", "--cache-dir", str(cache), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(cache.rglob("*.png")):
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the generator finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list(cache.rglob("*.png")))
    assert 0 < done_before < len(names) * NUM_VIEWS

    summary = _load_script().main(args)
    assert summary["unfinished"] == 0 and summary["complete"] + summary["processed"] == len(names)
    assert summary["generated_views"] == len(names) * NUM_VIEWS - summary["cached_views"]
    assert summary["cached_views"] >= done_before - 1  # at most the view being written at the kill is redone
    assert _load_script().main(args)["generated_views"] == 0
