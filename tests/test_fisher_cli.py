"""EATA's Fisher on the command line: clean images from the data config (data.clean_root / the on-the-fly
root), a clear error when they are missing, and ``method.fisher_path`` computed once and then loaded.

Tiny folders from data_fixtures; one Hydra process per CLI test (threads pinned to one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import WNIDS, make_cifar_npy, make_imagenet_c, make_imagenet_val

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model=timm:test_resnet", "model_pretrained=false", f"data.classes=[{','.join(WNIDS)}]",
         "data.corruptions=[gaussian_noise]", "data.crop=64", "data.num_workers=0", "max_samples=8",
         "source_accuracy=false", "method=eata", "method.fisher_size=8", "batch_size=4"]


def run_cli(args: list[str], out: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "tta.run", *args, "progress=false", f"hydra.run.dir={out}",
               f"hydra.sweep.dir={out}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"CLI failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def eata_record(path: Path) -> dict:
    record = json.loads(path.read_text())
    assert record["method"]["method"] == "eata"
    return record["method"]


@pytest.mark.slow
def test_onthefly_imagenet_c_fisher_from_the_clean_root(tmp_path):
    root = make_imagenet_val(tmp_path / "imagenet", per_class=4, nested=False)  # 12 clean images
    run_cli(["data=imagenet_c_onthefly", f"data.root={root}", "data.resize=72", *MODEL], tmp_path / "run")
    hp = eata_record(tmp_path / "run" / "run.json")
    assert hp["source"] == "data" and hp["num_samples"] == 8 and hp["num_batches"] == 2, hp
    assert hp["fisher_size"] == 8 and hp["fisher_tensors"] > 0 and "saved_to" not in hp


@pytest.mark.slow
def test_released_imagenet_c_fisher_path_is_computed_once_then_loaded(tmp_path):
    """A sweep with one method.fisher_path: the first run estimates the Fisher from data.clean_root and
    saves it there, the second loads that file (and does not need to read the clean images)."""
    root = make_imagenet_c(tmp_path / "imagenet-c", corruptions=["gaussian_noise"], severities=(5,))
    clean = make_imagenet_val(tmp_path / "imagenet", per_class=4)  # <clean>/val/<wnid>/*
    fisher = tmp_path / "fishers" / "resnet.pt"
    run_cli(["-m", "data=imagenet_c", f"data.root={root}", f"data.clean_root={clean}", *MODEL,
             f"method.fisher_path={fisher}", "seed=0,1"], tmp_path / "sweep")
    first, second = (eata_record(tmp_path / "sweep" / str(k) / "run.json") for k in (0, 1))
    assert first["source"] == "data" and first["num_samples"] == 8 and first["saved_to"] == str(fisher), first
    assert fisher.is_file() and not list(fisher.parent.glob(".*partial"))
    assert second["source"] == "file" and second["path"] == str(fisher) and second["num_samples"] == 8, second
    # an existing file is used as it is: no clean images needed any more
    run_cli(["data=imagenet_c", f"data.root={root}", *MODEL, f"method.fisher_path={fisher}"], tmp_path / "again")
    assert eata_record(tmp_path / "again" / "run.json")["source"] == "file"


def test_missing_clean_folder_is_a_clear_error(tmp_path):
    root = make_imagenet_c(tmp_path / "imagenet-c", corruptions=["gaussian_noise"], severities=(5,))
    missing = tmp_path / "no-imagenet"
    result = run_cli(["data=imagenet_c", f"data.root={root}", f"data.clean_root={missing}", *MODEL], tmp_path / "run",
                     check=False)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "data.clean_root" in result.stderr, result.stderr[-3000:]
    assert "method.fisher_path" in result.stderr and "<wnid>" in result.stderr


# ------------------------------------------------------------------ in process (no Hydra)


def _imagenet_config(kind: str, **keys) -> dict:
    from tta.data import load_data_config

    return {**load_data_config(kind), "classes": list(WNIDS), "corruptions": ["gaussian_noise"], "num_workers": 0,
            **keys}


def test_clean_data_is_a_seeded_sample_of_the_clean_images(tmp_path):
    from tta.data import clean_data_for

    root = make_imagenet_val(tmp_path / "imagenet", per_class=4)
    config = _imagenet_config("imagenet_c_onthefly", root=str(root))

    def ids(seed):
        stream = clean_data_for(config, num_samples=5, seed=seed, batch_size=2)
        batches = list(stream)
        assert [b.images.shape[0] for b in batches] == [2, 2, 1]
        assert all(b.images.shape[1:] == (3, 224, 224) and 0 <= b.images.min() and b.images.max() <= 1
                   for b in batches)  # Resize(256) -> CenterCrop(224), in [0, 1]
        return torch.cat([b.ids for b in batches]).tolist()

    assert ids(0) == ids(0) and ids(0) != ids(1) and len(set(ids(0))) == 5

    # CIFAR: the on-the-fly root, or the released config's clean_root
    clean = make_cifar_npy(tmp_path / "cifar10", n=12)
    for name, keys in (("cifar10_c_onthefly", {"root": str(clean)}), ("cifar10_c", {"clean_root": str(clean)})):
        from tta.data import load_data_config

        batches = list(clean_data_for({**load_data_config(name), **keys}, num_samples=8, seed=0, batch_size=4))
        assert [tuple(b.images.shape) for b in batches] == [(4, 3, 32, 32)] * 2, name


def test_digits_clean_split_is_one_seeded_shuffled_tensor():
    from tta.data import clean_data_for, load_data_config
    from tta.data.digits import load_digits_split

    config = load_data_config("digits_c")
    train, _ = load_digits_split(config["fisher_split"])
    a = clean_data_for(config, num_samples=100, seed=3)
    assert isinstance(a, torch.Tensor) and a.shape == (100, 3, 32, 32)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))  # EATA's shuffle
    assert torch.equal(a, train[order[:100]])
    assert torch.equal(a, clean_data_for(config, num_samples=100, seed=3))
    assert not torch.equal(a, clean_data_for(config, num_samples=100, seed=4))
    with pytest.raises(ValueError, match="fisher_split is only implemented for digits_c.*fisher_path"):
        clean_data_for({**config, "kind": "image_folder"}, num_samples=8, seed=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        clean_data_for(config, num_samples=0, seed=0)


def test_no_clean_images_names_the_keys_and_the_hint():
    from tta.data import clean_data_for

    config = _imagenet_config("imagenet_c", root="/nowhere")
    with pytest.raises(FileNotFoundError, match=r"data\.clean_root.*method\.fisher_path"):
        clean_data_for(config, num_samples=8, seed=0)
    with pytest.raises(FileNotFoundError, match=r"data\.clean_root.*; use file F"):
        clean_data_for(config, num_samples=8, seed=0, hint="use file F")
    assert clean_data_for(config, num_samples=8, seed=0, required=False) is None
    folder = {"name": "imagenet_r", "kind": "image_folder", "root": "/nowhere"}
    assert clean_data_for(folder, num_samples=8, seed=0, required=False) is None
    with pytest.raises(ValueError, match="no clean images known for data kind 'image_folder'.*fisher_path"):
        clean_data_for(folder, num_samples=8, seed=0)


@pytest.mark.filterwarnings("ignore:classifier head")
def test_eata_fisher_path_round_trip_in_python(tmp_path):
    from tta import methods
    from tta.models.classifier import load_classifier

    path = tmp_path / "sub" / "fisher.pt"
    data = torch.rand(8, 3, 32, 32)
    make = lambda **kw: methods.build("eata", load_classifier("timm:test_resnet", num_classes=3, pretrained=False),
                                      num_classes=3, batch_size=4, fisher_path=str(path), **kw)
    first = make(fisher_data=data)
    assert not path.exists()  # estimated lazily (at the first forward), then saved
    first.adapt(torch.rand(4, 3, 32, 32))
    assert path.is_file() and first.hparams()["saved_to"] == str(path) and first.hparams()["source"] == "data"
    second = make(fisher_data=torch.zeros(8, 3, 32, 32))  # an existing file wins over the data
    assert second.hparams()["source"] == "file"
    for f, g in zip(second.fisher.fisher(), first.fisher.fisher()):
        torch.testing.assert_close(f, g)
    with pytest.raises(FileNotFoundError, match="not found"):
        methods.build("eata", load_classifier("timm:test_resnet", num_classes=3, pretrained=False), num_classes=3,
                      fisher_path=str(tmp_path / "missing.pt"))
