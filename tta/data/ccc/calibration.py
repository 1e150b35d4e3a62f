"""CCC calibration matrices: read the reference's file safely, or this project's ``.npz`` / ``.json``.

A calibration gives, per ordered corruption pair (a, b), the matrix ``A[i][j]``: the accuracy (%) of
a source model on clean images corrupted with a at severity ``i * step`` and then b at ``j * step``.
The reference (oripress/CCC @ 656dec3, ``generate.py`` lines 234-243) downloads
``ccc_accuracy_matrix.pickle``: a dict keyed ``"n1_<a>_n2_<b>"`` with a 21 x 21 matrix per ordered
pair of its 14 corruptions (grid step 0.25, a pretrained ResNet-50 on 5,000 ImageNet val images).

**The pickle is never unpickled as such**: unpickling can run any code the file names.
:func:`load_calibration` reads it with :class:`SafeUnpickler`, which builds only plain containers,
numbers, strings and NumPy arrays (the globals NumPy's array pickling names) and refuses every
other global with :class:`UnsafeCalibrationFile` before anything runs. ``scripts/calibrate_ccc.py``
writes this project's ``.npz`` (or ``.json``) form, which needs no unpickling at all.

A calibration is labelled ``ccc`` only when it has the reference's layout (21 x 21 for every
ordered pair of the reference's 14 names, keys as the reference spells them); anything else is
``ccc-like``: its walks, and so its stream, differ from the published benchmark.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .schedule import EASY, TO_PROJECT, TO_REFERENCE

REFERENCE_GRID = 21  # severities 0, 0.25, ..., 5 (generate.py lines 38-60 and line 30)
REFERENCE_CLASSES = 1000
# torchvision's ResNet50_Weights.IMAGENET1K_V1 top-1 (the reference model, eval.py line 90):
# the clean accuracy the reference targets are relative to (see :func:`target_for`)
REFERENCE_CLEAN_ACCURACY = 76.13


class UnsafeCalibrationFile(ValueError):
    """A calibration pickle that names something other than plain data and NumPy arrays."""


# (module, name) -> what a NumPy array / scalar pickle needs (NumPy 1.x and 2.x module paths)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "float"), ("builtins", "int"),
    ("collections", "OrderedDict"),
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays only: any other global raises before it is loaded."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCalibrationFile(
            f"the calibration pickle refers to {module}.{name}, which is not plain data or a NumPy array; it is "
            f"refused (unpickling it could run code). Convert a trusted file with scripts/calibrate_ccc.py --convert")


def safe_unpickle(data: bytes) -> Any:
    """``pickle.loads`` restricted to :class:`SafeUnpickler`'s globals."""
    return SafeUnpickler(io.BytesIO(data)).load()


@dataclass
class Calibration:
    """Matrices per ordered pair ``(a, b)`` (this project's names), the grid step, and provenance."""

    matrices: dict[tuple[str, str], np.ndarray]
    step: float
    origin: str  # "reference" (the reference's file) or "ccc-like" (anything else)
    clean_accuracy: float | None = None  # the matrices' accuracy without corruption (A[0][0])
    num_classes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def matrix(self, a: str, b: str) -> np.ndarray:
        try:
            return self.matrices[(a, b)]
        except KeyError:
            raise ValueError(f"the CCC calibration {self.path or ''} has no matrix for the pair {a} -> {b} (it has "
                             f"{len(self.matrices)} pairs); the difficulty needs every ordered pair of its "
                             f"corruptions") from None

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "origin": self.origin, "grid_step": self.step,
                "grid_size": int(next(iter(self.matrices.values())).shape[0]) if self.matrices else 0,
                "pairs": len(self.matrices), "clean_accuracy": self.clean_accuracy, "num_classes": self.num_classes,
                **({"info": self.info} if self.info else {})}


def _project_name(name: str) -> str:
    return TO_PROJECT.get(name, name)


def _split_key(key: str) -> tuple[str, str]:
    """``"n1_<a>_n2_<b>"`` -> ``(a, b)`` (names in this project's spelling)."""
    if not isinstance(key, str) or not key.startswith("n1_") or "_n2_" not in key:
        raise ValueError(f"calibration key {key!r} is not of the form n1_<a>_n2_<b>")
    a, b = key[3:].split("_n2_", 1)
    return _project_name(a), _project_name(b)


