"""The ``ccc`` setting (tta/data/ccc; Press et al., NeurIPS 2023, oripress/CCC @ 656dec3).

* the walk and the pair sequence equal the reference's algorithm, re-implemented here from
  ``generate.py`` (``find_path`` / ``traverse_graph``, recursive and memoised, lines 85-138; the pair
  draws with the module-level ``random``, lines 173-175, 256-260, 347-356) on synthetic matrices;
* the calibration reader refuses a malicious pickle without running it, reads plain NumPy pickles,
  and recognises the reference's layout;
* the composition order (flip + crop, first corruption, uint8, second corruption, uint8, JPEG 85);
* the stream: the same seed gives the same images (bitwise) and record, another seed others;
* the command line on digits-C with the shipped calibration (slow).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tta.data.ccc import calibration as cal
from tta.data.ccc.compose import JPEG_QUALITY, compose, crop_boxes, flip_and_crop, to_uint8_levels
from tta.data.ccc.schedule import EASY, HARD, MEDIUM, corruption_names, find_walk, pair_sequence, schedule
from tta.data.corruptions import _SampleRng, _jpeg_compression, corrupt


# ------------------------------------------------------------------ the reference's algorithm, written directly
def reference_find_path(arr, target_val):
    """generate.py lines 85-98, as written there."""
    cur_max = 99999999999
    cost_dict, path_dict = {}, {}
    for i in range(1, arr.shape[0]):
        cost_dict, path_dict = reference_traverse(cost_dict, path_dict, arr, i, 0, target_val)
    for i in range(1, arr.shape[0]):
        cur_cost = abs(cost_dict[(i, 0)] / len(path_dict[(i, 0)]) - target_val)
        if cur_cost < cur_max:
            cur_max = cur_cost
            cur_path = path_dict[(i, 0)]
    return cur_path


def reference_traverse(cost_dict, path_dict, arr, i, j, target_val):
    """generate.py lines 101-138: recursive, memoised, greedy on the running mean."""
    if j >= arr.shape[1]:
        if (i, j) not in cost_dict.keys():
            cost_dict[(i, j)] = 9999999999999
            path_dict[(i, j)] = [9999999999999]
        return cost_dict, path_dict
    if i == 0:
        if (i, j) not in cost_dict.keys():
            cost_dict[(i, j)] = arr[i][j]
            path_dict[(i, j)] = [(i, j)]
        return cost_dict, path_dict
    if (i - 1, j) not in cost_dict.keys():
        cost_dict, path_dict = reference_traverse(cost_dict, path_dict, arr, i - 1, j, target_val)
    if (i, j + 1) not in cost_dict.keys():
        cost_dict, path_dict = reference_traverse(cost_dict, path_dict, arr, i, j + 1, target_val)
    if abs(((cost_dict[(i - 1, j)] + arr[i][j]) / (len(path_dict[i - 1, j]) + 1)) - target_val) < abs(
            ((cost_dict[(i, j + 1)] + arr[i][j]) / (len(path_dict[i, j + 1]) + 1)) - target_val):
        cost_dict[(i, j)] = cost_dict[(i - 1, j)] + arr[i][j]
        path_dict[(i, j)] = [(i, j)] + path_dict[(i - 1, j)]
    else:
        cost_dict[(i, j)] = cost_dict[(i, j + 1)] + arr[i][j]
        path_dict[(i, j)] = [(i, j)] + path_dict[(i, j + 1)]
    return cost_dict, path_dict


def reference_steps(noises, walk_dict, seed, n_steps):
    """generate.py's main loop (lines 173-175, 256-260, 272-356) reduced to its (n1, s1, n2, s2) per step."""
    random.seed(seed)
    noise1 = random.choice(noises)
    noise2 = random.choice(noises)
    while noise2 == noise1:
        noise2 = random.choice(noises)
    walk = walk_dict[(noise1, noise2)]
    walk_ind = 0
    out = []
    while len(out) < n_steps:
        out.append((noise1, float(walk[walk_ind][0]) / 4, noise2, float(walk[walk_ind][1]) / 4))
        if walk_ind == len(walk) - 1:
            noise1 = noise2
            while noise1 == noise2:
                noise2 = random.choice(noises)
            walk = walk_dict[(noise1, noise2)]
            walk_ind = 0
        else:
            walk_ind += 1
    return out


def synthetic_matrix(rng: np.random.Generator, size: int = 21) -> np.ndarray:
    """Accuracy-like: falling with both severities, noisy, a random pair-specific strength."""
    i, j = np.arange(size)[:, None] / (size - 1), np.arange(size)[None] / (size - 1)
    a, b = rng.uniform(10, 80, 2)
    return np.clip(76 - a * i - b * j + rng.normal(0, 3, (size, size)), 0, 100)


