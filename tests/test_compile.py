"""``compile=True`` (and the ``fast`` preset) against eager, for every batch method, on digits-C batches.

What is checked, per method, over the same batches (two of 16, a smaller last batch of 8 ending the
domain, a reset, then 16 and 8 again):

* the predictions (the returned pre-update logits) equal eager's within ``ATOL`` and have the
  same argmax, and the counters (steps taken, samples kept, skipped updates) are identical;
* recompilations stop: the first batch compiles, the second and later batches of 16 compile
  nothing, the first batch of 8 compiles once more (static shapes: one recompile per new batch
  size, decided in :mod:`tta.methods.speed`), and after the reset neither size compiles again.

Graphs are counted with ``torch._dynamo``'s counters. The tracing, graph breaks, guards and
recompilations are ``torch.compile``'s own whatever the backend; the per-method tests use the
``aot_eager`` backend (AOTAutograd, no Inductor code generation, which takes minutes per method on
a small CPU), so eager and compiled agree to float rounding. One test runs Inductor itself (the
default backend) on Tent, where its kernels change the rounding: tolerance ``INDUCTOR_ATOL``.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import tta.methods as methods
import tta.methods.speed as speed
from tta.models import load_classifier

ATOL = 1e-4  # aot_eager: the same kernels as eager; rounding only from a different op order
INDUCTOR_ATOL = 1e-3  # Inductor's fused kernels on logits of magnitude ~10
NAMES = ["source", "norm", "tent", "eta", "eata", "sar", "deyo", "crowds", "eata_c"]
FAST = {"deyo"}  # the others are marked slow (still run by default); DeYO crosses the eager boundary


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """A fresh compiler with room for every recompile a test counts. torch's settings are patched
    with torch's own API (a test runner's attribute patching can delete options that torch's config
    modules serve dynamically); ``speed.BACKEND`` is a plain attribute of our module."""
    torch._dynamo.reset()
    monkeypatch.setattr(speed, "BACKEND", "aot_eager")
    with torch._dynamo.config.patch(recompile_limit=16):
        yield
    torch._dynamo.reset()


def digits_c(sizes: list[int], seed: int = 0, labels: bool = False):
    """Digits test images under severity-5 Gaussian noise, cut into batches of ``sizes`` (and their
    labels, with ``labels=True``)."""
    from tta.data.corruptions import corrupt
    from tta.data.digits import load_digits_split

    images, targets = load_digits_split("test")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: sum(sizes)]
    batches = list(corrupt(images[idx], "gaussian_noise", 5, seed=seed).split(sizes))
    return (batches, list(targets[idx].split(sizes))) if labels else batches


def build(name: str, skip_empty: str = "never", **kwargs):
    """``skip_empty="never"``: the sync-free step, one path per batch (the skip's read adds a branch,
    checked in :func:`test_compiled_skip_keeps_one_graph_per_decision`)."""
    if name in ("eata", "eata_c"):
        kwargs["fisher_data"] = digits_c([16, 16], seed=7)
    torch.manual_seed(0)
    return methods.build(name, load_classifier("digits_cnn"), batch_size=16, nonfinite="skip", input_range=None,
                         skip_empty=skip_empty, **kwargs)


def run(method, batches, reset_before: int) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of every batch and the graphs compiled during each call (seeded per batch: DeYO's
    permutations and EATA-C's sub-network draw from the global RNG)."""
    logits, compiled = [], []
    for i, x in enumerate(batches):
        if i == reset_before:
            method.reset()
        before = speed.compiled_graphs()
        torch.manual_seed(100 + i)
        logits.append(method(x).float())
        compiled.append(speed.compiled_graphs() - before)
    return logits, compiled


SIZES, RESET = [16, 16, 8, 16, 8], 3


