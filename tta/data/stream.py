"""Streams: what the engine consumes, one batch at a time.

A stream is any iterable of :class:`Batch`. Images are float in [0, 1] (N, 3, H, W), already on the
device; ``labels`` and ``ids`` stay on the CPU (reading them must not sync the GPU).

:class:`Stream` is the general form. It holds

* ``parts``: the :class:`Domain` objects the images come from -- an image source (files, arrays,
  noise) plus what turns a clean image into a test image (a corruption at a severity, or a custom
  transform), and whether its samples are out-of-distribution (label -1);
* ``segments``: the exact sample order, as consecutive stretches that are each scored under one
  domain name. A segment may draw from several parts (a mixed-domain stream; open-set mixing).

Settings (``tta/data/settings.py``) only write segments; the stream cuts them into batches (never
across a segment boundary), cuts the whole at ``max_samples``, and loads batches ahead of the
model: CPU decoding in DataLoader worker processes (``num_workers``) or a background thread, GPU
decoding (nvJPEG) and corruption synthesis on a side CUDA stream in that thread, ``prefetch``
batches deep, so the model never waits for the CPU when the CPU keeps up.

Resuming: the plan is fixed up front and every image is corrupted by its own seed, so a stream can
start at any batch number (``stream.iterate(start_batch=k)``; ``Batch.number`` is each batch's
number) and yields exactly the batches an uninterrupted iteration yields from there, without
reading the earlier ones. ``state_dict()`` / ``load_state_dict()`` carry that position and the
bad-image record (which counts only batches handed to the caller, not those loaded ahead).

Sample ids: ``ids = code(part) << 32 | index``, where ``index`` is the sample's index in its source
and ``code`` a stable 31-bit hash of the part's name (``"gaussian_noise/5"``, ``"clean"``,
``"ood:noise/gaussian_noise/5"``). They are unique per domain and sample, identical across settings
and seeds for the same sample, and are what the engine hashes into the run record's order hash.
Corruptions are seeded by ``(stream seed, corruption, severity, index)``: a sample is corrupted the
same way in every setting and batch composition.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .checks import positive_int
from .decode import BadImage
from .sources import ON_BAD_IMAGE, ArraySource, ImageSource

MAX_LISTED_BAD_IMAGES = 10_000


@dataclass
class Batch:
    images: Tensor
    labels: Tensor  # int64, CPU; -1 marks out-of-distribution samples
    domain: str
    ids: Tensor  # int64, CPU
    keys: list[str] | None = None  # per-sample file paths (relative to the source root), when there are files
    number: int | None = None  # the batch's position in its stream's plan (Stream.iterate(start_batch=number + 1))

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0] or self.labels.shape[0] != self.ids.shape[0]:
            raise ValueError(f"batch of {self.images.shape[0]} images has {self.labels.shape[0]} labels and "
                             f"{self.ids.shape[0]} ids")


@dataclass
class Domain:
    """One source of test images: a name (``"gaussian_noise/5"``) and how to make its images.

    ``images`` is an :class:`~tta.data.sources.ImageSource` or a tensor (then ``labels`` is needed).
    The images are corrupted on the device with ``corruption`` at ``severity`` (seeded by the
    stream seed), or passed through ``transform(images, ids)``, or used as they are.
    """

    name: str
    images: Any
    labels: Tensor | None = None
    transform: Callable[[Tensor, Tensor], Tensor] | None = None  # (images, ids) -> images
    ids: Tensor | None = None  # per-sample ids given to ``transform``/``corrupt`` (default: the index)
    corruption: str | None = None
    severity: int | float | None = None
    ood: bool = False  # out-of-distribution: labels are -1

    def __post_init__(self) -> None:
        if not isinstance(self.images, ImageSource):
            if self.labels is None:
                raise ValueError(f"domain {self.name!r}: a tensor of images needs labels")
            self.images = ArraySource(self.images, self.labels, name=self.name)
        if self.labels is None:
            self.labels = self.images.labels
        if len(self.labels) != len(self.images):
            raise ValueError(f"domain {self.name!r}: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def source(self) -> ImageSource:
        return self.images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def code(self) -> int:
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF


@dataclass
class Segment:
    """A stretch of the stream scored under one domain name: ``part[i]`` and ``index[i]`` per sample."""

    name: str
    part: np.ndarray  # int64 (n,) positions in Stream.parts
    index: np.ndarray  # int64 (n,) sample index in that part's source

    def __post_init__(self) -> None:
        self.part = np.asarray(self.part, dtype=np.int64).reshape(-1)
        self.index = np.asarray(self.index, dtype=np.int64).reshape(-1)
        if self.part.shape != self.index.shape:
            raise ValueError(f"segment {self.name!r}: {len(self.part)} part entries but {len(self.index)} indices")

    def __len__(self) -> int:
        return len(self.index)


class OrderHash:
    """A running hash of the exact sample order (domain names and sample ids)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, domain: str, ids: Tensor) -> None:
        self._hash.update(domain.encode())
        self._hash.update(ids.to(torch.int64).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


def sample_ids(part: Domain, index: np.ndarray) -> np.ndarray:
    """The per-sample ids handed to the part's corruption or transform (its ``ids`` or the index)."""
    if part.ids is not None:
        return part.ids.numpy()[index].astype(np.int64)
    return index.astype(np.int64)


@dataclass
class _Raw:
    """A batch after the CPU stage: per part, the positions in the batch and the source's raw data."""

    number: int
    groups: list[tuple[int, np.ndarray, Any]]

    def pin_memory(self) -> "_Raw":
        for _, _, raw in self.groups:
            if isinstance(raw, Tensor):
                pass  # small (ids, array rows); pinned by the caller when worth it
            elif hasattr(raw, "pin_memory"):
                raw.pin_memory()
        return self


class _PlanReader(torch.utils.data.Dataset):
    """Batch ``start + i`` of the plan after the CPU stage (for DataLoader workers)."""

    def __init__(self, stream: "Stream", start: int = 0):
        self.stream = stream
        self.start = int(start)

    def __len__(self) -> int:
        return len(self.stream._batches) - self.start

    def __getitem__(self, i: int) -> _Raw:
        return self.stream._read(self.start + i)


class Stream:
    """Batches over ``segments`` of samples drawn from ``parts`` (see the module docstring).

    Args:
        parts: the domains the samples come from.
        segments: the sample order, in stretches scored under one name each.
        batch_size: batches never cross a segment boundary (a segment's last batch may be smaller).
        seed: the corruption seed (and recorded as the stream seed).
        max_samples: cut the stream after this many samples (``None``: all).
        num_workers: DataLoader worker processes for CPU decoding (0: a background thread).
        prefetch: batches loaded ahead in a background thread (0: load in the caller's thread).
        decode: ``"auto"`` (on the GPU when ``device`` is CUDA), ``"cpu"`` or ``"cuda"``.
        on_bad_image: ``"skip"`` (skip, count and list unreadable files) or ``"fail"``.
        info: extra entries for :meth:`describe` (setting name and options ...).
        channels: the model's input channels: images are converted after any corruption
            (greyscale <-> RGB, :mod:`tta.data.channels`) and the conversion is recorded
            (``describe()["channels"]``); ``None``: as the sources deliver them.
        summarize: ``domains -> results`` (the engine's results part); default: mean over domains.
    """

    def __init__(self, parts: Sequence[Domain], segments: Sequence[Segment], *, batch_size: int = 64, seed: int = 0,
                 device: torch.device | str = "cpu", max_samples: int | None = None, num_workers: int = 0,
                 prefetch: int = 2, decode: str = "auto", on_bad_image: str = "skip",
                 info: dict[str, Any] | None = None,
                 summarize: Callable[[dict[str, dict[str, float]]], dict[str, Any]] | None = None,
                 channels: int | None = None):
        batch_size = positive_int(batch_size, "batch_size")
        max_samples = positive_int(max_samples, "max_samples", none_means="the whole stream")
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if decode not in ("auto", "cpu", "cuda"):
            raise ValueError(f"decode must be auto, cpu or cuda, got {decode!r}")
        self.parts = list(parts)
        self._codes: np.ndarray | None = None  # the parts' id codes (_ids)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.device = torch.device(device)
        self.max_samples = max_samples
        self.num_workers = int(num_workers or 0)
        self.prefetch = int(prefetch or 0)
        self.decode = ("cuda" if self.device.type == "cuda" else "cpu") if decode == "auto" else decode
        if self.decode == "cuda" and self.device.type != "cuda":
            raise ValueError("decode=cuda needs a CUDA device")
        self.on_bad_image = on_bad_image
        self.info = dict(info or {})
        self._summarize = summarize
        self.bad_images: list[BadImage] = []  # distinct unreadable files, in the order met
        self._bad_paths: set[str] = set()
        self.skipped_samples = 0
        self.skipped_batches = 0
        self.start_batch = 0  # where iteration starts (load_state_dict sets it to resume)
        self.next_batch = 0  # the plan number after the last batch handed out (state_dict)
        self.segments = self._cut(list(segments))
        self._plan_hash: str | None = None
        for segment in self.segments:
            if len(segment) and (segment.part.min() < 0 or segment.part.max() >= len(self.parts)):
                raise ValueError(f"segment {segment.name!r} refers to a part that does not exist")
        self.channels = None if channels is None else positive_int(channels, "channels")
        self.channel_conversions: dict[str, Any] = {}  # part name -> conversion, for the parts that need one
        self._convert: set[int] = set()  # indices of those parts
        if self.channels is not None:
            from .channels import channel_conversion

            for p, part in enumerate(self.parts):
                conversion = channel_conversion(getattr(part.source, "channels", 3), self.channels)
                if conversion is not None:
                    self.channel_conversions[part.name] = conversion
                    self._convert.add(p)
        self._batches = [(s, start, min(start + self.batch_size, len(seg)))
                         for s, seg in enumerate(self.segments) for start in range(0, len(seg), self.batch_size)]

    # -- plan ---------------------------------------------------------------------------------

    def _cut(self, segments: list[Segment]) -> list[Segment]:
        segments = [s for s in segments if len(s)]
        if self.max_samples is None:
            return segments
        out, left = [], self.max_samples
        for segment in segments:
            if left <= 0:
                break
            if len(segment) > left:
                segment = Segment(segment.name, segment.part[:left], segment.index[:left])
            out.append(segment)
            left -= len(segment)
        return out

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.segments)

    def _ids(self, part: np.ndarray, index: np.ndarray) -> np.ndarray:
        if self._codes is None or len(self._codes) != len(self.parts):  # computed once: a ccc stream has many parts
            self._codes = np.asarray([p.code for p in self.parts], dtype=np.int64)
        codes = self._codes[part]
        low = index.astype(np.int64)  # a part without its own ids: the index (sample_ids)
        for p in np.unique(part):
            if self.parts[p].ids is not None:  # only these: a ccc stream has thousands of parts
                mask = part == p
                low[mask] = sample_ids(self.parts[p], index[mask])
        return (codes << 32) | (low & 0xFFFFFFFF)

    def plan_hash(self) -> str:
        """Hash of the planned order (names and ids), known before the run."""
        if self._plan_hash is None:
            order = OrderHash()
            for segment in self.segments:
                order.update(segment.name, torch.from_numpy(self._ids(segment.part, segment.index)))
            self._plan_hash = order.hexdigest()
        return self._plan_hash

    # -- loading ------------------------------------------------------------------------------

    def _read(self, number: int) -> _Raw:
        """CPU stage of batch ``number`` (may run in a worker process)."""
        s, start, stop = self._batches[number]
        segment = self.segments[s]
        part, index = segment.part[start:stop], segment.index[start:stop]
        groups = []
        for p in _unique_in_order(part):
            positions = np.flatnonzero(part == p)
            source = self.parts[p].source
            groups.append((int(p), positions, source.read(index[positions], self.decode, self.on_bad_image)))
        return _Raw(number, groups)

    def _finish(self, raw: _Raw) -> tuple[Batch | None, list[BadImage]]:
        """Device stage: decode (GPU path), corrupt, assemble in the planned order. Returns the batch
        (``None`` when no image of it could be read) and the files skipped in it."""
        s, start, stop = self._batches[raw.number]
        segment = self.segments[s]
        part, index = segment.part[start:stop], segment.index[start:stop]
        outputs: list[tuple[np.ndarray, Tensor]] = []
        target_size = None
        skipped: list[BadImage] = []
        for p, positions, data in raw.groups:
            domain = self.parts[p]
            images, ok, bad = domain.source.finish(data, self.device)
            skipped.extend(bad)
            kept = positions if ok is None else positions[ok]
            if images is None or len(kept) == 0:
                continue
            ids = sample_ids(domain, index[kept])
            if domain.transform is not None or domain.corruption is not None:
                ids_device = torch.from_numpy(ids).to(self.device, non_blocking=True)
                if domain.transform is not None:
                    images = domain.transform(images, ids_device)
                else:
                    from .corruptions import corrupt

                    images = corrupt(images, domain.corruption, domain.severity, seed=self.seed, ids=ids_device)
            if p in self._convert:  # after the corruption: it sees the data as it is
                from .channels import convert_channels

                images = convert_channels(images, self.channels)
            if not domain.ood and target_size is None:
                target_size = tuple(images.shape[-2:])
            outputs.append((kept, images))
        if not outputs:
            return None, skipped
        if target_size is not None:  # out-of-distribution images take the in-distribution size
            outputs = [(k, _resize_to(x, target_size)) for k, x in outputs]
        kept = np.concatenate([k for k, _ in outputs])
        images = outputs[0][1] if len(outputs) == 1 else torch.cat([x for _, x in outputs])
        order = np.argsort(kept, kind="stable")
        if len(outputs) > 1 or not np.array_equal(order, np.arange(len(order))):
            images = images[torch.from_numpy(order).to(images.device)]
            kept = kept[order]
        labels = torch.empty(len(kept), dtype=torch.int64)
        for p in _unique_in_order(part[kept]):
            mask = part[kept] == p
            domain = self.parts[p]
            labels[torch.from_numpy(mask)] = (-1 if domain.ood else
                                              domain.labels[torch.from_numpy(index[kept][mask])])
        ids = torch.from_numpy(self._ids(part[kept], index[kept]))
        keys = None
        if any(hasattr(self.parts[p].source, "files") for p, _, _ in raw.groups):
            keys = [""] * len(kept)
            for p in _unique_in_order(part[kept]):
                where = np.flatnonzero(part[kept] == p)
                found = self.parts[p].source.keys(index[kept][where]) or [""] * len(where)
                for w, k in zip(where, found):
                    keys[w] = k
        return Batch(images, labels, segment.name, ids, keys, number=raw.number), skipped

    def _record_bad(self, bad: list[BadImage]) -> None:
        for item in bad:  # a file read in several domains (on-the-fly corruptions) is listed once
            self.skipped_samples += 1
            if item.path not in self._bad_paths:
                self._bad_paths.add(item.path)
                self.bad_images.append(item)

    def _use_workers(self) -> bool:
        return self.num_workers > 0 and self.decode == "cpu" and any(p.source.heavy for p in self.parts)

    def _raw_batches(self, start: int) -> Iterator[_Raw]:
        """The CPU stage of batches ``start, start + 1, ...``; earlier batches are never read."""
        if self._use_workers():
            loader = torch.utils.data.DataLoader(
                _PlanReader(self, start), batch_size=None, shuffle=False, num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=max(2, self.prefetch),
                collate_fn=_identity)
            yield from loader
            return
        pin = self.device.type == "cuda"
        for number in range(start, len(self._batches)):
            raw = self._read(number)
            yield raw.pin_memory() if pin else raw

    def _produce(self, start: int) -> Iterator[_Loaded]:
        """Read and finish batches from ``start`` on, in the caller's thread and CUDA stream."""
        for raw in self._raw_batches(start):
            batch, bad = self._finish(raw)
            yield _Loaded(raw.number, batch, bad, None)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()

    def iterate(self, start_batch: int | None = None) -> Iterator[Batch]:
        """The batches of the plan from batch number ``start_batch`` on (default :attr:`start_batch`).

        The batches are exactly those an uninterrupted iteration yields from that position (same
        samples, ids, images, labels, domains): the order is planned up front and every image is
        corrupted by its own seed, so batches before ``start_batch`` are never read, decoded or
        corrupted. ``len(stream)`` stays the number of batches of the whole plan.
        """
        start = self.start_batch if start_batch is None else _batch_number(start_batch, len(self))
        items = self._prefetched(start) if self.prefetch > 0 else self._produce(start)
        for item in items:
            self._record_bad(item.bad)
            self.next_batch = item.number + 1
            if item.batch is None:
                self.skipped_batches += 1
                continue
            if item.event is not None:  # finished on the loader's side stream
                current = torch.cuda.current_stream(self.device)
                current.wait_event(item.event)
                item.batch.images.record_stream(current)
            yield item.batch

    def _prefetched(self, start: int) -> Iterator[_Loaded]:
        """:meth:`_produce` in a background thread (on a side CUDA stream), ``prefetch`` batches ahead.

        The thread reads, decodes, corrupts and copies the next batches while the caller adapts on
        the current one; it produces them in plan order (so the batches are those of a synchronous
        iteration), its errors are raised in the caller, and it stops when the caller stops
        iterating (a ``break``, an error, or the generator being closed)."""
        results: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                if cuda and self.device.index is not None:
                    torch.cuda.set_device(self.device)
                for raw in self._raw_batches(start):
                    if stop.is_set():
                        return
                    if cuda:
                        with torch.cuda.stream(side):
                            batch, bad = self._finish(raw)
                            event = torch.cuda.Event()
                            event.record(side)
                    else:
                        (batch, bad), event = self._finish(raw), None
                    if not put(_Loaded(raw.number, batch, bad, event)):
                        return
                put(done)
            except BaseException as error:  # re-raised in the consumer
                put(error)

        thread = threading.Thread(target=produce, name="tta-stream-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)

    # -- resuming -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the next batch number and the bad-image record so far.

        Taken after the caller has processed batch ``n`` it holds ``next_batch = n + 1``; with
        :meth:`load_state_dict` on the same stream (same data, setting, seed, batch size and cut)
        the next iteration continues there and :meth:`describe` counts as an uninterrupted run
        would. Plain ints, strings and lists (loadable with ``torch.load(weights_only=True)``)."""
        return {"next_batch": int(self.next_batch), "num_batches": len(self), "batch_size": self.batch_size,
                "plan_hash": self.plan_hash(), "skipped_samples": int(self.skipped_samples),
                "skipped_batches": int(self.skipped_batches),
                "bad_images": [[b.path, b.error] for b in self.bad_images]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next ``for batch in stream`` starts at its
        ``next_batch`` (:attr:`start_batch`) and the bad-image record is restored. A state of
        another plan (other data, setting, seed, batch size or ``max_samples``) raises ``ValueError``."""
        expected = {"num_batches": len(self), "batch_size": self.batch_size, "plan_hash": self.plan_hash()}
        differ = [f"{k}: {state.get(k)!r} in the state, {v!r} here" for k, v in expected.items() if state.get(k) != v]
        if differ:
            raise ValueError("this stream state was saved for another stream plan (" + "; ".join(differ) + "); "
                             "resume with the same data, setting, seed, batch_size and max_samples")
        self.start_batch = _batch_number(state["next_batch"], len(self))
        self.next_batch = self.start_batch
        self.skipped_samples = int(state["skipped_samples"])
        self.skipped_batches = int(state["skipped_batches"])
        self.bad_images = [BadImage(str(path), str(error)) for path, error in state["bad_images"]]
        self._bad_paths = {b.path for b in self.bad_images}

    # -- record -------------------------------------------------------------------------------

    def summarize(self, domains: dict[str, dict[str, float]]) -> dict[str, Any]:
        """The results part of the run record from the per-domain metrics."""
        if self._summarize is not None:
            return self._summarize(domains)
        from ..metrics import mean_over_domains

        return {"mean": mean_over_domains(domains), "domains": domains}

    def domain_names(self) -> list[str]:
        names: list[str] = []
        for segment in self.segments:
            if not names or names[-1] != segment.name:
                names.append(segment.name)
        return names

    def describe(self) -> dict[str, Any]:
        bad = self.bad_images
        return {
            "batch_size": self.batch_size, "seed": self.seed, "num_samples": self.num_samples,
            "num_batches": len(self), "max_samples": self.max_samples, "domains": self.domain_names(),
            "plan_hash": self.plan_hash(), "decode": self.decode, "num_workers": self.num_workers,
            "prefetch": self.prefetch, "on_bad_image": self.on_bad_image,
            "channels": {"model": self.channels, "conversions": self.channel_conversions},
            "bad_images": {"count": len(bad), "skipped_samples": self.skipped_samples,
                           "skipped_batches": self.skipped_batches,
                           "files": [{"path": b.path, "error": b.error} for b in bad[:MAX_LISTED_BAD_IMAGES]]},
            **self.info,
        }


@dataclass
class _Loaded:
    """A finished batch on its way to the caller (``batch`` is ``None`` when all its images were bad)."""

    number: int
    batch: Batch | None
    bad: list[BadImage]
    event: Any  # torch.cuda.Event on the loader's side stream, or None


def _identity(x: Any) -> Any:
    return x


def _batch_number(value: Any, num_batches: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= num_batches:
        raise ValueError(f"start_batch must be an integer in [0, {num_batches}] (the stream's number of batches), "
                         f"got {value!r}")
    return int(value)


def _unique_in_order(values: np.ndarray) -> list[int]:
    _, first = np.unique(values, return_index=True)
    return [int(values[i]) for i in sorted(first)]


def _resize_to(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                           antialias=True).clamp_(0, 1)


def shuffled(n: int, seed: int, name: str, visit: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` that depends on (seed, domain name, visit) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, zlib.crc32(name.encode()), visit]))
    return rng.permutation(n).astype(np.int64)


def domain_order(n: int, seed: int, name: str, shuffle: bool, visit: int = 0) -> np.ndarray:
    """The order of a domain's ``n`` samples: :func:`shuffled`, or ``0..n-1`` without shuffling."""
    return shuffled(n, seed, name, visit) if shuffle else np.arange(n, dtype=np.int64)

