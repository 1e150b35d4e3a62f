"""Streams: seeded order and images, unique ids, batching, cuts, prefetching, resuming, input checks, AUROC."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from data_fixtures import CORRUPTIONS, imagenet_config, make_imagenet_val
from tta.data import Batch, Domain, Segment, Stream, build_stream, corrupt, load_data_config
from tta.metrics import DomainMetrics, auroc


def _digits(**overrides):
    return dict(load_data_config("digits_c"), corruptions=["gaussian_noise", "brightness"], **overrides)


def _one_domain(domain, **options):
    """A stream over one domain's samples in index order."""
    return Stream([domain], [Segment(domain.name, np.zeros(len(domain)), np.arange(len(domain)))], **options)


def _collect(stream):
    batches = list(stream)
    return batches, torch.cat([b.images.cpu() for b in batches]), torch.cat([b.ids for b in batches])


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    return make_imagenet_val(tmp_path_factory.mktemp("val"), per_class=3)


@pytest.mark.parametrize("setting", ["reset_each_shift", "mixed_domains", "label_shift", "open_set"])
def test_same_seed_same_stream_different_seed_different(val_root, setting):
    config = imagenet_config(val_root, "imagenet_c_onthefly")
    a_batches, a_images, a_ids = _collect(build_stream(config, setting=setting, seed=7, batch_size=4)[0])
    b_batches, b_images, b_ids = _collect(build_stream(config, setting=setting, seed=7, batch_size=4)[0])
    assert torch.equal(a_ids, b_ids) and torch.equal(a_images, b_images)
    assert [b.domain for b in a_batches] == [b.domain for b in b_batches]
    c_batches, c_images, c_ids = _collect(build_stream(config, setting=setting, seed=8, batch_size=4)[0])
    assert not torch.equal(a_ids, c_ids)  # another order
    # and other noise: the same sample of the same domain is corrupted differently under another seed
    first = a_batches[0]
    where = {int(i): k for k, i in enumerate(torch.cat([b.ids for b in c_batches]))}
    k = where[int(first.ids[0])]
    assert not torch.equal(first.images[0].cpu(), c_images[k])


def test_sample_corrupted_the_same_in_every_setting_and_batch(val_root):
    """A sample's image depends on (seed, domain, sample), not on the setting or the batch it is in."""
    config = imagenet_config(val_root, "imagenet_c_onthefly")
    images = {}
    for setting, batch_size in [("reset_each_shift", 5), ("mixed_domains", 3), ("continual", 1)]:
        for batch in build_stream(config, setting=setting, seed=1, batch_size=batch_size)[0]:
            for i, x in zip(batch.ids.tolist(), batch.images.cpu()):
                if i in images:
                    assert torch.allclose(images[i], x, atol=1e-6), setting
                images[i] = x
    assert len(images) == 18
    # the ids' low 32 bits are the sample index; the corruption is corrupt(image, name, severity, seed, index)
    stream, _ = build_stream(config, seed=1, batch_size=64)
    batch = next(iter(stream))
    index = batch.ids & 0xFFFFFFFF
    clean = stream.parts[0].source
    x, _, _ = clean.finish(clean.read(index.numpy()), torch.device("cpu"))
    name, severity = batch.domain.split("/")
    assert torch.allclose(corrupt(x, name, int(severity), seed=1, ids=index), batch.images, atol=1e-6)


def test_ids_unique_per_domain_and_sample():
    for setting in ["mixed_domains", "open_set", "forgetting"]:
        stream, _ = build_stream(_digits(), setting=setting, seed=0)
        seen = {}
        for batch in stream:
            for i in batch.ids.tolist():
                seen.setdefault(i, set()).add(batch.domain)
        parts = {p.name for p in stream.parts}
        assert len(seen) == sum(len(p) for p in stream.parts if p.name != "ood:noise") + \
            (stream.describe()["ood"]["num_samples"] if setting == "open_set" else 0)
        if setting == "forgetting":  # the clean images recur in every clean pass, with the same ids
            assert "clean" in parts


