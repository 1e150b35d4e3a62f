"""Calibrate CCC's accuracy matrices for your own model and clean images (or convert a file).

CCC (Press et al., NeurIPS 2023; oripress/CCC @ 656dec3) chooses each corruption pair's severity
walk on a matrix ``A[i][j]``: a source model's accuracy (%) on clean images corrupted by a at
severity ``i * step`` and then b at ``j * step`` (the reference: a ResNet-50 on 5,000 ImageNet val
images, step 0.25, 21 x 21 per ordered pair, ``generate.py`` lines 30, 38-60, 234-243). Without the
reference's file, this script measures such matrices with this project's corruptions; a stream
built on them is labelled ``ccc-like`` in ``run.json`` (its walks are not the published ones).

The images are corrupted as the stream corrupts them, minus the flip + crop and the JPEG round trip
(the reference calibrates on uncropped images, ``generate.py`` line 190): a at its severity, uint8
truncation, b at its severity, uint8 truncation. Severity 0 leaves the image as it is.

Cost: ``pairs x grid^2 x images`` corrupted images. The first corruption is computed once per
(a, severity); row 0 and column 0 (one corruption only) are measured once per corruption and shared
by every pair. ``--step`` sets the measured grid, ``--interpolate`` resamples the matrices linearly
onto a finer grid (e.g. measure at 1.0, interpolate to 0.25) when measuring the fine grid costs too
much.

    python scripts/calibrate_ccc.py --model digits_cnn --data digits_c --images 100 --step 1 \\
        --difficulty easy --out ccc_digits.npz
    python scripts/calibrate_ccc.py --model torchvision:resnet50:IMAGENET1K_V1 --data imagenet_c \\
        --clean-root /data/imagenet/val --images 5000 --step 0.25 --device cuda --out ccc_r50.npz
    python scripts/calibrate_ccc.py --convert ccc_accuracy_matrix.pickle --out ccc_reference.npz
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tta.data.ccc.calibration import load_calibration, save_calibration
from tta.data.ccc.compose import to_uint8_levels
from tta.data.ccc.schedule import corruption_names
from tta.data.corruptions import corrupt


def clean_images(data: str, clean_root: str | None, images: int, seed: int):
    """``images`` clean images (seeded choice) and labels from the data config's clean split or ``clean_root``."""
    from tta.data.benchmarks import ccc_benchmark, load_benchmark
    from tta.data.configs import load_data_config

    config = dict(load_data_config(data))
    if clean_root:
        config["clean_root"] = clean_root
    bench = ccc_benchmark(config, seed=seed, load=lambda: load_benchmark(config, seed=seed))
    source = bench.clean.source
    chosen = np.sort(np.random.default_rng(seed).choice(len(source), size=min(images, len(source)), replace=False))
    raw = source.read(chosen, "cpu", "fail")
    x, _, _ = source.finish(raw, torch.device("cpu"))
    return x, source.labels[torch.from_numpy(chosen)], config


def _severity(value: float):
    return int(value) if float(value).is_integer() else float(value)


