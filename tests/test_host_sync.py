"""No host synchronisation in the steady-state step of any batch method, nor in the engine loop.

On a GPU a host sync stalls the CPU until the GPU has caught up, so the next kernels are queued
late and the GPU idles. Here, on the CPU, every dispatched op that would force one on a GPU is
counted with a ``TorchDispatchMode``: reading a value on the host (``aten._local_scalar_dense``:
``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``), and ops whose output size depends on the values
(``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``, ...). Counted over batches
after a warm-up, with ``nonfinite="skip"`` and ``input_range=None`` (the input check's NaN/range
test is one documented sync per batch, on by default, and not part of the step) and
``skip_empty="never"``: the path a GPU takes unless empty selections are common (on the CPU, where
a read is free, ``"auto"`` reads the selection's size to skip an empty batch's backward; that read
is counted on its own below).

The one sync left is named: DeYO's PLPD reads the number of samples still alive, to forward the
destroyed images of exactly those (the official ``x[S1]``, whose BatchNorm statistics are those
of the subset; see :meth:`tta.policies.plpd.PLPD.destroyed_logits`).
"""
from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tta.methods as methods
from tta import engine
from tta.data.stream import Batch
from tta.models import load_classifier

aten = torch.ops.aten

#: ops that read a device value on the host, or whose output size depends on the values
SYNCING = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten.allclose.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.bincount.default, aten.masked_scatter.default,
}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

#: the syncs a method's step may do, each with the function that does it and why
ALLOWED = {
    # DeYO's PLPD forwards the destroyed images of the alive samples only (BatchNorm statistics of
    # that subset, as the official x[S1]): the subset's size is read on the host, once per batch
    "deyo": {("plpd.py", "destroyed_logits"): 1},
    # CoTTA's ImageNet path reads its gate (whether the 32 augmented teacher passes run), as the reference
    "cotta": {("cotta.py", "teacher_target"): 1},
    # ROID's consistency forward takes the kept samples only (their BatchNorm statistics), as the reference;
    # its augmentation draws its parameters from the CPU generator (5 colour factors; 4 affine numbers and
    # the flip): host numbers of CPU tensors, counted here because this test runs on the CPU, no device sync
    "roid": {("roid.py", "adapt"): 1, ("cotta.py", "color_jitter"): 5, ("cotta.py", "__call__"): 5},
}

BATCHES = 3  # counted batches, after a warm-up of two


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops, with where (file, function) in ``tta`` each came from."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.sites: Counter[tuple[str, str]] = Counter()
        self.stacks: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncing = func in SYNCING
        if func in INDEXING and len(args) > 1:  # a bool/uint8 mask index is a nonzero in disguise
            syncing = any(t is not None and torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)
                          for t in args[1])
        if syncing:
            self.ops[str(func)] += 1
            frames = [f for f in traceback.extract_stack() if "/tta/" in f.filename.replace("\\", "/")]
            site = (frames[-1].filename.rsplit("/", 1)[-1], frames[-1].name) if frames else ("?", "?")
            self.sites[site] += 1
            self.stacks.append("".join(traceback.format_list(frames[-6:])))
        return func(*args, **kwargs)

    def report(self) -> str:
        return f"{dict(self.ops)} at {dict(self.sites)}\n" + "\n".join(self.stacks[:3])


def test_counter_sees_the_syncs_it_must_see():
    """The counter is not blind: ``.item()``, ``bool()``, mask indexing and ``nonzero`` are counted."""
    x = torch.rand(8)
    with SyncCounter() as counter:
        x.sum().item()
        bool((x > 0.5).any())
        x[x > 0.5]
        torch.nonzero(x > 0.5)
        x.masked_select(x > 0.5)
        x[torch.arange(3)]  # an integer index is not a sync
        torch.where(x > 0.5, x, 0.0)  # nor a where
    assert sum(counter.ops.values()) == 5, counter.report()


