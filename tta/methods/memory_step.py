"""The batch family's step when a memory policy is present: predict the batch, admit from it, learn
from the memory (:mod:`tta.policies.memory`).

With ``policies.extra=[rotta_memory]`` (or any :class:`~tta.policies.memory.MemoryPolicy`), a batch
method's default step becomes:

1. predict the batch (no gradient; BatchNorm as the method configures it) -- the returned logits;
2. the memory policy admits samples of the batch (and evicts others), from those logits;
3. forward the memory's contents (class-major order) with gradient; the method's policies weight
   them (the memory policy's own weight, e.g. RoTTA's timeliness, is one of them); the method's
   objective on them; one guarded step.

Costs: 2 forwards (1 + the memory) and 1 backward per batch, and the host reads of the memory
policy (one per batch). Selection diagnostics: the stage ``<policy>_admitted`` is the mask of the
batch's samples that entered the memory, so its precision is that of the pseudo-labels admitted;
``counters.memory_admitted`` / ``memory_evicted`` count them. The batch's memory events (admitted,
evicted, the slots each update trained on) go to the engine in ``last_memory``
(:class:`~tta.policies.memory.MemoryRecord`), which scores the precision of the trained pseudo-labels
once the batch's labels are known (``selection.memory`` in run.json). An empty memory skips the step
(``skipped_empty``). The update runs once per batch, after the whole batch is admitted (RoTTA's own
recipe updates every 64 admitted samples).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .batch import BatchMethod


def memory_policies(method: "BatchMethod") -> list:
    return [p for p in method.policies if getattr(p, "holds_memory", False)]


def check_memory_policies(method: "BatchMethod") -> None:
    """At most one memory per method: two memory policies would each want the update's samples."""
    held = memory_policies(method)
    if len(held) > 1:
        names = " and ".join(repr(p.name) for p in held)
        raise ValueError(f"method {method.name!r} can train from one sample memory; the policies {names} each "
                         f"hold one: keep one of them")
    if held and method.steps > 1:  # each step would admit the batch again
        raise ValueError(f"method {method.name!r} with the memory policy {held[0].name!r} takes one step per batch "
                         f"(steps={method.steps}): a second step would admit the same samples twice")
    if held:
        method.counters.add("memory_admitted", 0)
        method.counters.add("memory_evicted", 0)


def adapt_from_memory(method: "BatchMethod", x: torch.Tensor) -> torch.Tensor:
    """One step of ``method`` learning from its memory policy's memory (see the module docstring)."""
    policy = memory_policies(method)[0]
    key = method.policy_keys[list(method.policies).index(policy)]
    with torch.no_grad():
        logits = method.run_model(x)
    method.counters.add("forwards", 1)
    record = method.__dict__["last_memory"] = policy.memory.begin_batch()
    admitted, evicted = policy.admit(x, logits)
    record.admitted, record.evicted = admitted.sum(), evicted
    method.counters.add("memory_admitted", record.admitted)
    method.counters.add("memory_evicted", evicted)
    slots = policy.training_slots()
    if slots.numel() == 0:
        method.last_selection = {f"{key}_admitted": admitted}
        method.counters.add("skipped_empty", 1)
        return logits
    memory = policy.memory
    memory.trained_on(record, slots)
    images = memory.images.index_select(0, slots)
    memory_logits = method.run_model(images)
    method.counters.add("forwards", 1)
    ctx = method.context(images, memory_logits)
    ctx.extras.update(slots=slots, ages=memory.ages.index_select(0, slots), labels=memory.labels.index_select(0, slots))
    weights = method.select(ctx)
    method.step(method.objective(ctx, weights), weights)
    method.last_selection = {f"{key}_admitted": admitted}  # over the batch, for the engine's diagnostics
    return logits


def admit_in_update_periods(method, x: torch.Tensor, predict: Callable[[int, int], torch.Tensor],
                            key: str) -> list[torch.Tensor]:
    """RoTTA's and SoTTA's walk over a batch: cut it where the stream reaches the next multiple of
    ``method.update_every`` samples, let the memory policy admit each piece (given ``predict(start,
    end)``, its logits), count admissions and evictions, and call ``method.update_model()`` at each
    multiple (so an update can fall in the middle of a batch, as the references' per-sample loops).
    The stream position lives in ``method.instances`` (a buffer, saved with the state) and its host
    copy ``method._seen`` (read from the buffer only after a load). Returns each piece's logits; the
    admitted mask of the batch goes to the selection diagnostics under ``key``, its memory events to
    ``last_memory`` (``update_model`` notes the slots it trains on with ``memory.trained_on``)."""
    seen = method._seen if method._seen is not None else int(method.instances)
    policy, start, outputs, admitted = method.memory_policy, 0, [], []
    record = method.__dict__["last_memory"] = policy.memory.begin_batch()
    while start < x.shape[0]:
        end = min(x.shape[0], start + method.update_every - seen % method.update_every)
        logits = predict(start, end)
        outputs.append(logits)
        mask, evicted = policy.admit(x[start:end], logits, offset=start)
        admitted.append(mask)
        record.evicted += evicted
        method.counters.add("memory_admitted", mask.sum())
        method.counters.add("memory_evicted", evicted)
        seen += end - start
        if seen % method.update_every == 0:
            method.update_model()
        start = end
    method.instances.fill_(seen)
    method._seen = seen
    method.last_selection = {key: torch.cat(admitted)}
    record.admitted = method.last_selection[key].sum()
    return outputs


__all__ = ["adapt_from_memory", "admit_in_update_periods", "check_memory_policies", "memory_policies"]
