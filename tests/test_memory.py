"""The sample memory and ``rotta_memory`` against BIT-DA/RoTTA ``core/utils/memory.py`` (CSTU),
re-implemented here as the official code writes it (``MemoryItem``, per-class lists, ``>=`` over
classes then items, ``add_age`` after every sample), and Tent / ETA learning from the memory.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import tta.methods as methods
from tta.models import load_classifier
from tta.policies import RoTTAMemory


# ---------------------------------------------------------------- the reference CSTU
class MemoryItem:
    def __init__(self, data=None, uncertainty=0, age=0):
        self.data, self.uncertainty, self.age = data, uncertainty, age


class CSTU:
    def __init__(self, capacity, num_class, lambda_t=1.0, lambda_u=1.0):
        self.capacity, self.num_class = capacity, num_class
        self.per_class = self.capacity / self.num_class
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.data = [[] for _ in range(self.num_class)]

    def get_occupancy(self):
        return sum(len(d) for d in self.data)

    def add_instance(self, instance):
        x, prediction, uncertainty = instance
        new_item = MemoryItem(data=x, uncertainty=uncertainty, age=0)
        new_score = self.heuristic_score(0, uncertainty)
        if self.remove_instance(prediction, new_score):
            self.data[prediction].append(new_item)
        for class_list in self.data:
            for item in class_list:
                item.age += 1

    def remove_instance(self, cls, score):
        if len(self.data[cls]) < self.per_class:
            if self.get_occupancy() < self.capacity:
                return True
            dist = [len(c) for c in self.data]
            majority = [i for i, o in enumerate(dist) if o == max(dist)]
            return self.remove_from_classes(majority, score)
        return self.remove_from_classes([cls], score)

    def remove_from_classes(self, classes, score_base):
        max_class = max_index = max_score = None
        for cls in classes:
            for idx, item in enumerate(self.data[cls]):
                score = self.heuristic_score(age=item.age, uncertainty=item.uncertainty)
                if max_score is None or score >= max_score:
                    max_score, max_index, max_class = score, idx, cls
        if max_class is not None:
            if max_score > score_base:
                self.data[max_class].pop(max_index)
                return True
            return False
        return True

    def heuristic_score(self, age, uncertainty):
        return self.lambda_t * 1 / (1 + math.exp(-age / self.capacity)) + self.lambda_u * uncertainty / math.log(self.num_class)

    def get_memory(self):
        data, ages = [], []
        for class_list in self.data:
            for item in class_list:
                data.append(item.data)
                ages.append(item.age)
        return data, [a / self.capacity for a in ages]


def timeliness_reweighting(ages):
    ages = torch.tensor(ages).float()
    return torch.exp(-ages) / (1 + torch.exp(-ages))


def skewed_logits(n, c, g):
    """Few classes dominate (so classes fill up and evictions happen), confidences vary."""
    labels = torch.multinomial(torch.tensor([6.0, 3.0, 1.0, 1.0, 0.5] + [0.2] * (c - 5)), n, replacement=True, generator=g)
    logits = torch.randn(n, c, generator=g) * 0.5
    logits[torch.arange(n), labels] += torch.rand(n, generator=g) * 4
    return logits


@pytest.mark.parametrize("capacity,lambda_t,few_logits", [(16, 1.0, False), (64, 1.0, False), (20, 0.0, True)])
def test_rotta_memory_matches_the_official_cstu(capacity, lambda_t, few_logits):
    """``few_logits``: the batches repeat four logit rows and ``lambda_t = 0``, so scores tie exactly
    (the ``>=`` of the candidate search and the strict ``>`` of the eviction decide), and a capacity
    of 20 makes the per-class share an integer (2: the strict ``<`` of the share decides)."""
    C, g = 10, torch.Generator().manual_seed(0)
    policy, ref = RoTTAMemory(num_classes=C, capacity=capacity, lambda_t=lambda_t), CSTU(capacity, C, lambda_t=lambda_t)
    evictions = 0
    rows = torch.zeros(4, C)
    rows[0, 0], rows[1, 0], rows[2, 1], rows[3, 1] = 4.0, 1.0, 3.0, 0.5  # two classes, two certainties each
    n = 5 if few_logits else 24  # small batches: a tie broken one way or the other shows before it is erased
    for b in range(12 if few_logits else 5):
        x = torch.rand(n, 3, 4, 4, generator=g)
        pick = torch.randint(0, 4, (n,), generator=g)
        pick[:5] = torch.tensor([1, 1, 3, 3, 0]) if b == 0 else pick[:5]  # equal scores stored, then a tie to break
        logits = rows[pick] if few_logits else skewed_logits(n, C, g)
        admitted, evicted = policy.admit(x, logits)
        evictions += evicted
        p = logits.softmax(1)
        u = -(p * torch.log(p + 1e-6)).sum(1)
        for i in range(n):
            ref.add_instance((x[i], int(p[i].argmax()), float(u[i])))
        data, ages = ref.get_memory()
        slots = policy.training_slots()
        assert len(slots) == len(data)
        torch.testing.assert_close(policy.memory.images[slots], torch.stack(data), atol=0, rtol=0)
        torch.testing.assert_close(policy.memory.ages[slots].double() / capacity, torch.tensor(ages, dtype=torch.float64))
        labels = [k for k, items in enumerate(ref.data) for _ in items]
        assert policy.memory.labels[slots].tolist() == labels
        from tta.policies import BatchContext
        ctx = BatchContext(policy.memory.images[slots], torch.zeros(len(slots), C), None, ages=policy.memory.ages[slots])
        torch.testing.assert_close(policy(ctx, torch.ones(len(slots), dtype=torch.bool)), timeliness_reweighting(ages))
    assert evictions > 0  # the eviction rules were exercised
    assert capacity != 16 or ref.get_occupancy() == capacity  # and, at 16, the full-memory ones


def test_memory_state_saves_and_loads_with_the_method():
    method = methods.build("tent", load_classifier("digits_cnn"), batch_size=32, extra_policies=["rotta_memory"])
    x = torch.rand(32, 3, 32, 32)
    method(x)
    state = copy.deepcopy(method.state_dict())
    assert state["policies.0.memory.images"].shape == (64, 3, 32, 32)
    other = methods.build("tent", load_classifier("digits_cnn"), batch_size=32, extra_policies=["rotta_memory"])
    other.load_state_dict(state)
    assert torch.equal(other.policies[0].training_slots(), method.policies[0].training_slots())
    method.reset()
    assert not bool(method.policies[0].memory.occupied.any())


@pytest.mark.parametrize("name", ["tent", "eta"])
def test_tent_and_eta_learn_from_the_rotta_memory(name):
    """The update is the method's objective over the memory's contents, weighted by the policies
    (the memory's timeliness last): checked against a hand-written SGD step for Tent."""
    clf = load_classifier("digits_cnn").double()
    ref = copy.deepcopy(clf)
    kwargs = {"d_margin": 0.6} if name == "eta" else {}
    method = methods.build(name, clf, batch_size=32, lr=0.1, momentum=0.0, extra_policies=["rotta_memory"], **kwargs)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 32, 32, generator=g, dtype=torch.float64)
    out = method(x)
    stats = method.stats()
    assert stats["per_batch"] == {"forwards": 2.0, "backwards": 1.0}
    assert stats["counters"]["memory_admitted"] == int(method.last_selection["rotta_memory_admitted"].sum()) > 0
    if name == "eta":
        return  # ETA's own policies then weight the memory samples (counted above); Tent's step checked below
    from tta.models.params import configure_model
    params = [p for _, p in configure_model(ref.net, "norm")]
    with torch.no_grad():
        z = ref(x)
    torch.testing.assert_close(out, z)
    policy = method.policies[0]
    slots = policy.training_slots()
    zm = ref(policy.memory.images[slots])
    h = -(zm.softmax(1) * zm.log_softmax(1)).sum(1)
    w = timeliness_reweighting((policy.memory.ages[slots].double() / 64).tolist())
    loss = (w * h).mean()
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
    ours = dict(method.model.net.named_parameters())
    for (n, _), p in zip(configure_model(copy.deepcopy(ref.net), "norm"), params):
        torch.testing.assert_close(ours[n].detach(), p.detach(), atol=1e-6, rtol=1e-6)