def digits_batches(n: int, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Noisy digits (severity-5-like Gaussian noise), so the filters keep some samples and drop others."""
    from tta.data.digits import load_digits_split

    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: n * size]
    noisy = (images[idx] + 0.3 * torch.randn(images[idx].shape, generator=g)).clamp(0, 1)
    return list(noisy.split(size))


def build(name: str, **kwargs):
    if name in ("eata", "eata_c"):
        kwargs["fisher_data"] = digits_batches(2, seed=9)
    kwargs.setdefault("skip_empty", "never")  # the sync-free step (what a GPU runs by default)
    return methods.build(name, load_classifier("digits_cnn"), batch_size=16, nonfinite="skip", input_range=None,
                         **kwargs)


@pytest.mark.parametrize("name", ["source", "norm", "tent", "eta", "eata", "sar", "deyo", "crowds", "eata_c", "rdumb",
                                  "lame", "cotta", "roid"])
def test_steady_state_step_has_no_host_sync(name):
    method = build(name)
    xs = digits_batches(2 + BATCHES)
    for x in xs[:2]:  # warm-up: optimizer state, the Fisher, the frozen copy
        method(x)
    with SyncCounter() as counter:
        for x in xs[2:]:
            method(x)
    expected = {site: n * BATCHES for site, n in ALLOWED.get(name, {}).items()}
    assert dict(counter.sites) == expected, counter.report()
    counts = method.stats()["counters"]
    assert counts["batches"] == 2 + BATCHES
    if method.learns:  # the filters did real work on these batches (not all kept, not all dropped)
        assert counts["backwards"] >= 2 + BATCHES


@pytest.mark.parametrize("name", ["eta", "sar"])
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_skip_empty_reads_once_per_batch_where_asked(name, mode):
    """``skip_empty="always"``, and ``"auto"`` on the CPU, read the selection's size on the host once
    per batch, in one place (SAR's official step on an empty selection, ``step_on_empty``, needs no
    such read); on the CPU the guarded update also reads its decision and counts (nowhere else).
    With ``"never"`` nothing is read (the tests above)."""
    method = build(name, skip_empty=mode)
    xs = digits_batches(2 + BATCHES)
    for x in xs[:2]:
        method(x)
    with SyncCounter() as counter:
        for x in xs[2:]:
            method(x)
    sites = dict(counter.sites)
    # the selection's size: once per batch, on the CPU with the policies' counts in select() (one
    # ``tolist``, which the step reuses), so the step itself reads nothing more
    assert sites.pop(("core.py", "step"), 0) == 0, counter.report()
    # on the CPU, whether any sample is left before each policy that an empty selection lets select()
    # skip (ETA: redundancy and the weight after the entropy filter): at most one read per such policy
    assert sites.pop(("core.py", "select"), 0) <= (2 * BATCHES if name == "eta" else 0), counter.report()
    # the guarded update's decision (the loss, the gradients) and its counts, read on the host where
    # reads are free (the CPU) (SAR: its official step on an empty S1 reads the size and the logits'
    # finiteness there too, its recovery flag before the recovery's ops, and the SAM ascent the
    # gradients' finiteness before using them as they are)
    assert set(sites) <= {("update.py", "__call__"), ("update.py", "apply"), ("update.py", "_grads_finite_on_host"),
                          ("core.py", "record_step"), ("sar.py", "_zero_gradient_step"), ("sar.py", "_recover"),
                          ("sam.py", "ascend")}, counter.report()


def test_sar_recovery_and_guarded_skip_have_no_host_sync():
    """The paths taken only sometimes: a SAR model recovery (EMA below its threshold) and a step
    undone on the device (a non-finite batch) stay sync-free too."""
    sar = build("sar", reset_constant=1e9)  # every batch with a valid EMA triggers a recovery
    tent = build("tent")
    xs = digits_batches(2 + BATCHES)
    bad = xs[-1].clone()
    bad[0, 0, 0, 0] = float("nan")
    for x in xs[:2]:
        sar(x)
        tent(x)
    with SyncCounter() as counter:
        for x in xs[2:]:
            sar(x)
        tent(bad)
    assert not counter.ops, counter.report()
    assert sar.stats()["counters"]["recoveries"] >= 1
    assert tent.stats()["counters"]["skipped_nonfinite"] == 1


class _CountedStream:
    """A stream of ``Batch`` objects that counts syncs from its ``start``-th batch until it is exhausted
    (the engine's steady state between log points: ``log_every`` is larger than the stream)."""

    def __init__(self, batches: list[Batch], start: int):
        self.batches, self.start = batches, start
        self.counter = SyncCounter()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.start:
                self.counter.__enter__()
            yield batch
        if len(self.batches) > self.start:
            self.counter.__exit__(None, None, None)


def _engine_batches(domains: tuple[str, ...], per_domain: int) -> list[Batch]:
    from tta.data.digits import load_digits_split

    _, labels = load_digits_split("test")
    out = []
    for d, domain in enumerate(domains):
        for k, x in enumerate(digits_batches(per_domain, seed=d)):
            n = x.shape[0]
            ids = torch.arange(n) + 1000 * d + n * k
            out.append(Batch(images=x, labels=labels[:n].clone(), ids=ids, domain=domain))
    return out


@pytest.mark.parametrize("name", ["tent", "eata", "sar"])
def test_engine_loop_has_no_host_sync_between_log_points(name):
    """``engine.run`` over two domains (the reset between them included), progress bar on with a
    ``log_every`` beyond the stream: from the second batch to the end of the stream, no sync."""
    batches = _engine_batches(("gaussian_noise", "contrast"), per_domain=3)
    stream = _CountedStream(batches, start=1)
    method = build(name)
    out = engine.run(method, stream, device="cpu", progress=True, log_every=10_000)
    assert not stream.counter.ops, stream.counter.report()
    assert set(out["results"]["domains"]) == {"gaussian_noise", "contrast"}
    assert out["stats"]["counters"]["batches"] == len(batches)


class _RecordingLogger:
    """A run logger that keeps what it is handed."""

    def __init__(self):
        self.points, self.summary = [], {}

    def log_metrics(self, step, metrics):
        self.points.append((step, dict(metrics)))

    def log_summary(self, summary):
        self.summary.update(summary)


@pytest.mark.parametrize("name", ["tent", "eata"])
def test_a_logger_reads_only_at_its_log_points(name, monkeypatch):
    """With a run logger attached (and the step monitor it brings), the step and the loop stay
    sync-free: every host read between the second batch and the end of the stream happens inside
    the engine's log point (:func:`tta.engine.progress_point`), every ``log_every`` batches."""
    batches = _engine_batches(("gaussian_noise", "contrast"), per_domain=3)
    stream = _CountedStream(batches, start=1)
    counter = stream.counter
    inside = []
    original = engine.progress_point

    def point(*args, **kwargs):  # the log point's reads are not counted: they are the logger's cadence
        counter.ops, saved = Counter(), counter.ops
        try:
            return original(*args, **kwargs)
        finally:
            inside.append(sum(counter.ops.values()))
            counter.ops = saved

    monkeypatch.setattr(engine, "progress_point", point)
    original_domain = engine.domain_point

    def domain(*args, **kwargs):  # a finished domain's row: read at the domain boundary, not counted either
        counter.ops, saved = Counter(), counter.ops
        try:
            return original_domain(*args, **kwargs)
        finally:
            counter.ops = saved

    monkeypatch.setattr(engine, "domain_point", domain)
    logger = _RecordingLogger()
    method = build(name)
    out = engine.run(method, stream, device="cpu", progress=False, log_every=2, logger=logger)
    assert not counter.ops, counter.report()  # 0 syncs per batch outside the log points
    curves = [(step, point) for step, point in logger.points if "batch/accuracy" in point]
    assert [step for step, _ in curves] == [2, 4, 6]
    assert len(inside) == 3 and all(n > 0 for n in inside)  # the reads happen there (the counter sees them)
    rows = {step: point for step, point in logger.points if "batch/accuracy" not in point}
    assert sorted(rows) == [3, 6]  # each domain's row as it ends
    assert rows[3]["domain_end/gaussian_noise/accuracy"] == out["results"]["domains"]["gaussian_noise"]["accuracy"]
    first = curves[0][1]
    assert {"batch/accuracy", "batch/entropy", "batch/effective_classes", "batch/step_time_ms"} <= set(first)
    assert "batch/loss" in first and ("batch/kept_pct/learned" in first)
    assert logger.summary["domain/contrast/accuracy"] == out["results"]["domains"]["contrast"]["accuracy"]
