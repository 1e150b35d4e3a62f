"""RobustBench's CIFAR-C models without the robustbench package: the architectures with the published
checkpoints' parameter names, loading from robustbench's cache layout, and the error when a file is missing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tta.data import load_data_config
from tta.models import load_classifier
from tta.models.robustbench import ENV_DIR, CifarResNeXt, WideResNet, checkpoint_path, zoo_entry


def _randomise(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that predictions depend on every buffer."""
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) * 0.4 - 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def standard() -> nn.Module:
    return _randomise(WideResNet(28, 10, 10))  # built once: 36M parameters


def test_architectures_have_robustbenchs_parameters(standard):
    state = standard.state_dict()
    assert len(state) == 155 and sum(p.numel() for p in standard.parameters()) == 36_479_194  # WRN-28-10
    assert state["block1.layer.0.convShortcut.weight"].shape == (160, 16, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in state and state["fc.weight"].shape == (10, 640)
    resnext = CifarResNeXt(29, 4, 32, 100)
    state = resnext.state_dict()
    assert len(state) == 188 and sum(p.numel() for p in resnext.parameters()) == 6_900_132
    assert state["stage_1.0.conv_conv.weight"].shape == (128, 32, 3, 3)  # 4 groups of 32 channels
    assert state["stage_3.0.downsample.0.weight"].shape == (1024, 512, 1, 1)
    assert state["classifier.weight"].shape == (100, 1024)


def test_standard_loads_from_robustbenchs_cache_layout(standard, tmp_path, monkeypatch):
    path = tmp_path / "models" / "cifar10" / "corruptions" / "Standard.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in standard.state_dict().items()}, "epoch": 200}, path)
    monkeypatch.chdir(tmp_path)  # robustbench's default model_dir is ./models
    monkeypatch.delenv(ENV_DIR, raising=False)
    model = load_classifier("robustbench:Standard", num_classes=10).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), standard(x))  # Standard takes [0, 1] images as they are
    info = model.info
    assert info.spec == "robustbench:cifar10/Standard" and info.weights == str(Path("models/cifar10/corruptions/Standard.pt"))
    assert (info.mean, info.std, info.normalization_source) == ((0.0,) * 3, (1.0,) * 3, "weights")
    assert info.input_size == (32, 32) and info.num_classes == 10

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cifar10" / "corruptions").mkdir(parents=True)
    path.rename(elsewhere / "cifar10" / "corruptions" / "Standard.pt")
    monkeypatch.setenv(ENV_DIR, str(elsewhere))
    assert load_classifier("robustbench:Standard").info.weights.startswith(str(elsewhere))


def test_missing_checkpoint_says_where_to_put_it_and_where_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "rb"))
    with pytest.raises(FileNotFoundError) as error:
        load_classifier("robustbench:Standard")
    message = str(error.value)
    assert str(tmp_path / "rb" / "cifar10" / "corruptions" / "Standard.pt") in message
    assert "drive.google.com/uc?id=1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC" in message
    assert "model_weights=" in message and ENV_DIR in message and "nothing is downloaded" in message


def test_augmix_resnext_for_cifar100_with_its_normalisation(tmp_path):
    net = _randomise(CifarResNeXt(29, 4, 32, 100))
    path = checkpoint_path(zoo_entry("cifar100/Hendrycks2020AugMix_ResNeXt"), tmp_path)
    assert path == tmp_path / "cifar100" / "corruptions" / "Hendrycks2020AugMix_ResNeXt.pt"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)  # as published: no mu/sigma, RobustBench's class supplies 0.5 / 0.5
    model = load_classifier("robustbench:Hendrycks2020AugMix_ResNeXt", num_classes=100, model_dir=tmp_path).eval()
    assert model.info.spec == "robustbench:cifar100/Hendrycks2020AugMix_ResNeXt"
    assert model.info.mean == (0.5,) * 3 and model.info.std == (0.5,) * 3
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - 0.5) / 0.5))
    with pytest.raises(ValueError, match="exists for cifar10, cifar100: name the dataset"):
        load_classifier("robustbench:Hendrycks2020AugMix_ResNeXt", model_dir=tmp_path)


def test_normalisation_buffers_in_a_checkpoint_are_used(tmp_path):
    net = _randomise(WideResNet(40, 2, 10))
    state = {**net.state_dict(), "mu": torch.full((1, 3, 1, 1), 0.4), "sigma": torch.full((1, 3, 1, 1), 0.3)}
    path = tmp_path / "augmix_wrn.pt"
    torch.save(state, path)
    model = load_classifier("robustbench:cifar10/Hendrycks2020AugMix_WRN", weights=path).eval()
    assert model.info.mean == pytest.approx((0.4,) * 3) and model.info.std == pytest.approx((0.3,) * 3)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - 0.4) / 0.3))
    torch.save({k: v for k, v in net.state_dict().items() if k != "fc.bias"}, path)
    with pytest.raises(ValueError, match="missing keys .*fc.bias"):
        load_classifier("robustbench:cifar10/Hendrycks2020AugMix_WRN", weights=path)


def test_cifar_c_configs_name_the_standard_models():
    assert load_data_config("cifar10_c")["model"] == load_data_config("cifar10_c_onthefly")["model"] == "robustbench:Standard"
    for name in ("cifar100_c", "cifar100_c_onthefly"):
        assert load_data_config(name)["model"] == "robustbench:cifar100/Hendrycks2020AugMix_ResNeXt"
    with pytest.raises(ValueError, match="unknown model"):
        load_classifier("robustbench:Nope")