def test_impossible_memory_combinations_name_both_sides():
    for name in ("cotta", "sar", "lame"):
        with pytest.raises(ValueError, match=f"'rotta_memory'.*'{name}'"):
            methods.build(name, load_classifier("digits_cnn"), extra_policies=["rotta_memory"])
    with pytest.raises(ValueError, match="'rotta_memory' and 'rotta_memory'"):
        methods.build("tent", load_classifier("digits_cnn"), extra_policies=["rotta_memory", "rotta_memory"])
    with pytest.raises(ValueError, match="steps=2"):
        methods.build("tent", load_classifier("digits_cnn"), steps=2, extra_policies=["rotta_memory"])


# ---------------------------------------------------------------- selection diagnostics of a memory
def _confident(classes):
    """Logits whose softmax puts ~1 on each listed class; ``None``: a flat, unsure row."""
    return torch.stack([torch.zeros(3) if c is None else torch.nn.functional.one_hot(torch.tensor(c), 3) * 20.0
                        for c in classes])


def test_memory_diagnostics_count_a_hand_stream():
    """SoTTA's memory (capacity 3, threshold 0.9, 3 classes) on a stream where every decision is
    known: admitted, evicted, and the precision of the pseudo-labels of what each update trains on."""
    from tta.metrics import SelectionMetrics
    from tta.policies import SoTTAMemory
    from tta.policies.memory import UNKNOWN

    policy = SoTTAMemory(num_classes=3, capacity=3, threshold=0.9)
    memory, metrics = policy.memory, SelectionMetrics("cpu")

    def images(n):
        return torch.rand(n, 3, 4, 4)

    # batch 1: A (class 0, true 0), an unsure sample, B (class 2, true 1) -> A, B admitted; one update on both
    record = memory.begin_batch()
    mask, evicted = policy.admit(images(3), _confident([0, None, 2]))
    record.admitted, record.evicted = mask.sum(), evicted
    memory.trained_on(record, policy.training_slots())
    metrics.update_memory(record, torch.tensor([0, 1, 1]))
    assert mask.tolist() == [True, False, True] and evicted == 0
    # batch 2: C (class 1) enters; its label is never handed over (a batch without diagnostics)
    record = memory.begin_batch()
    policy.admit(images(1), _confident([1]))
    # batch 3 in two pieces (an update between them, as RoTTA's and SoTTA's update periods):
    # z0 (class 0, true 0) evicts A (its own class, the only sample of it); update on B, C, z0;
    # z1 (class 0, true 2) evicts z0 and takes its slot; update on B, C, z1
    record = memory.begin_batch()
    first, e1 = policy.admit(images(1), _confident([0]), offset=0)
    memory.trained_on(record, policy.training_slots())
    second, e2 = policy.admit(images(1), _confident([0]), offset=1)
    memory.trained_on(record, policy.training_slots())
    record.admitted, record.evicted = first.sum() + second.sum(), e1 + e2
    metrics.update_memory(record, torch.tensor([0, 2]))
    counts = metrics.result()["memory"]
    # trained: 2 (batch 1) + 3 + 3; labelled: C never; right: A (batch 1), z0 (first update of batch 3)
    assert {k: counts[k] for k in ("admitted", "evicted", "trained", "trained_labelled", "trained_correct")} == \
        {"admitted": 4, "evicted": 2, "trained": 8, "trained_labelled": 6, "trained_correct": 2}
    assert counts["precision"] == 2 / 6 and counts["admitted_frac"] is None  # no batch stage counted here
    # the memory keeps the labels it was handed, class-major: z1 (2), C (unknown), B (1); no current batch
    held = policy.training_slots()
    assert memory.truth[held].tolist() == [2, UNKNOWN, 1] and memory.labels[held].tolist() == [0, 1, 2]
    assert bool((memory.arrival == -1).all())


