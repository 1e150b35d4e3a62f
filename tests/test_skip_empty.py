"""Skipping the backward and the step of a batch whose selection is empty changes nothing but the work.

Every learning method of the batch family runs the same batches twice from the same start: with
``skip_empty="never"`` (today's sync-free step: backward of a zero-weighted loss, step, undo on the
device) and with ``skip_empty="always"`` (the size read on the host, the backward and the step
skipped). A batch whose selection is empty (an extra policy that drops everything, put in place
between batches) sits between two that learn; after each batch the weights, the optimizer state (SGD
momentum, and Adam's step count and moments), every counter and the returned logits must be
bit-identical. On the CPU ``"always"`` also decides the guarded update on the host (no snapshot, no
undo), so the same comparison checks that path, with a batch holding a NaN image (an update the
guard refuses) at the end.
"""
from __future__ import annotations

import pytest
import torch

import tta.methods as methods
from tta.methods.core import SKIP_EMPTY_WINDOW, reads_are_free
from tta.models import load_classifier
from tta.policies import BatchContext, Policy

BATCH_METHODS = [n for n in methods.available()
                 if methods.METHODS.get(n).policy_level == "samples" and methods.METHODS.get(n).learns]


class Gate(Policy):
    """Keeps every alive sample while ``open``, none otherwise (state in a buffer: copied with the method)."""

    name = "gate"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("open", torch.ones((), dtype=torch.bool))

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        return (alive & self.open).to(torch.float32)


def digits(n: int, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    from tta.data.digits import load_digits_split

    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: n * size]
    return list((images[idx] + 0.3 * torch.randn(images[idx].shape, generator=g)).clamp(0, 1).split(size))


def build(name: str, skip_empty: str, **kwargs):
    if name in ("eata", "eata_c"):
        kwargs["fisher_data"] = digits(1, seed=9)
    torch.manual_seed(0)  # the same start (and RNG stream: DeYO's permutations, EATA-C's dropout) for both
    return methods.build(name, load_classifier("digits_cnn"), batch_size=8, nonfinite="skip", input_range=None,
                         extra_policies=[Gate()], skip_empty=skip_empty, **kwargs)


def gate(method) -> Gate:
    return next(p for p in method.policies if isinstance(p, Gate))


def run(method, xs: list[torch.Tensor], empty: set[int], bad: set[int] = frozenset()) -> list[dict]:
    torch.manual_seed(1)
    out = []
    for i, x in enumerate(xs):
        gate(method).open.fill_(i not in empty)
        if i in bad:  # a NaN image: the guarded step refuses the update (nonfinite="skip")
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        logits = method(x)
        out.append({"logits": logits.detach().clone(), "state": {k: v.clone() for k, v in method.state_dict().items()
                                                                  if torch.is_tensor(v)},
                    "optimizer": method.optimizer.state_dict(), "stats": method.stats()})
    return out


def assert_identical(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif torch.is_tensor(a):  # bit for bit (NaN where NaN: the logits of a batch with a NaN image)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert a == b


def options(name: str) -> list[dict]:
    """The variants that can skip: SAR's and crowds' official step on an empty selection cannot."""
    if name == "sar":  # reset_constant 1e9: a model recovery at every batch once the EMA exists (skipped ones too)
        return [{}, {"step_on_empty": False, "reset_constant": 1e9, "e_margin": 1.0}]
    if name == "crowds":
        return [{}, {"step_on_empty": False}]
    return [{}]


CASES = [(n, o) for n in BATCH_METHODS for o in options(n)]
#: methods with nothing to skip on an empty selection: ROID's reference steps every batch, RoTTA and
#: SoTTA learn from a memory filled across batches (the identity above still holds for them)
STEPS_ANYWAY = {"roid", "rotta", "sotta"}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, o in CASES])
def test_skipping_an_empty_selection_changes_nothing(name, extra, optimizer):
    xs = digits(5)
    empty, bad = {1, 2}, {4}
    never = run(build(name, "never", optimizer=optimizer, **extra), xs, empty, bad)
    always = run(build(name, "always", optimizer=optimizer, **extra), xs, empty, bad)
    assert_identical(never, always)
    counters = always[-1]["stats"]["counters"]
    if (extra or name not in ("sar", "crowds")) and name not in STEPS_ANYWAY:
        assert counters["skipped_empty"] >= len(empty)
    if "reset_constant" in extra:
        assert counters["recoveries"] >= 2
        assert counters["steps"] >= 1  # the open batches learned
    adam = always[-1]["optimizer"]["state"]
    if optimizer == "adam" and adam:  # the skipped batches did not count as Adam steps
        assert float(next(iter(adam.values()))["step"]) == counters["steps"]


def test_the_skip_skips_the_backward():
    """With the read, an empty batch runs no backward at all (the point of the skip)."""
    calls = []
    method = build("eta", "always")
    hook = [p.register_hook(lambda g: calls.append(1)) for p in method.adapted_parameters()][:1]
    gate(method).open.fill_(False)
    method(digits(1)[0])
    assert not calls and method.stats()["counters"]["skipped_empty"] == 1
    method2 = build("eta", "never")
    [p.register_hook(lambda g: calls.append(1)) for p in method2.adapted_parameters()][:1]
    gate(method2).open.fill_(False)
    method2(digits(1)[0])
    assert calls  # the sync-free step backpropagates the zero-weighted loss
    del hook


