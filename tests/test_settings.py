"""Evaluation settings: their orders, options and engine flags."""
from __future__ import annotations

from collections import Counter
from itertools import groupby

import numpy as np
import pytest
import torch

from data_fixtures import cifar_config, make_cifar_npy, make_imagenet_val, imagenet_config
from tta.data import build_stream, dirichlet_order, imbalance_order, load_data_config
from tta.data.settings import SETTING_DEFAULTS, resolve, summarize_forgetting


def _digits(**overrides):
    return dict(load_data_config("digits_c"), corruptions=["gaussian_noise", "brightness"], **overrides)


def _domains(stream):
    return [name for name, _ in groupby(b.domain for b in stream)]


def test_every_setting_has_a_cli_file_with_the_same_options():
    import yaml
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "tta" / "conf" / "setting"
    for name, defaults in SETTING_DEFAULTS.items():
        config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert config["name"] == name
        assert set(config) - {"name", "batch_size"} == set(defaults) - {"batch_size"}, name
        assert {k: config[k] for k in defaults} == defaults, name


def test_reset_and_continual_flags():
    for name, reset in [("reset_each_shift", True), ("continual", False), ("mixed_domains", False),
                        ("gradual", False), ("label_shift", True), ("bs1", True), ("open_set", True),
                        ("forgetting", False), ("long_stream", False)]:
        _, engine = build_stream(_digits(), setting=name, seed=0, max_samples=10)
        assert engine["reset_each_domain"] is reset, name
        assert engine["open_set"] is (name == "open_set")
    _, engine = build_stream(_digits(), setting={"name": "label_shift", "reset_each_domain": False}, max_samples=10)
    assert engine["reset_each_domain"] is False


def test_unknown_setting_and_option():
    with pytest.raises(ValueError, match="unknown setting"):
        resolve("nope")
    with pytest.raises(ValueError, match="no option"):
        resolve({"name": "gradual", "delta": 0.1})


def test_mixed_domains_is_one_shuffled_pass():
    stream, _ = build_stream(_digits(), setting="mixed_domains", seed=0, batch_size=64)
    batches = list(stream)
    assert {b.domain for b in batches} == {"mixed"}
    ids = torch.cat([b.ids for b in batches])
    assert len(ids) == len(set(ids.tolist())) == 2 * 719
    codes = (ids >> 32).tolist()
    assert len(set(codes[:64])) == 2  # the first batch already mixes both corruptions


def test_gradual_goes_up_and_down_per_corruption():
    stream, _ = build_stream(_digits(), setting="gradual", seed=0, batch_size=1000)
    up_down = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert _domains(stream) == [f"gaussian_noise/{s}" for s in up_down] + [f"brightness/{s}" for s in up_down]
    stream, _ = build_stream(_digits(), setting={"name": "gradual", "severities": [2, 4]}, seed=0, batch_size=1000)
    assert _domains(stream) == ["gaussian_noise/2", "gaussian_noise/4", "brightness/2", "brightness/4"]


def test_imbalance_order_follows_the_sar_rule():
    labels = np.repeat(np.arange(10), 50)  # 10 classes x 50 images
    order = imbalance_order(labels, imbalance_ratio=500000, seed=0)
    assert len(order) == 1000 and order.max() < 500
    steps = labels[order].reshape(10, 100)  # steps = classes, 100 samples each
    dominant = [Counter(step.tolist()).most_common(1)[0] for step in steps]
    assert sorted(k for k, _ in dominant) == list(range(10))  # each class dominates one step
    assert all(count >= 99 for _, count in dominant)  # IR = 500000: almost pure
    assert Counter(order.tolist()).most_common(1)[0][1] <= 3  # images repeat only as the counts require
    assert np.array_equal(order, imbalance_order(labels, imbalance_ratio=500000, seed=0))
    assert not np.array_equal(order, imbalance_order(labels, imbalance_ratio=500000, seed=1))
    # IR = 1: uniform labels in every step
    flat = labels[imbalance_order(labels, imbalance_ratio=1, seed=0)].reshape(10, 100)
    assert max(Counter(step.tolist()).most_common(1)[0][1] for step in flat) < 40
    # SAR's ImageNet-C numbers: 100,000 indices over 1,000 steps for 50,000 images
    big = imbalance_order(np.repeat(np.arange(1000), 50), seed=2021)
    assert len(big) == 100_000


def test_dirichlet_order():
    labels = np.repeat(np.arange(10), 40)
    order = dirichlet_order(labels, delta=0.01, seed=0)
    assert sorted(order.tolist()) == list(range(400))  # a permutation
    runs_small = sum(1 for _ in groupby(labels[order]))
    runs_large = sum(1 for _ in groupby(labels[dirichlet_order(labels, delta=100.0, seed=0)]))
    assert runs_small < 40 < runs_large


