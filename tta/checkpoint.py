"""Checkpoints of a run, so that a killed run continues where it stopped.

``python -m tta.run`` writes ``checkpoint.pt`` into the run folder every ``checkpoint_every``
batches and at the end of every domain; ``resume=true`` with the same command into the same
folder continues from it and ends with the ``run.json`` an uninterrupted run writes (same device:
the same results, counters and order hash). A checkpoint holds

* ``method``: the method's :meth:`~tta.methods.Method.state_dict` (weights, optimizer state,
  policies' and method buffers, counters), less the parameters the method never changes (the
  frozen weights come from the model the command builds again);
* ``progress``: the engine's progress (:class:`RunProgress`): the metrics so far (on the CPU),
  the current domain, the batches done, the stream's position (:meth:`Stream.state_dict`), the
  running order hash and the wall time so far;
* ``rng``: the random number generators' states (torch CPU and CUDA, Python's ``random``, numpy);
* ``config``: the run's configuration, to refuse a resume with another command.

Everything is tensors and plain containers: :func:`load_checkpoint` reads it with
``torch.load(..., weights_only=True)``, so a checkpoint cannot run code. It is written atomically
(a temporary file in the same folder, then ``os.replace``): a run killed while writing leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
#: configuration keys that may differ between a run and its resumption (they change no result)
VOLATILE_KEYS = ("resume", "overwrite", "checkpoint_every", "progress", "logger", "log_every", "logger_options")


# ---------------------------------------------------------------------------------------- files
def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (it never runs code) and check its format."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "tta.run checkpoint":
        raise ValueError(f"{path} is not a tta run checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a checkpoint of format version {state.get('version')!r}; this tta reads "
                         f"version {CHECKPOINT_VERSION}: rerun with overwrite=true")
    return state


def to_cpu(value: Any) -> Any:
    """Tensors moved to the CPU (detached copies) inside plain containers."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def comparable_config(config: Mapping[str, Any]) -> str:
    """The configuration as canonical JSON, less :data:`VOLATILE_KEYS`."""
    return json.dumps({k: v for k, v in config.items() if k not in VOLATILE_KEYS}, sort_keys=True, default=str)


