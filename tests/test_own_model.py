"""Your own model on the command line and in Python: ``py:`` specs, pickled modules only by opt-in,
stated or loudly guessed normalisation, any input channel count, the spec registry."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import tta
from tta.models import available_specs, load_classifier
from tta.models.checkpoints import PickleRequired
from tta.models.classifier import IMAGENET_MEAN, IMAGENET_STD, stated_normalization
from tta.models.digits import WEIGHTS_FILE

REPO = Path(__file__).resolve().parents[1]

# A user's own class in a file of their own: the digits-C layout, so that the shipped weights fit it.
MYNET = '''
import torch.nn as nn


def block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MyNet(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.features = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w),
                                      *block(2 * w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def build():
    return MyNet()


def not_a_model():
    return 42
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory holding mynet.py and mynet.pt (the shipped digits weights as a state dict)."""
    (tmp_path / "mynet.py").write_text(MYNET)
    torch.save(load_file(str(WEIGHTS_FILE)), tmp_path / "mynet.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    yield tmp_path
    sys.modules.pop("mynet", None)


def _grey_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))


# ------------------------------------------------------------------------------------------ py: specs
def test_py_spec_builds_the_users_class_with_its_state_dict(user_dir):
    model = load_classifier("py:mynet:build", weights=user_dir / "mynet.pt", normalization="half").eval()
    reference = load_classifier("digits_cnn").eval()
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))
    info = model.info
    assert (info.spec, info.source, info.weights) == ("py:mynet:build", "python", str(user_dir / "mynet.pt"))
    assert info.normalization_source == "given" and info.mean == (0.5, 0.5, 0.5) and info.input_channels == 3


def test_py_spec_errors_say_what_is_wrong(user_dir):
    with pytest.raises(ValueError, match="no module 'nothere'"):
        load_classifier("py:nothere:build")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_classifier("py:mynet:missing")
    with pytest.raises(TypeError, match="returned a int"):
        load_classifier("py:mynet:not_a_model")
    with pytest.raises(ValueError, match="py:<module>:<factory>"):
        load_classifier("py:mynet")


@pytest.mark.slow
def test_cli_runs_a_users_class_like_the_builtin_model(user_dir):
    """One Hydra multirun: the shipped digits model and the user's class with the same weights, given the
    digits normalisation in the README's list form, give the same numbers on digits-C."""
    sweep = user_dir / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tta.run", "-m", "model=digits_cnn,py:mynet:build", "model_weights=mynet.pt",
           "normalization=[[0.5],[0.5]]", "data.corruptions=[gaussian_noise]", "max_samples=96", "progress=false",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=user_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["model"]["spec"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/run.json"))}
    assert set(records) == {"digits_cnn", "py:mynet:build"}
    mine, builtin = records["py:mynet:build"], records["digits_cnn"]
    assert mine["model"]["source"] == "python" and mine["model"]["weights"] == "mynet.pt"
    assert mine["model"]["normalization_source"] == "given" and mine["model"]["mean"] == [0.5, 0.5, 0.5]
    assert mine["results"] == builtin["results"]
    assert mine["results"]["mean"]["accuracy"] > 0.5  # the shipped weights, adapted: far above chance


# ------------------------------------------------------------------------------------ pickled modules
def test_a_pickled_module_needs_the_opt_in(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(ValueError, match="model_allow_pickle=true") as error:
        load_classifier(str(path))
    assert "model_weights=" in str(error.value) and "py:" in str(error.value)
    with pytest.warns(UserWarning, match="ImageNet statistics"):
        model = load_classifier(str(path), allow_pickle=True)
    x = torch.rand(2, 3, 8, 8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), net((x - mean) / std))
    assert model.info.source == "file" and model.info.normalization_source == "guessed"

    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)
    with pytest.raises(ValueError, match="holds a state dict"):
        load_classifier(str(state))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_classifier(str(tmp_path / "typo.pt"))


def test_weights_that_need_unpickling_are_refused_without_the_opt_in(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": load_file(str(WEIGHTS_FILE)), "args": _Args()}, path)
    with pytest.raises(PickleRequired, match="allow_pickle"):
        load_classifier("digits_cnn", weights=path)
    model = load_classifier("digits_cnn", weights=path, allow_pickle=True)
    assert model.info.weights == str(path)


class _Args:  # an arbitrary object saved next to the weights, as training scripts do
    lr = 0.1


# ------------------------------------------------------------------------------------- normalisation
def test_adapt_without_mean_and_std_warns_once_and_records_a_guess():
    net = _rgb_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = tta.adapt(net)
    guesses = [w for w in caught if "ImageNet statistics" in str(w.message)]
    assert len(guesses) == 1
    info = adapted.model.info
    assert info.normalization_source == "guessed" and info.mean == IMAGENET_MEAN and info.std == IMAGENET_STD


def test_adapt_with_stated_statistics_is_quiet_and_recorded_as_given():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = tta.adapt(_rgb_net(), mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])
    assert adapted.model.info.normalization_source == "given" and adapted.model.info.mean == (0.4, 0.4, 0.4)