def synthetic_calibration(names, seed=0, size=21):
    rng = np.random.default_rng(seed)
    return {(x, y): synthetic_matrix(rng, size) for x in names for y in names if x != y}


# ------------------------------------------------------------------ the walk and the pair sequence
@pytest.mark.parametrize("target", [0.0, 20.0, 40.0, 33.3])
def test_walk_equals_reference(target):
    rng = np.random.default_rng(int(target * 10))
    for size in (21, 11, 6):
        for _ in range(12):
            m = synthetic_matrix(rng, size)
            assert find_walk(m, target) == reference_find_path(m, target)
    flat = np.full((21, 21), 30.0)  # ties everywhere: the reference raises j on a tie, keeps the first start row
    assert find_walk(flat, 30.0) == reference_find_path(flat, 30.0)


def test_walk_shape():
    m = synthetic_matrix(np.random.default_rng(1))
    walk = find_walk(m, 20.0)
    assert walk[0][1] == 0 and walk[0][0] >= 1 and walk[-1][0] == 0
    for (i, j), (k, l) in zip(walk, walk[1:]):
        assert (k, l) in ((i - 1, j), (i, j + 1))


@pytest.mark.parametrize("difficulty,seed", [("easy", 43), ("medium", 44), ("hard", 45)])
def test_schedule_equals_reference(difficulty, seed):
    """Walks from the calibration, then the pair draws: the steps of the reference's loop, in order."""
    names_ref = {"easy": EASY, "medium": MEDIUM, "hard": HARD}[difficulty]
    target = {"easy": 40.0, "medium": 20.0, "hard": 0.0}[difficulty]
    matrices = synthetic_calibration(names_ref, seed)
    walk_dict = {k: reference_find_path(m, target) for k, m in matrices.items()}
    expected = reference_steps(list(names_ref), walk_dict, seed, 400)
    to_project = {"elastic": "elastic_transform", "jpeg": "jpeg_compression"}
    names = corruption_names(difficulty)
    walks = {(to_project.get(a, a), to_project.get(b, b)): find_walk(m, target) for (a, b), m in matrices.items()}
    steps = schedule(walks, names, seed=seed, speed=1000, max_samples=400 * 1000, grid_step=0.25)
    got = [(s.n1, s.s1, s.n2, s.s2) for s in steps]
    assert got == [(to_project.get(a, a), s1, to_project.get(b, b), s2) for a, s1, b, s2 in expected]
    assert all(s.count == 1000 for s in steps)
    assert len({(s.n1, s.n2) for s in steps}) > 5  # several pairs: the carried-over corruption is tested


def test_schedule_cut_and_seed():
    names = corruption_names("hard")
    walks = {k: find_walk(m, 0.0) for k, m in synthetic_calibration(names).items()}
    steps = schedule(walks, names, seed=1, speed=300, max_samples=10_000, grid_step=0.25)
    assert sum(s.count for s in steps) == 10_000 and steps[-1].count == 10_000 % 300
    other = schedule(walks, names, seed=2, speed=300, max_samples=10_000, grid_step=0.25)
    assert [s.as_list() for s in steps] != [s.as_list() for s in other]
    first, second = next(pair_sequence(names, 1))
    assert (steps[0].n1, steps[0].n2) == (first, second)
    with pytest.raises(ValueError, match="unknown CCC difficulty"):
        corruption_names("extreme")
    with pytest.raises(ValueError, match="speed"):
        schedule(walks, names, seed=1, speed=0, max_samples=10, grid_step=0.25)


# ------------------------------------------------------------------ calibration files
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "ccc_accuracy_matrix.pickle"
    file.write_bytes(pickle.dumps({"n1_gaussian_noise_n2_contrast": _Exploit(marker)}))
    with pytest.raises(cal.UnsafeCalibrationFile, match="refused"):
        cal.load_calibration(file)
    assert not marker.exists()
    builtins_eval = tmp_path / "eval.pickle"  # a global the format itself allows (builtins) but not eval
    builtins_eval.write_bytes(b"cbuiltins\neval\n(Vopen(%r, 'w')\ntR." % str(marker).encode())
    with pytest.raises(cal.UnsafeCalibrationFile):
        cal.load_calibration(builtins_eval)
    assert not marker.exists()


