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
    """Assemble ``run.json`` from the parts of a run (see docs/design.md, "Reproducible")."""
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


def failed_record(*, config: dict[str, Any], error: BaseException, wall_time_s: float,
                  checkpoint: bool = False) -> dict[str, Any]:
    """``run.json`` of a run that failed: ``"status": "failed"``, the error's type and message, the
    configuration and versions (``tta.report`` lists it among the runs that did not finish).
    ``checkpoint``: a checkpoint is left in the folder (``resume=true`` continues from it)."""
    import traceback

    return {
        "status": "failed",
        "error": {"type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))[-20000:]},
        "config": config,
        "versions": library_versions(),
        "wall_time_s": wall_time_s,
        "checkpoint_left": bool(checkpoint),
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON atomically (a temporary file, then a rename): a reader never sees
    half a record, and a run killed while writing leaves the previous file."""
    import os

    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
