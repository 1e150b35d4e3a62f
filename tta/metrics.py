"""Streaming classification metrics kept on the device: accuracy, NLL, ECE (15 bins), open-set AUROC,
and selection diagnostics (what each sample-selection stage kept, and how much of it was predicted right).

ECE is the one calibration implementation of the toolkit: equal-width bins of the max-softmax
confidence, ``sum_b |acc_b - conf_b| * n_b / n``. By default 15 bins, a confidence in ``[lower, upper)``;
a method that declares its paper's convention (``Method.paper_ece = (bins, upper_inclusive)``: C-TPT's
20 bins with ``(lower, upper]``) also gets ``paper_ece`` computed that way from the same samples.

Samples with label -1 (out-of-distribution samples in open-set streams) are excluded from the
closed-set metrics. When a domain holds both kinds, ``auroc`` is the AUROC of the max-softmax
probability for telling in-distribution (positive) from out-of-distribution samples, and
``source_auroc`` the same for the frozen source model; ``ood_n`` counts the OOD samples.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import torch

ECE_BINS = 15


def bin_index(conf: torch.Tensor, bins: int, upper_inclusive: bool = False) -> torch.Tensor:
    """The ECE bin of each confidence in [0, 1]: ``[lower, upper)`` (the last bin closed), or with
    ``upper_inclusive`` ``(lower, upper]`` (C-TPT's ``ECE_Loss``; a confidence of exactly 0, which a
    softmax never gives, goes to the first bin)."""
    if upper_inclusive:
        return (torch.ceil(conf * bins).long() - 1).clamp_(min=0, max=bins - 1)
    return (conf * bins).long().clamp_(max=bins - 1)


class DomainMetrics:
    """Accumulates one domain's metrics without leaving the device; :meth:`result` syncs once."""

    def __init__(self, device: torch.device, bins: int = ECE_BINS, paper_ece: tuple[int, bool] | None = None):
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.bins = bins
        self.paper_ece = None if paper_ece is None else (int(paper_ece[0]), bool(paper_ece[1]))
        self.paper_bins = zeros(3, self.paper_ece[0]) if self.paper_ece else None  # count, confidence, accuracy
        self.n = zeros((), dtype=torch.long)
        self.correct = zeros((), dtype=torch.long)
        self.source_correct = zeros((), dtype=torch.long)
        self.source_n = zeros((), dtype=torch.long)
        self.nll = zeros(())
        self.bin_count = zeros(bins)
        self.bin_conf = zeros(bins)
        self.bin_acc = zeros(bins)
        self._conf: list[torch.Tensor] = []  # per batch: max-softmax confidence (method, source), OOD flag
        self._source_conf: list[torch.Tensor] = []
        self._ood: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, source_logits: torch.Tensor | None = None) -> None:
        valid = labels >= 0
        safe_labels = labels.clamp(min=0)
        log_p = logits.detach().float().log_softmax(dim=1)
        conf, pred = log_p.max(dim=1)
        conf = conf.exp()
        hit = (pred == safe_labels) & valid
        self.n += valid.sum()
        self.correct += hit.sum()
        self.nll -= (log_p.gather(1, safe_labels[:, None]).squeeze(1) * valid).sum().double()
        weight = valid.double()
        index = bin_index(conf, self.bins, upper_inclusive=False)
        self.bin_count.index_add_(0, index, weight)
        self.bin_conf.index_add_(0, index, conf.double() * weight)
        self.bin_acc.index_add_(0, index, hit.double())
        if self.paper_bins is not None:
            index = bin_index(conf, self.paper_ece[0], upper_inclusive=self.paper_ece[1])
            for row, value in enumerate((weight, conf.double() * weight, hit.double())):
                self.paper_bins[row].index_add_(0, index, value)
        self._conf.append(conf.float())
        self._ood.append(~valid)
        if source_logits is not None:
            self.source_n += valid.sum()
            self.source_correct += ((source_logits.argmax(dim=1) == safe_labels) & valid).sum()
            self._source_conf.append(source_logits.detach().float().softmax(dim=1).amax(dim=1))

    def result(self) -> dict[str, float]:
        n = max(int(self.n), 1)
        ece = (self.bin_acc - self.bin_conf).abs().sum().item() / n
        out = {"n": int(self.n), "accuracy": int(self.correct) / n, "nll": float(self.nll) / n, "ece": ece}
        if self.paper_bins is not None:
            out["paper_ece"] = (self.paper_bins[2] - self.paper_bins[1]).abs().sum().item() / n
        if int(self.source_n):
            out["source_accuracy"] = int(self.source_correct) / int(self.source_n)
        if self._ood:
            ood = torch.cat(self._ood).cpu().numpy()
            if ood.any():
                out["ood_n"] = int(ood.sum())
                if not ood.all():
                    out["auroc"] = auroc(torch.cat(self._conf).cpu().numpy(), ~ood)
                    if len(self._source_conf) == len(self._conf):
                        out["source_auroc"] = auroc(torch.cat(self._source_conf).cpu().numpy(), ~ood)
        return out

    def running_accuracy(self) -> float:
        return int(self.correct) / max(int(self.n), 1)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` vs the rest (ties count one half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # average 1-based rank of each distinct value
    ranks = (upper - (counts - 1) / 2.0)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_over_domains(domains: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over domains of every metric they all report (the ImageNet-C convention)."""
    if not domains:
        return {}
    keys = set.intersection(*(set(d) for d in domains.values())) - {"n", "ood_n"}
    return {k: sum(d[k] for d in domains.values()) / len(domains) for k in sorted(keys)}


# ----------------------------------------------------------------------------- selection diagnostics
SELECTION_FIELDS = ("seen", "kept", "kept_correct", "dropped_correct", "kept_ood")
#: a sample memory's counts (:meth:`tta.policies.memory.SampleMemory.diagnose`): samples admitted and
#: evicted, samples trained on (summed over the updates), of those with a known label, and right
MEMORY_FIELDS = ("admitted", "evicted", "trained", "trained_labelled", "trained_correct")
LOW_KEEP = 0.01
"""A stage that keeps less than this fraction of a domain's samples is warned about."""


class SelectionMetrics:
    """One domain's selection diagnostics, accumulated on the device (no host sync per batch).

    Per batch the engine hands over the method's stage masks (``method.last_selection``: for each
    policy stage, in order, which samples were still kept after it), the logits of the prediction
    and the labels. For every stage it counts the samples the stage **saw** (kept by the stages
    before it), **kept**, **kept and predicted right** (``argmax`` of the logits equals the label:
    the precision of the pseudo-labels the method learns from) and **predicted right among the
    dropped**; ``kept_ood`` counts kept samples with label -1 (open-set streams). A final row,
    ``learned``, is the last stage's kept samples against every sample of the batch (every
    sample when the method has no stage, e.g. Tent).

    Decisions: with ``steps > 1`` the masks are the last step's, computed on the logits the method
    returns for the batch (so mask and prediction come from one forward; the method's own policy
    counters count every step). SAR's second selection (at the SAM-perturbed weights) is the stage
    ``entropy_margin_sam``, judged on the first forward's prediction, the one SAR reports.

    A method that trains from a sample memory (:mod:`tta.policies.memory`) also hands over the
    batch's memory events (:meth:`update_memory`): admitted, evicted, and the pseudo-labels of the
    memory's samples each update trained on, scored against their true labels (``memory``).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.counts: dict[tuple[str, ...], torch.Tensor] = {}  # stage keys -> (stages + 1, fields) counts
        self.n = torch.zeros((), dtype=torch.long, device=self.device)
        self.memory: torch.Tensor | None = None  # MEMORY_FIELDS counts, once a memory reported

    def update(self, stages: Mapping[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> bool:
        """Add one batch; returns ``False`` (and adds nothing) when a mask is not one flag per sample
        (e.g. a method whose policies rank the views of one image)."""
        n = labels.shape[0]
        masks = [m for m in stages.values()]
        if any(m.shape != (n,) for m in masks):
            return False
        keys = tuple(stages)
        valid = labels >= 0
        correct = (logits.detach().argmax(dim=1) == labels) & valid
        every = torch.ones(1, n, dtype=torch.bool, device=labels.device)
        kept = torch.stack([m.to(labels.device, torch.bool) for m in masks]) if masks else every
        alive = torch.cat([every, kept[:-1]]) if masks else every  # what each stage saw
        alive = torch.cat([alive[:len(masks)], every])            # + the "learned" row: every sample ...
        kept = torch.cat([kept[:len(masks)], kept[-1:]])           # ... against the last stage's kept
        dropped = alive & ~kept
        row = torch.stack([alive.sum(1), kept.sum(1), (kept & correct).sum(1), (dropped & correct).sum(1),
                           (kept & ~valid).sum(1)], dim=1).to(self.device)
        if keys in self.counts:
            self.counts[keys] += row
        else:
            self.counts[keys] = row
        self.n += n
        return True

    def update_memory(self, record: Any, labels: torch.Tensor) -> None:
        """Add one batch's memory events (a :class:`tta.policies.memory.MemoryRecord`) given the
        batch's labels (device operations; the memory stores the labels of the samples it took)."""
        counts = record.memory.diagnose(record, labels).to(self.device)
        self.memory = counts if self.memory is None else self.memory + counts

    def state_dict(self) -> dict[str, Any]:
        state = {"n": self.n, "counts": {"\x1f".join(k): v for k, v in self.counts.items()}}
        if self.memory is not None:
            state["memory"] = self.memory
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = state["n"].to(self.device)
        memory = state.get("memory")
        self.memory = None if memory is None else memory.to(self.device)
        self.counts = {tuple(k.split("\x1f")) if k else (): v.to(self.device) for k, v in state["counts"].items()}

    def result(self) -> dict[str, Any]:
        """Counts per stage key and for ``learned`` (one host sync), with the rates of :func:`selection_rates`."""
        stages: dict[str, dict[str, int]] = {}
        learned = dict.fromkeys(SELECTION_FIELDS, 0)
        for keys, counts in self.counts.items():
            table = counts.cpu().tolist()
            for key, values in zip(keys, table[:-1]):
                entry = stages.setdefault(key, dict.fromkeys(SELECTION_FIELDS, 0))
                for field, value in zip(SELECTION_FIELDS, values):
                    entry[field] += int(value)
            for field, value in zip(SELECTION_FIELDS, table[-1]):
                learned[field] += int(value)
        n = int(self.n)
        out = {"n": n, "stages": {k: selection_rates(v, n) for k, v in stages.items()},
               "learned": selection_rates(learned, n)}
        if self.memory is not None:
            out["memory"] = memory_rates(dict(zip(MEMORY_FIELDS, self.memory.cpu().tolist())), n)
        return out


def memory_rates(counts: Mapping[str, int], n: int) -> dict[str, Any]:
    """A memory's counts plus ``admitted_frac`` (admitted / the domain's samples) and ``precision``
    (the trained pseudo-labels that were right / those with a known label); ``None`` where the
    denominator is 0."""
    out: dict[str, Any] = {"n": n, **{k: int(counts[k]) for k in MEMORY_FIELDS}}
    out["admitted_frac"] = counts["admitted"] / n if n else None
    labelled = counts["trained_labelled"]
    out["precision"] = counts["trained_correct"] / labelled if labelled else None
    return out


def selection_rates(counts: Mapping[str, int], n: int) -> dict[str, Any]:
    """Counts plus ``kept_frac`` (kept / the domain's samples), ``pass_rate`` (kept / seen),
    ``precision`` (kept and right / kept) and ``dropped_accuracy`` (right / dropped); ``None`` where
    the denominator is 0. ``kept_ood`` only when some OOD sample was kept."""
    seen, kept = counts["seen"], counts["kept"]
    out: dict[str, Any] = {"n": n, **{k: counts[k] for k in SELECTION_FIELDS if k != "kept_ood"}}
    if counts.get("kept_ood"):
        out["kept_ood"] = counts["kept_ood"]
    out["kept_frac"] = kept / n if n else None
    out["pass_rate"] = kept / seen if seen else None
    out["precision"] = counts["kept_correct"] / kept if kept else None
    out["dropped_accuracy"] = counts["dropped_correct"] / (seen - kept) if seen > kept else None
    return out


def selection_summary(domains: Mapping[str, SelectionMetrics], low_keep: float = LOW_KEEP,
                      warn: bool = True) -> dict[str, Any] | None:
    """The run record's ``selection``: per stage key and for ``learned``, per domain and ``mean``.

    ``mean`` pools the domains (counts summed, rates from the sums), i.e. the rates over every sample
    of the run. A stage that dropped samples and kept less than ``low_keep`` of a domain's samples gives
    one warning (counting those domains), emitted with :func:`warnings.warn` when ``warn`` and kept
    in ``warnings``.
    """
    results = {name: m.result() for name, m in domains.items()}
    results = {name: r for name, r in results.items() if r["n"]}
    if not results:
        return None
    keys: list[str] = []
    for r in results.values():
        keys.extend(k for k in r["stages"] if k not in keys)

    def block(get) -> dict[str, Any]:
        per = {name: get(r) for name, r in results.items() if get(r) is not None}
        total = dict.fromkeys(SELECTION_FIELDS, 0)
        for entry in per.values():
            for field in SELECTION_FIELDS:
                total[field] += entry.get(field, 0)
        n = sum(entry["n"] for entry in per.values())
        return {"domains": per, "mean": selection_rates(total, n)}

    policies = {key: block(lambda r, key=key: r["stages"].get(key)) for key in keys}
    memory = {name: r["memory"] for name, r in results.items() if r.get("memory") is not None}
    if memory:
        pooled = {k: sum(entry[k] for entry in memory.values()) for k in MEMORY_FIELDS}
        memory = {"domains": memory, "mean": memory_rates(pooled, sum(entry["n"] for entry in memory.values()))}
    messages = []
    for key, entry in policies.items():
        low = {d: e["kept_frac"] for d, e in entry["domains"].items() if e["kept_frac"] is not None
               and e["kept_frac"] < low_keep and e["kept"] < e["seen"]}  # a stage that dropped nothing is not the cause
        if low:
            worst = min(low, key=low.get)
            messages.append(f"selection stage {key!r} kept under {100 * low_keep:g}% of the samples in {len(low)} of "
                            f"{len(entry['domains'])} domain(s) (lowest: {worst}, {100 * low[worst]:.2f}%): the method "
                            f"hardly learns there; check the protocol's thresholds for this model's class count")
    if warn:
        for message in messages:
            warnings.warn(message, stacklevel=2)
    out = {"learned_from": keys[-1] if keys else None, "stages": keys, "policies": policies,
           "learned": block(lambda r: r["learned"]), "warnings": messages}
    if memory:
        out["memory"] = memory
    return out
