"""The sample memory: what a memory policy admits from the stream and a method trains from.

Some selection rules do not weight the samples of the current batch but decide which samples enter
a **memory** of fixed capacity, and the method then learns from the memory (RoTTA's
category-balanced memory with timeliness and uncertainty, SoTTA's high-confidence class-balanced
memory). The memory is written once, here; *which* samples enter and which leave is the policy's
(:class:`MemoryPolicy`, e.g. ``rotta_memory``).

**What a sample carries**: its image (as the method saw it, in [0, 1]), its pseudo-label (the class
it was admitted under), its age (samples admitted since it was), its score (the admission policy's
number, e.g. RoTTA's uncertainty) and its insertion number (the order within a class).

**For the selection diagnostics only** it also carries, per slot, the sample's true label
(``truth``; :data:`UNKNOWN` until the engine hands the batch's labels over, and forever on a stream
without labels) and the sample's index in the current batch (``arrival``, -1 for samples of earlier
batches). The method never reads them; :meth:`SampleMemory.diagnose` turns a batch's
:class:`MemoryRecord` (admitted, evicted, the slots trained on) into counts after the step, with the
labels, and writes the labels of the samples the batch brought in (device operations, no host read).

**Where it lives**: device buffers, in the policy's state (``state_dict()``), so a saved method
resumes with its memory. The images buffer is sized by the first admitted batch. Admission and
eviction rules of the reference code are sequential decisions over single samples (each one
depends on the memory as the previous sample left it), so a memory policy reads the batch's
pseudo-labels and scores and the memory's bookkeeping on the host **once per batch** (one sync), makes
the decisions in Python, and writes the images and the bookkeeping back in one copy each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .base import BatchContext, Policy


#: ``truth`` of a slot whose sample's label was never handed over (a stream without labels)
UNKNOWN = -2


@dataclass
class MemoryRecord:
    """One batch's memory events for the selection diagnostics: the samples admitted (a device
    count), evicted (a host number, known from the decisions) and, per update taken on the memory,
    the pseudo-labels, stored true labels and arrival indices of the slots trained on (device
    tensors copied when the update ran, so a slot overwritten later in the batch does not change them)."""

    memory: "SampleMemory"
    admitted: torch.Tensor | int = 0
    evicted: int = 0
    trained: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class SampleMemory(torch.nn.Module):
    """A fixed number of slots; each holds an image, a pseudo-label, an age, a score and its insertion number.

    Args:
        capacity: the number of slots.
    """

    def __init__(self, capacity: int):
        super().__init__()
        if int(capacity) < 1:
            raise ValueError(f"memory capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.register_buffer("images", torch.zeros(0))
        self.register_buffer("occupied", torch.zeros(self.capacity, dtype=torch.bool))
        self.register_buffer("labels", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("ages", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("scores", torch.zeros(self.capacity, dtype=torch.float64))
        self.register_buffer("order", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("inserted", torch.zeros((), dtype=torch.long))
        # diagnostics only (never read by a method): the true label, the index in the current batch
        self.register_buffer("truth", torch.full((self.capacity,), UNKNOWN, dtype=torch.long))
        self.register_buffer("arrival", torch.full((self.capacity,), -1, dtype=torch.long))

    def clear(self) -> None:
        for name in ("occupied", "labels", "ages", "scores", "order", "inserted"):
            getattr(self, name).zero_()
        self.truth.fill_(UNKNOWN)
        self.arrival.fill_(-1)

    # ------------------------------------------------------------------ diagnostics
    def begin_batch(self) -> MemoryRecord:
        """A new batch: no slot holds a sample of it yet. Returns the batch's (empty) record."""
        self.arrival.fill_(-1)
        return MemoryRecord(self)

    def trained_on(self, record: MemoryRecord | None, slots: torch.Tensor) -> None:
        """Note in ``record`` that an update trains on ``slots`` (copies of their labels, no host read)."""
        if record is not None and slots.numel():
            record.trained.append((self.labels.index_select(0, slots), self.truth.index_select(0, slots),
                                   self.arrival.index_select(0, slots)))

    def diagnose(self, record: MemoryRecord, labels: torch.Tensor) -> torch.Tensor:
        """The batch's counts (:data:`tta.metrics.MEMORY_FIELDS`, a device tensor) given the batch's true
        ``labels`` (-1: an open-set sample, never right); then the labels of the samples the batch
        brought in are stored with them. A trained sample of this batch takes its label from
        ``labels``; an older one from ``truth`` (:data:`UNKNOWN`: not counted in the precision)."""
        labels = labels.to(self.truth.device, torch.long)
        trained = labelled = correct = torch.zeros((), dtype=torch.long, device=labels.device)
        for pseudo, truth, arrival in record.trained:
            truth = torch.where(arrival >= 0, labels[arrival.clamp(min=0)], truth)
            trained = trained + pseudo.numel()
            labelled = labelled + (truth != UNKNOWN).sum()
            correct = correct + (pseudo == truth).sum()
        admitted = torch.as_tensor(record.admitted, device=labels.device).to(torch.long)
        self.truth.copy_(torch.where(self.arrival >= 0, labels[self.arrival.clamp(min=0)], self.truth))
        self.arrival.fill_(-1)
        return torch.stack([admitted, torch.full_like(admitted, record.evicted), trained, labelled, correct])

    # ------------------------------------------------------------------ host view (one sync)
    def fits(self, x: torch.Tensor) -> bool:
        """Whether images like ``x`` can join the stored ones (same size and dtype)."""
        return self.images.dim() == x.dim() and self.images.shape[1:] == x.shape[1:] and self.images.dtype == x.dtype

    def host_view(self, x: torch.Tensor | None = None) -> dict[str, list]:
        """The bookkeeping as Python lists (one host read). Given a batch ``x`` of another image size
        or dtype than the stored images, the memory is emptied first: samples of different sizes
        cannot be trained on together (a stream whose image size changes starts a new memory)."""
        if x is not None and not self.fits(x):
            self.clear()
        return {"occupied": self.occupied.tolist(), "labels": self.labels.tolist(), "ages": self.ages.tolist(),
                "scores": self.scores.tolist(), "order": self.order.tolist(), "inserted": int(self.inserted)}

    def write(self, view: dict[str, list], x: torch.Tensor, placed: dict[int, int], offset: int = 0) -> None:
        """Write back the bookkeeping of ``view`` and the images ``x[i]`` into slot ``placed[i]``
        (``x`` starts at index ``offset`` of the batch: the slots' ``arrival``)."""
        device = self.occupied.device
        if self.images.dim() != x.dim() or self.images.shape[1:] != x.shape[1:] or self.images.dtype != x.dtype:
            # first batch, or images of another size or dtype than those stored: a new memory buffer
            # (the caller's decisions were made on an emptied view, see MemoryPolicy.fits)
            self.images = torch.zeros(self.capacity, *x.shape[1:], dtype=x.dtype, device=x.device)
        if placed:
            slots = torch.tensor(list(placed.values()), dtype=torch.long, device=x.device)
            rows = torch.tensor(list(placed.keys()), dtype=torch.long, device=x.device)
            self.images.index_copy_(0, slots, x.detach().index_select(0, rows))
            self.arrival.index_copy_(0, slots.to(self.arrival.device), rows.to(self.arrival.device) + offset)
            self.truth.index_fill_(0, slots.to(self.truth.device), UNKNOWN)
        self.occupied.copy_(torch.tensor(view["occupied"], dtype=torch.bool), non_blocking=True)
        self.labels.copy_(torch.tensor(view["labels"], dtype=torch.long), non_blocking=True)
        self.ages.copy_(torch.tensor(view["ages"], dtype=torch.long), non_blocking=True)
        self.scores.copy_(torch.tensor(view["scores"], dtype=torch.float64), non_blocking=True)
        self.order.copy_(torch.tensor(view["order"], dtype=torch.long), non_blocking=True)
        self.inserted.fill_(view["inserted"])
        del device

    # ------------------------------------------------------------------ what a method trains from
    def contents(self, view: dict[str, list] | None = None) -> torch.Tensor:
        """Occupied slot indices, class-major (class 0 first), in insertion order within a class (the
        order of RoTTA's ``get_memory`` and SoTTA's ``get_memory``)."""
        view = view or self.host_view()
        slots = [s for s in range(self.capacity) if view["occupied"][s]]
        slots.sort(key=lambda s: (view["labels"][s], view["order"][s]))
        return torch.tensor(slots, dtype=torch.long, device=self.occupied.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, fill in (("truth", UNKNOWN), ("arrival", -1)):  # a state saved before the diagnostics
            state_dict.setdefault(prefix + name, torch.full((self.capacity,), fill, dtype=torch.long))
        images = state_dict.get(prefix + "images")
        if images is not None and images.shape != self.images.shape:  # sized by the first batch
            self.images = torch.zeros_like(images, device=self.occupied.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}"


class MemoryPolicy(Policy):
    """Base of the memory policies: :meth:`admit` decides, per batch, which samples enter the memory
    and which leave it; :meth:`forward` weights the memory's samples when the method trains from them.

    A method that has a memory policy (the batch family's default step, ``policies.extra=[...]``)
    predicts the batch, lets the policy admit from it, and takes its update on the memory's contents
    instead of the batch; its other policies then weight the memory's samples.
    """

    level = "samples"
    needs: tuple[str, ...] = ("memory",)
    #: the method trains from this policy's memory
    holds_memory: ClassVar[bool] = True

    def __init__(self, capacity: int):
        super().__init__()
        self.memory = SampleMemory(capacity)

    def admission_scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``(pseudo-labels, score)`` of each sample of the batch, the score the policy admits by."""
        raise NotImplementedError

    def admit_on_host(self, view: dict[str, Any], labels: list[int], scores: list[float]
                      ) -> tuple[list[int], int]:  # pragma: no cover
        """The admission and eviction decisions on the host bookkeeping ``view`` (changed in place;
        ``view["batch_index"]`` gives, per slot, the batch index of the sample stored there in this
        batch, or -1): the batch indices admitted and the number of evictions."""
        raise NotImplementedError

    def admit(self, x: torch.Tensor, logits: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, int]:
        """Admit from the batch ``x`` given its ``logits``; returns the mask of admitted samples (on the
        device) and the number of evictions (a host number, known from the decisions). The labels and
        scores, and the memory's bookkeeping, are the batch's only host reads. ``offset``: the index
        of ``x[0]`` in the batch, when ``x`` is a piece of it (the diagnostics' ``arrival``)."""
        labels, scores = self.admission_scores(logits.detach())
        values = torch.stack([labels.to(torch.float64), scores.to(torch.float64)]).tolist()
        view = self.memory.host_view(x)
        admitted, evicted = self.admit_on_host(view, [int(c) for c in values[0]], values[1])
        placed = {i: s for s, i in enumerate(view["batch_index"]) if i >= 0 and view["occupied"][s]}
        self.memory.write(view, x, placed, offset)
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        mask[admitted] = True
        return mask.to(x.device, non_blocking=True), evicted

    def training_slots(self) -> torch.Tensor:
        """The slots a method trains from, in order (default: every occupied one, class-major)."""
        return self.memory.contents()

    def reset(self) -> None:
        """A reset empties the memory (the samples belong to the stream before it)."""
        self.memory.clear()

    def forward(self, ctx: BatchContext, alive: torch.Tensor) -> torch.Tensor:
        """Weights of the memory samples the method trains from (``ctx.extras["slots"]``): 1."""
        return torch.ones(ctx.batch_size, device=ctx.logits.device)


__all__ = ["MemoryPolicy", "MemoryRecord", "SampleMemory", "UNKNOWN"]