def test_a_run_records_the_memory_diagnostics():
    """Tent with the SoTTA memory through the engine: run.json's ``selection.memory`` agrees with the
    method's own counters; a saved and reloaded accumulator gives the same numbers."""
    from tta import engine
    from tta.checkpoint import accumulators_state, load_accumulators
    from tta.data.digits import load_digits_split
    from tta.data.stream import Batch
    from tta.metrics import SelectionMetrics

    images, labels = load_digits_split("test")
    method = methods.build("tent", load_classifier("digits_cnn"), batch_size=16, extra_policies=["sotta_memory"],
                           policy_kwargs={"sotta_memory": {"capacity": 8, "threshold": 0.5}})
    stream = [Batch(images[16 * i:16 * (i + 1)], labels[16 * i:16 * (i + 1)], f"d{i // 2}", torch.arange(16))
              for i in range(4)]
    out = engine.run(method, stream, progress=False)
    memory = out["selection"]["memory"]
    counters = out["stats"]["counters"]
    assert memory["mean"]["admitted"] == counters["memory_admitted"] > 0
    assert memory["mean"]["evicted"] == counters["memory_evicted"] > 0
    assert sorted(memory["domains"]) == ["d0", "d1"] and memory["mean"]["n"] == 64
    assert 0 < memory["mean"]["trained"] <= 4 * 8 and memory["mean"]["trained_labelled"] == memory["mean"]["trained"]
    assert 0.0 <= memory["mean"]["precision"] <= 1.0
    from tta.report import selection_table  # the report's selection table gains the memory's row
    record = {"config": {"method": {"name": "tent"}, "policies": {"extra": ["sotta_memory"]}, "seed": 0,
                         "setting": {"name": "reset_each_shift"}, "model": None},
              "method": {"method": "tent"}, "model": {"spec": "digits_cnn"}, "results": out["results"],
              "selection": out["selection"]}
    table = selection_table([record])
    lines = table.splitlines()
    assert lines[-3].startswith("| run (sample memory) |")
    row = lines[-1]
    mean = memory["mean"]
    assert row == (f"| tent+sotta_memory | {100 * mean['admitted'] / 64:.1f} | {mean['evicted']} | {mean['trained']} | "
                   f"{100 * mean['precision']:.1f} |")
    m = SelectionMetrics("cpu")  # a checkpoint carries the memory's counts
    m.update_memory(method.policies[0].memory.begin_batch(), labels[:16])
    saved = load_accumulators(accumulators_state({"d": m}), torch.device("cpu"))["d"]
    assert torch.equal(saved.memory, m.memory) and saved.memory.tolist() == [0, 0, 0, 0, 0]


def test_a_state_saved_before_the_diagnostics_loads():
    """A memory state without the diagnostics' buffers (``truth``, ``arrival``) loads: labels unknown."""
    from tta.policies import SoTTAMemory
    from tta.policies.memory import UNKNOWN

    policy = SoTTAMemory(num_classes=3, capacity=4, threshold=0.5)
    policy.admit(torch.rand(2, 3, 4, 4), _confident([0, 1]))
    state = {k: v for k, v in policy.state_dict().items() if not k.endswith(("truth", "arrival"))}
    other = SoTTAMemory(num_classes=3, capacity=4, threshold=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.memory.occupied, policy.memory.occupied)
    assert other.memory.truth.tolist() == [UNKNOWN] * 4 and other.memory.arrival.tolist() == [-1] * 4