def test_label_shift_setting_and_order_file(tmp_path):
    stream, _ = build_stream(_digits(), setting="label_shift", seed=0, batch_size=100)
    labels = [b.labels for b in stream]
    assert sum(len(l) for l in labels) == 2 * 2 * 719  # total = 2 N per domain
    runs = sum(1 for _ in groupby(torch.cat(labels[:14]).tolist()))
    assert runs < 30  # class-ordered
    stream, _ = build_stream(_digits(), setting={"name": "label_shift", "order": "dirichlet", "delta": 0.1}, seed=0)
    assert sum(len(b.labels) for b in stream) == 2 * 719
    order = np.arange(719)[::-1].copy()
    np.save(tmp_path / "order.npy", order)
    stream, _ = build_stream(_digits(), setting={"name": "label_shift", "order_file": str(tmp_path / "order.npy")},
                             seed=0, batch_size=719, prefetch=0)
    first = next(iter(stream))
    assert (first.ids & 0xFFFFFFFF).tolist() == order.tolist()
    np.save(tmp_path / "bad.npy", np.array([0, 5000]))
    with pytest.raises(ValueError, match="719 samples"):
        build_stream(_digits(), setting={"name": "label_shift", "order_file": str(tmp_path / "bad.npy")})


def test_open_set_noise_fraction_and_sizes():
    stream, engine = build_stream(_digits(), setting={"name": "open_set", "ood_fraction": 0.25}, seed=0, batch_size=64)
    batches = list(stream)
    labels = torch.cat([b.labels for b in batches])
    assert (labels == -1).sum().item() == 2 * round(719 / 3)
    assert all(b.images.shape[1:] == (3, 32, 32) for b in batches)
    assert 0 < (batches[0].labels == -1).sum() < 64  # mixed into the batches
    assert engine["open_set"] is True


def test_open_set_ood_folder_and_data(tmp_path):
    root = make_imagenet_val(tmp_path / "in")
    ood = make_imagenet_val(tmp_path / "ood", nested=False, size=(50, 70), seed=9)
    config = imagenet_config(root, "imagenet_c_onthefly")
    stream, _ = build_stream(config, setting={"name": "open_set", "ood": "folder", "ood_root": str(ood)}, seed=0)
    batches = list(stream)
    assert sum((b.labels == -1).sum().item() for b in batches) == 12
    assert all(b.images.shape[-2:] == (64, 64) for b in batches)
    # CIFAR-10-C with CIFAR-100 test images (corrupted alike) as OOD data
    c10, c100 = make_cifar_npy(tmp_path / "c10"), make_cifar_npy(tmp_path / "c100", num_classes=100, seed=3)
    options = {"name": "open_set", "ood": "data", "ood_data": "cifar100_c_onthefly", "ood_root": str(c100)}
    stream, _ = build_stream(cifar_config(c10, "cifar10_c_onthefly"), setting=options, seed=0)
    parts = [p for p in stream.parts if p.ood]
    assert {p.corruption for p in parts} == {"gaussian_noise", "brightness"}
    assert sum((b.labels == -1).sum().item() for b in stream) == 16
    with pytest.raises(ValueError, match="ood_root"):
        build_stream(config, setting={"name": "open_set", "ood": "folder"})


def test_forgetting_interleaves_clean_passes():
    stream, engine = build_stream(_digits(), setting={"name": "forgetting", "clean_samples": 100}, seed=0, batch_size=64)
    assert _domains(stream) == ["clean@0", "gaussian_noise/5", "clean@1", "brightness/5", "clean@2"]
    passes = {}
    for batch in stream:
        if batch.domain.startswith("clean@"):
            passes.setdefault(batch.domain, []).append(batch.ids)
    sets = [set(torch.cat(v).tolist()) for v in passes.values()]
    assert all(len(s) == 100 for s in sets) and sets[0] == sets[1] == sets[2]
    results = summarize_forgetting({"clean@0": {"accuracy": 0.9, "n": 1}, "a/5": {"accuracy": 0.2, "n": 1},
                                    "clean@1": {"accuracy": 0.7, "n": 1}})
    assert results["mean"] == {"accuracy": 0.2} and list(results["domains"]) == ["a/5"]
    assert results["forgetting"]["clean_accuracy_drop"] == pytest.approx(0.2)
    assert engine["reset_each_domain"] is False


def test_forgetting_needs_clean_images(tmp_path):
    from data_fixtures import make_imagenet_c

    root = make_imagenet_c(tmp_path, severities=(5,), per_class=1)
    with pytest.raises(ValueError, match="clean_root"):
        build_stream(imagenet_config(root), setting="forgetting")


def test_long_stream_rounds_and_cut():
    stream, _ = build_stream(_digits(), setting={"name": "long_stream", "rounds": 3}, seed=0, batch_size=719)
    assert _domains(stream) == ["gaussian_noise/5", "brightness/5"] * 3
    ids = [b.ids for b in stream]
    assert not torch.equal(ids[0], ids[2]) and set(ids[0].tolist()) == set(ids[2].tolist())  # reshuffled per round
    stream, _ = build_stream(_digits(), setting="long_stream", seed=0, max_samples=5000)
    assert sum(len(b.labels) for b in stream) == 5000
