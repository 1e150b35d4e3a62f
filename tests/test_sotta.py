"""SoTTA against a direct re-implementation of taeckyung/SoTTA (``learner/sotta.py``,
``utils/memory.py`` HUS, ``utils/sam_optimizer.py``, ``utils/loss_functions.py``) in float64 on the
shipped digits CNN: the reference loop goes sample by sample (an eval forward per sample for the
memory, an update every ``update_every`` samples through a shuffled ``DataLoader`` and SAM over
Adam); the comparison covers every sample's logits, the memory, the parameters and BatchNorm running
statistics after every batch, and the random draws (Python ``random`` and torch's generator).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import tta.methods as methods
from tta.data.digits import load_digits_split
from tta.models import load_classifier


class HUS:
    def __init__(self, capacity, num_class, threshold=None):
        self.data = [[[], [], [], []] for _ in range(num_class)]
        self.num_class, self.capacity, self.threshold = num_class, capacity, threshold

    def get_memory(self):
        tmp = [[], [], []]
        for feats, cls, dls, _ in self.data:
            tmp[0].extend(feats)
            tmp[1].extend(cls)
            tmp[2].extend(dls)
        return tmp

    def get_occupancy(self):
        return sum(len(d[0]) for d in self.data)

    def add_instance(self, instance):
        cls = instance[1]
        is_add = True
        if self.threshold is not None and instance[3] < self.threshold:
            is_add = False
        elif self.get_occupancy() >= self.capacity:
            is_add = self.remove_instance(cls)
        if is_add:
            for i, dim in enumerate(self.data[cls]):
                dim.append(instance[i])

    def remove_instance(self, cls):
        occupancy = [len(d[0]) for d in self.data]
        largest_indices = [i for i, oc in enumerate(occupancy) if oc == max(occupancy)]
        if cls not in largest_indices:
            largest = random.choice(largest_indices)
            tgt_idx = random.randrange(0, len(self.data[largest][3]))
            for dim in self.data[largest]:
                dim.pop(tgt_idx)
        else:
            tgt_idx = random.randrange(0, len(self.data[cls][3]))
            for dim in self.data[cls]:
                dim.pop(tgt_idx)
        return True


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                            if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


def hloss(x):
    softmax = F.softmax(x / 1.0, dim=1)
    return (-softmax * torch.log(softmax + 1e-6)).sum(dim=1).mean()


class ReferenceSoTTA:
    def __init__(self, clf, capacity, every, threshold, lr):
        net = clf
        for param in net.parameters():
            param.requires_grad = False
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.track_running_stats = True
                module.momentum = 0.2
                module.weight.requires_grad_(True)
                module.bias.requires_grad_(True)
        params = []
        for nm, m in net.named_modules():
            if 'layer4' in nm or 'blocks.9' in nm or 'blocks.10' in nm or 'blocks.11' in nm or 'norm.' in nm or nm == 'norm':
                continue
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                params += [p for n, p in m.named_parameters() if n in ('weight', 'bias')]
        self.net, self.every = net, every
        self.optimizer = SAM(params, torch.optim.Adam, rho=0.05, lr=lr, weight_decay=0.0)
        self.mem = HUS(capacity, 10, threshold)
        self.k = 0

    def __call__(self, x):
        outs = []
        for f in x:
            self.k += 1
            with torch.no_grad():
                self.net.eval()
                logit = self.net(f.unsqueeze(0))
                outs.append(logit)
                pseudo_cls = int(logit.max(1)[1][0])
                pseudo_conf = float(F.softmax(logit, dim=1).max(1)[0][0])
                self.mem.add_instance([f, pseudo_cls, 0, pseudo_conf])
            if self.k % self.every != 0:
                continue
            self.net.train()
            feats, _, _ = self.mem.get_memory()
            if len(feats) == 0:
                continue
            loader = DataLoader(TensorDataset(torch.stack(feats)), batch_size=128, shuffle=True, drop_last=False)
            for (batch,) in loader:
                self.net.train()
                loss_first = hloss(self.net(batch))
                self.optimizer.zero_grad()
                loss_first.backward()
                self.optimizer.first_step()
                hloss(self.net(batch)).backward()
                self.optimizer.second_step()
        return torch.cat(outs)


def digits_stream(n=4, bs=20):
    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(3)
    x = images[torch.randperm(len(images), generator=g)[: n * bs]].double()
    x = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return list(x.split(bs))


def test_sotta_matches_the_official_loop():
    capacity, every, threshold, lr = 12, 16, 0.6, 1e-2
    clf = load_classifier("digits_cnn").double()
    ref = ReferenceSoTTA(copy.deepcopy(clf), capacity, every, threshold, lr)
    method = methods.build("sotta", clf, batch_size=20, capacity=capacity, update_every=every, threshold=threshold,
                           lr=lr, params="norm")  # the digits CNN has no layer4: the same set either way
    for i, x in enumerate(digits_stream()):
        random.seed(i), torch.manual_seed(50 + i)
        out = method(x)
        states = random.getstate(), torch.get_rng_state()
        random.seed(i), torch.manual_seed(50 + i)
        z = ref(x)
        assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[1]), i
        torch.testing.assert_close(out, z, atol=1e-10, rtol=1e-10)
        feats, labels, _ = ref.mem.get_memory()
        policy = method.memory_policy
        slots = policy.training_slots()
        torch.testing.assert_close(policy.memory.images[slots], torch.stack(feats), atol=0, rtol=0)
        assert policy.memory.labels[slots].tolist() == labels
        ours, theirs = method.model.state_dict(), ref.net.state_dict()
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], atol=1e-10, rtol=1e-10, msg=k)
    counters = method.stats()["counters"]
    assert counters["steps"] == 80 // every and counters["memory_evicted"] > 0
    assert counters["memory_admitted"] < 80  # the threshold rejected some


def test_sotta_defaults_and_the_memory_in_other_methods():
    method = methods.build("sotta", load_classifier("digits_cnn"), batch_size=64)
    assert (method.threshold, method.capacity, method.update_every, method.bn_momentum, method.rho) == \
        (0.33, 64, 64, 0.2, 0.05)
    assert method.optimizer_name == "adam" and method.lr == 1e-3 and method.params_preset == "sar"
    bn = next(m for m in method.model.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.momentum == 0.2 and bn.running_mean is not None
    method(torch.rand(64, 3, 32, 32))
    assert method.stats()["counters"]["batches"] == 1
    tent = methods.build("tent", load_classifier("digits_cnn"), batch_size=32, extra_policies=["sotta_memory"],
                         policy_kwargs={"sotta_memory": {"threshold": 0.0}})
    tent(torch.rand(32, 3, 32, 32))
    assert tent.stats()["counters"]["memory_admitted"] == 32
    with pytest.raises(ValueError, match="'sotta_memory'.*'sotta'"):
        methods.build("sotta", load_classifier("digits_cnn"), extra_policies=["sotta_memory"])