def test_reference_layout_pickle_and_npz_roundtrip(tmp_path):
    matrices = {f"n1_{a}_n2_{b}": synthetic_matrix(np.random.default_rng(k), 21)
                for k, (a, b) in enumerate((a, b) for a in EASY for b in EASY if a != b)}
    file = tmp_path / "ccc_accuracy_matrix.pickle"
    file.write_bytes(pickle.dumps(matrices))  # plain dict of float64 NumPy arrays, as the reference's file
    loaded = cal.load_calibration(file)
    assert loaded.origin == "reference" and loaded.step == 0.25 and len(loaded.matrices) == 182
    np.testing.assert_array_equal(loaded.matrix("elastic_transform", "jpeg_compression"),
                                  matrices["n1_elastic_n2_jpeg"])
    assert cal.target_for("medium", loaded) == (20.0, "the reference's")
    partial = tmp_path / "partial.pickle"
    partial.write_bytes(pickle.dumps({k: v for k, v in list(matrices.items())[:10]}))
    assert cal.load_calibration(partial).origin == "ccc-like"
    out = cal.save_calibration(tmp_path / "c.npz", loaded.matrices, step=0.25, clean_accuracy=90.0, num_classes=10)
    again = cal.load_calibration(out)
    assert again.origin == "ccc-like" and again.num_classes == 10
    np.testing.assert_allclose(again.matrix("gaussian_noise", "fog"), loaded.matrix("gaussian_noise", "fog"), atol=1e-4)
    target, rule = cal.target_for("hard", again)
    assert target == pytest.approx(10 + (0 - 0.1) / (76.13 - 0.1) * 80) and "position" in rule
    with pytest.raises(ValueError, match="no matrix for the pair"):
        again.matrix("gaussian_noise", "brightness")


