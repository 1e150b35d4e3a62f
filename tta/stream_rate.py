"""Accuracy under a stream rate: a method slower than the stream misses batches.

Alfarra et al., "Evaluation of Test-Time Adaptation Under Computational Time Constraints", ICML
2024 (code: github.com/MotasemAlfarra/Online_Test_Time_Adaptation @8e21fad, ``utils/online_eval.py``).
The stream reveals a batch every ``1 / (eta * r)`` seconds, ``r`` the throughput of a plain
forward. After each batch it adapts on, a method with relative cost

    C = (time to adapt on and predict the batch) / (time of one plain forward of the current model)

misses the next ``max(0, ceil(eta * C) - 1)`` batches (``online_eval.py`` L31). A missed batch is
predicted by the method's current model without adapting (:meth:`tta.methods.Method.predict_only`:
no update, no change of any method state) and counts towards the accuracy like any other
(L32-41). ``eta = 1`` is the paper's default (``utils/argparse.py`` L21, ``--eta 1``); ``eta = 0``
is the offline protocol (every batch adapted).

Measured C (the default): per adapted batch, like the reference (L9-30), the adapting call is timed
and then a plain forward of the post-update model on the same batch. On a GPU the two spans are
timed with CUDA events and read with **one** host sync per adapted batch (the protocol's; nothing
syncs on a missed batch); on the CPU with the wall clock. A declared C (``relative_cost``: a
number, or a table by method name) times nothing and makes a run reproducible on a noisy machine.

Deviations from the reference, none affecting the rule: the plain forward is
:meth:`~tta.methods.Method.predict_only` (its buffer restore is included in the forward's time, a
copy of the BatchNorm statistics, so C is slightly lower than a bare forward would give); the
reference times with ``torch.cuda.synchronize()`` around each span (three syncs), here CUDA events
(one). The reference's ``--single_model`` variant (random labels on missed batches) is not offered.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping

import torch

#: the paper's default ``eta`` (``utils/argparse.py`` L21)
PAPER_ETA = 1.0


def resolve_relative_cost(spec: Any, method: str) -> float | None:
    """The declared relative cost for ``method``: ``None`` (measure it), a number, or a table
    ``{method name: number}`` with an optional ``default`` entry (a method missing from a table
    without one raises ``ValueError``)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        if method in spec:
            value = spec[method]
        elif "default" in spec:
            value = spec["default"]
        else:
            raise ValueError(f"eval.relative_cost is a table without {method!r} and without a 'default' entry: "
                             f"{dict(spec)}")
    else:
        value = spec
    if isinstance(value, bool) or value is None:
        raise ValueError(f"eval.relative_cost must be a number, got {value!r} for {method!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"eval.relative_cost must be a positive number, got {value} for {method!r}")
    return value


def check_stream_rate(eta: Any) -> float:
    """``eta`` as a float >= 0 (0: offline, every batch adapted)."""
    if isinstance(eta, bool) or eta is None:
        raise ValueError(f"eval.stream_rate must be a number >= 0 (0: off), got {eta!r}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eval.stream_rate must be a number >= 0 (0: off), got {eta}")
    return eta


def batches_missed(eta: float, cost: float) -> int:
    """Batches missed after an adapted one: ``max(0, ceil(eta * C) - 1)`` (reference L31)."""
    return max(0, math.ceil(eta * cost) - 1)


class StreamRate:
    """The stream-rate schedule of one run (see the module docstring).

    Per batch the engine asks :meth:`adapts`; an adapted batch runs through :meth:`adapt_timed`
    (which measures C unless one is declared), a missed one through ``method.predict_only``.
    ``reset()`` starts a new episode (the reference runs each domain of the episodic setting in its
    own process, so nothing is missed at a domain's start); :meth:`record` is what run.json keeps.
    """

    def __init__(self, eta: float, relative_cost: float | None = None):
        self.eta = check_stream_rate(eta)
        self.declared = None if relative_cost is None else float(relative_cost)
        self.delay = 0
        self.adapted = 0
        self.skipped = 0
        self.costs: list[float] = []          # measured C per adapted batch (empty when declared)
        self.per_domain: dict[str, list[int]] = {}  # domain -> [adapted, skipped]
        self.skipped_batches: list[int] = []  # stream batch indices predicted without adapting

    @property
    def active(self) -> bool:
        return self.eta > 0

    def reset(self) -> None:
        self.delay = 0

    def adapts(self) -> bool:
        """Whether the next batch is adapted on (else it is missed)."""
        return self.delay == 0

    def missed(self, index: int, domain: str) -> None:
        self.delay -= 1
        self.skipped += 1
        self.skipped_batches.append(int(index))
        self.per_domain.setdefault(domain, [0, 0])[1] += 1

    def adapt_timed(self, adapt: Callable[[], torch.Tensor], forward: Callable[[], torch.Tensor],
                    device: torch.device, domain: str) -> torch.Tensor:
        """Run ``adapt`` (the method's call) and set the delay from C: the declared one, or measured
        as ``adapt``'s time over ``forward``'s (a plain forward of the post-update model), with one
        host sync on a GPU."""
        self.adapted += 1
        self.per_domain.setdefault(domain, [0, 0])[0] += 1
        if self.declared is not None:
            out = adapt()
            cost = self.declared
        elif device.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            out = adapt()
            marks[1].record()
            forward()
            marks[2].record()
            marks[2].synchronize()  # the one host sync of an adapted batch
            cost = marks[0].elapsed_time(marks[1]) / max(marks[1].elapsed_time(marks[2]), 1e-6)
            self.costs.append(cost)
        else:
            t0 = time.perf_counter()
            out = adapt()
            t1 = time.perf_counter()
            forward()
            t2 = time.perf_counter()
            cost = (t1 - t0) / max(t2 - t1, 1e-9)
            self.costs.append(cost)
        self.delay = batches_missed(self.eta, cost)
        return out

    # ------------------------------------------------------------------ record / resume
    def record(self) -> dict[str, Any]:
        """For run.json: eta, the declared or measured C (median, quartiles, min, max, and per adapted
        batch), batches adapted and skipped (in total, per domain, and which)."""
        out: dict[str, Any] = {"eta": self.eta, "relative_cost": self.declared, "mode": (
            "declared" if self.declared is not None else "measured"),
            "batches_adapted": self.adapted, "batches_skipped": self.skipped,
            "per_domain": {d: {"adapted": a, "skipped": s} for d, (a, s) in self.per_domain.items()},
            "skipped_batches": list(self.skipped_batches)}
        if self.costs:
            ordered = sorted(self.costs)
            q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
            out["measured_cost"] = {"median": statistics.median(ordered), "q25": q[0], "q75": q[2],
                                    "min": ordered[0], "max": ordered[-1], "n": len(ordered),
                                    "per_batch": list(self.costs)}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"delay": self.delay, "adapted": self.adapted, "skipped": self.skipped, "costs": list(self.costs),
                "per_domain": {d: list(v) for d, v in self.per_domain.items()},
                "skipped_batches": list(self.skipped_batches)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.delay, self.adapted, self.skipped = int(state["delay"]), int(state["adapted"]), int(state["skipped"])
        self.costs = [float(c) for c in state["costs"]]
        self.per_domain = {str(d): [int(a), int(s)] for d, (a, s) in dict(state["per_domain"]).items()}
        self.skipped_batches = [int(i) for i in state["skipped_batches"]]


__all__ = ["PAPER_ETA", "StreamRate", "batches_missed", "check_stream_rate", "resolve_relative_cost"]
