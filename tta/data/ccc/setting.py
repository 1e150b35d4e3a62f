"""The ``ccc`` setting: a CCC-style stream generated on the fly from clean images.

``setting=ccc`` (``ccc.difficulty``, ``ccc.speed``, ``ccc.max_samples``, ``ccc.calibration``,
``seed``) builds the stream of Press et al. (NeurIPS 2023; oripress/CCC @ 656dec3): the walks of
every ordered corruption pair on the calibration matrix, the pair sequence of the seed, ``speed``
images per grid point (:mod:`.schedule`), each image made by :func:`.compose.compose`. The images
are drawn from a clean source: ``data.clean_root`` (an image folder, labels = sorted class folders
as the reference's ``sorted(os.listdir(valdir))``, generate.py line 389), else the benchmark's clean
images (digits-C's held-out split). Within a step the images are distinct, as the reference's
``np.random.shuffle(all_paths)[:speed]`` (lines 380-388); across steps the draws are independent.

The stream is one segment scored as the domain ``ccc`` (accuracy over the whole stream is the
headline, eval.py lines 37-58); each step is one part of the stream, so a batch may span two steps
(the reference's batches of 64 run across its steps of 1,000 images, too). The record keeps the
schedule compactly (``[n1, s1, n2, s2, count]`` per step), the calibration's provenance (``ccc``
with the reference's file, else ``ccc-like``), the walk target and whether the stream was cut
short of the reference's 7,500,000 images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..stream import Domain, Segment
from .calibration import Calibration, load_calibration, target_for
from .compose import CROP_SCALE, compose
from .schedule import (DEFAULT_MAX_SAMPLES, DEFAULT_SPEED, DIFFICULTIES, Step, compact, corruption_names, find_walk,
                       schedule)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_CALIBRATIONS = {"digits_cnn": ASSETS / "ccc_digits_cnn.npz"}
DEFAULT_WINDOW = 781  # batches of the running-window curves (maintainer, oripress/CCC#10: ~50k images at batch 64)


def options_with_defaults(options: dict[str, Any], data_config: dict[str, Any]) -> dict[str, Any]:
    """The setting's options: given values, else the data config's ``ccc`` block, else the reference's."""
    own = dict(data_config.get("ccc") or {})
    out = dict(options)
    for key, default in (("speed", DEFAULT_SPEED), ("max_samples", DEFAULT_MAX_SAMPLES), ("calibration", None),
                         ("window", DEFAULT_WINDOW), ("difficulty", "medium"), ("flip", True),
                         ("crop_scale", list(CROP_SCALE))):
        if out.get(key) is None:
            out[key] = own.get(key, default)
    return out


def check_options(options: dict[str, Any]) -> None:
    errors = []
    if options["difficulty"] not in DIFFICULTIES:
        errors.append(f"ccc.difficulty must be one of {', '.join(DIFFICULTIES)}, got {options['difficulty']!r}")
    for key in ("speed", "max_samples", "window"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
            errors.append(f"ccc.{key} must be an integer >= 1, got {value!r}")
    if not isinstance(options["flip"], bool):
        errors.append(f"ccc.flip must be true or false, got {options['flip']!r}")
    scale = options["crop_scale"]
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and 0 < float(scale[0]) <= float(scale[1]) <= 1):
        errors.append(f"ccc.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    if not options.get("calibration"):
        errors.append("ccc.calibration is needed: the reference's ccc_accuracy_matrix.pickle, or a .npz/.json made by "
                      "scripts/calibrate_ccc.py for your model and clean images")
    if errors:
        raise ValueError("invalid ccc option" + ("s" if len(errors) > 1 else "") + ": " + "; ".join(errors))


def resolve_calibration(value: str) -> Calibration:
    """A shipped calibration's name (``digits_cnn``) or a path."""
    if value in SHIPPED_CALIBRATIONS:
        calibration = load_calibration(SHIPPED_CALIBRATIONS[value])
        calibration.path = f"shipped:{value}"
        return calibration
    return load_calibration(os.path.expandvars(str(value)))


def walks_for(calibration: Calibration, names: list[str], target: float) -> dict[tuple[str, str], list]:
    return {(a, b): find_walk(calibration.matrix(a, b), target) for a in names for b in names if a != b}


def plan_ccc(clean: Domain, options: dict[str, Any], *, seed: int) -> tuple[list[Domain], list[Segment], dict]:
    """Parts (one per step), the one segment ``ccc`` and the record entry of a CCC stream
    (``options`` completed by :func:`options_with_defaults`)."""
    check_options(options)
    calibration = resolve_calibration(str(options["calibration"]))
    names = corruption_names(options["difficulty"])
    target, target_rule = target_for(options["difficulty"], calibration, target=options.get("target"))
    walks = walks_for(calibration, names, target)
    steps = schedule(walks, names, seed=seed, speed=int(options["speed"]), max_samples=int(options["max_samples"]),
                     grid_step=calibration.step)
    source = clean.source
    n = len(source)
    if int(options["speed"]) > n:
        raise ValueError(f"ccc.speed={options['speed']} images per step, but the clean source has only {n} images "
                         f"(the images of a step are distinct): choose ccc.speed <= {n}")
    parts, part_of, index_of = [], [], []
    for k, step in enumerate(steps):
        parts.append(Domain(f"ccc/{k}", source, transform=_StepTransform(step, k, seed, flip=options["flip"],
                                                                          crop_scale=options["crop_scale"])))
        rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, 0xCCC, k]))
        index_of.append(rng.choice(n, size=step.count, replace=False).astype(np.int64))
        part_of.append(np.full(step.count, k, dtype=np.int64))
    segment = Segment("ccc", np.concatenate(part_of), np.concatenate(index_of))
    truncated = int(options["max_samples"]) < DEFAULT_MAX_SAMPLES  # build_stream updates it for a max_samples= cut
    record = {
        "benchmark": "ccc" if calibration.origin == "reference" else "ccc-like",
        "difficulty": options["difficulty"], "speed": int(options["speed"]), "seed": int(seed),
        "max_samples": int(options["max_samples"]), "reference_length": DEFAULT_MAX_SAMPLES,
        "truncated": truncated, "target_accuracy": round(target, 4), "target_rule": target_rule,
        "corruptions": names, "calibration": calibration.describe(), "window_batches": int(options["window"]),
        "flip": options["flip"], "crop_scale": [float(v) for v in options["crop_scale"]],
        "clean_images": n, "schedule": compact(steps),
    }
    return parts, [segment], record


class _StepTransform:
    """The transform of one step's part: :func:`compose` with the step's pair and severities."""

    def __init__(self, step: Step, number: int, seed: int, *, flip: bool, crop_scale):
        self.step, self.number, self.seed = step, number, seed
        self.flip, self.crop_scale = flip, (float(crop_scale[0]), float(crop_scale[1]))

    def __call__(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        s = self.step
        return compose(images, ids, n1=s.n1, s1=s.s1, n2=s.n2, s2=s.s2, seed=self.seed, step=self.number,
                       flip=self.flip, crop_scale=self.crop_scale)
