"""ROID against a direct re-implementation of mariodoebler/test-time-adaptation ``methods/roid.py``
(with ``utils/losses.py``, ``utils/misc.py`` and ``augmentations/transforms_cotta.py``), in float64
on the shipped digits CNN: returned (prior-corrected) logits, the kept samples, the running prior,
the parameters after every step (SGD with Nesterov, then the weight ensembling) and the random
draws of the augmentation.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms

import tta.methods as methods
from tta.data.digits import load_digits_split
from tta.models import load_classifier

from test_cotta import Clip, ColorJitterPro


def roid_transforms(n_pixels=32):
    return transforms.Compose([
        Clip(),
        ColorJitterPro(brightness=[0.6, 1.4], contrast=[0.7, 1.3], saturation=[0.5, 1.5], hue=[-0.06, 0.06],
                       gamma=[0.7, 1.3]),
        transforms.Pad(padding=int(n_pixels / 2), padding_mode="reflect"),
        transforms.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                                interpolation=transforms.InterpolationMode.BILINEAR, fill=0),
        transforms.CenterCrop(size=n_pixels),
        transforms.RandomHorizontalFlip(p=0.5),
        Clip(),
    ])


class ReferenceROID:
    def __init__(self, model, batch_size, lr):
        model.eval()
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(True)
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.requires_grad_(True)
        params = []
        for nm, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                params += [p for n, p in m.named_parameters() if n in ['weight', 'bias'] and p.requires_grad]
        self.model, self.batch_size = model, batch_size
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True)
        self.class_probs_ema = 1 / 10 * torch.ones(10, dtype=torch.float64)
        self.tta_transform = roid_transforms()
        self.src_model = copy.deepcopy(model)
        for param in self.src_model.parameters():
            param.detach_()
        self.temperature, self.last_kept = 1 / 3, None

    def __call__(self, imgs_test):
        outputs = self.model(imgs_test)
        with torch.no_grad():
            weights_div = 1 - F.cosine_similarity(self.class_probs_ema.unsqueeze(dim=0), outputs.softmax(1), dim=1)
            weights_div = (weights_div - weights_div.min()) / (weights_div.max() - weights_div.min())
            mask = weights_div < weights_div.mean()
            weights_cert = (outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
            weights_cert = (weights_cert - weights_cert.min()) / (weights_cert.max() - weights_cert.min())
            weights = torch.exp(weights_div * weights_cert / self.temperature)
            weights[mask] = 0.
            self.class_probs_ema = 0.9 * self.class_probs_ema + 0.1 * outputs.softmax(1).mean(0)
        probs = torch.clamp(outputs.softmax(1), min=0.0, max=0.99)
        loss_out = - (probs * torch.log((probs / (torch.ones_like(probs) - probs)) + 1e-5)).sum(1)
        loss_out = (loss_out * weights)[~mask]
        loss = loss_out.sum() / self.batch_size
        outputs_aug = self.model(self.tta_transform(imgs_test[~mask]))
        x, x_ema = outputs_aug, outputs[~mask]
        sce = -0.5 * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - 0.5 * (x.softmax(1) * x_ema.log_softmax(1)).sum(1)
        loss += (sce * weights[~mask]).sum() / self.batch_size
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), self.src_model.parameters()):
                if p.requires_grad:
                    p.data = 0.99 * p.data + (1 - 0.99) * q.data
            prior = outputs.softmax(1).mean(0)
            smooth = max(1 / outputs.shape[0], 1 / outputs.shape[1]) / torch.max(prior)
            smoothed_prior = (prior + smooth) / (1 + smooth * outputs.shape[1])
            outputs *= smoothed_prior
        self.last_kept = ~mask
        return outputs


def digits_stream(n=3, bs=24):
    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(4)
    x = images[torch.randperm(len(images), generator=g)[: n * bs]].double()
    x = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return list(x.split(bs))


def test_roid_matches_the_official_step():
    lr, bs = 0.05, 32  # a configured batch of 32 with batches of 24: the reference's denominator
    clf = load_classifier("digits_cnn").double()
    ref = ReferenceROID(copy.deepcopy(clf), bs, lr)
    method = methods.build("roid", clf, batch_size=bs, lr=lr)
    for i, x in enumerate(digits_stream()):
        torch.manual_seed(20 + i)
        out = method(x)
        rng = torch.get_rng_state()
        torch.manual_seed(20 + i)
        z = ref(x)
        assert torch.equal(torch.get_rng_state(), rng), i
        torch.testing.assert_close(out, z, atol=1e-10, rtol=1e-10)
        assert torch.equal(method.last_selection["roid_weight"], ref.last_kept)
        assert 0 < int(ref.last_kept.sum()) < len(x)
        torch.testing.assert_close(method.policies[0].prior, ref.class_probs_ema, atol=1e-12, rtol=1e-12)
        ours = dict(method.model.named_parameters())
        for name, p in ref.model.named_parameters():
            torch.testing.assert_close(ours[name].detach(), p.detach(), atol=1e-10, rtol=1e-10, msg=name)


def test_roid_defaults_reset_and_the_weight_elsewhere():
    method = methods.build("roid", load_classifier("digits_cnn"), batch_size=64)
    group = method.optimizer.param_groups[0]
    assert method.lr == 2.5e-4 and group["nesterov"] and group["momentum"] == 0.9
    assert (method.momentum_src, method.momentum_probs, method.temperature) == (0.99, 0.9, 1 / 3)
    x = torch.rand(64, 3, 32, 32)
    method(x)
    assert not torch.allclose(method.policies[0].prior, torch.full((10,), 0.1, dtype=torch.float64))
    method.reset()
    assert torch.allclose(method.policies[0].prior, torch.full((10,), 0.1, dtype=torch.float64))
    with pytest.warns(UserWarning, match="batch size 1"):
        one = method(x[:1])  # one sample: the min-max normalisation has no span; finite all the same
    assert torch.isfinite(one).all()
    tent = methods.build("tent", load_classifier("digits_cnn"), batch_size=64, extra_policies=["roid_weight"])
    tent(x)
    assert 0 < tent.stats()["policies"]["roid_weight_kept"] < 64