def check_against_eager(name: str, atol: float, sizes: list[int] = SIZES, reset: int = RESET,
                        **prepare) -> list[int]:
    batches = digits_c(sizes)
    eager = build(name)
    expected, none = run(eager, batches, reset)
    assert not any(none), "eager compiled something"
    fast = build(name).prepare(**prepare)
    got, compiled = run(fast, batches, reset)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, atol=atol, rtol=0, msg=lambda m: f"{name} batch {i}: {m}")
        assert torch.equal(g.argmax(1), e.argmax(1)), f"{name} batch {i}: predictions differ"
    assert fast.stats() == eager.stats()
    return compiled


def check_recompiles(name: str, compiled: list[int]) -> None:
    first, second, small, again, small_again = compiled
    assert first > 0, f"{name}: nothing compiled"
    assert second == 0, f"{name}: the second batch of the same size recompiled ({compiled})"
    assert small > 0, f"{name}: the smaller last batch did not compile its own graphs ({compiled})"
    assert again == 0 and small_again == 0, f"{name}: recompiled after the reset ({compiled})"


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_compiled_step_matches_eager_and_stops_recompiling(name):
    compiled = check_against_eager(name, ATOL, compile=True)
    check_recompiles(name, compiled)


@pytest.mark.slow
def test_compiled_skip_keeps_one_graph_per_decision():
    """With the host read (``skip_empty="always"``, ``"auto"`` on the CPU), a compiled step compiles each
    path once (an empty selection, a learning one) and then nothing, whichever comes; the results
    equal eager's. Switching the decision off and back on keeps the results; back on compiles nothing."""
    from test_skip_empty import Gate

    batches = digits_c([16] * 8)
    empty = {1, 2, 5}
    def go(method, xs, start=0):
        out, compiled = [], []
        for i, x in enumerate(xs, start):
            next(p for p in method.policies if isinstance(p, Gate)).open.fill_(i not in empty)
            before = speed.compiled_graphs()
            torch.manual_seed(100 + i)
            out.append(method(x).float())
            compiled.append(speed.compiled_graphs() - before)
        return out, compiled

    eager = build("eta", "always", extra_policies=[Gate()])
    expected, _ = go(eager, batches)
    fast = build("eta", "always", extra_policies=[Gate()]).prepare(compile=True)
    got, compiled = go(fast, batches[:6])
    assert compiled[0] > 0 and compiled[1] > 0, compiled  # each path compiles on its first batch
    assert compiled[2:] == [0, 0, 0, 0], compiled  # then neither path compiles again
    fast.skip_empty = "never"
    more, _ = go(fast, batches[6:7], start=6)  # the sync-free path (no graph of its own: it only skips the read)
    fast.skip_empty = "always"
    last, back = go(fast, batches[7:], start=7)
    assert back == [0], back
    for e, g in zip(expected, got + more + last):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
    assert fast.stats() == eager.stats()
    assert fast.stats()["counters"]["skipped_empty"] >= len(empty)


@pytest.mark.slow
def test_compiled_step_keeps_the_network_outside_the_step(monkeypatch):
    """The network is compiled on its own, behind a boundary: no graph holds both a convolution (the
    network) and the step's softmax/entropy (the glue), and a second method on the same architecture
    and parameter preset reuses the network's graph (only its frozen copy, without gradients, adds
    one: wisdom of crowds runs the adapted and a frozen network)."""
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    def network_graphs() -> int:
        return sum(any("conv2d" in str(n.target) for n in g.graph.nodes) for g in graphs)

    monkeypatch.setattr(speed, "BACKEND", recording)
    x = digits_c([16])[0]
    build("tent").prepare(compile=True)(x)
    assert network_graphs() == 1
    build("crowds").prepare(compile=True)(x)
    assert network_graphs() == 2  # the frozen copy's; the adapted network's graph was reused
    for g in graphs:
        targets = {str(n.target) for n in g.graph.nodes}
        assert not (any("conv2d" in t for t in targets) and any("softmax" in t for t in targets)), \
            "a network graph holds the step's loss"
    assert any(any("softmax" in str(n.target) for n in g.graph.nodes) for g in graphs)  # the glue is compiled


