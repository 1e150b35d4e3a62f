"""The classifier wrapper: specs, local weights through the same path, normalisation, presets."""
import pytest
import timm
import torch
from torch import nn

from tta.models import collect_params, configure_model, load_classifier
from tta.models.digits import DigitsCNN


def test_timm_model_round_trips_through_a_local_weights_file(tmp_path):
    net = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "test_resnet.pth"
    torch.save(net.state_dict(), path)
    model = load_classifier("timm:test_resnet", num_classes=10, weights=path)
    assert model.info.weights == str(path)
    model.eval()
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    expected = net((x - torch.tensor(model.info.mean).view(1, 3, 1, 1)) / torch.tensor(model.info.std).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), expected)


def test_weights_for_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "digits.pth"
    torch.save(DigitsCNN().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        load_classifier("timm:test_resnet", weights=path)


def test_head_is_resized_with_a_warning_and_recorded():
    with pytest.warns(UserWarning, match="resized to 7 classes"):
        model = load_classifier("timm:test_vit", pretrained=False, num_classes=7)
    assert model.num_classes == 7
    assert any("resized" in note for note in model.info.notes)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)  # ViT input is resized to its size


def test_pretrained_auto_falls_back_loudly_offline_and_true_raises():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = load_classifier("timm:test_resnet")
    assert model.info.weights == "random"
    with pytest.raises(RuntimeError, match="could not load pretrained"):
        load_classifier("timm:test_resnet", pretrained=True)


def test_torchvision_spec_and_imagenet_normalisation_override():
    model = load_classifier("torchvision:resnet18", num_classes=10)
    assert model.info.source == "torchvision" and model.info.weights == "random"
    vit = load_classifier("timm:test_vit", pretrained=False, normalization="imagenet")
    assert vit.info.mean == (0.485, 0.456, 0.406)


def test_digits_model_and_features():
    model = load_classifier("digits_cnn").eval()
    x = torch.rand(3, 3, 32, 32)
    assert model.features(x).shape == (3, 64)
    assert model(x).shape == (3, 10)


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model spec"):
        load_classifier("resnet50")


@pytest.mark.parametrize("preset,expected", [("bn", 10), ("norm", 10), ("all", 17)])
def test_presets_on_a_cnn(preset, expected):
    net = load_classifier("digits_cnn").net
    assert len(collect_params(net, preset)) == expected  # 5 conv, 5 BN (weight+bias), fc


def test_sar_preset_excludes_last_blocks_and_final_norm():
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=12)
    names = [n for n, _ in collect_params(net, "sar")]
    assert len(names) == 36  # norm1/norm2 of blocks 0-8
    assert not any(n.startswith(("blocks.9", "blocks.10", "blocks.11", "norm.")) for n in names)


def test_configure_model_freezes_everything_else_and_uses_batch_statistics():
    net = load_classifier("digits_cnn").net
    params = configure_model(net, "bn")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in params}
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.running_mean is None and not m.track_running_stats for m in bns)