def test_modes_and_the_cpu_decision():
    assert reads_are_free(torch.device("cpu")) and not reads_are_free(torch.device("cuda"))
    method = build("tent", "auto")
    assert method.hparams()["skip_empty"] == "auto"
    method.plan_skip(torch.device("cpu"))
    assert method._skip_now  # auto on the CPU: always read
    method.skip_empty = "never"
    method.plan_skip(torch.device("cpu"))
    assert not method._skip_now
    with pytest.raises(ValueError, match="step_on_empty"):
        build("sar", True)
    with pytest.raises(ValueError, match="skip_empty"):
        build("tent", "sometimes")


def test_auto_where_a_read_syncs_decides_per_window():
    """``"auto"`` on a device where a read is a sync: off at first, then decided from the counters read
    once per window of batches (the empty rate of that window), never per batch."""
    method = build("eta", "auto")
    cuda = torch.device("cuda")  # only the device type is looked at; nothing runs on it
    for _ in range(SKIP_EMPTY_WINDOW - 1):
        method.counters.add("batches", 1)
        method.counters.add("skipped_empty", 1)
        method.plan_skip(cuda)
        assert not method._skip_now  # not read before the window ends
    method.counters.add("batches", 1)
    method.plan_skip(cuda)
    assert method._skip_now  # the window was almost all empty
    for _ in range(SKIP_EMPTY_WINDOW):
        method.counters.add("batches", 1)
        method.plan_skip(cuda)
    assert not method._skip_now  # the next window had no empty selection


@pytest.mark.parametrize("name,margin", [("eta", {"e_margin": 0.6}), ("deyo", {"deyo_margin": 0.6})])
def test_policies_after_an_empty_filter_are_skipped_with_the_same_result(name, margin):
    """On the CPU a policy that an empty selection leaves inert (``inert_when_empty``: ETA's redundancy
    filter and weight, DeYO's PLPD) is not called once the entropy filter kept nothing; weights,
    optimizer state, counters, policy state (EATA's running prediction) and the selection masks of
    the diagnostics are those of the step that calls it."""
    xs = digits(6, size=4)
    records, calls = {}, {}
    for mode in ("never", "auto"):
        torch.manual_seed(0)
        method = methods.build(name, load_classifier("digits_cnn"), batch_size=4, nonfinite="skip", input_range=None,
                               skip_empty=mode, **margin)
        later = method.policies[1]
        calls[mode] = 0

        def counted(ctx, alive, _forward=later.forward, _mode=mode):
            calls[_mode] += 1
            return _forward(ctx, alive)

        later.forward = counted
        torch.manual_seed(1)
        out = []
        for x in xs:
            logits = method(x)
            out.append({"logits": logits.clone(), "state": {k: v.clone() for k, v in method.state_dict().items()
                                                            if torch.is_tensor(v)},
                        "optimizer": method.optimizer.state_dict(), "stats": method.stats(),
                        "masks": {k: v.clone() for k, v in method.last_selection.items()}})
        records[mode] = out
    assert_identical(records["never"], records["auto"])
    empty = records["auto"][-1]["stats"]["counters"]["skipped_empty"]
    assert 0 < empty < len(xs)  # both cases ran: some batches kept samples, some none
    first_kept = sum(bool(next(iter(r["masks"].values())).any()) for r in records["auto"])
    assert calls["never"] == len(xs) and calls["auto"] == first_kept < len(xs)  # called only after a non-empty filter


def test_counters_hold_host_numbers_until_read():
    """A host number added to a counter is held until the counters are read: ``as_dict``, the state
    dict and an attribute read see it, a copy counts on its own, a loaded state replaces what was
    counted, a replaced buffer is the one added to, and a pickled copy keeps the pending counts."""
    import copy
    import pickle

    from tta.methods.counters import Counters

    c = Counters(["a"])
    c.add("a", 2)
    c.add("a", torch.tensor(3))  # a device value: the tensor path
    twin = copy.deepcopy(c)
    twin.add("a", 10)
    c.add("a", 1)
    assert c.as_dict() == {"a": 6} and twin.as_dict() == {"a": 15}
    c.load_state_dict({"a": torch.tensor(40)})
    c.add("a", 1)
    assert c.state_dict()["a"].item() == 41
    c.a = torch.zeros((), dtype=torch.long)  # a new buffer object: a new view
    c.add("a", 5)
    assert c.a.item() == 5
    restored = pickle.loads(pickle.dumps(c))
    restored.add("a", 1)
    assert restored.as_dict() == {"a": 6} and c.as_dict() == {"a": 5}
    c.add("a", 2)
    assert c.state_dict()["a"].item() == 7  # a pending count is in the saved state
    c.add("a", 3)
    assert int(c.a) == 10  # and in an attribute read
    c.add("b", 4)  # a counter first seen as a host number: registered at once, counted when read
    assert "b" in c._buffers and c.as_dict() == {"a": 10, "b": 4}
    c.add("a", 100)
    c.load_state_dict({"a": torch.tensor(1), "b": torch.tensor(2)})  # what was counted is replaced
    assert c.as_dict() == {"a": 1, "b": 2}
