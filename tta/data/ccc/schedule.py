"""CCC's schedule: which corruption pair and which two severities each stretch of the stream gets.

Press, Schneider, Kümmerer and Bethge, "RDumb: A simple approach that questions our progress in
continual test-time adaptation" (NeurIPS 2023), build the *Continually Changing Corruptions*
benchmark (CCC) in ``generate.py`` of oripress/CCC @ 656dec3. This module re-derives its schedule:

* **corruption lists** per difficulty (``GenerateDataset``, lines 193-232): easy (target 40 %) the
  fourteen below, medium (20 %) the same without ``jpeg``, hard (0 %) the four noise/contrast ones;
  brightness is never used. The reference names ``elastic`` and ``jpeg`` are this project's
  ``elastic_transform`` and ``jpeg_compression``;
* **the walk** of one ordered pair (a, b) on its calibration matrix ``A[i][j]`` (accuracy with a at
  severity ``i * step`` then b at ``j * step``; the reference's grid is 0.25, 21 x 21): from a node
  ``(i, 0)`` with ``i >= 1`` to a node ``(0, j)``, each move lowering i by one or raising j by one.
  The rule is the reference's memoised recursion (``traverse_graph``, lines 101-138): at a node the
  successor kept is the one whose path mean *including this node* is closer to the target (ties:
  raise j), and among the start rows ``i = 1 ..`` the first path whose mean is closest to the target
  (``find_path``, lines 85-98);
* **the pair sequence** (lines 256-260, 347-356): Python's ``random`` seeded with the stream seed
  (line 174); the first corruption is ``random.choice(names)``, then a second one is drawn until it
  differs; when a walk ends the second becomes the first and a new second is drawn until it
  differs. Python ``random`` is used for nothing else, so the sequence of pairs is exact;
* **images per grid point**: ``speed`` (1000, 2000 or 5000 in the paper, line 512), the stream cut
  at ``max_samples`` (7,500,000, line 177).

Everything here is plain Python on the host, computed once before the run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

# oripress/CCC @ 656dec3 generate.py lines 193-232 (names as in make_imagenet_c.py noise_dict, lines 658-674)
EASY = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "contrast", "elastic", "pixelate", "jpeg")
MEDIUM = EASY[:-1]
HARD = ("gaussian_noise", "shot_noise", "impulse_noise", "contrast")
REFERENCE_NAMES: dict[str, tuple[str, ...]] = {"easy": EASY, "medium": MEDIUM, "hard": HARD}
# the reference's baseline accuracy (%) per difficulty (README line 76; generate.py line 190: on its calibration set)
REFERENCE_TARGETS: dict[str, float] = {"easy": 40.0, "medium": 20.0, "hard": 0.0}
# reference name -> this project's corruption name
TO_PROJECT = {"elastic": "elastic_transform", "jpeg": "jpeg_compression"}
TO_REFERENCE = {v: k for k, v in TO_PROJECT.items()}
DEFAULT_MAX_SAMPLES = 7_500_000  # generate.py line 177 (cutoff)
DEFAULT_SPEED = 1000  # the smallest of the paper's three (generate.py line 512)
DIFFICULTIES = tuple(REFERENCE_NAMES)


def corruption_names(difficulty: str) -> list[str]:
    """This project's corruption names for a CCC difficulty, in the reference's list order."""
    if difficulty not in REFERENCE_NAMES:
        raise ValueError(f"unknown CCC difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")
    return [TO_PROJECT.get(n, n) for n in REFERENCE_NAMES[difficulty]]


def find_walk(matrix: np.ndarray, target: float) -> list[tuple[int, int]]:
    """The reference's walk on one pair's calibration matrix: grid nodes ``(i, j)`` from ``(i0, 0)``
    (``i0 >= 1``) to ``(0, j1)``.

    Greedy on the running mean, as ``traverse_graph``: a node's path is the node followed by the
    path of the successor ``(i - 1, j)`` when that path's mean with the node is strictly closer to
    ``target`` than the mean of ``(i, j + 1)``'s path with the node, else by the path of
    ``(i, j + 1)``; a row-0 node ends the path; a column past the last is unreachable (its cost is
    the reference's sentinel, so it is never chosen while a finite alternative exists). The start
    row is the first ``i0 >= 1`` whose path mean is closest to the target. Computed bottom-up in
    the order the memoised recursion fills it (every node depends on ``(i - 1, j)`` and
    ``(i, j + 1)`` only), so there is no recursion-depth limit.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"a calibration matrix must be 2-D with at least 2 rows, got shape {a.shape}")
    rows, cols = a.shape
    sentinel = 9999999999999.0  # generate.py line 103
    cost: dict[tuple[int, int], float] = {}
    length: dict[tuple[int, int], int] = {}
    succ: dict[tuple[int, int], tuple[int, int] | None] = {}
    for j in range(cols):
        cost[(0, j)], length[(0, j)], succ[(0, j)] = float(a[0, j]), 1, None
    for i in range(1, rows):
        cost[(i, cols)], length[(i, cols)], succ[(i, cols)] = sentinel, 1, None
        for j in range(cols - 1, -1, -1):
            down, right = (i - 1, j), (i, j + 1)
            here = float(a[i, j])
            if abs((cost[down] + here) / (length[down] + 1) - target) < \
                    abs((cost[right] + here) / (length[right] + 1) - target):
                best = down
            else:
                best = right
            cost[(i, j)], length[(i, j)], succ[(i, j)] = cost[best] + here, length[best] + 1, best
    best_start, best_gap = None, 99999999999.0  # generate.py line 86
    for i in range(1, rows):
        gap = abs(cost[(i, 0)] / length[(i, 0)] - target)
        if gap < best_gap:
            best_gap, best_start = gap, i
    path = []
    node: tuple[int, int] | None = (best_start, 0)
    while node is not None:
        if node[1] >= cols:
            raise ValueError("the walk left the calibration grid (the matrix holds sentinel-sized values?)")
        path.append(node)
        node = succ[node]
    return path