def config_differences(saved: str, current: str) -> list[str]:
    """The top-level keys (and ``method.*`` / ``data.*`` sub-keys) whose values differ."""
    a, b = json.loads(saved), json.loads(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out.extend(f"{key}.{k}" for k in sorted(set(a[key]) | set(b[key])) if a[key].get(k) != b[key].get(k))
        else:
            out.append(key)
    return out


# ---------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and CUDA) generators, Python's ``random`` and numpy's global one."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- order hash
class OrderHash:
    """A running hash of the exact sample order that can be saved and resumed.

    Chained per batch: ``d_k = sha256(d_{k-1} | len(domain) | domain | ids as int64)``, so its
    state is one digest (:meth:`state_dict`); two runs that saw the same batches (domain names and
    sample ids, in the same order and cut into the same batches) have the same :meth:`hexdigest`.
    """

    def __init__(self) -> None:
        self._digest = b"tta-order-v1"
        self.batches = 0

    def update(self, domain: str, ids: torch.Tensor) -> None:
        name = domain.encode()
        h = hashlib.sha256(self._digest)
        h.update(len(name).to_bytes(4, "little"))
        h.update(name)
        h.update(ids.to(torch.int64).numpy().tobytes())
        self._digest = h.digest()
        self.batches += 1

    def hexdigest(self) -> str:
        return hashlib.sha256(self._digest).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"digest": self._digest.hex(), "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._digest = bytes.fromhex(state["digest"])
        self.batches = int(state["batches"])


# ---------------------------------------------------------------------------------------- metrics
def _pack(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, torch.device):
        return {"__device__": str(value)}  # restored as the resumed run's device
    if isinstance(value, list) and value and all(torch.is_tensor(v) and v.ndim == 1 for v in value):
        # one tensor and the lengths, not one record per batch: the same list comes back (split)
        return {"__tensor_list__": torch.cat([v.detach().cpu() for v in value]), "lengths": [len(v) for v in value]}
    if isinstance(value, dict):
        return {"__dict__": [[_pack(k), _pack(v)] for k, v in value.items()]}  # keys may be tuples
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v) for v in value]}
    if isinstance(value, list):
        return [_pack(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a metrics field of type {type(value).__name__}")


def _unpack(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        if "__device__" in value:
            return device
        if "__tensor_list__" in value:
            return [t.to(device) for t in value["__tensor_list__"].split(list(value["lengths"]))]
        if "__tuple__" in value:
            return tuple(_unpack(v, device) for v in value["__tuple__"])
        return {_unpack(k, device): _unpack(v, device) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unpack(v, device) for v in value]
    return value


def accumulators_state(accumulators: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of each domain's metrics accumulator (:mod:`tta.metrics`), on the CPU, with its
    class name: restored exactly by :func:`load_accumulators`."""
    return {name: {"class": type(m).__name__, "fields": {k: _pack(v) for k, v in vars(m).items()}}
            for name, m in accumulators.items()}


def load_accumulators(state: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    from . import metrics

    out = {}
    for name, saved in state.items():
        cls = getattr(metrics, saved["class"], None)
        if not isinstance(cls, type):
            raise ValueError(f"checkpoint holds metrics of an unknown kind {saved['class']!r}")
        m = cls(device)
        for key, value in saved["fields"].items():
            setattr(m, key, _unpack(value, device))
        out[name] = m
    return out


# ---------------------------------------------------------------------------------------- progress
class RunProgress:
    """What the engine has done so far, restorable from a checkpoint (see the module docstring).

    The engine keeps its metrics accumulators (``metrics``, ``selection``) and order hash here and
    calls :meth:`batch_done` after every batch and :meth:`domain_end` when a domain ends;
    with a ``checkpoint`` callback these hand it :meth:`state_dict` every ``every`` batches and at
    every domain end. A domain's end is noticed at the next domain's first batch, which the stream
    has already handed out: :meth:`batch_done` notes the stream's position after each batch (a few
    integers), so that checkpoint holds the position after the domain's last batch.
    """

    def __init__(self, device: torch.device, resume: Mapping[str, Any] | None = None, *,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None, every: int = 0):
        if isinstance(every, bool) or int(every) != every or int(every) < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at domain ends), got {every!r}")
        self.device = device
        self.checkpoint = checkpoint
        self.every = int(every)
        self.order = OrderHash()
        self.metrics: dict[str, Any] = {}
        self.selection: dict[str, Any] = {}
        self.current: str | None = None
        self.done = 0
        self.wall_before = 0.0
        self.stream_state: dict[str, Any] | None = None
        #: the engine's own progress beyond the metrics (the stream-rate schedule), plain values
        self.extra: dict[str, Any] = {}
        self.extra_state: Callable[[], dict[str, Any]] | None = None
        self._mark: tuple[int, int, int, int] | None = None
        self._saved_at = -1
        self._start = time.perf_counter()
        if resume is not None:
            self.metrics = load_accumulators(resume["metrics"], device)
            self.selection = load_accumulators(resume.get("selection") or {}, device)
            self.order.load_state_dict(resume["order"])
            self.current = resume["current"]
            self.done = int(resume["done"])
            self.wall_before = float(resume["wall_time_s"])
            self.stream_state = resume.get("stream")
            self.extra = dict(resume.get("extra") or {})
            self._saved_at = self.done

    def batches(self, stream: Iterable[Any]) -> Iterator[Any]:
        """``stream`` from the resume position: :meth:`Stream.load_state_dict` (nothing before it
        is read) or, for a plain iterable, by skipping the batches already done. Starts the clock."""
        self._start = time.perf_counter()
        if self.done == 0:
            return iter(stream)
        if self.stream_state is not None and hasattr(stream, "load_state_dict"):
            stream.load_state_dict(self.stream_state)
            return iter(stream)
        return itertools.islice(iter(stream), self.done, None)

    @property
    def position(self) -> int:
        """Batches of the stream behind us (where a progress bar starts)."""
        if self.stream_state is not None:
            return int(self.stream_state.get("next_batch", self.done))
        return self.done

    def wall(self) -> float:
        """Seconds of this run so far, earlier sessions included."""
        return self.wall_before + time.perf_counter() - self._start

    def batch_done(self, stream: Any, current: str | None) -> None:
        """After every batch: note the stream position; checkpoint every ``every`` batches."""
        self.done += 1
        if hasattr(stream, "next_batch") and hasattr(stream, "state_dict"):
            self._mark = (int(stream.next_batch), int(stream.skipped_samples), int(stream.skipped_batches),
                          len(stream.bad_images))
        if self.checkpoint is not None and self.every and self.done % self.every == 0:
            self.save(stream, current)

    def domain_end(self, stream: Any, current: str | None) -> None:
        """When ``current`` has ended (before a reset for the next one): checkpoint."""
        if self.checkpoint is not None and current is not None:
            self.save(stream, current)

    def save(self, stream: Any, current: str | None) -> None:
        if self._saved_at == self.done:  # e.g. a domain that ended on a multiple of ``every``
            return
        self.checkpoint(self.state_dict(stream, current))
        self._saved_at = self.done

    def _stream_position(self, stream: Any) -> dict[str, Any] | None:
        if self._mark is None:
            return self.stream_state
        state = dict(stream.state_dict())
        next_batch, skipped_samples, skipped_batches, bad = self._mark
        state.update(next_batch=next_batch, skipped_samples=skipped_samples, skipped_batches=skipped_batches,
                     bad_images=list(state["bad_images"])[:bad])
        return state

    def state_dict(self, stream: Any, current: str | None) -> dict[str, Any]:
        """The progress after the last batch done (metrics on the CPU)."""
        return {"metrics": accumulators_state(self.metrics), "selection": accumulators_state(self.selection),
                "order": self.order.state_dict(), "current": current, "done": self.done,
                "wall_time_s": self.wall(), "stream": self._stream_position(stream),
                "extra": self.extra_state() if self.extra_state is not None else {}}


# ---------------------------------------------------------------------------------------- writer
def changing_state(method: torch.nn.Module) -> dict[str, Any]:
    """``method.state_dict()`` less the parameters it never changes (not adapted), on the CPU."""
    adapted = {id(p) for p in method.adapted_parameters()}
    frozen = {name for name, p in method.named_parameters() if id(p) not in adapted}
    return to_cpu({k: v for k, v in method.state_dict().items() if k not in frozen})


def restore_method(method: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Load a :func:`changing_state` into ``method`` (its frozen parameters stay as built)."""
    full = dict(method.state_dict())
    unknown = sorted(set(state) - set(full) - {k for k in state if k.startswith(("counters.", "policy_counters."))})
    if unknown:
        raise ValueError(f"the checkpoint's method state has entries this method lacks: {unknown[:10]}")
    full.update(state)
    method.load_state_dict(full)


class Checkpointer:
    """The engine's checkpoint callback: adds the method state and the RNG states to the engine's
    progress and writes ``path`` atomically."""

    def __init__(self, path: str | Path, method: torch.nn.Module, *, config: str, every: int,
                 history: list[dict[str, Any]] | None = None):
        self.path = Path(path)
        self.method = method
        self.config = config
        self.every = int(every)
        self.history = list(history or [])  # earlier sessions of this run (resumes)
        self.written = 0
        self.seconds = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        start = time.perf_counter()
        save_atomic({"format": "tta.run checkpoint", "version": CHECKPOINT_VERSION, "config": self.config,
                     "method": changing_state(self.method), "progress": progress, "rng": rng_state(),
                     "history": self.history}, self.path)
        self.written += 1
        self.seconds += time.perf_counter() - start

    def info(self) -> dict[str, Any]:
        return {"every": self.every, "written": self.written, "seconds": round(self.seconds, 3)}


__all__ = ["CHECKPOINT_NAME", "Checkpointer", "OrderHash", "RunProgress", "accumulators_state", "changing_state",
           "comparable_config", "config_differences", "load_accumulators", "load_checkpoint", "restore_method",
           "rng_state", "save_atomic", "set_rng_state", "to_cpu"]