@pytest.mark.parametrize("kwargs", [{"mean": [0.5, 0.5, 0.5]}, {"std": [0.5, 0.5, 0.5]}])
def test_mean_without_std_is_an_error(kwargs):
    with pytest.raises(ValueError, match="both mean and std"):
        tta.adapt(_rgb_net(), **kwargs)


def test_normalisation_sources_of_the_builtin_specs():
    assert load_classifier("digits_cnn").info.normalization_source == "weights"
    timm_net = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a timm module states its config: no guess, no warning
        model = load_classifier(timm_net)
    assert model.info.normalization_source == "model_config"
    assert model.info.mean == tuple(timm_net.pretrained_cfg["mean"])


def test_normalization_forms():
    assert stated_normalization("weights") is None
    assert stated_normalization("imagenet")[:2] == (IMAGENET_MEAN, IMAGENET_STD)
    assert stated_normalization([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), True)
    assert stated_normalization({"mean": [0.3], "std": [0.2]}) == ((0.3,), (0.2,), True)
    with pytest.raises(ValueError, match="unknown normalization"):
        stated_normalization("cifar")
    with pytest.raises(ValueError, match="mean has 3 values but std has 1"):
        stated_normalization([[0.1, 0.2, 0.3], [0.4]])
    with pytest.raises(ValueError, match="std must be positive"):
        stated_normalization([[0.1], [0.0]])
    with pytest.raises(ValueError, match="either mean/std or normalization"):
        stated_normalization("half", [0.5], [0.5])


# --------------------------------------------------------------------------------------- channels
def test_input_channels_from_the_first_conv_and_greyscale_adaptation():
    net = _grey_net()
    adapted = tta.adapt(net, mean=[0.5], std=[0.25])
    assert adapted.model.input_channels == 1 and adapted.model.info.input_channels == 1
    before = [p.detach().clone() for p in adapted.model.net[1].parameters()]
    logits = adapted(torch.rand(8, 1, 16, 16))
    assert logits.shape == (8, 5)
    assert any(not torch.equal(b, p) for b, p in zip(before, adapted.model.net[1].parameters()))  # Tent stepped
    with pytest.raises(ValueError, match="expected 1 channels"):
        adapted(torch.rand(8, 3, 16, 16))


def test_channel_errors_and_named_normalisations_on_greyscale():
    with pytest.warns(UserWarning, match="input_channels=2 is used, but the first convolution"):
        stated = load_classifier(_grey_net(), mean=[0.5], std=[0.5], input_channels=2)
    assert stated.input_channels == 2 and stated.info.mean == (0.5, 0.5)
    with pytest.raises(ValueError, match="3 values but the model takes 1 channels"):
        load_classifier(_grey_net(), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    model = load_classifier(_grey_net(), normalization="imagenet")
    assert model.info.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and model.mean.shape == (1, 1, 1, 1)
    assert any("averaged over the channels" in n for n in model.info.notes)
    mlp = load_classifier(nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), mean=[0.5, 0.5], std=[0.5, 0.5])
    assert mlp.input_channels == 2 and any("no Conv2d" in n for n in mlp.info.notes)


# --------------------------------------------------------------------------------------- registry
def test_registry_lists_every_form_and_classifier_imports_no_loader():
    with pytest.raises(ValueError, match="unknown model spec 'resnet50'") as error:
        load_classifier("resnet50")
    for form in ("digits_cnn", "timm:", "torchvision:", "clip:", "py:", "robustbench:", "model_allow_pickle"):
        assert form in str(error.value)
        assert any(form in line for line in available_specs())
    source = (REPO / "tta" / "models" / "classifier.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"clip", "digits", "custom", "robustbench", "hubs"}, imported


def _rgb_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))


GREYNET = '''
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))
'''


@pytest.mark.slow
def test_cli_runs_a_greyscale_model_on_rgb_data_and_records_the_conversion(tmp_path):
    """A 1-channel model end to end on digits-C (RGB): the stream converts to luma after the corruption and
    run.json says so; the model's input channels come from its first convolution."""
    (tmp_path / "greynet.py").write_text(GREYNET)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tta.run", "model=py:greynet:build", "normalization=[[0.5],[0.5]]",
           "data.corruptions=[gaussian_noise]", "max_samples=64", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["input_channels"] == 1
    channels = record["stream"]["channels"]
    assert channels["model"] == 1
    assert channels["conversions"]["gaussian_noise/5"]["from"] == 3 and "luma" in channels["conversions"][
        "gaussian_noise/5"]["method"]
    assert record["results"]["domains"]["gaussian_noise/5"]["n"] == 64