def test_batches_never_cross_domains_and_batch_size_one():
    stream, _ = build_stream(_digits(), seed=0, batch_size=100)
    sizes = [len(b.labels) for b in stream]
    assert sizes == [100] * 7 + [19] + [100] * 7 + [19]
    stream, _ = build_stream(_digits(), setting="bs1", seed=0, max_samples=5)
    batches = list(stream)
    assert [len(b.labels) for b in batches] == [1] * 5 and stream.batch_size == 1
    stream, _ = build_stream(_digits(), setting="mixed_domains", seed=0, batch_size=1, max_samples=3)
    assert [len(b.labels) for b in stream] == [1, 1, 1]


def test_max_samples_cuts_the_stream():
    stream, _ = build_stream(_digits(), setting="continual", seed=0, batch_size=64, max_samples=1000)
    batches = list(stream)
    assert sum(len(b.labels) for b in batches) == 1000 == stream.describe()["num_samples"]
    assert [b.domain for b in batches][-1] == "brightness/5"  # 719 + 281
    with pytest.raises(ValueError, match="max_samples"):
        build_stream(_digits(), seed=0, max_samples=0)


def test_prefetch_equals_synchronous_loading(val_root):
    config = imagenet_config(val_root, "imagenet_c_onthefly")
    _, a, ida = _collect(build_stream(config | {"prefetch": 0}, seed=2, batch_size=4)[0])
    _, b, idb = _collect(build_stream(config | {"prefetch": 3}, seed=2, batch_size=4)[0])
    assert torch.equal(a, b) and torch.equal(ida, idb)


def test_prefetch_propagates_errors_and_stops_early():
    def broken(images, ids):
        raise RuntimeError("transform exploded")

    images, labels = torch.rand(10, 3, 8, 8), torch.zeros(10, dtype=torch.long)
    stream = _one_domain(Domain("a", images, labels, transform=broken), batch_size=4, prefetch=2)
    with pytest.raises(RuntimeError, match="exploded"):
        list(stream)
    stream = _one_domain(Domain("a", images, labels), batch_size=1, prefetch=2)
    for batch in stream:  # leaving early stops the loader thread
        break
    assert isinstance(batch, Batch)


def test_stream_of_tensors_with_custom_ids():
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6) % 2
    seen = []

    def transform(x, ids):
        seen.append(ids.clone())
        return 1 - x

    stream = _one_domain(Domain("d", images, labels, transform=transform, ids=torch.arange(100, 106)),
                         batch_size=4, prefetch=0)
    batches = list(stream)
    assert torch.equal(batches[0].images, 1 - images[:4]) and torch.equal(batches[1].labels, labels[4:])
    assert torch.equal(torch.cat(seen), torch.arange(100, 106))
    assert torch.equal(batches[0].ids & 0xFFFFFFFF, torch.arange(100, 104))
    assert len(stream) == 2 and stream.describe()["num_samples"] == 6


def test_segments_mixing_parts_keep_planned_order():
    a = Domain("a", torch.zeros(4, 3, 4, 4), torch.zeros(4, dtype=torch.long))
    b = Domain("b", torch.ones(4, 3, 4, 4), torch.ones(4, dtype=torch.long), ood=True)
    segment = Segment("mix", [0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 2, 2])
    stream = Stream([a, b], [segment], batch_size=6, prefetch=0)
    (batch,) = list(stream)
    assert batch.labels.tolist() == [0, -1, -1, 0, -1, 0]
    assert batch.images[:, 0, 0, 0].tolist() == [0, 1, 1, 0, 1, 0]
    assert (batch.ids & 0xFFFFFFFF).tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(batch.ids.tolist())) == 6


def test_auroc_and_open_set_metrics():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # with ties
    positive = rng.random(200) < 0.4
    assert auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    metrics = DomainMetrics(torch.device("cpu"))
    logits = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.1, 0.0], [0.0, 0.2]])
    labels = torch.tensor([0, 1, -1, -1])
    metrics.update(logits, labels, source_logits=logits.flip(0))
    result = metrics.result()
    assert result["n"] == 2 and result["accuracy"] == 0.5 and result["ood_n"] == 2
    assert result["auroc"] == 1.0 and result["source_auroc"] == 0.0
    plain = DomainMetrics(torch.device("cpu"))
    plain.update(logits, torch.tensor([0, 1, 0, 1]))
    assert "auroc" not in plain.result()


