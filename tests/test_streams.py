"""Streams: seeded order and images, unique ids, batching, cuts, prefetching, legacy domains, AUROC."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import CORRUPTIONS, imagenet_config, make_imagenet_val
from tta.data import Batch, Domain, DomainStream, Segment, Stream, build_stream, corrupt, load_data_config
from tta.metrics import DomainMetrics, auroc


def _digits(**overrides):
    return dict(load_data_config("digits_c"), corruptions=["gaussian_noise", "brightness"], **overrides)


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
    stream = DomainStream([Domain("a", images, labels, transform=broken)], batch_size=4, prefetch=2)
    with pytest.raises(RuntimeError, match="exploded"):
        list(stream)
    stream = DomainStream([Domain("a", images, labels)], batch_size=1, prefetch=2)
    for batch in stream:  # leaving early stops the loader thread
        break
    assert isinstance(batch, Batch)


def test_legacy_domain_stream_with_tensors_and_custom_ids():
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6) % 2
    seen = []

    def transform(x, ids):
        seen.append(ids.clone())
        return 1 - x

    stream = DomainStream([Domain("d", images, labels, transform=transform, ids=torch.arange(100, 106))],
                          batch_size=4, shuffle=False, prefetch=0)
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
