"""A tiny open_clip model for offline tests: built from a config, saved, loaded back by spec.

``build_tiny_clip(folder)`` writes ``<folder>/tiny-clip-test.json`` (an open_clip model config: a
2-layer ViT on 32 px images with 8 px patches, a 2-layer causal text transformer of width 64, CLIP's
real BPE vocabulary so the bundled tokenizer works) and ``<folder>/tiny_clip.pt`` (random weights,
seeded), and returns the spec ``clip:tiny-clip-test/<folder>/tiny_clip.pt``. The JSON next to the
checkpoint is how :func:`tta.models.clip.create_open_clip` finds an architecture open_clip does not
ship, so the test goes through the same code path as ``clip:ViT-B-16/openai``.

``write_image_folder(root, classes, per_class)`` writes a small ImageFolder tree of PNGs whose
colour depends on the class, so a random model still sees class-dependent inputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCH = "tiny-clip-test"
CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_clip(folder: str | Path, seed: int = 0, logit_scale: float | None = None) -> str:
    """Write the config and seeded random weights into ``folder``; return the model spec."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{ARCH}.json"
    config_path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(np.log(logit_scale)))
    weights = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return f"clip:{ARCH}/{weights}"


def write_image_folder(root: str | Path, classes: list[str], per_class: int = 2, size: tuple[int, int] = (40, 48),
                       seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` with class-tinted noise images of ``size`` (H, W)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        tint = np.array([(37 * k) % 256, (91 * k + 60) % 256, (53 * k + 120) % 256], dtype=np.float64)
        for i in range(per_class):
            noise = rng.integers(0, 256, size=(*size, 3)).astype(np.float64)
            pixels = (0.6 * tint + 0.4 * noise).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    return root
