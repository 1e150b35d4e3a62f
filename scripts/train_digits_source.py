"""Train the embedded digits-C source model (fixed seed, about a minute on two CPU cores).

    python scripts/train_digits_source.py                      # writes tta/weights/digits_cnn.safetensors
    python scripts/train_digits_source.py --model digits_gn    # GroupNorm: tta/weights/digits_gn.safetensors

Clean training split only, light augmentation (random shifts of up to 2 pixels); the model never
sees a corruption, so digits-C measures how much adaptation recovers. Both models use the same
recipe and seed; only the normalisation layers differ (BatchNorm, or GroupNorm with 8 groups).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tta.data.digits import load_digits_split
from tta.models.digits import DIGITS_MEAN, DIGITS_STD, SHIPPED, DigitsCNN


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(x, [max_shift] * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(SHIPPED), default="digits_cnn",
                        help="digits_cnn (BatchNorm) or digits_gn (GroupNorm)")
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped weights file of --model")
    args = parser.parse_args()
    norm, shipped = SHIPPED[args.model]
    args.out = args.out or shipped

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    model = DigitsCNN(norm=norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = args.epochs * ((len(y_train) + 63) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            x = random_shift(x_train[idx], 2, generator)
            loss = F.cross_entropy(model((x - mean) / std), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            acc = (model((x_test - mean) / std).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  clean test accuracy {acc:.4f}")
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KB) after {time.time() - start:.0f} s; "
          f"clean test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