def _matrices(raw: Mapping[str, Any], source: str) -> dict[tuple[str, str], np.ndarray]:
    out: dict[tuple[str, str], np.ndarray] = {}
    shape = None
    for key, value in raw.items():
        matrix = np.asarray(value, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ValueError(f"{source}: the matrix of {key} must be square with at least 2 rows, got {matrix.shape}")
        if shape is not None and matrix.shape != shape:
            raise ValueError(f"{source}: matrices of different sizes ({shape} and {matrix.shape} for {key})")
        if not np.isfinite(matrix).all():
            raise ValueError(f"{source}: the matrix of {key} holds non-finite values")
        shape = matrix.shape
        out[_split_key(key)] = matrix
    if not out:
        raise ValueError(f"{source}: no calibration matrices")
    return out


def is_reference_layout(raw_keys: set[str], size: int) -> bool:
    """The reference's file: 21 x 21 for every ordered pair of its 14 names, keyed as it spells them."""
    wanted = {f"n1_{a}_n2_{b}" for a in EASY for b in EASY if a != b}
    return size == REFERENCE_GRID and wanted <= raw_keys


def load_calibration(path: str | Path) -> Calibration:
    """A calibration from the reference's ``.pickle`` (safely), or a ``.npz`` / ``.json`` of this project.

    ``.npz``: one array per key ``n1_<a>_n2_<b>`` plus ``__meta__`` (a JSON string: ``step``,
    ``clean_accuracy``, ``num_classes``, ``info``). ``.json``: ``{"matrices": {key: rows}, "step":
    ..., ...}``. The grid step defaults to ``5 / (size - 1)`` (0.25 for 21 x 21).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"CCC calibration file not found: {file}")
    meta: dict[str, Any] = {}
    suffix = file.suffix.lower()
    if suffix in (".pickle", ".pkl"):
        raw = safe_unpickle(file.read_bytes())
        if not isinstance(raw, Mapping):
            raise ValueError(f"{file}: expected a dict of matrices, got {type(raw).__name__}")
    elif suffix == ".npz":
        with np.load(file, allow_pickle=False) as archive:
            raw = {k: archive[k] for k in archive.files if k != "__meta__"}
            if "__meta__" in archive.files:
                meta = json.loads(str(archive["__meta__"]))
    elif suffix == ".json":
        content = json.loads(file.read_text())
        raw = content.get("matrices", {})
        meta = {k: v for k, v in content.items() if k != "matrices"}
    else:
        raise ValueError(f"CCC calibration {file}: expected a .pickle (the reference's file), .npz or .json")
    matrices = _matrices(raw, str(file))
    size = next(iter(matrices.values())).shape[0]
    step = float(meta.get("step", 5.0 / (size - 1)))
    reference = suffix in (".pickle", ".pkl") and is_reference_layout(set(raw), size)
    clean = meta.get("clean_accuracy")
    if clean is None and reference:
        clean = REFERENCE_CLEAN_ACCURACY
    return Calibration(matrices, step, "reference" if reference else "ccc-like",
                       clean_accuracy=None if clean is None else float(clean),
                       num_classes=meta.get("num_classes", REFERENCE_CLASSES if reference else None),
                       info=dict(meta.get("info") or {}), path=str(file))


def save_calibration(path: str | Path, matrices: Mapping[tuple[str, str], np.ndarray], *, step: float,
                     clean_accuracy: float, num_classes: int, info: Mapping[str, Any] | None = None) -> Path:
    """Write this project's ``.npz`` (or ``.json``) form; keys use the reference's spelling."""
    file = Path(path)
    meta = {"step": float(step), "clean_accuracy": float(clean_accuracy), "num_classes": int(num_classes),
            "info": dict(info or {})}
    keyed = {f"n1_{TO_REFERENCE.get(a, a)}_n2_{TO_REFERENCE.get(b, b)}": np.asarray(m, dtype=np.float64)
             for (a, b), m in matrices.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix.lower() == ".json":
        file.write_text(json.dumps({**meta, "matrices": {k: np.round(v, 4).tolist() for k, v in keyed.items()}}))
    else:
        np.savez_compressed(file, __meta__=np.asarray(json.dumps(meta)),
                            **{k: v.astype(np.float32) for k, v in keyed.items()})
    return file


def target_for(difficulty: str, calibration: Calibration, *, target: float | None = None) -> tuple[float, str]:
    """The walk's target accuracy (%) and how it was chosen.

    The reference's targets (40 / 20 / 0 %) are for its 1000-class ResNet-50 and file. Another
    calibration gets the same *relative* position between chance and the clean accuracy:
    ``chance + (t_ref - chance_ref) / (clean_ref - chance_ref) * (clean - chance)``, with the
    reference's clean accuracy 76.13 % (torchvision's IMAGENET1K_V1 top-1) and chance 100 / classes.
    ``target`` (``ccc.target=``) overrides both.
    """
    from .schedule import REFERENCE_TARGETS

    if target is not None:
        return float(target), "given (ccc.target)"
    reference = REFERENCE_TARGETS[difficulty]
    if calibration.origin == "reference":
        return reference, "the reference's"
    if calibration.clean_accuracy is None or not calibration.num_classes:
        return reference, "the reference's (the calibration states no clean accuracy / classes)"
    chance_ref = 100.0 / REFERENCE_CLASSES
    chance = 100.0 / int(calibration.num_classes)
    position = (reference - chance_ref) / (REFERENCE_CLEAN_ACCURACY - chance_ref)
    value = chance + position * (float(calibration.clean_accuracy) - chance)
    return float(value), (f"the reference's {reference:g} % mapped to the same position between chance "
                          f"({chance:.2f} %) and the calibration's clean accuracy ({calibration.clean_accuracy:.2f} %)")
