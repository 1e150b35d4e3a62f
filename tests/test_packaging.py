"""A normal (non-editable) install carries the data configs, Hydra configs, weights and textures."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_non_editable_install_finds_its_data(tmp_path):
    # build from a copy: an in-tree build would write build/ into the checkout and could package stale files
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "outputs", "multirun",
                                                                "__pycache__", ".pytest_cache", ".whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    probe = ("import tta, tta.data.configs as c, pathlib;"
             "assert pathlib.Path(tta.__file__).is_relative_to(pathlib.Path(r'%s')), tta.__file__;"
             "assert {'digits_c', 'imagenet_c', 'cifar10_c'} <= set(c.available());"
             "p = pathlib.Path(tta.__file__).parent;"
             "assert (p / 'weights/digits_cnn.safetensors').is_file() and (p / 'conf/config.yaml').is_file();"
             "assert len(list((p / 'data/assets/frost').iterdir())) == 4;"
             "print('ok')") % target
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
