"""LAME on digits-C against the reference's rule, on the same batches.

    python scripts/lame_vs_reference_digits.py [corruption ...]

For every corruption at severity 5: the 719 held-out digits in a fixed shuffled order, batches of
200 (the protocol's), the shipped ``digits_cnn`` in float64. Prints the source model's accuracy,
``tta``'s ``lame`` and the direct re-implementation of fiveai/LAME's ``run_step`` written in
``tests/test_lame.py`` (defaults: ``rbf``, ``knn=5``, no forced symmetry), the largest difference
between the two outputs, and what the affinity looks like (the RBF's sigma, the mean row sum of the
kernel, the number of classes the reference's output predicts). docs/methods/lame.md shows a run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tta.methods as methods  # noqa: E402
from tta.data.corruptions import CORRUPTIONS, corrupt  # noqa: E402
from tta.data.digits import load_digits_split  # noqa: E402
from tta.models import load_classifier  # noqa: E402

from test_lame import ref_run_step  # noqa: E402


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    images, labels = load_digits_split("test")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    print("| corruption | source % | lame % | reference % | max abs diff | sigma | mean row sum of K | classes predicted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names or list(CORRUPTIONS):
        x_all = corrupt(images, name, 5, seed=0).double()
        clf = load_classifier("digits_cnn").double().eval()
        method = methods.build("lame", load_classifier("digits_cnn").double(), batch_size=200)
        right = {"source": 0, "lame": 0, "reference": 0}
        diff, sigmas, row_sums, predicted = 0.0, [], [], torch.zeros(10, dtype=torch.long)
        for x, y in zip(x_all.split(200), labels.split(200)):
            with torch.no_grad():
                source = clf(x)
                feats = F.normalize(clf.net.features(clf.normalize(x)), dim=-1)
            ours = method(x).softmax(1)
            reference, _ = ref_run_step(clf, x, "rbf", 5, False)
            diff = max(diff, (ours - reference).abs().max().item())
            for key, out in (("source", source), ("lame", ours), ("reference", reference)):
                right[key] += int((out.argmax(1) == y).sum())
            dist = torch.cdist(feats, feats)
            sigma = dist.topk(5, dim=-1, largest=False).values[:, -1].mean()
            sigmas.append(float(sigma))
            row_sums.append(float(torch.exp(-dist ** 2 / (2 * sigma ** 2)).sum(1).mean()))
            predicted += torch.bincount(reference.argmax(1), minlength=10)
        n = len(labels)
        print(f"| {name} | {100 * right['source'] / n:.1f} | {100 * right['lame'] / n:.1f} | "
              f"{100 * right['reference'] / n:.1f} | {diff:.1e} | {sum(sigmas) / len(sigmas):.3f} | "
              f"{sum(row_sums) / len(row_sums):.1f} | {int((predicted > 0).sum())} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
