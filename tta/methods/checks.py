"""What a method checks before anything changes: input batches, and saved states.

* :func:`check_batch`: a batch no method should learn from (wrong shape, dtype, device or channel
  count, non-finite values, values outside the expected range) raises a ``ValueError`` before any
  weight or counter moves.
* :func:`plain_state`: a saved state is accepted only when it is made of tensors and plain
  containers (what ``torch.load(..., weights_only=True)`` reads): nothing is ever unpickled.
"""
from __future__ import annotations

import collections
import math
from typing import Any

import torch

#: how far outside the input range a value may lie before a batch is refused (float rounding of
#: resizing, interpolation and corruption code)
INPUT_TOLERANCE = 1e-3


def check_batch(x: torch.Tensor, channels: int = 3, nonfinite: str = "raise", *,
                input_range: tuple[float, float] | None = (0.0, 1.0), tolerance: float = INPUT_TOLERANCE,
                dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    """Raise a clear ``ValueError`` for a batch no method should learn from, before anything changes.

    From metadata only (no synchronisation): a 4-D tensor ``(N, C, H, W)`` with ``N, H, W >= 1``
    and ``C == channels``, a floating-point dtype equal to ``dtype`` (the model's parameters'; a
    half-precision batch is let through under ``torch.autocast``, which casts it), and on
    ``device``. A batch of another dtype is refused rather than cast: casting would hide a change
    of precision (cast it yourself, ``x.to(dtype)``).

    From the values: non-finite values (when ``nonfinite="raise"``) and values outside
    ``input_range`` by more than ``tolerance`` (unless ``input_range`` is ``None``). Both come from
    one reduction (``aminmax``, which propagates NaN) and cost **one host synchronisation** per
    batch together (on the CPU, where a read is free, its two numbers are read as scalars); with
    ``nonfinite="skip"`` and ``input_range=None`` there is none. With ``nonfinite="skip"`` a
    non-finite batch is predicted but its update is dropped on the device and counted, and only its
    finite values are range-checked.
    """
    if not torch.is_tensor(x):
        raise ValueError(f"expected a tensor batch of images, got {type(x).__name__}")
    shape = x.shape
    if len(shape) != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(shape)}")
    n, c, h, w = shape
    if n == 0:
        raise ValueError("empty batch: a batch needs at least one image")
    if c != channels:
        raise ValueError(f"expected {channels} channels, got {c} (shape {tuple(shape)})")
    if h < 1 or w < 1:
        raise ValueError(f"expected images of at least 1x1 pixels, got shape {tuple(shape)}")
    x_dtype = x.dtype
    if not x_dtype.is_floating_point:
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
    if dtype is not None and x_dtype is not dtype:  # dtypes are singletons
        autocast = x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type)
        if not autocast:
            raise ValueError(f"batch dtype {x.dtype} differs from the model's parameters ({dtype}): cast the batch "
                             f"(x.to({dtype})), or run under torch.autocast for mixed precision; nothing was updated")
    if device is not None and x.device != device:
        raise ValueError(f"batch is on {x.device} but the model is on {device}: move one of them "
                         f"(x.to({str(device)!r}) or adapted.to({str(x.device)!r})); nothing was updated")
    check_finite = nonfinite == "raise"
    if not check_finite and input_range is None:
        return
    values = x.detach() if x.requires_grad else x
    if not check_finite:  # skip mode: non-finite values are the guarded step's business, not a range error
        lo, hi = input_range
        values = values.nan_to_num(nan=lo, posinf=hi, neginf=lo)
    extremes = torch.aminmax(values)
    if x.device.type == "cpu":  # two reads, free here: fewer ops than gathering the pair first
        low, high = extremes[0].item(), extremes[1].item()
    else:  # one copy to the host: the one host sync
        low, high = torch.stack(extremes).float().tolist()
    if check_finite and not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("batch contains NaN or Inf values; nothing was updated "
                         "(pass nonfinite='skip' to predict anyway and count the skipped update)")
    if input_range is not None:
        lo, hi = input_range
        if low < lo - tolerance or high > hi + tolerance:
            raise ValueError(
                f"images must be in [{lo:g}, {hi:g}] (the wrapper applies the model's normalisation itself), got "
                f"values in [{low:.4g}, {high:.4g}]; nothing was updated. Scale 0..255 images by 1/255, pass images "
                f"before normalisation, or pass input_range=None to turn this check off")


def parse_input_range(value: Any) -> tuple[float, float] | None:
    """``None`` or a ``(low, high)`` pair of finite numbers with ``low < high``."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"input_range must be None or a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"input_range must be a finite (low, high) pair with low < high, got {value!r}")
    return low, high


_PLAIN_SCALARS = (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)


def plain_state(value: Any, where: str) -> Any:
    """``value`` if it is made of tensors and plain containers only (what ``weights_only`` loads),
    else a ``ValueError`` naming where: a state holding anything else (bytes of a pickle, an
    object) is refused, never unpickled or called."""
    if value is None or isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(value))
    if type(value) in (dict, collections.OrderedDict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: keys must be strings or integers, found {type(k).__name__}; refusing "
                                 f"to load it (tta never unpickles a saved state)")
            out[k] = plain_state(v, f"{where}[{k!r}]")
        return out
    hint = ""
    if isinstance(value, (bytes, bytearray)):
        hint = (" (bytes in a method state are an optimizer state pickled by tta < 0.2: loading them could run "
                "code, so tta refuses them; re-save the state with this version)")
    raise ValueError(f"{where}: expected tensors and plain containers, found {type(value).__name__}; refusing "
                     f"to load it (tta never unpickles a saved state){hint}")


__all__ = ["INPUT_TOLERANCE", "check_batch", "parse_input_range", "plain_state"]
