"""RDumb and ``reset_every`` (a full periodic reset, an option of every method).

The fidelity test re-derives RDumb's step from oripress/CCC ``models/rdumb.py`` (index lists, the
model and optimizer states reloaded every ``period`` batches, ``current_model_probs = None``) and
compares it with ``method=rdumb`` over several batches in float64: pre-update logits, kept samples,
the running mean prediction and the parameters after every step.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta.methods as methods
from tta.models import load_classifier

timm = pytest.importorskip("timm")

C, BS = 10, 16


def tiny(head_scale: float = 6.0):
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=C)
    with torch.no_grad():
        net.get_classifier().weight.mul_(head_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_classifier(net.double(), pretrained=False, num_classes=C)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(BS, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(n)]


class ReferenceRDumb:
    """RDumb as ``models/rdumb.py`` and ``models/functional.py`` write it (BatchNorm2d affine, SGD
    momentum 0.9, the states saved after configuration and reloaded every ``period`` steps)."""

    def __init__(self, clf, lr: float, period: int, d_margin: float):
        self.model = clf
        net = clf.net
        params = []
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                params += [m.weight, m.bias]
        net.train()
        net.requires_grad_(False)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(True)
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
        self.params = params
        self.optimizer = torch.optim.SGD(params, lr, momentum=0.9)
        self.model_state = copy.deepcopy(clf.state_dict())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self.period, self.d_margin, self.e_margin = period, d_margin, 0.4 * math.log(C)
        self.m, self.total_steps = None, 0

    def __call__(self, x):
        if self.total_steps % self.period == 0:
            self.model.load_state_dict(self.model_state, strict=True)
            self.optimizer.load_state_dict(self.optimizer_state)
            self.m = None
        outputs = self.model(x)
        entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
        ids1 = torch.where(entropys < self.e_margin)
        ids2 = torch.where(ids1[0] > -0.1)
        entropys = entropys[ids1]
        if self.m is not None:
            cos = F.cosine_similarity(self.m.unsqueeze(0), outputs[ids1].softmax(1).detach(), dim=1)
            ids2 = torch.where(torch.abs(cos) < self.d_margin)
            entropys = entropys[ids2]
            new = outputs[ids1][ids2].softmax(1).detach()
        else:
            new = outputs[ids1].softmax(1).detach()
        if new.size(0) > 0:
            self.m = new.mean(0) if self.m is None else 0.9 * self.m + 0.1 * new.mean(0)
        loss = (entropys * (1 / torch.exp(entropys.detach() - self.e_margin))).mean(0)
        if x[ids1][ids2].size(0) != 0:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.total_steps += 1
        return outputs.detach(), len(ids1[0]), entropys.size(0)


def test_rdumb_matches_the_official_step_across_resets():
    period, d_margin, lr = 3, 0.6, 0.05
    clf = tiny()
    ref = ReferenceRDumb(copy.deepcopy(clf), lr, period, d_margin)
    method = methods.build("rdumb", clf, batch_size=BS, params="bn", lr=lr, d_margin=d_margin, reset_every=period)
    names = [n for n, m in ref.model.net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert method.param_names == [f"{n}.{w}" for n in names for w in ("weight", "bias")]
    initial = [p.detach().clone() for p in ref.params]
    kept = []
    for i, x in enumerate(batches(8)):
        out = method(x)
        z, n1, n2 = ref(x)
        kept.append((n1, n2))
        torch.testing.assert_close(out, z, atol=1e-6, rtol=1e-6)
        assert int(method.last_selection["entropy_margin"].sum()) == n1, i
        assert int(method.last_selection["redundancy"].sum()) == n2, i
        red = method.policies[1]
        assert bool(red.m_exists) == (ref.m is not None)
        if ref.m is not None:
            torch.testing.assert_close(red.m, ref.m, atol=1e-6, rtol=1e-6, check_dtype=False)  # policies: float32
        for p, q in zip(method.adapted_parameters(), ref.params):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-6)  # float32 policy weights
        if i % period == 0:  # right after a reset: one step away from the source weights at most
            assert n2 == 0 or any(not torch.equal(p.detach(), q) for p, q in zip(ref.params, initial))
    assert any(0 < n2 < n1 for n1, n2 in kept) and any(n1 < BS for n1, _ in kept)  # both filters bite
    assert method.stats()["counters"]["periodic_resets"] == (8 - 1) // period
    assert method.hparams()["reset_every"] == period


def test_rdumb_defaults_are_the_official_ones():
    method = methods.build("rdumb", tiny(), batch_size=BS)
    assert method.reset_every == 1000 and method.lr == 2.5e-4 and method.optimizer_name == "sgd"
    group = method.optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and not group["nesterov"] and group["weight_decay"] == 0
    assert (method.e_margin, method.d_margin) == (0.4, 0.05)
    assert methods.build("rdumb", tiny(), batch_size=8).lr == 2.5e-4  # not the batch-size rule


def test_reset_every_is_a_full_reset_of_any_method_adam_state_and_moving_averages_included():
    """Tent with Adam: weights and Adam moments back to the source after the period; ETA's running
    mean (which ``reset()`` keeps, as EATA) cleared by the periodic reset."""
    clf = tiny()
    fresh = methods.build("tent", copy.deepcopy(clf), batch_size=BS, optimizer="adam", lr=1e-2)
    method = methods.build("tent", clf, batch_size=BS, optimizer="adam", lr=1e-2, reset_every=2)
    xs = batches(3)
    method(xs[0]), method(xs[1])
    assert any(not torch.equal(p, q) for p, q in zip(method.adapted_parameters(), fresh.adapted_parameters()))
    torch.testing.assert_close(method(xs[2]), fresh(xs[2]))  # reset before batch 3: the fresh model's output
    for p, q in zip(method.adapted_parameters(), fresh.adapted_parameters()):
        torch.testing.assert_close(p, q)  # the same single step from the source, Adam's first step included
    assert method.stats()["counters"]["periodic_resets"] == 1

    eta = methods.build("eta", tiny(), batch_size=BS, lr=0.05, d_margin=0.6, reset_every=2)
    eta(xs[0]), eta(xs[1])
    red = eta.policies[1]
    assert bool(red.m_exists)
    eta.reset()
    assert bool(red.m_exists)  # EATA's own reset keeps m ...
    eta.full_reset()
    assert not bool(red.m_exists)  # ... a full reset does not


def test_reset_every_resumes_mid_period_from_a_state_dict_and_zero_means_never():
    a = methods.build("tent", tiny(), batch_size=BS, lr=0.05, reset_every=3)
    xs = batches(5)
    a(xs[0]), a(xs[1])
    state = copy.deepcopy(a.state_dict())
    assert int(state["reset_clock.batches"]) == 2
    b = methods.build("tent", tiny(), batch_size=BS, lr=0.05, reset_every=3)
    b.load_state_dict(state)
    for x in xs[2:]:
        torch.testing.assert_close(a(x), b(x))
    assert a.stats()["counters"]["periodic_resets"] == b.stats()["counters"]["periodic_resets"] == 1
    a.reset()
    assert a.reset_clock.count == 0  # a reset starts a new period
    plain = methods.build("tent", tiny(), batch_size=BS)
    assert plain.reset_every == 0 and "reset_clock.batches" not in plain.state_dict()
    with pytest.raises(ValueError, match="reset_every"):
        methods.build("tent", tiny(), batch_size=BS, reset_every=-1)