def test_corruption_names_are_checked_for_synthesized_data():
    with pytest.raises(ValueError, match="unknown corruption"):
        build_stream(_digits() | {"corruptions": ["not_a_corruption"]})


def test_stream_record_has_seed_and_hashes():
    stream, _ = build_stream(_digits(), setting="label_shift", seed=5)
    info = stream.describe()
    assert info["seed"] == 5 and info["setting"] == "label_shift" and len(info["plan_hash"]) == 16
    assert info["plan_hash"] == build_stream(_digits(), setting="label_shift", seed=5)[0].describe()["plan_hash"]
    assert info["plan_hash"] != build_stream(_digits(), setting="label_shift", seed=6)[0].describe()["plan_hash"]
    assert set(CORRUPTIONS) == {d.split("/")[0] for d in info["domains"]}


# ------------------------------------------------------------------ resuming


def _same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.domain == b.domain and a.number == b.number
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("setting", ["reset_each_shift", "continual", "label_shift", "mixed_domains", "open_set",
                                     "forgetting"])
def test_stream_started_at_a_batch_equals_the_rest_of_an_uninterrupted_one(setting):
    def make(prefetch):
        return build_stream(_digits(subset=250), setting=setting, seed=3, batch_size=50, max_samples=1000,
                            prefetch=prefetch)[0]

    full = list(make(2))
    assert [b.number for b in full] == list(range(len(full))) and len(full) >= 10
    assert len({b.domain for b in full}) > 1 or setting == "mixed_domains"  # crosses a domain change
    for k, prefetch in [(0, 2), (1, 0), (7, 2), (len(full) - 1, 0), (len(full), 2)]:
        _same_batches(full[k:], list(make(prefetch).iterate(start_batch=k)))
    with pytest.raises(ValueError, match="start_batch"):
        next(make(0).iterate(start_batch=len(full) + 1))


def test_skipped_batches_are_never_produced():
    seen = []

    def transform(x, ids):
        seen.append(ids.clone())
        return x

    images, labels = torch.rand(10, 3, 4, 4), torch.zeros(10, dtype=torch.long)
    for prefetch in (0, 2):
        seen.clear()
        stream = _one_domain(Domain("a", images, labels, transform=transform), batch_size=3, prefetch=prefetch)
        batches = list(stream.iterate(start_batch=2))
        assert [b.number for b in batches] == [2, 3] and len(stream) == 4
        assert torch.cat(seen).tolist() == [6, 7, 8, 9]  # batches 0 and 1 were not read or transformed


def test_resume_from_state_dict_with_workers_and_bad_images(tmp_path):
    """A stream stopped after batch n and resumed from its state_dict (as a checkpoint would) gives the
    rest of the batches and the same bad-image record as an uninterrupted run, with DataLoader workers."""
    root = make_imagenet_val(tmp_path, per_class=3)
    (root / "val" / "n01440764" / "ILSVRC2012_val_99999999.JPEG").write_bytes(b"not a jpeg")
    config = imagenet_config(root, "imagenet_c_onthefly") | {"num_workers": 2}

    def make():
        return build_stream(config, setting="continual", seed=4, batch_size=3)[0]

    whole = make()
    full = list(whole)
    assert whole.describe()["bad_images"]["skipped_samples"] == 2  # one file, two domains
    planned = [min(3, len(seg) - start) for seg in whole.segments for start in range(0, len(seg), 3)]
    short = [b.number for b in full if len(b.labels) < planned[b.number]]  # the batches with the bad file
    stops = [s - 1 for s in short if s >= 1]  # stop just before one: the loader has already read it
    assert len(short) == 2 and stops
    for n in stops:
        first = make()
        for batch in first:
            if batch.number == n:
                time.sleep(0.3)  # the model works on batch n while the loader finishes the next ones
                break  # stopped after processing batch n
        state = first.state_dict()
        assert state["next_batch"] == n + 1
        state = torch.load(_saved(tmp_path / "state.pt", state), weights_only=True)  # a checkpoint round trip
        second = make()
        second.load_state_dict(state)
        _same_batches(full[n + 1:], list(second))
        assert second.describe() == whole.describe()