# ------------------------------------------------------------------ composition
def _images(n=6, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.6 + 0.2
    return torch.round(x * 255) / 255


def test_composition_order():
    x, ids = _images(), torch.arange(6) + 100
    got = compose(x, ids, n1="gaussian_noise", s1=2, n2="contrast", s2=3, seed=7, step=5)
    keyed = (5 << 32) | ids
    y = flip_and_crop(x, _SampleRng(7, "ccc_flip_crop", 0, keyed), (24, 24))
    y = to_uint8_levels(corrupt(y, "gaussian_noise", 2, seed=7, ids=keyed))
    y = to_uint8_levels(corrupt(y, "contrast", 3, seed=7, ids=keyed))
    expected = _jpeg_compression(y, JPEG_QUALITY, None)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    swapped = _jpeg_compression(to_uint8_levels(corrupt(to_uint8_levels(corrupt(
        flip_and_crop(x, _SampleRng(7, "ccc_flip_crop", 0, keyed), (24, 24)), "contrast", 3, seed=7, ids=keyed)),
        "gaussian_noise", 2, seed=7, ids=keyed)), JPEG_QUALITY, None)
    assert not torch.equal(got, swapped)
    assert torch.equal(torch.round(got * 255), got * 255)  # uint8 levels
    # severity 0: that corruption is not applied
    only_second = compose(x, ids, n1="gaussian_noise", s1=0, n2="contrast", s2=3, seed=7, step=5)
    crop = flip_and_crop(x, _SampleRng(7, "ccc_flip_crop", 0, keyed), (24, 24))
    torch.testing.assert_close(only_second, _jpeg_compression(
        to_uint8_levels(corrupt(crop, "contrast", 3, seed=7, ids=keyed)), JPEG_QUALITY, None), rtol=0, atol=0)


def reference_crop_params(height, width, scale, ratio, u_area, u_ratio, u_top, u_left):
    """torchvision's RandomResizedCrop.get_params (transforms.py), written directly, with its random
    draws replaced by the given uniforms (one area and one ratio draw per attempt)."""
    import math

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + u_area[attempt] * (scale[1] - scale[0]))
        aspect_ratio = math.exp(log_ratio[0] + u_ratio[attempt] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u_top * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(u_left * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width,scale", [(24, 24, (0.08, 1.0)), (10, 60, (0.6, 1.0)), (50, 12, (0.3, 1.0))])
def test_crop_boxes_equal_torchvision_rule(height, width, scale):
    ids = torch.arange(300)
    rng = _SampleRng(3, "crop", 0, ids)
    top, left, h, w = crop_boxes(rng, height, width, scale, (3 / 4, 4 / 3), torch.device("cpu"))
    u_area, u_ratio = rng.uniform((10,), 1).double(), rng.uniform((10,), 2).double()
    u_pos = rng.uniform((2,), 3).double()
    fallback = 0
    for k in range(300):
        expected = reference_crop_params(height, width, scale, (3 / 4, 4 / 3), u_area[k].tolist(),
                                         u_ratio[k].tolist(), float(u_pos[k, 0]), float(u_pos[k, 1]))
        assert (int(top[k]), int(left[k]), int(h[k]), int(w[k])) == expected, k
        fallback += expected[2:] in ((height, width), (height, int(round(height * 4 / 3))),
                                     (int(round(width / (3 / 4))), width)) and expected[:2] == (
            (height - expected[2]) // 2, (width - expected[3]) // 2)
    if (height, width) != (24, 24):
        assert fallback > 0  # the centred fallback is exercised


def test_flip_and_crop_rule():
    x, ids = _images(40, 16), torch.arange(40)
    rng = _SampleRng(0, "t", 0, ids)
    whole = flip_and_crop(x, rng, (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image, maybe mirrored
    for k in range(40):
        assert torch.equal(whole[k], x[k]) or torch.equal(whole[k], x[k].flip(-1))
    flips = sum(not torch.equal(whole[k], x[k]) for k in range(40))
    assert 8 < flips < 32
    kept = flip_and_crop(x, rng, (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.equal(kept, x)
    small = flip_and_crop(x, rng, (8, 8))
    assert small.shape == (40, 3, 8, 8) and torch.equal(torch.round(small * 255), small * 255)
    assert to_uint8_levels(torch.tensor([0.5 / 255, 3 / 255, 254.9 / 255])).mul(255).tolist() == \
        pytest.approx([0.0, 3.0, 254.0])  # truncation, as np.uint8 of the reference's float output


# ------------------------------------------------------------------ the stream
def _digits_stream(tmp_path, seed, **options):
    from tta.data.benchmarks import build_stream
    from tta.data.configs import load_data_config

    names = corruption_names("hard")
    file = tmp_path / "cal.npz"
    if not file.exists():
        cal.save_calibration(file, synthetic_calibration(names, size=6), step=1.0, clean_accuracy=76.0,
                             num_classes=10)
    setting = {"name": "ccc", "difficulty": "hard", "speed": 40, "max_samples": 150, "calibration": str(file),
               **options}
    stream, engine = build_stream(load_data_config("digits_c"), setting=setting, seed=seed, batch_size=64)
    batches = list(stream)
    return stream, engine, batches


def test_stream_is_seeded(tmp_path):
    stream, engine, batches = _digits_stream(tmp_path, 3)
    assert engine == {"reset_each_domain": False, "open_set": False, "per_batch_accuracy": True}
    assert [len(b.labels) for b in batches] == [64, 64, 22] and {b.domain for b in batches} == {"ccc"}
    info = stream.describe()["ccc"]
    steps = info["schedule"]["steps"]
    assert info["benchmark"] == "ccc-like" and info["truncated"] and sum(s[4] for s in steps) == 150
    assert [s[4] for s in steps] == [40, 40, 40, 30]
    assert info["num_samples"] == 150
    assert info["flip"] is False and info["crop_scale"] == [0.5, 1.0]  # digits-C's own defaults
    # images are distinct within a step
    segment = stream.segments[0]
    for k in range(4):
        index = segment.index[segment.part == k]
        assert len(np.unique(index)) == len(index)
    again_stream, _, again = _digits_stream(tmp_path, 3)
    assert again_stream.describe()["ccc"] == info and again_stream.plan_hash() == stream.plan_hash()
    for a, b in zip(batches, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.ids, b.ids)
    other_stream, _, other = _digits_stream(tmp_path, 4)
    assert other_stream.plan_hash() != stream.plan_hash()
    assert not torch.equal(other[0].images, batches[0].images)


def test_per_batch_counts_resume(tmp_path):
    """The engine's per-batch counts (the running-window curve) survive a checkpoint and resume."""
    import tta
    from tta import engine
    from tta.checkpoint import changing_state, restore_method
    from tta.models import load_classifier

    saves = []
    method = tta.methods.build("tent", load_classifier("digits_cnn"))
    stream, options, _ = _digits_stream(tmp_path, 5, max_samples=320)
    whole = engine.run(method, stream, progress=False, checkpoint=lambda p: saves.append((p, changing_state(method))),
                       checkpoint_every=2, **options)
    assert whole["batches"]["samples"] == [64] * 5
    assert sum(whole["batches"]["correct"]) == round(whole["results"]["mean"]["accuracy"] * 320)
    progress, state = saves[1]
    assert progress["done"] == 4 and len(progress["extra"]["batches"]["correct"]) == 4
    fresh = tta.methods.build("tent", load_classifier("digits_cnn"))
    restore_method(fresh, state)
    stream, options, _ = _digits_stream(tmp_path, 5, max_samples=320)
    again = engine.run(fresh, stream, progress=False, resume=progress, **options)
    assert again["batches"] == whole["batches"] and again["results"] == whole["results"]


def test_top_level_cut_is_a_truncation(tmp_path):
    from tta.data.benchmarks import build_stream
    from tta.data.configs import load_data_config

    _digits_stream(tmp_path, 0)  # writes the calibration
    setting = {"name": "ccc", "difficulty": "hard", "speed": 700, "max_samples": 7_500_000,
               "calibration": str(tmp_path / "cal.npz")}
    stream, _ = build_stream(load_data_config("digits_c"), setting=setting, seed=0, max_samples=100)
    info = stream.describe()["ccc"]
    assert info["max_samples"] == 7_500_000 and info["num_samples"] == 100 and info["truncated"]


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="ccc.difficulty must be one of easy, medium, hard"):
        _digits_stream(tmp_path, 0, difficulty="extreme")
    with pytest.raises(ValueError, match="ccc.speed must be an integer >= 1"):
        _digits_stream(tmp_path, 0, speed=0)
    with pytest.raises(ValueError, match="clean source has only 719 images"):
        _digits_stream(tmp_path, 0, speed=1000)
    with pytest.raises(ValueError, match="no matrix for the pair"):
        _digits_stream(tmp_path, 0, difficulty="medium")  # the synthetic file covers the hard pairs only
    with pytest.raises(FileNotFoundError, match="clean_root"):
        from tta.data.benchmarks import build_stream
        from tta.data.configs import load_data_config

        build_stream({**load_data_config("digits_c"), "clean_root": str(tmp_path / "none")},
                     setting={"name": "ccc", "calibration": "digits_cnn"})


def test_clean_root_folder(tmp_path):
    """An image folder of clean images (labels: sorted class folders), decoded, resized and cropped."""
    from PIL import Image

    from tta.data.benchmarks import build_stream

    g = np.random.default_rng(0)
    for name in ("b_class", "a_class"):
        (tmp_path / "clean" / name).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(g.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "clean" / name / f"{k}.png")
    names = corruption_names("hard")
    cal.save_calibration(tmp_path / "cal.json", synthetic_calibration(names, size=6), step=1.0, clean_accuracy=80.0,
                         num_classes=2)
    config = {"name": "mine", "clean_root": str(tmp_path / "clean"), "crop": 16}
    setting = {"name": "ccc", "difficulty": "hard", "speed": 5, "max_samples": 12, "calibration": str(tmp_path / "cal.json")}
    stream, _ = build_stream(config, setting=setting, seed=0)
    batches = list(stream)
    assert [tuple(b.images.shape) for b in batches] == [(12, 3, 16, 16)]
    segment = stream.segments[0]
    expected = (segment.index >= 4).astype(np.int64)  # files a_class/0..3 first: label 0, then b_class: label 1
    assert batches[0].labels.tolist() == expected.tolist()
    info = stream.describe()["ccc"]
    assert info["flip"] is True and info["crop_scale"] == [0.08, 1.0] and info["speed"] == 5
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_stream({**config, "clean_root": str(tmp_path / "empty")}, setting=setting, seed=0)


def test_running_window():
    from tta.curves import reset_batches, running_window

    np.testing.assert_allclose(running_window([1, 2, 3, 4], [4, 4, 4, 4], 2), [25, 37.5, 62.5, 87.5])
    record = {"method": {"reset_every": 3}, "batches": {"samples": [1] * 10, "correct": [0] * 10}}
    assert reset_batches(record) == [3, 6, 9]


@pytest.mark.slow
def test_cli_ccc_on_digits_c(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "tta.run", f"hydra.run.dir={out}", "progress=false", "setting=ccc", "method=rdumb",
           "method.reset_every=4", "ccc.max_samples=640", "ccc.difficulty=hard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    info = record["stream"]["ccc"]
    assert info["benchmark"] == "ccc-like" and info["calibration"]["path"] == "shipped:digits_cnn"
    assert info["speed"] == 50 and info["window_batches"] == 20 and record["stream"]["batch_size"] == 64
    batches = record["batches"]
    assert batches["samples"] == [64] * 10
    assert sum(batches["correct"]) / 640 == pytest.approx(record["results"]["mean"]["accuracy"], abs=1e-6)
    assert "2 periodic resets" in (out / "results.md").read_text()  # before batches 4 and 8
    assert record["counts"]["counters"]["periodic_resets"] == 2  # the method's own count agrees
    assert (out / "results.png").stat().st_size > 0
    report = subprocess.run([sys.executable, "-m", "tta.report", str(out), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "ccc.png").stat().st_size > 0
