"""Benchmark protocols: the reference code's hyperparameters per benchmark, resolved with their origin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tta import protocols
from tta.data import load_data_config
from tta.run import method_defaults

from data_fixtures import make_cifar_npy

REPO = Path(__file__).resolve().parents[1]


def resolved(method: str, data: str, num_classes: int = 10, given: dict | None = None, **cfg):
    """What ``tta.run`` resolves for ``method`` on the data config ``data`` (no data is read)."""
    config = {"protocol": None, "batch_size": None, "setting": {"batch_size": None}, **cfg}
    defaults = method_defaults(method)
    method_cfg = {**defaults, **(given or {})}
    overrides = [f"method.{k}={v}" for k, v in (given or {}).items()]
    return protocols.for_run(config, load_data_config(data), method, method_cfg, defaults, num_classes, overrides)


@pytest.mark.parametrize("data", ["cifar10_c", "cifar10_c_onthefly"])
def test_cifar10_configs_resolve_to_adam_1e3_batch_200(data):
    kwargs, stream_data, record = resolved("tent", data)
    assert kwargs["optimizer"] == "adam" and kwargs["lr"] == 1e-3 and kwargs["weight_decay"] == 0.0
    assert stream_data["batch_size"] == 200
    assert record["name"] == "cifar" and record["chosen_by"] == "data config"
    assert record["origins"]["optimizer"] == record["origins"]["lr"] == "protocol"
    assert record["origins"]["batch_size"] == "protocol"
    assert record["origins"]["params"] == "method default"
    assert record["sources"]["lr"] == "tent-cifar" and "DequanWang/tent@e9e926a" in record["references"]["tent-cifar"]


def test_cifar_eata_margins_follow_the_class_count():
    kwargs10, _, _ = resolved("eata", "cifar10_c", num_classes=10)
    kwargs100, _, _ = resolved("eata", "cifar100_c", num_classes=100)
    assert (kwargs10["d_margin"], kwargs100["d_margin"]) == (0.4, 0.1)
    for kwargs in (kwargs10, kwargs100):
        assert kwargs["fisher_alpha"] == 1.0 and kwargs["e_margin"] == 0.4 and kwargs["fisher_size"] == 2000
        assert kwargs["optimizer"] == "adam" and kwargs["lr"] == 1e-3
    eta, _, _ = resolved("eta", "cifar10_c")
    assert eta["d_margin"] == 0.4 and "fisher_alpha" not in eta
    sar, _, _ = resolved("sar", "cifar10_c")  # the reference's SAR is SAM over SGD whatever OPTIM.METHOD says
    assert (sar["optimizer"], sar["lr"], sar["momentum"]) == ("sgd", 1e-3, 0.9)


def test_imagenet_c_stays_as_today():
    """Under the imagenet protocol every method is built exactly as with its own defaults (the ImageNet values)."""
    import torch

    from tta import methods
    from tta.models import load_classifier
    from tta.models.digits import DigitsCNN

    model = load_classifier(DigitsCNN(num_classes=1000), mean=(0.5,) * 3, std=(0.5,) * 3)
    clean = {"fisher_data": torch.rand(4, 3, 32, 32)}
    for method in ("source", "norm", "tent", "eta", "eata", "eata_c", "sar", "deyo", "crowds"):
        kwargs, stream_data, record = resolved(method, "imagenet_c", num_classes=1000)
        assert stream_data["batch_size"] == 64 and record["name"] == "imagenet" and record["warnings"] == []
        inputs = clean if method in ("eata", "eata_c") else {}
        today = methods.build(method, model, **inputs).hparams()
        assert methods.build(method, model, **kwargs, **inputs).hparams() == today, method
    _, _, record = resolved("eata", "imagenet_c", num_classes=1000)
    assert record["origins"]["d_margin"] == "protocol" and record["sources"]["d_margin"] == "eata-main"
    assert record["origins"]["lr"] == "protocol" and record["resolved"]["lr"] is None  # the SAR/DeYO rule


def test_command_line_beats_protocol_beats_default():
    kwargs, _, record = resolved("eata", "cifar10_c", given={"lr": 0.01, "d_margin": 0.05})
    assert kwargs["lr"] == 0.01 and kwargs["d_margin"] == 0.05 and kwargs["optimizer"] == "adam"
    assert record["origins"]["lr"] == record["origins"]["d_margin"] == "command line"
    assert record["origins"]["optimizer"] == "protocol" and record["origins"]["fisher_strict"] == "method default"
    # protocol= on the command line overrides the data config's
    kwargs, data, record = resolved("tent", "cifar10_c", protocol="imagenet")
    assert kwargs["optimizer"] == "sgd" and data["batch_size"] == 64 and record["chosen_by"] == "command line"
    kwargs, data, record = resolved("tent", "cifar10_c", protocol="none")
    assert kwargs == method_defaults("tent") and record["name"] is None and record["origins"]["batch_size"] == "data config"


def test_batch_size_order():
    _, data, record = resolved("tent", "digits_c", batch_size=32)
    assert record["origins"]["batch_size"] == "command line" and data["batch_size"] == 64  # the stream takes 32
    _, data, record = resolved("tent", "digits_c", setting={"batch_size": 1})
    assert record["origins"]["batch_size"] == "setting"
    _, data, record = resolved("tent", "digits_c")
    assert record["origins"]["batch_size"] == "protocol" and data["batch_size"] == 200
    config = {"protocol": None, "batch_size": None, "setting": {"batch_size": None}}
    _, data, record = protocols.for_run(config, load_data_config("digits_c"), "tent", method_defaults("tent"),
                                        method_defaults("tent"), 10, ["data.batch_size=16"])
    assert record["origins"]["batch_size"] == "command line" and data["batch_size"] == 64  # as loaded; Hydra sets 16


def test_resolver_is_pure_and_checks_its_table():
    defaults = {"lr": None, "optimizer": "sgd", "d_margin": 0.05, "other": 1}
    kwargs, origins = protocols.resolve("eta", "cifar", 100, {**defaults, "e_margin": 0.4, "weight_decay": 0.0,
                                                              "steps": 1}, {"other": 2})
    assert kwargs["d_margin"] == 0.1 and origins["other"] == "command line" and kwargs["other"] == 2
    assert defaults["d_margin"] == 0.05  # not mutated
    with pytest.raises(ValueError, match="for 10, 100 classes only.*pass method.d_margin"):
        protocols.resolve("eta", "cifar", 1000, method_defaults("eta"), {})
    kwargs, origins = protocols.resolve("eta", "cifar", 1000, method_defaults("eta"), {"d_margin": 0.02})
    assert kwargs["d_margin"] == 0.02 and origins["d_margin"] == "command line"
    with pytest.raises(ValueError, match="takes no hyperparameter 'lr'"):
        protocols.resolve("tent", "cifar", 10, {"optimizer": "sgd"}, {})
    with pytest.raises(ValueError, match="unknown protocol 'cifar10'.*cifar, imagenet"):
        protocols.resolve("tent", "cifar10", 10, method_defaults("tent"), {})


def test_every_table_entry_is_a_hyperparameter_of_its_method_with_a_source():
    from tta import methods

    for proto in protocols.PROTOCOLS.values():
        assert proto.batch_size.source in protocols.SOURCES
        for method, entries in proto.methods.items():
            assert method in methods.available(), method
            defaults = method_defaults(method)
            for key, entry in entries.items():
                assert key in defaults, (proto.name, method, key)
                assert entry.source in protocols.SOURCES, (proto.name, method, key)


def test_hydra_overrides_name_the_given_keys():
    got = protocols.given_from_overrides(["method=eata", "method.lr=0.01", "+method.d_margin=0.3",
                                          "~method.steps", "seed=1", "data.batch_size=8", "method.policy.x=1"])
    assert got == {"lr": "0.01", "d_margin": "0.3", "policy": "1"}


def test_adapt_warns_once_about_a_1000_class_margin_on_10_classes():
    import tta
    from tta.models.digits import DigitsCNN

    norm = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.warns(UserWarning, match="d_margin comes from the method default, tuned for 1000 classes"):
        method = tta.adapt(DigitsCNN(), "eta", **norm)
    assert method.d_margin == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = tta.adapt(DigitsCNN(), "eta", protocol="cifar", **norm)
        assert (method.d_margin, method.optimizer_name, method.lr) == (0.4, "adam", 1e-3)
        tta.adapt(DigitsCNN(), "eta", d_margin=0.3, **norm)
        tta.adapt(DigitsCNN(), "tent", **norm)
    with pytest.warns(UserWarning) as caught:
        tta.adapt(DigitsCNN(), "eata", fisher_alpha=0.0, **norm)
    assert len([w for w in caught if "d_margin" in str(w.message)]) == 1


@pytest.mark.slow
def test_cli_records_protocol_and_origins_on_a_tiny_cifar(tmp_path):
    root = make_cifar_npy(tmp_path / "cifar10", n=8)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "tta.run", "data=cifar10_c_onthefly", f"data.root={root}", "model=digits_cnn",
           "method=eta", "method.e_margin=0.5", "data.corruptions=[gaussian_noise]", "progress=false",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["protocol"]["name"] == "cifar" and record["protocol"]["chosen_by"] == "data config"
    origins = record["protocol"]["origins"]
    assert origins["lr"] == origins["optimizer"] == origins["d_margin"] == origins["batch_size"] == "protocol"
    assert origins["e_margin"] == "command line" and origins["params"] == "method default"
    assert record["method"]["optimizer"]["name"] == "adam" and record["method"]["optimizer"]["lr"] == 1e-3
    assert record["method"]["d_margin"] == 0.4 and record["method"]["e_margin"] == 0.5
    assert record["stream"]["batch_size"] == 200
