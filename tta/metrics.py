"""Streaming classification metrics kept on the device: accuracy, NLL, ECE (15 bins).

Samples with label -1 (out-of-distribution samples in open-set streams) are excluded from the
closed-set metrics.
"""
from __future__ import annotations

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
        if source_logits is not None:
            self.source_n += valid.sum()
            self.source_correct += ((source_logits.argmax(dim=1) == safe_labels) & valid).sum()

    def result(self) -> dict[str, float]:
        n = max(int(self.n), 1)
        ece = (self.bin_acc - self.bin_conf).abs().sum().item() / n
        out = {"n": int(self.n), "accuracy": int(self.correct) / n, "nll": float(self.nll) / n, "ece": ece}
        if int(self.source_n):
            out["source_accuracy"] = int(self.source_correct) / int(self.source_n)
        return out

    def running_accuracy(self) -> float:
        return int(self.correct) / max(int(self.n), 1)


def mean_over_domains(domains: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over domains of every metric they all report (the ImageNet-C convention)."""
    if not domains:
        return {}
    keys = set.intersection(*(set(d) for d in domains.values())) - {"n"}
    return {k: sum(d[k] for d in domains.values()) / len(domains) for k in sorted(keys)}