def measure(model, x: torch.Tensor, y: torch.Tensor, names: list[str], grid: np.ndarray, *, seed: int, device,
            batch: int, log=print) -> dict[tuple[str, str], np.ndarray]:
    """The matrices of every ordered pair of ``names`` on the severity ``grid`` (accuracy in %).

    The first corruption is computed once per (a, severity); the second is applied, per (b,
    severity), to all of them at once (one call over every a != b and every severity of a)."""
    n, size = len(x), len(grid)

    @torch.no_grad()
    def correct(images: torch.Tensor) -> torch.Tensor:
        """Correct predictions per image (bool, on the host)."""
        out = []
        for k in range(0, len(images), batch):
            out.append(model(images[k:k + batch].to(device)).argmax(1).cpu())
        return torch.cat(out) == y.repeat(len(images) // n)

    def apply(images: torch.Tensor, name: str, severity: float, salt: int) -> torch.Tensor:
        if severity <= 0:
            return images
        ids = torch.arange(len(images)) + (salt << 32)
        return to_uint8_levels(corrupt(images, name, _severity(severity), seed=seed, ids=ids))

    started = time.time()
    clean = float(correct(x).float().mean()) * 100
    first = {a: torch.cat([apply(x, a, grid[i], 1) for i in range(1, size)]) for a in names}  # ((size-1) n, ...)
    single = {a: [clean] + (correct(first[a]).view(size - 1, n).float().mean(1) * 100).tolist() for a in names}
    out = {(a, b): np.zeros((size, size)) for a in names for b in names if a != b}
    for (a, b), m in out.items():
        m[0, :] = single[b]  # a at severity 0 is not applied: only b
        m[:, 0] = single[a]
    for p, b in enumerate(names):
        others = [a for a in names if a != b]
        stacked = torch.cat([first[a] for a in others])  # (len(others) (size-1) n, ...)
        for j in range(1, size):
            hits = correct(apply(stacked, b, grid[j], 2 + j)).view(len(others), size - 1, n).float().mean(2) * 100
            for k, a in enumerate(others):
                out[(a, b)][1:, j] = hits[k].numpy()
        log(f"  second corruption {b}: {p + 1}/{len(names)} done ({time.time() - started:.0f} s)")
    return out


def interpolate(matrix: np.ndarray, grid: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Bilinear resampling of a matrix measured on ``grid`` x ``grid`` onto ``fine`` x ``fine``."""
    rows = np.stack([np.interp(fine, grid, matrix[:, j]) for j in range(len(grid))], 1)
    return np.stack([np.interp(fine, grid, rows[i]) for i in range(len(fine))], 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .npz (or .json)")
    parser.add_argument("--convert", help="a calibration file (the reference's pickle, read safely) to write as --out")
    parser.add_argument("--model", default="digits_cnn", help="model spec (as model= of tta.run)")
    parser.add_argument("--model-weights", default=None)
    parser.add_argument("--data", default="digits_c", help="data config whose clean images are used")
    parser.add_argument("--clean-root", default=None, help="a folder of class folders of clean images")
    parser.add_argument("--images", type=int, default=5000, help="clean images used (the reference: 5,000)")
    parser.add_argument("--step", type=float, default=0.25, help="measured severity grid step (the reference: 0.25)")
    parser.add_argument("--interpolate", type=float, default=None, help="resample onto this finer grid step")
    parser.add_argument("--difficulty", default="easy", help="easy covers every pair medium and hard need")
    parser.add_argument("--corruptions", default=None, help="comma-separated list instead of a difficulty's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (e.g. 1 to time one core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.convert:
        calibration = load_calibration(args.convert)
        matrices, step = calibration.matrices, calibration.step
        if args.interpolate:
            size = next(iter(matrices.values())).shape[0]
            grid = np.round(np.arange(size) * step, 6)
            fine = np.round(np.arange(0, grid[-1] + 1e-9, args.interpolate), 6)
            matrices = {k: interpolate(m, grid, fine) for k, m in matrices.items()}
            step = args.interpolate
        path = save_calibration(args.out, matrices, step=step,
                                clean_accuracy=calibration.clean_accuracy or float("nan"),
                                num_classes=calibration.num_classes or 0,
                                info={**calibration.info, "converted_from": Path(args.convert).name,
                                      "origin": calibration.origin, "interpolated_to": args.interpolate,
                                      "convert_command": "python scripts/calibrate_ccc.py "
                                      + " ".join(sys.argv[1:] if argv is None else argv)})
        print(f"wrote {path} ({len(calibration.matrices)} pairs, origin {calibration.origin})")
        return 0
    grid = np.round(np.arange(0, 5 + 1e-9, args.step), 6)
    if abs(grid[-1] - 5) > 1e-6:
        raise SystemExit(f"--step must divide 5, got {args.step}")
    names = args.corruptions.split(",") if args.corruptions else corruption_names(args.difficulty)
    from tta.data.benchmarks import num_classes_of
    from tta.models.classifier import load_classifier

    started = time.time()
    x, y, config = clean_images(args.data, args.clean_root, args.images, args.seed)
    device = torch.device(args.device)
    model = load_classifier(args.model, num_classes=num_classes_of(config), weights=args.model_weights).to(device)
    model.eval()
    print(f"{len(x)} clean images, {len(names)} corruptions, grid {list(grid)}")
    matrices = measure(model, x, y, names, grid, seed=args.seed, device=device, batch=args.batch)
    step = args.step
    if args.interpolate:
        fine = np.round(np.arange(0, 5 + 1e-9, args.interpolate), 6)
        matrices = {k: interpolate(m, grid, fine) for k, m in matrices.items()}
        step = args.interpolate
    clean = float(next(iter(matrices.values()))[0, 0])
    info = {"model": args.model, "data": args.data, "clean_root": args.clean_root, "images": len(x),
            "measured_step": args.step, "interpolated_to": args.interpolate, "seed": args.seed,
            "corruptions": names, "wall_time_s": round(time.time() - started, 1),
            "command": "python scripts/calibrate_ccc.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    path = save_calibration(args.out, matrices, step=step, clean_accuracy=clean, num_classes=num_classes_of(config),
                            info=info)
    print(json.dumps({k: v for k, v in info.items() if k != "corruptions"}))
    print(f"wrote {path}: {len(matrices)} pairs, clean accuracy {clean:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
