"""Streaming classification metrics kept on the device: accuracy, NLL, ECE (15 bins), open-set AUROC.

Samples with label -1 (out-of-distribution samples in open-set streams) are excluded from the
closed-set metrics. When a domain holds both kinds, ``auroc`` is the AUROC of the max-softmax
probability for telling in-distribution (positive) from out-of-distribution samples, and
``source_auroc`` the same for the frozen source model; ``ood_n`` counts the OOD samples.
"""
from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15


class DomainMetrics:
    """Accumulates one domain's metrics without leaving the device; :meth:`result` syncs once."""

    def __init__(self, device: torch.device, bins: int = ECE_BINS):
        zeros = lambda *shape, dtype=torch.float64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.bins = bins
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
        index = (conf * self.bins).long().clamp_(max=self.bins - 1)
        weight = valid.double()
        self.bin_count.index_add_(0, index, weight)
        self.bin_conf.index_add_(0, index, conf.double() * weight)
        self.bin_acc.index_add_(0, index, hit.double())
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
