"""Tent parity: one step equals a hand derivation of the paper's update (Wang et al., ICLR 2021)."""
import copy

import pytest
import timm
import torch
from torch import nn

import tta
from tta.models import load_classifier


def _reference_tent_step(net: nn.Module, x: torch.Tensor, lr: float):
    """BN affine only, test-batch statistics, mean Shannon entropy, SGD(momentum 0.9) first step."""
    net = copy.deepcopy(net).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    bn_params = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    logits = net(x)
    p = logits.softmax(1)
    loss = -(p * logits.log_softmax(1)).sum(1).mean()
    grads = torch.autograd.grad(loss, bn_params)
    # first SGD step with momentum: the buffer equals the gradient, so p <- p - lr * g
    updated = [w.detach() - lr * g for w, g in zip(bn_params, grads)]
    return logits.detach(), updated


@pytest.mark.parametrize("spec", ["timm:test_resnet", "digits_cnn"])
def test_one_tent_step_matches_hand_derivation(spec):
    torch.manual_seed(0)
    model = load_classifier(spec, pretrained=False, num_classes=10) if spec.startswith("timm") else load_classifier(spec)
    x = torch.rand(16, 3, 32, 32)
    normalised = model.normalize(x)
    ref_logits, ref_params = _reference_tent_step(model.net, normalised, lr=1e-2)
    method = tta.methods.build("tent", model, params="bn", lr=1e-2)
    before = {n: p.detach().clone() for n, p in method.model.net.named_parameters()}
    logits = method(x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    ours = [p for m in method.model.net.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    for got, want in zip(ours, ref_params):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # nothing but BN affine moved, and the BN affine parameters did move
    bn = {f"{m}.{p}" for m, mod in method.model.net.named_modules() if isinstance(mod, nn.BatchNorm2d)
          for p in ("weight", "bias")}
    assert set(method.param_names) == bn
    moved = {n for n, p in method.model.net.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= bn, moved - bn  # (timm zero-initialises some BN weights: their branch gets no gradient)
    stats = method.stats()["counters"]
    assert stats["steps"] == 1 and stats["kept"] == 16 and stats["forwards"] == 1


def test_tent_returns_pre_update_logits_and_second_batch_sees_the_update():
    torch.manual_seed(0)
    model = load_classifier("digits_cnn")
    method = tta.methods.build("tent", model, lr=1e-1)
    x = torch.rand(8, 3, 32, 32)
    first = method(x)
    second = method(x)
    assert not torch.allclose(first, second)  # the update changed the model between the two calls


def test_reset_restores_source_state_and_state_dict_round_trips():
    model = load_classifier("digits_cnn")
    method = tta.methods.build("tent", model, lr=1e-1)
    before = copy.deepcopy(method.model.state_dict())
    x = torch.rand(8, 3, 32, 32)
    method(x)
    saved = copy.deepcopy(method.state_dict())
    after_one = method(x)
    method.reset()
    for k, v in before.items():
        torch.testing.assert_close(method.model.state_dict()[k], v)
    method.load_state_dict(saved)
    torch.testing.assert_close(method(x), after_one)  # same model and optimizer state -> same output


def test_adapt_leaves_the_callers_model_untouched():
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    before = copy.deepcopy(net.state_dict())
    adapted = tta.adapt(net, "tent", lr=1e-1)
    adapted(torch.rand(8, 3, 32, 32))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
