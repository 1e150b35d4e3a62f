"""RoTTA against a direct re-implementation of BIT-DA/RoTTA (``core/adapter/rotta.py``,
``core/utils/bn_layers.py``, ``core/utils/memory.py``, ``core/utils/custom_transforms.py``) in
float64 on the shipped digits CNN: the teacher's returned logits, the memory, the student and
teacher parameters and robust BatchNorm statistics after every batch, and the random draws
(one augmentation per update, seeded alike), with updates in the middle of a batch.
"""
from __future__ import annotations

import copy
from copy import deepcopy

import pytest
import torch
import torch.nn as nn

import tta.methods as methods
from tta.data.digits import load_digits_split
from tta.models import load_classifier
from tta.models.robust_bn import RobustBatchNorm

from test_cotta import get_tta_transforms  # the official CoTTA transform, which RoTTA's custom_transforms.py repeats
from test_memory import CSTU, timeliness_reweighting


class RobustBN2d(nn.Module):
    """``bn_layers.py`` (MomentumBN + RobustBN2d), as written there."""

    def __init__(self, bn_layer, momentum):
        super().__init__()
        self.num_features, self.momentum = bn_layer.num_features, momentum
        self.register_buffer("source_mean", deepcopy(bn_layer.running_mean))
        self.register_buffer("source_var", deepcopy(bn_layer.running_var))
        self.weight = deepcopy(bn_layer.weight)
        self.bias = deepcopy(bn_layer.bias)
        self.eps = bn_layer.eps

    def forward(self, x):
        if self.training:
            b_var, b_mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False, keepdim=False)
            mean = (1 - self.momentum) * self.source_mean + self.momentum * b_mean
            var = (1 - self.momentum) * self.source_var + self.momentum * b_var
            self.source_mean, self.source_var = deepcopy(mean.detach()), deepcopy(var.detach())
            mean, var = mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1)
        else:
            mean, var = self.source_mean.view(1, -1, 1, 1), self.source_var.view(1, -1, 1, 1)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ReferenceRoTTA:
    def __init__(self, clf, capacity, update_frequency, nu=0.001, alpha=0.05, lr=1e-3):
        clf.requires_grad_(False)
        names = [n for n, m in clf.named_modules() if isinstance(m, nn.BatchNorm2d)]
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = clf.get_submodule(parent_name)
            rbn = RobustBN2d(getattr(parent, child), alpha)
            rbn.requires_grad_(True)
            setattr(parent, child, rbn)
        self.model = clf
        params = [p for p in clf.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.mem = CSTU(capacity=capacity, num_class=10, lambda_t=1.0, lambda_u=1.0)
        self.model_ema = deepcopy(clf)
        for param in self.model_ema.parameters():
            param.detach_()
        self.transform = get_tta_transforms(32)
        self.nu, self.update_frequency, self.current_instance = nu, update_frequency, 0

    def __call__(self, batch_data):
        with torch.no_grad():
            self.model.eval()
            self.model_ema.eval()
            ema_out = self.model_ema(batch_data)
            predict = torch.softmax(ema_out, dim=1)
            pseudo_label = torch.argmax(predict, dim=1)
            entropy = torch.sum(- predict * torch.log(predict + 1e-6), dim=1)
        for i, data in enumerate(batch_data):
            self.mem.add_instance((data, pseudo_label[i].item(), entropy[i].item()))
            self.current_instance += 1
            if self.current_instance % self.update_frequency == 0:
                self.update_model()
        return ema_out

    def update_model(self):
        self.model.train()
        self.model_ema.train()
        sup_data, ages = self.mem.get_memory()
        if len(sup_data) > 0:
            sup_data = torch.stack(sup_data)
            strong_sup_aug = self.transform(sup_data)
            ema_sup_out = self.model_ema(sup_data)
            stu_sup_out = self.model(strong_sup_aug)
            instance_weight = timeliness_reweighting(ages)
            l_sup = (-(ema_sup_out.softmax(1) * stu_sup_out.log_softmax(1)).sum(1) * instance_weight).mean()
            self.optimizer.zero_grad()
            l_sup.backward()
            self.optimizer.step()
        for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters()):
            ema_param.data[:] = (1 - self.nu) * ema_param[:].data[:] + self.nu * param[:].data[:]


