"""Reading checkpoint files without running code from them.

Every ``torch.load`` here uses ``weights_only=True`` (tensors, numbers, strings and containers only;
nothing in the file is executed). A file that needs full unpickling -- a whole pickled module, or a
checkpoint holding arbitrary Python objects -- is loaded only with the caller's explicit opt-in
(``allow_pickle=True``; on the command line ``model_allow_pickle=true``), because unpickling can run
any code the file's author put in it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
"""Keys under which training scripts commonly nest the state dict of a checkpoint."""


class PickleRequired(ValueError):
    """A file that can only be read by unpickling arbitrary objects (no opt-in was given)."""


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False, what: str = "checkpoint") -> Any:
    """The object stored in ``path`` (``.safetensors`` or a ``torch.save`` file), on the CPU.

    Without ``allow_pickle`` the file is read with ``weights_only=True``; a file that needs more
    raises :class:`PickleRequired` with the ways out.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise PickleRequired(
            f"{what} {path} holds Python objects that only full unpickling can restore ({first}). "
            f"Unpickling runs code from the file, so it needs an explicit opt-in: allow_pickle=True "
            f"(command line: model_allow_pickle=true) if you trust the file. Safer: save its state dict "
            f"(torch.save(model.state_dict(), 'weights.pt')) and load it with model_weights=") from err


def unwrap_state_dict(obj: Any, *, what: str = "checkpoint", strip: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, found in ``obj`` (possibly nested under :data:`STATE_DICT_KEYS`),
    with the prefixes ``strip`` (``DataParallel``'s ``module.``) removed from its keys."""
    for key in STATE_DICT_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = f" (keys: {', '.join(map(str, list(obj)[:6]))})" if isinstance(obj, Mapping) else ""
        raise ValueError(f"{what} does not hold a state dict (a mapping of names to tensors) but a {kind}{keys}")
    state: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        for prefix in strip:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        state[name] = value
    return state


def read_state_dict(path: str | Path, *, allow_pickle: bool = False, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or ``torch.save`` file (see :func:`unwrap_state_dict`)."""
    return unwrap_state_dict(load_checkpoint(path, allow_pickle=allow_pickle, what=what), what=f"{what} {path}")


__all__ = ["PickleRequired", "STATE_DICT_KEYS", "load_checkpoint", "read_state_dict", "unwrap_state_dict"]