def test_fast_preset_options():
    cnn = build("tent")
    assert cnn.speed == speed.SpeedOptions()  # defaults: fp32 eager
    cnn.prepare(fast=True)
    assert cnn.speed == speed.SpeedOptions(amp=True, channels_last=True, compile=True)
    assert speed.resolve(load_classifier("digits_cnn").net, fast=True).channels_last
    timm = pytest.importorskip("timm")
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10)
    assert speed.resolve(vit, fast=True) == speed.SpeedOptions(amp=True, channels_last=False, compile=True)
    cnn.prepare()  # a later prepare keeps what an earlier one turned on
    assert cnn.speed.compile and cnn.speed.amp
    with pytest.raises(ValueError, match="compile_mode"):
        speed.resolve(vit, compile=True, compile_mode="fastest")


@pytest.mark.slow
def test_fast_preset_predicts_like_eager_within_bf16():
    """``fast``: bf16 autocast + channels_last + compiled step; predictions agree with fp32 eager up to
    bf16 rounding (most argmaxes equal; logits within a bf16 tolerance)."""
    batches = digits_c([16, 16, 8])
    eager, fast = build("eata"), build("eata").prepare(fast=True)
    expected, _ = run(eager, batches, reset_before=-1)
    got, compiled = run(fast, batches, reset_before=-1)
    assert compiled[0] > 0 and compiled[1] == 0
    agree = torch.cat([(g.argmax(1) == e.argmax(1)).float() for e, g in zip(expected, got)]).mean()
    assert agree >= 0.9, f"only {agree:.0%} of predictions agree"
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=0.25, rtol=0.05)


@pytest.mark.slow
@torch._inductor.config.patch(compile_threads=1)  # no pool of compile workers to start on a small CPU
def test_inductor_compiled_tent_matches_eager(monkeypatch):
    """The default backend (Inductor: generated C++ kernels on the CPU), on Tent. One batch size
    (each new size costs Inductor a full compile, minutes on a small CPU): the recompiles per batch
    size are the same for every backend and are counted by the ``aot_eager`` tests above."""
    monkeypatch.setattr(speed, "BACKEND", "inductor")
    first, second = check_against_eager("tent", INDUCTOR_ATOL, sizes=[16, 16], reset=-1, compile=True)
    assert first > 0 and second == 0


@pytest.mark.slow
def test_engine_fast_runs_the_preset_and_records_it():
    """``engine.run(..., fast=True)`` (the CLI's ``fast=true``): the method runs prepared with the preset,
    the outcome says which options were used, and the accuracy is that of the eager run up to bf16."""
    from tta import engine
    from tta.data.stream import Batch

    images, labels = digits_c([16, 16, 16, 16], labels=True)
    batches = [Batch(images=x, labels=y, ids=torch.arange(16) + 16 * i, domain=d)
               for i, (x, y, d) in enumerate(zip(images, labels, ["a", "a", "b", "b"]))]
    eager = engine.run(build("tent"), batches, device="cpu", progress=False)
    fast = engine.run(build("tent"), batches, device="cpu", progress=False, fast=True)
    assert eager["speed"] == {"amp": False, "channels_last": False, "compile": False, "compile_mode": None}
    assert fast["speed"] == {"amp": True, "channels_last": True, "compile": True, "compile_mode": None}
    assert abs(fast["results"]["mean"]["accuracy"] - eager["results"]["mean"]["accuracy"]) <= 0.05


@pytest.mark.slow
def test_a_copy_of_a_compiled_method_compiles_its_own_step():
    """``copy.deepcopy`` of a compiled method adapts the copy, not the original (the compiled functions
    are bound to the method they were made for)."""
    import copy

    x = digits_c([16])[0]
    original = build("tent").prepare(compile=True)
    original(x)
    clone = copy.deepcopy(original)
    before = {k: v.clone() for k, v in original.state_dict().items() if torch.is_tensor(v)}
    clone(x)
    after = original.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "the copy's call changed the original"
    assert int(clone.counters.batches) == 2 and int(original.counters.batches) == 1
    assert clone.speed.compile