@dataclass(frozen=True)
class Step:
    """One grid point of the stream: ``count`` images with ``n1`` at ``s1`` then ``n2`` at ``s2``
    (severity 0: that corruption is not applied)."""

    n1: str
    s1: float
    n2: str
    s2: float
    count: int

    def as_list(self) -> list:
        return [self.n1, self.s1, self.n2, self.s2, self.count]


def pair_sequence(names: Sequence[str], seed: int) -> Iterator[tuple[str, str]]:
    """The reference's endless sequence of ordered pairs (generate.py lines 256-260, 347-356)."""
    rng = random.Random(seed)  # the same sequence as random.seed(seed) then random.choice
    names = list(names)
    if len(names) < 2:
        raise ValueError("CCC needs at least two corruptions")
    first = rng.choice(names)
    second = rng.choice(names)
    while second == first:
        second = rng.choice(names)
    while True:
        yield first, second
        first = second
        while first == second:
            second = rng.choice(names)


def schedule(walks: Mapping[tuple[str, str], Sequence[tuple[int, int]]], names: Sequence[str], *, seed: int,
             speed: int, max_samples: int, grid_step: float) -> list[Step]:
    """The stream's steps: walk after walk over the pair sequence, ``speed`` images per grid point,
    cut at ``max_samples`` (the last step may be shorter). Severities are ``index * grid_step``."""
    if int(speed) < 1:
        raise ValueError(f"ccc.speed must be at least 1 image per severity step, got {speed}")
    if int(max_samples) < 1:
        raise ValueError(f"ccc.max_samples must be at least 1, got {max_samples}")
    steps: list[Step] = []
    left = int(max_samples)
    for first, second in pair_sequence(names, seed):
        for i, j in walks[(first, second)]:
            count = min(int(speed), left)
            steps.append(Step(first, round(i * grid_step, 6), second, round(j * grid_step, 6), count))
            left -= count
            if left == 0:
                return steps
    raise AssertionError("unreachable")  # pragma: no cover


def compact(steps: Sequence[Step]) -> dict:
    """The schedule for the run record: one ``[n1, s1, n2, s2, count]`` per step (plain lists)."""
    return {"fields": ["n1", "s1", "n2", "s2", "count"], "steps": [s.as_list() for s in steps]}
