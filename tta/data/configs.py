"""Data configs: one YAML per dataset in ``data_configs/`` (roots, classes, corruptions, defaults).

Found next to the package in a source checkout and inside it (``tta.data_configs``) after a normal
install, so ``python -m tta.run data=<name>`` works either way.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml


def config_dir() -> Path:
    """The folder holding the data configs."""
    return Path(str(resources.files("tta.data_configs")))


def available() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def load_data_config(name: str) -> dict[str, Any]:
    """The data config called ``name`` (a file stem in ``data_configs/``) or at a path."""
    path = Path(name)
    if not path.suffix:
        path = config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no data config {name!r} (looked for {path}); available: {', '.join(available())}")
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    config.setdefault("name", path.stem)
    return config
