"""CoTTA against a direct re-implementation of qinenergy/cotta (``cifar/cotta.py``,
``imagenet/cotta.py``, ``cifar/my_transforms.py``), in float64 on the shipped digits CNN.

The reference below is written the way the official code writes it: ``configure_model`` (every
weight and bias trainable, BatchNorm on batch statistics), the copies made after configuration,
the torchvision ``Compose`` of ``get_tta_transforms`` with ``ColorJitterPro``, the 32 teacher passes,
the loss, the EMA over ``parameters()`` and the restore loop over ``named_modules()`` with
``torch.rand`` on the CPU. Both sides are seeded alike before every batch, so the comparison covers
the random draws too: the same augmented copies, the same restore masks, the same generator state
after the step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as transforms
import torchvision.transforms.functional as F

import tta.methods as methods
from tta.data.digits import load_digits_split
from tta.models import load_classifier


# ---------------------------------------------------------------- the reference
class ColorJitterPro(transforms.ColorJitter):
    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0, gamma=0):
        super().__init__(brightness, contrast, saturation, hue)
        self.gamma = self._check_input(gamma, 'gamma')

    def forward(self, img):
        fn_idx = torch.randperm(5)
        for fn_id in fn_idx:
            if fn_id == 0 and self.brightness is not None:
                img = F.adjust_brightness(img, torch.tensor(1.0).uniform_(self.brightness[0], self.brightness[1]).item())
            if fn_id == 1 and self.contrast is not None:
                img = F.adjust_contrast(img, torch.tensor(1.0).uniform_(self.contrast[0], self.contrast[1]).item())
            if fn_id == 2 and self.saturation is not None:
                img = F.adjust_saturation(img, torch.tensor(1.0).uniform_(self.saturation[0], self.saturation[1]).item())
            if fn_id == 3 and self.hue is not None:
                img = F.adjust_hue(img, torch.tensor(1.0).uniform_(self.hue[0], self.hue[1]).item())
            if fn_id == 4 and self.gamma is not None:
                gamma_factor = torch.tensor(1.0).uniform_(self.gamma[0], self.gamma[1]).item()
                img = img.clamp(1e-8, 1.0)
                img = F.adjust_gamma(img, gamma_factor)
        return img


class GaussianNoise(nn.Module):
    def __init__(self, mean=0., std=1.):
        super().__init__()
        self.std, self.mean = std, mean

    def forward(self, img):
        return img + (torch.randn(img.size()) * self.std + self.mean).to(img.device)


class Clip(nn.Module):
    def forward(self, img):
        return torch.clip(img, 0.0, 1.0)


def get_tta_transforms(n_pixels=32, gaussian_std=0.005):
    return transforms.Compose([
        Clip(),
        ColorJitterPro(brightness=[0.6, 1.4], contrast=[0.7, 1.3], saturation=[0.5, 1.5], hue=[-0.06, 0.06],
                       gamma=[0.7, 1.3]),
        transforms.Pad(padding=int(n_pixels / 2), padding_mode='edge'),
        transforms.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                                interpolation=transforms.InterpolationMode.BILINEAR, fill=0),
        transforms.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]),
        transforms.CenterCrop(size=n_pixels),
        transforms.RandomHorizontalFlip(p=0.5),
        GaussianNoise(0, gaussian_std),
        Clip(),
    ])


class ReferenceCoTTA:
    def __init__(self, model, variant, lr, mt, rst, ap):
        model.train()
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(True)
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
            else:
                m.requires_grad_(True)
        params = []
        for nm, m in model.named_modules():
            for np_, p in m.named_parameters():
                if np_ in ['weight', 'bias'] and p.requires_grad:
                    params.append(p)
        if variant == "imagenet":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True)
        else:
            self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.model, self.variant, self.mt, self.rst, self.ap = model, variant, mt, rst, ap
        self.model_state = copy.deepcopy(model.state_dict())
        self.model_anchor = copy.deepcopy(model)
        self.model_ema = copy.deepcopy(model)
        for param in self.model_ema.parameters():
            param.detach_()
        self.transform = get_tta_transforms()

    def __call__(self, x):
        outputs = self.model(x)
        anchor_prob = torch.nn.functional.softmax(self.model_anchor(x), dim=1).max(1)[0]
        standard_ema = self.model_ema(x)
        outputs_emas = []
        if self.variant == "cifar":
            for i in range(32):
                outputs_emas.append(self.model_ema(self.transform(x)).detach())
            outputs_ema = torch.stack(outputs_emas).mean(0) if anchor_prob.mean(0) < self.ap else standard_ema
            loss = (-(outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1)).mean(0)
        else:
            to_aug = anchor_prob.mean(0) < self.ap
            if to_aug:
                for i in range(32):
                    outputs_emas.append(self.model_ema(self.transform(x)).detach())
            outputs_ema = torch.stack(outputs_emas).mean(0) if to_aug else standard_ema
            t = outputs_ema.detach()
            loss = (-0.5 * (t.softmax(1) * outputs.log_softmax(1)).sum(1)
                    - 0.5 * (outputs.softmax(1) * t.log_softmax(1)).sum(1)).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters()):
            ema_param.data[:] = self.mt * ema_param[:].data[:] + (1 - self.mt) * param[:].data[:]
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ['weight', 'bias'] and p.requires_grad:
                    mask = (torch.rand(p.shape) < self.rst).float()
                    with torch.no_grad():
                        p.data = self.model_state[f"{nm}.{npp}"] * mask + p * (1. - mask)
        return outputs_ema.detach(), bool(anchor_prob.mean(0) < self.ap)


# ---------------------------------------------------------------- data
def stream(n=3, bs=16):
    """Clean digits and heavily noised digits alternate, so the anchor's mean confidence falls on
    both sides of the gate."""
    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = images[torch.randperm(len(images), generator=g)[:bs]].double()
        if i % 2:
            x = (x + 0.8 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        out.append(x)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["imagenet", "cifar"])
def test_cotta_matches_the_official_step(variant):
    lr, mt, rst, ap = (0.01, 0.9, 0.05, 0.6) if variant == "imagenet" else (1e-3, 0.9, 0.05, 0.8)
    clf = load_classifier("digits_cnn").double()
    ref = ReferenceCoTTA(copy.deepcopy(clf), variant, lr, mt, rst, ap)  # images in [0, 1], as RobustBench models
    kwargs = dict(lr=lr, mt=mt, rst=rst, ap=ap, num_augs=32)
    if variant == "cifar":
        kwargs.update(optimizer="adam", loss="one_sided", augment_always=True)
    method = methods.build("cotta", clf, batch_size=16, **kwargs)
    assert [f"net.{n}" for n in method.param_names] == [n for n, _ in ref.model.named_parameters()]
    gates = []
    for i, x in enumerate(stream()):
        torch.manual_seed(100 + i)
        out = method(x)
        ours_rng = torch.get_rng_state()
        torch.manual_seed(100 + i)
        target, gate = ref(x)
        gates.append(gate)
        assert torch.equal(torch.get_rng_state(), ours_rng), i  # the same random draws, in number and order
        torch.testing.assert_close(out, target, atol=1e-10, rtol=1e-10)
        student = dict(method.model.net.named_parameters())
        teacher = dict(method.teacher.net.named_parameters())
        for (name, p), q in zip(ref.model.named_parameters(), ref.model_ema.parameters()):
            name = name[len("net."):]
            torch.testing.assert_close(student[name].detach(), p.detach(), atol=1e-10, rtol=1e-10, msg=name)
            torch.testing.assert_close(teacher[name], q, atol=1e-10, rtol=1e-10, msg=name)
    assert True in gates and False in gates  # both sides of the gate were compared
    counters = method.stats()["counters"]
    assert counters["augmented_batches"] == sum(gates)
    forwards = 3 * 3 + 32 * (3 if variant == "cifar" else sum(gates))
    assert counters["forwards"] == forwards and counters["backwards"] == 3


def test_cotta_defaults_reset_and_state():
    method = methods.build("cotta", load_classifier("digits_cnn"), batch_size=64)
    assert (method.mt, method.rst, method.ap, method.num_augs, method.loss) == (0.999, 0.001, 0.1, 32, "symmetric")
    group = method.optimizer.param_groups[0]
    assert method.lr == 0.01 and group["nesterov"] and group["momentum"] == 0.9 and not method.augment_always
    source = {k: v.clone() for k, v in method.model.state_dict().items()}
    x = torch.rand(8, 3, 32, 32)
    method(x), method(x)
    assert any(not torch.equal(v, source[k]) for k, v in method.teacher.state_dict().items())
    assert "teacher.net.fc.weight" in method.state_dict()  # the teacher is saved with the state
    method.reset()
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, source[k]), k
    assert method.hparams()["model_copies"] == 3
    with pytest.raises(ValueError, match="loss"):
        methods.build("cotta", load_classifier("digits_cnn"), loss="kl")


def test_cotta_takes_an_extra_policy_on_the_student():
    method = methods.build("cotta", load_classifier("digits_cnn"), batch_size=16, extra_policies=["entropy_margin"])
    x = torch.rand(16, 3, 32, 32)
    method(x)
    stats = method.stats()
    assert stats["policies"]["entropy_margin_seen"] == 16
    assert stats["counters"]["kept"] == stats["policies"]["entropy_margin_kept"] * stats["counters"]["steps"]