def digits_stream(n=4, bs=20):
    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(2)
    x = images[torch.randperm(len(images), generator=g)[: n * bs]].double()
    x = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return list(x.split(bs))


def test_rotta_matches_the_official_step():
    capacity, every, nu, lr = 16, 16, 0.2, 1e-2  # a large nu and lr: the teacher and the student visibly move
    clf = load_classifier("digits_cnn").double()
    ref = ReferenceRoTTA(copy.deepcopy(clf), capacity, every, nu=nu, lr=lr)
    method = methods.build("rotta", clf, batch_size=20, capacity=capacity, update_every=every, nu=nu, lr=lr)
    for i, x in enumerate(digits_stream()):  # 20 per batch, an update every 16: in the middle of batches
        torch.manual_seed(10 + i)
        out = method(x)
        rng = torch.get_rng_state()
        torch.manual_seed(10 + i)
        z = ref(x)
        assert torch.equal(torch.get_rng_state(), rng), i
        torch.testing.assert_close(out, z, atol=1e-10, rtol=1e-10)
        data, ages = ref.mem.get_memory()
        slots = method.memory_policy.training_slots()
        torch.testing.assert_close(method.memory_policy.memory.images[slots], torch.stack(data), atol=0, rtol=0)
        for ours, theirs in ((method.model, ref.model), (method.teacher, ref.model_ema)):
            a, b = ours.state_dict(), theirs.state_dict()
            assert sorted(a) == sorted(b)
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=1e-10, msg=k)
    assert method.stats()["counters"]["steps"] == 80 // every
    assert sum(isinstance(m, RobustBatchNorm) for m in method.model.modules()) == method.num_robust_bn == 5


def test_rotta_defaults_state_and_refusals():
    method = methods.build("rotta", load_classifier("digits_cnn"), batch_size=64)
    assert (method.nu, method.capacity, method.update_every, method.alpha) == (0.001, 64, 64, 0.05)
    assert method.optimizer_name == "adam" and method.lr == 1e-3
    x = torch.rand(64, 3, 32, 32)
    method(x)
    stats = method.stats()
    assert stats["counters"]["steps"] == 1 and stats["per_batch"] == {"forwards": 3.0, "backwards": 1.0}
    assert "teacher.net.features.1.source_mean" in method.state_dict()
    method.reset()
    assert int(method.instances) == 0 and not bool(method.memory_policy.memory.occupied.any())
    with pytest.raises(ValueError, match="'rotta_memory' and 'rotta_memory'"):
        methods.build("rotta", load_classifier("digits_cnn"), extra_policies=["rotta_memory"])
    gn = methods.build("rotta", load_classifier("digits_gn"), batch_size=16)  # GroupNorm: its affine adapted
    gn(torch.rand(16, 3, 32, 32))
    assert gn.num_robust_bn == 0 and gn.param_names


@pytest.mark.parametrize("name", ["rotta", "sotta"])
def test_a_saved_state_resumes_the_memory_and_the_update_period(name):
    """Batches of 40 with an update every 16 samples: a state saved mid-period, loaded into a fresh
    method, continues exactly (memory, sample count, statistics, teacher)."""
    import random

    kwargs = dict(batch_size=40, update_every=16, capacity=16, **({"threshold": 0.0} if name == "sotta" else {}))
    a = methods.build(name, load_classifier("digits_cnn"), **kwargs)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(40, 3, 32, 32, generator=g) for _ in range(3)]
    a(xs[0])
    b = methods.build(name, load_classifier("digits_cnn"), **kwargs)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i, x in enumerate(xs[1:]):
        torch.manual_seed(i), random.seed(i)
        out_a = a(x)
        torch.manual_seed(i), random.seed(i)
        torch.testing.assert_close(b(x), out_a)
    assert int(a.instances) == int(b.instances) == 120
    assert a.stats()["counters"]["steps"] == 7  # 120 samples: updates after 16, 32, ..., 112
