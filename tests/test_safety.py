"""Deployment safety of an adapted model: state files that cannot run code, save / restore /
rollback, input checks, the collapse guard, and the command line's value checks."""
import copy
import io
import sys

import pytest
import torch

import tta
from tta.data.digits import load_digits_split
from tta.models import load_classifier

VIEW_METHODS = {"tpt", "difftpt", "adte", "zero", "tda", "ctpt"}
BATCH_METHODS = sorted(set(tta.methods.available()) - VIEW_METHODS)


def build(name, **kw):
    if name in ("eata", "eata_c"):
        kw.setdefault("fisher_data", torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return tta.methods.build(name, load_classifier("digits_cnn"), **kw)


def batches(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, _ = load_digits_split("test")
    return [x[torch.randint(0, len(x), (size,), generator=g)] for _ in range(n)]


def tensors_equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------- 1. safe state
class _Payload:
    """Unpickles to ``value`` after running a shell command (what a malicious state file holds)."""

    def __init__(self, command, value):
        self.command, self.value = command, value

    def __reduce__(self):
        return eval, (f"__import__('os').system({self.command!r}) * 0 or {self.value!r}",)


def _pickled_optimizer_state(method, marker):
    """The old format of the extra state (bytes of ``torch.save(optimizer.state_dict())``), with a
    payload that touches ``marker`` and unpickles to a valid optimizer state."""
    groups = method.optimizer.state_dict()["param_groups"]
    buffer = io.BytesIO()
    torch.save(_Payload(f"touch {marker}", {"state": {}, "param_groups": groups}), buffer)
    return buffer.getvalue()


def test_malicious_state_file_is_refused_and_runs_nothing(tmp_path):
    method = build("tent")
    method(batches(1)[0])
    marker, proof = tmp_path / "pwned", tmp_path / "proof"

    # the payload is real: unpickled the way tta < 0.2 did, it runs the command and gives a valid state
    loaded = torch.load(io.BytesIO(_pickled_optimizer_state(method, proof)), weights_only=False)
    assert proof.exists() and loaded["param_groups"] == method.optimizer.state_dict()["param_groups"]

    state = method.state_dict()
    state["_extra_state"] = _pickled_optimizer_state(method, marker)
    path = tmp_path / "adapted.pt"
    torch.save(state, path)
    outer = torch.load(path, weights_only=True)  # the outer dict holds only tensors, strings and bytes
    assert isinstance(outer["_extra_state"], bytes)

    victim = build("tent")
    before = copy.deepcopy(victim.state_dict())
    with pytest.raises(ValueError, match="refus"):
        victim.load_state_dict(outer)
    assert not marker.exists()  # nothing ran
    assert tensors_equal(victim.state_dict(), before)  # and nothing was loaded

    # the payload one level down (inside the optimizer state) is refused too
    nested = dict(outer, _extra_state={"optimizer": {"state": {}, "param_groups": outer["_extra_state"]}})
    with pytest.raises(ValueError, match="refusing"):
        victim.load_state_dict(nested)
    assert not marker.exists()


def _optimizer_state_with(state, where, bad):
    """``state`` (a method's ``state_dict()``) with ``bad`` put into its optimizer state: as the
    momentum buffer of the first parameter, or as the learning rate of the first parameter group."""
    state = copy.deepcopy(state)
    optimizer = state["_extra_state"]["optimizer"]
    if where == "momentum_buffer":
        first = next(iter(optimizer["state"].values()))
        assert "momentum_buffer" in first  # Tent's SGD has momentum 0.9: the buffer is there to replace
        first["momentum_buffer"] = bad
    else:
        optimizer["param_groups"][0]["lr"] = bad
    return state


@pytest.mark.parametrize("bad", [object(), b"\x80\x04K\x01."], ids=["object", "bytes"])
@pytest.mark.parametrize("where", ["momentum_buffer", "lr"])
def test_a_non_plain_value_inside_the_optimizer_state_loads_nothing(where, bad):
    """An object or bytes where the optimizer state holds a tensor or a number is refused with a
    ``ValueError`` before anything is loaded: the weights, the optimizer state and the counters stay
    as they were, and the method keeps adapting as if the call had not happened. (A filter that let
    any value through would load the object into the optimizer without an error, or fail later, in
    a step.)"""
    donor = build("tent")
    donor(batches(1)[0])
    poisoned = _optimizer_state_with(donor.state_dict(), where, bad)

    victim, twin = build("tent"), build("tent")
    for method in (victim, twin):
        method(batches(1, seed=4)[0])
    before = copy.deepcopy(victim.state_dict())
    optimizer_before = copy.deepcopy(victim.optimizer.state_dict())
    with pytest.raises(ValueError):
        victim.load_state_dict(poisoned)
    with pytest.raises(ValueError):
        victim.set_extra_state(poisoned["_extra_state"])
    assert tensors_equal(victim.state_dict(), before)
    assert tensors_equal(victim.optimizer.state_dict(), optimizer_before)
    nxt = batches(1, seed=5)[0]
    torch.testing.assert_close(victim(nxt), twin(nxt), rtol=0, atol=0)
    assert tensors_equal(victim.state_dict(), twin.state_dict())


@pytest.mark.parametrize("name", BATCH_METHODS)
def test_state_round_trips_through_a_weights_only_file(tmp_path, name):
    method = build(name)
    data = batches(3)
    for x in data[:2]:
        method(x)
    path = tmp_path / "state.pt"
    torch.save(method.state_dict(), path)
    other = build(name)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert tensors_equal(other.state_dict(), method.state_dict())
    assert other.stats() == method.stats()
    torch.manual_seed(5)  # DeYO's patch shuffles draw from the global RNG, which is not method state
    ours = other(data[2])
    torch.manual_seed(5)
    torch.testing.assert_close(ours, method(data[2]), rtol=0, atol=0)  # the same next step
    assert tensors_equal(other.state_dict(), method.state_dict())


def test_rollback_after_a_poisoned_stream():
    """save / restore / rollback: restore a known-good state_dict after adapting on garbage."""
    method = build("tent", lr=0.05)
    clean = batches(4)
    for x in clean[:3]:
        method(x)
    good = copy.deepcopy(method.state_dict())
    expected = method(clean[3])  # what the model predicts from the good state
    method.load_state_dict(good)

    g = torch.Generator().manual_seed(3)
    for _ in range(10):  # poisoned: noise and constant images
        method(torch.rand(16, 3, 32, 32, generator=g))
        method(torch.full((16, 3, 32, 32), 0.9))
    assert not torch.equal(method(clean[3]), expected)  # the poison changed the model

    method.load_state_dict(good)
    torch.testing.assert_close(method(clean[3]), expected, rtol=0, atol=0)

    fresh = build("tent", lr=0.05)  # reset() is the rollback to the source state
    first = fresh(clean[0])
    method.reset()
    torch.testing.assert_close(method(clean[0]), first, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- 4. input checks
def _snapshot(method):
    return copy.deepcopy(method.state_dict())


@pytest.mark.parametrize("make,match", [
    (lambda x: x * 255, r"images must be in \[0, 1\]"),
    (lambda x: x * 10 - 5, r"images must be in \[0, 1\]"),
    (lambda x: x + 0.01, r"images must be in \[0, 1\]"),
    (lambda x: x.half(), "differs from the model's parameters"),
    (lambda x: x.bfloat16(), "differs from the model's parameters"),
    (lambda x: x.double(), "differs from the model's parameters"),
    (lambda x: x[:, :, :0], "at least 1x1"),
])
@pytest.mark.parametrize("name", ["tent", "sar"])
def test_bad_input_raises_before_any_counter_or_weight_moves(name, make, match):
    method = build(name)
    method(batches(1)[0])
    before = _snapshot(method)
    with pytest.raises(ValueError, match=match):
        method(make(batches(1, seed=1)[0]))
    assert tensors_equal(method.state_dict(), before)  # weights, optimizer state and counters


def test_range_check_tolerance_and_opt_out():
    x = batches(1)[0]
    method = build("tent")
    method(x.clamp(0, 1) * (1 + 5e-4) - 2e-4)  # within the 1e-3 tolerance (resizing and interpolation rounding)
    loose = build("tent", input_range=None)
    loose(x * 255)  # allowed when asked for
    assert loose.stats()["counters"]["batches"] == 1
    other = build("tent", input_range=(-1, 1))
    other(x * 2 - 1)
    with pytest.raises(ValueError, match=r"images must be in \[-1, 1\]"):
        other(x * 3)
    with pytest.raises(ValueError, match="input_range"):
        build("tent", input_range=(1, 0))


def test_skip_mode_range_checks_only_the_finite_values():
    method = build("tent", nonfinite="skip")
    x = batches(1)[0].clone()
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    method(x)  # NaN/Inf: predicted, update dropped and counted; not a range error
    assert method.stats()["counters"]["skipped_nonfinite"] == 1
    x[2] = 7.0
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        method(x)


def test_half_precision_batch_passes_under_autocast():
    method = build("tent")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = method(batches(1)[0].bfloat16())
    assert logits.shape == (16, 10)


@pytest.mark.parametrize("data,match", [
    ((torch.rand(8, 3, 32, 32) * 255).to(torch.uint8), "float images"),
    (torch.full((8, 3, 32, 32), float("nan")), "NaN or Inf"),
    (torch.rand(8, 3, 32, 32) * 255, r"in \[0, 1\]"),
])
def test_eata_fisher_data_is_checked_at_construction(data, match):
    with pytest.raises(ValueError, match=match):
        tta.methods.build("eata", load_classifier("digits_cnn"), fisher_data=data)


def test_eata_fisher_batches_are_checked_at_estimation():
    bad = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32).index_fill_(0, torch.tensor([1]), float("nan"))]
    method = tta.methods.build("eata", load_classifier("digits_cnn"), fisher_data=bad)
    with pytest.raises(ValueError, match="fisher_data batch 1.*NaN"):
        method.compute_fisher()
    assert not method.fisher.is_ready


# ---------------------------------------------------------------------------------------- 3. collapse guard
def test_guard_resets_on_a_collapsed_stream_and_not_on_a_clean_one():
    x, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(0)
    clean = tta.adapt("digits_cnn", "tent", guard="reset_on_collapse")
    for _ in range(25):
        clean(x[torch.randint(0, len(x), (32,), generator=g)])
    assert clean.stats()["counters"]["guard_resets"] == 0
    assert clean.hparams()["guard"]["min_effective_classes"] == pytest.approx(10 ** 0.5)

    poisoned = tta.adapt("digits_cnn", "tent", guard={"warmup": 5})
    source = copy.deepcopy(poisoned.model.state_dict())
    for i in range(12):  # constant images: every prediction the same class
        poisoned(torch.full((32, 3, 32, 32), 0.2 + 0.05 * i))
    assert poisoned.stats()["counters"]["guard_resets"] == 2  # after batches 5 and 10
    assert poisoned.stats()["counters"]["batches"] == 12

    # right after a reset the adapted state is the source state again, exactly
    probe = tta.adapt("digits_cnn", "tent", guard={"warmup": 1})
    probe(torch.full((32, 3, 32, 32), 0.5))
    assert probe.stats()["counters"]["guard_resets"] == 1
    for k, v in probe.model.state_dict().items():
        assert torch.equal(v, source[k]), k
    for state in probe.optimizer.state.values():
        assert all(not torch.is_tensor(t) or not t.any() for t in state.values())


def test_guard_is_off_by_default_and_survives_save_and_restore():
    from tta.guard import CollapseGuard, attach_guard

    plain = tta.adapt("digits_cnn", "tent")
    assert "collapse_guard" not in dict(plain.named_modules()) and "guard" not in plain.hparams()
    guarded = tta.adapt("digits_cnn", "sar", guard="reset_on_collapse")
    for x in batches(3):
        guarded(x)
    state = guarded.state_dict()
    assert "collapse_guard.mean_prediction" in state
    other = tta.adapt("digits_cnn", "sar", guard="reset_on_collapse")
    other.load_state_dict(state)
    assert torch.equal(other.collapse_guard.since_reset, guarded.collapse_guard.since_reset)
    plain_sar = tta.adapt("digits_cnn", "sar")
    plain_sar.load_state_dict(state)  # a guard's signal is ignored by a method without one
    with pytest.raises(ValueError, match="unknown guard"):
        tta.adapt("digits_cnn", "tent", guard="nope")
    with pytest.raises(ValueError, match="unknown guard option"):
        tta.adapt("digits_cnn", "tent", guard={"treshold": 3})
    with pytest.raises(ValueError, match="min_effective_classes"):
        CollapseGuard(10, min_effective_classes=20)
    with pytest.raises(ValueError, match="already has"):
        attach_guard(guarded, "reset_on_collapse")


# ---------------------------------------------------------------------------------------- 4. CLI values
def compose(tmp_path, *overrides):
    from pathlib import Path

    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tta.run import register_configs

    register_configs()
    with initialize_config_dir(str(Path(tta.__file__).parent / "conf"), version_base=None):
        cfg = hydra_compose("config", overrides=["progress=false", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("override,match", [
    ("method.lr=abc", r"method\.lr must be a number or null"),
    ("method.steps=2.5", r"method\.steps must be an integer"),
    ("method.episodic=maybe", r"method\.episodic must be true or false"),
    ("checkpoint_every=-1", "checkpoint_every must be an integer >= 0"),
    ("resume=sure", "resume must be true or false"),
    ("batch_size=0", "batch_size must be an integer >= 1"),
])
def test_cli_values_are_checked_with_clear_errors(tmp_path, override, match):
    from tta.record import read_json
    from tta.run import execute

    cfg = compose(tmp_path, override)
    with pytest.raises(ValueError, match=match):
        execute(cfg, tmp_path / "run")
    record = read_json(tmp_path / "run" / "run.json")  # the failure is recorded, then re-raised
    assert record["status"] == "failed" and record["error"]["type"] == "ValueError"
    assert match.split(" ")[0].replace("\\", "") in record["error"]["message"]


def test_cli_bad_method_value_from_the_command_line(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "tta.run", f"hydra.run.dir={tmp_path}", "method.lr=abc"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "method.lr must be a number" in proc.stderr
