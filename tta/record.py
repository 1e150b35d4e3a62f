"""The run record (``run.json``): what ran, on what, in which order, and what came out."""
from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("tta-toolkit", "torch", "torchvision", "timm", "open_clip_torch", "diffusers", "transformers",
             "hydra-core", "numpy")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def build_record(*, config: dict[str, Any], model_info: dict[str, Any], method_hparams: dict[str, Any],
                 stream_info: dict[str, Any], outcome: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Assemble ``run.json`` from the parts of a run (see DESIGN.md, "Reproducible")."""
    return {
        "config": config,
        "versions": library_versions(),
        "device": {"type": device.type, "name": device_name(device)},
        "model": model_info,
        "method": method_hparams,
        "stream": {**stream_info, "order_hash": outcome["order_hash"]},
        "counts": outcome["stats"],
        "wall_time_s": outcome["wall_time_s"],
        "peak_memory_mb": outcome["peak_memory_mb"],
        "results": outcome["results"],
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