def _saved(path, obj):
    torch.save(obj, path)
    return path


def test_state_of_another_plan_is_refused():
    state = build_stream(_digits(), seed=0, batch_size=50)[0].state_dict()
    for other in [dict(seed=1, batch_size=50), dict(seed=0, batch_size=64), dict(seed=0, batch_size=50, max_samples=100)]:
        with pytest.raises(ValueError, match="another stream plan"):
            build_stream(_digits(), **other)[0].load_state_dict(state)


# ------------------------------------------------------------------ input checks


@pytest.mark.parametrize("value", [0, -1, 2.5, 64.0, "64", "abc", True])
def test_batch_size_and_max_samples_must_be_positive_integers(value):
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1.*got"):
        build_stream(_digits(), batch_size=value)
    with pytest.raises(ValueError, match=r"max_samples must be an integer >= 1.*got"):
        build_stream(_digits(), max_samples=value)


def test_batch_size_none_means_the_setting_then_the_config():
    assert build_stream(_digits(), batch_size=None)[0].batch_size == 64
    assert build_stream(_digits(batch_size=32), batch_size=None)[0].batch_size == 32
    assert build_stream(_digits(batch_size=32), setting="bs1", batch_size=None)[0].batch_size == 1
    assert build_stream(_digits(), setting="bs1", batch_size=4)[0].batch_size == 4
    with pytest.raises(ValueError, match="digits_c: batch_size must be an integer >= 1"):
        build_stream(_digits(batch_size=0))
    with pytest.raises(ValueError, match="setting bs1: batch_size must be an integer >= 1"):
        build_stream(_digits(), setting={"name": "bs1", "batch_size": 0})


@pytest.mark.parametrize("value", [0, 6, 5.5, -1.5, float("nan"), "abc", "2.5", [], [1, 9], True])
def test_severity_must_be_in_zero_to_five(value):
    with pytest.raises(ValueError, match=r"severity must be a number in \(0, 5\]"):
        build_stream(_digits(), severity=value)


def test_fractional_severities_on_the_fly(tmp_path):
    """A fractional severity makes ``<corruption>/2.5`` domains corrupted at 2.5 (the images equal
    ``corrupt`` at 2.5); ``2.0`` is the integer severity 2; released data sets refuse fractions."""
    config = dict(load_data_config("digits_c"), corruptions=["fog", "contrast"])
    stream, _ = build_stream(config, severity=[2.5, 2.0], max_samples=8)
    assert [d.name for d in stream.parts] == ["fog/2.5", "contrast/2.5", "fog/2", "contrast/2"]
    assert [d.severity for d in stream.parts] == [2.5, 2.5, 2, 2]
    assert isinstance(stream.parts[2].severity, int)
    batch = next(iter(stream))
    assert batch.domain == "fog/2.5"
    index = batch.ids & 0xFFFFFFFF  # the sample index (see the test above)
    clean = stream.parts[0].source
    x, _, _ = clean.finish(clean.read(index.numpy()), torch.device("cpu"))
    torch.testing.assert_close(batch.images, corrupt(x, "fog", 2.5, seed=stream.seed, ids=index), atol=1e-6, rtol=0)
    gradual, _ = build_stream(config, setting={"name": "gradual", "severities": [1, 1.5, 2, 1.5, 1]})
    assert [s.name for s in gradual.segments][:5] == ["fog/1", "fog/1.5", "fog/2", "fog/1.5", "fog/1"]
    from data_fixtures import cifar_config, make_cifar_c

    root = make_cifar_c(tmp_path / "cifar")
    with pytest.raises(ValueError, match="severities 1 to 5 only"):
        build_stream(cifar_config(root), severity=2.5)


def test_valid_severities_and_gradual_severities_are_checked():
    stream, _ = build_stream(_digits(), severity=[2, 4], max_samples=10)
    assert {d.severity for d in stream.parts} == {2, 4}
    with pytest.raises(ValueError, match="gradual setting: severities must be"):
        build_stream(_digits(), setting={"name": "gradual", "severities": [1, 7]})
