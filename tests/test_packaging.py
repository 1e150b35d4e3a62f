"""A normal (non-editable) install carries the data configs, Hydra configs, weights and textures."""
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: what a build reads: the package's sources and data, and the files that describe it
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "tta", "data_configs")


def test_every_package_directory_is_declared():
    """Each folder of ``tta/`` holding Python modules is a package listed in ``setup.cfg`` (a folder
    missing from ``packages`` is silently left out of a non-editable install)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    declared = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tta").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    found.add("tta.data_configs")  # package_dir maps it to data_configs/
    assert found == declared


@pytest.mark.slow
def test_non_editable_install_finds_its_data(tmp_path):
    # build from a copy of what a build reads (an in-tree build would write build/ into the checkout;
    # copying the whole checkout would copy a virtual environment kept inside it, gigabytes)
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    probe = ("import tta, tta.data.configs as c, pathlib;"
             "assert pathlib.Path(tta.__file__).is_relative_to(pathlib.Path(r'%s')), tta.__file__;"
             "assert {'digits_c', 'imagenet_c', 'cifar10_c'} <= set(c.available());"
             "p = pathlib.Path(tta.__file__).parent;"
             "assert (p / 'weights/digits_cnn.safetensors').is_file() and (p / 'conf/config.yaml').is_file();"
             "assert len(list((p / 'data/assets/frost').iterdir())) == 4;"
             "import tta.data.ccc.setting as ccc;"
             "assert ccc.SHIPPED_CALIBRATIONS['digits_cnn'].is_file();"
             "print('ok')") % target
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
