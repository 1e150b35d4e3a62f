"""Our corruptions hurt the digits source model as much as the reference functions do."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("imagecorruptions")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from compare_corruptions_digits import compare  # noqa: E402

from tta.data.corruptions import CORRUPTIONS  # noqa: E402


@pytest.mark.slow
def test_source_accuracy_under_ours_and_reference_within_five_points():
    rows = compare([3, 5], list(CORRUPTIONS))
    assert len(rows) == 30
    off = [r for r in rows if abs(r["ours"] - r["reference"]) > 0.05]
    assert not off, off
    # the benchmark is not trivial: severity 5 noise takes the source model far below its clean ~99.6%
    assert min(r["ours"] for r in rows if r["corruption"] == "gaussian_noise") < 0.5
