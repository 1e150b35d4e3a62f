"""Accuracy under a stream rate (tta/stream_rate.py; Alfarra et al., ICML 2024).

* the schedule: with a declared relative cost C, exactly the batches ``ceil(eta * C) - 1`` after
  each adapted one are missed (per domain in the episodic setting, carried on in the continual one),
  re-derived here from the reference loop (``utils/online_eval.py`` L8-41) written directly;
* a measured C: the recorded per-batch costs replay to the same skipped batches;
* a missed batch changes nothing: for every batch method of ``tta.methods.available()`` and a view
  method, weights, optimizer state, buffers, policies' state and every counter are bitwise the same
  after ``predict_only``, and the next adapted batch gives bitwise the result of a copy that never
  saw the missed one; a BatchNorm in train mode with a momentum keeps its running statistics;
* the command line on digits-C with ``eval.stream_rate=1``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import tta.engine as engine
import tta.methods as methods
from tta.data.stream import Batch
from tta.models import load_classifier
from tta.stream_rate import StreamRate, batches_missed, check_stream_rate, resolve_relative_cost

BATCH_METHODS = [n for n in methods.available() if methods.METHODS.get(n).policy_level == "samples"]
VIEW_METHODS = [n for n in methods.available() if methods.METHODS.get(n).policy_level == "views"]


def digits(n: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from tta.data.digits import load_digits_split

    images, labels = load_digits_split("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: n * size]
    x = (images[idx] + 0.3 * torch.randn(images[idx].shape, generator=g)).clamp(0, 1)
    return list(zip(x.split(size), labels[idx].long().split(size)))


def stream(domains: dict[str, int], size: int = 8) -> list[Batch]:
    parts = digits(sum(domains.values()), size)
    out, k = [], 0
    for domain, n in domains.items():
        for _ in range(n):
            x, y = parts[k]
            out.append(Batch(x, y, domain, torch.arange(k * size, (k + 1) * size)))
            k += 1
    return out


def build(name: str, **kwargs):
    if name in ("eata", "eata_c"):
        kwargs["fisher_data"] = [x for x, _ in digits(1, seed=9)]
    if name == "rdumb":
        kwargs.setdefault("reset_every", 3)  # a reset inside the few batches of the test
    torch.manual_seed(0)
    return methods.build(name, load_classifier("digits_cnn"), batch_size=8, **kwargs)


def reference_skipped(domains: dict[str, int], eta: float, cost: float, episodic: bool) -> list[int]:
    """The reference's loop (online_eval.py L8-41) with a fixed ratio: which batches are missed.
    Episodic: each domain is its own run (a fresh ``delay``)."""
    skipped, index = [], 0
    delay = 0
    for n in domains.values():
        if episodic:
            delay = 0
        for _ in range(n):
            if delay == 0:
                ratio = cost
                delay += max(0, math.ceil(ratio * eta) - 1)
            else:
                skipped.append(index)
                delay -= 1
            index += 1
    return skipped


def snapshot(method) -> dict:
    state = {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in method.state_dict().items()}
    return {"state": state, "stats": method.stats(),
            "optimizer": copy.deepcopy(method.optimizer.state_dict()) if method.optimizer is not None else None,
            "policies": [copy.deepcopy(p.state_dict()) for p in method.policies]}


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_identical(u, v, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


# ------------------------------------------------------------------ the rule and the options (fast)
def test_missed_batches_rule_and_options():
    assert [batches_missed(1.0, c) for c in (0.5, 1.0, 1.01, 2.0, 2.5, 3.0)] == [0, 0, 1, 1, 2, 2]
    assert batches_missed(0.5, 2.5) == 1 and batches_missed(0.0, 9.0) == 0
    assert resolve_relative_cost(None, "tent") is None
    assert resolve_relative_cost(2, "tent") == 2.0
    assert resolve_relative_cost({"tent": 2, "default": 1.5}, "tent") == 2.0
    assert resolve_relative_cost({"tent": 2, "default": 1.5}, "sar") == 1.5
    with pytest.raises(ValueError, match="without 'sar'"):
        resolve_relative_cost({"tent": 2}, "sar")
    for bad in (0, -1, True, float("nan")):
        with pytest.raises(ValueError):
            resolve_relative_cost(bad, "tent")
    for bad in (-1, True, None, float("inf")):
        with pytest.raises(ValueError):
            check_stream_rate(bad)
    rate = StreamRate(1.0, 3.0)
    assert rate.active and rate.adapts()
    rate.load_state_dict(rate.state_dict())


@pytest.mark.parametrize("eta,cost,episodic", [(1.0, 2.5, True), (1.0, 2.5, False), (0.5, 2.5, True),
                                               (1.0, 1.0, True), (2.0, 1.6, False)])
def test_declared_cost_skips_exactly_the_reference_batches(eta, cost, episodic):
    domains = {"a": 5, "b": 4}
    method = build("tent")
    seen = []
    predict_only = method.predict_only
    method.predict_only = lambda x: seen.append(x) or predict_only(x)  # noqa: E731 (count the missed calls)
    out = engine.run(method, stream(domains), progress=False, reset_each_domain=episodic, stream_rate=eta,
                     relative_cost=cost)
    expected = reference_skipped(domains, eta, cost, episodic)
    record = out["stream_rate"]
    assert record["skipped_batches"] == expected
    assert record["batches_skipped"] == len(expected) == len(seen)  # declared: no timing forward at all
    assert record["batches_adapted"] == 9 - len(expected) == out["stats"]["counters"]["batches"]
    assert record["mode"] == "declared" and "measured_cost" not in record
    assert sum(d["adapted"] + d["skipped"] for d in record["per_domain"].values()) == 9
    assert out["results"]["domains"]["a"]["n"] == 40  # accuracy counts every batch, missed ones too


def test_offline_protocol_is_unchanged():
    a = engine.run(build("tent"), stream({"a": 4}), progress=False)
    b = engine.run(build("tent"), stream({"a": 4}), progress=False, stream_rate=0.0, relative_cost=3.0)
    assert a["stream_rate"] is None and b["stream_rate"] is None
    assert a["results"] == b["results"] and a["stats"] == b["stats"]


def test_measured_costs_replay_to_the_recorded_schedule():
    out = engine.run(build("tent"), stream({"a": 6, "b": 6}), progress=False, stream_rate=1.0)
    record = out["stream_rate"]
    costs = record["measured_cost"]["per_batch"]
    assert record["mode"] == "measured" and len(costs) == record["batches_adapted"] == out["stats"]["counters"]["batches"]
    assert all(c > 0 for c in costs) and record["measured_cost"]["min"] <= record["measured_cost"]["median"]
    skipped, delay, k, index = [], 0, 0, 0
    for n in (6, 6):
        delay = 0
        for _ in range(n):
            if delay == 0:
                delay = max(0, math.ceil(record["measured_cost"]["per_batch"][k] * 1.0) - 1)
                k += 1
            else:
                skipped.append(index)
                delay -= 1
            index += 1
    assert record["skipped_batches"] == skipped and record["batches_skipped"] == len(skipped)


# ------------------------------------------------------------------ a missed batch changes nothing
@pytest.mark.parametrize("name", BATCH_METHODS)
def test_a_missed_batch_changes_no_state(name):
    method = build(name)
    batches = [x for x, _ in digits(4)]
    for x in batches[:2]:  # some state: momentum, moving averages, memories, clocks
        method(x)
    before = snapshot(method)
    twin = copy.deepcopy(method)
    logits = method.predict_only(batches[2])
    assert logits.shape == (8, 10) and not logits.requires_grad
    assert_identical(before, snapshot(method), name)
    torch.manual_seed(5)
    after = method(batches[3])
    torch.manual_seed(5)
    expected = twin(batches[3])
    assert torch.equal(after, expected), name
    assert_identical(snapshot(twin), snapshot(method), name)


def test_train_mode_batchnorm_keeps_its_running_statistics():
    """A model in train mode with running statistics and a momentum (TTAC's setup in the reference): a
    plain forward moves them, ``predict_only`` normalises with the batch's statistics and leaves them."""
    method = build("source")
    method.model.train()
    x = digits(1)[0][0]
    bn = next(m for m in method.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum and bn.running_mean is not None
    before = snapshot(method)
    logits = method.predict_only(x)
    assert_identical(before, snapshot(method))
    plain = copy.deepcopy(method.model)
    with torch.no_grad():
        expected = plain(x)  # batch statistics in train mode
    assert torch.equal(logits, expected)
    moved = next(m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(moved.running_mean, bn.running_mean)  # the plain forward did move them
    assert torch.equal(bn.running_mean, before["state"][[k for k in before["state"] if k.endswith("running_mean")][0]])


# ------------------------------------------------------------------ a view method
@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    from tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_rate"), seed=1)


@pytest.mark.parametrize("name", ["tpt", "tda"])
def test_a_missed_image_changes_no_view_method_state(name, tiny_spec):
    from tta.models.clip import load_clip_classifier

    classes = ["goldfish", "red fox", "tabby cat", "great white shark", "axolotl"]
    torch.manual_seed(0)
    method = methods.build(name, load_clip_classifier(tiny_spec[5:], class_names=classes), num_views=4)
    fresh = copy.deepcopy(method)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 32, 32, generator=g)
    method(x[:2], ids=torch.arange(2))
    before = snapshot(method)
    twin = copy.deepcopy(method)
    logits = method.predict_only(x[2:])
    assert_identical(before, snapshot(method), name)
    assert torch.equal(logits, fresh.predict_only(x[2:]))  # the zero-shot model: what every image starts from
    after = method(x[2:], ids=torch.arange(2, 4))
    assert torch.equal(after, twin(x[2:], ids=torch.arange(2, 4)))
    assert_identical(snapshot(twin), snapshot(method), name)


# ------------------------------------------------------------------ the report
def test_report_puts_offline_and_stream_rate_side_by_side():
    from tta.report import report_text

    def record(method, seed, eta, acc, rate=None):
        return {"config": {"method": {"name": method}, "policies": {"extra": []}, "seed": seed,
                           "setting": {"name": "reset_each_shift"}, "eval": {"stream_rate": eta, "relative_cost": None}},
                "method": {"method": method}, "model": {"spec": "digits_cnn"}, "selection": None,
                "results": {"mean": {"accuracy": acc, "source_accuracy": 0.2}, "domains": {"a": {"accuracy": acc}}},
                "stream_rate": rate}

    measured = lambda c, s: {"mode": "measured", "relative_cost": None, "measured_cost": {"median": c},  # noqa: E731
                             "batches_adapted": 10 - s, "batches_skipped": s}
    records = [record("tent", 0, 0, 0.70), record("tent", 1, 0, 0.72),
               record("tent", 0, 1, 0.60, measured(1.5, 4)), record("tent", 1, 1, 0.64, measured(2.5, 6)),
               record("norm", 0, 1, 0.55, {"mode": "declared", "relative_cost": 1.0, "batches_adapted": 10,
                                           "batches_skipped": 0})]
    text = report_text(records)
    section = text.split("## offline and under a stream rate\n\n")[1].split("\n\n")[0].splitlines()
    assert section[0] == "| run | η | offline | stream rate | Δ | C | missed % | seeds |"
    tent = [c.strip() for c in section[2].split("|")[1:-1]]
    assert tent[0] == "tent" and tent[1] == "1" and tent[2].startswith("71.0 ±") and tent[3].startswith("62.0 ±")
    assert tent[4] == "-9.0" and tent[5] == "2.00" and tent[6] == "50.0" and tent[7] == "2"
    norm = [c.strip() for c in section[3].split("|")[1:-1]]
    assert norm[2] == "–" and norm[5] == "1.00 (declared)" and norm[6] == "0.0"
    assert "## offline and under a stream rate" not in report_text(records[:2])


# ------------------------------------------------------------------ the command line
@pytest.mark.slow
def test_cli_stream_rate_on_digits_c(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "tta.run", f"hydra.run.dir={out}", "progress=false", "max_samples=640", "batch_size=64",
           "eval.stream_rate=1", "eval.relative_cost={tent: 2.5, default: 1}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    rate = record["stream_rate"]
    assert rate["eta"] == 1.0 and rate["relative_cost"] == 2.5 and rate["mode"] == "declared"
    batches = rate["batches_adapted"] + rate["batches_skipped"]
    assert batches == 10 and rate["skipped_batches"] == [1, 2, 4, 5, 7, 8]
    assert record["counts"]["counters"]["batches"] == rate["batches_adapted"] == 4
    assert "stream rate η = 1 (Alfarra et al., ICML 2024): declared relative cost C = 2.5; 4 of 10 batches adapted" \
        in (out / "results.md").read_text()


# ------------------------------------------------------------------ no host sync with a declared cost
@pytest.mark.parametrize("name", ["tent", "eata"])
def test_declared_cost_adds_no_host_sync(name):
    """Adapted and missed batches alike: from the second batch to the end, no syncing op (the counter
    of tests/test_host_sync.py; a declared C times nothing)."""
    from test_host_sync import _CountedStream, _engine_batches, build as build_quiet

    batches = _engine_batches(("gaussian_noise", "contrast"), per_domain=4)
    stream = _CountedStream(batches, start=1)
    out = engine.run(build_quiet(name), stream, device="cpu", progress=True, log_every=10_000, stream_rate=1.0,
                     relative_cost=2.0)
    assert not stream.counter.ops, stream.counter.report()
    assert out["stream_rate"]["skipped_batches"] == [1, 3, 5, 7]


# ------------------------------------------------------------------ resume
def test_a_resumed_run_continues_the_schedule():
    """A checkpoint holds the schedule (the pending delay included): resumed mid-delay, the run ends with
    the uninterrupted run's record and results."""
    from tta.checkpoint import changing_state, restore_method

    batches = stream({"a": 7, "b": 3})
    saves = []
    method = build("tent")
    whole = engine.run(method, batches, progress=False, stream_rate=1.0, relative_cost=3.0, checkpoint_every=2,
                       checkpoint=lambda p: saves.append((p, changing_state(method))))
    assert [p["done"] for p, _ in saves] == [2, 4, 6, 7, 8, 10]
    progress, state = saves[1]  # after batch 3 (index 3 adapted, a delay of 2 pending)
    assert progress["extra"]["stream_rate"]["delay"] == 2
    fresh = build("tent")
    restore_method(fresh, state)
    again = engine.run(fresh, batches, progress=False, stream_rate=1.0, relative_cost=3.0, resume=progress)
    assert again["stream_rate"] == whole["stream_rate"]
    assert again["results"] == whole["results"] and again["stats"] == whole["stats"]
