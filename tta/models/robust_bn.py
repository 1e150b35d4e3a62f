"""RoTTA's robust BatchNorm (RBN): normalisation statistics of its own, moved by an EMA of the batches
it trains on (Yuan et al., CVPR 2023; BIT-DA/RoTTA @ 67e34c9, ``core/utils/bn_layers.py``).

In ``train()`` mode a :class:`RobustBatchNorm` computes the batch's mean and (biased) variance,
blends them into its stored statistics, ``mu <- (1 - alpha) mu + alpha mu_b`` (likewise the
variance; lines 47-62), stores the blend (detached) and normalises with it -- the gradient flows
through the batch statistics. In ``eval()`` mode it normalises with the stored statistics. The
stored statistics start from the layer's running estimates. The affine parameters are the layer's
own (the same ``Parameter`` objects, so an optimizer built over them still holds them).
"""
from __future__ import annotations

import torch
from torch import nn

BN_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)


class RobustBatchNorm(nn.Module):
    """A BatchNorm1d/2d layer replaced by RoTTA's robust BatchNorm with blending factor ``alpha``."""

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d, alpha: float = 0.05):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("robust BatchNorm starts from the layer's running statistics; this layer has none")
        self.num_features, self.alpha, self.eps = bn.num_features, float(alpha), bn.eps
        self.dims = [0] if isinstance(bn, nn.BatchNorm1d) else [0, 2, 3]
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("source_mean", bn.running_mean.detach().clone())
        self.register_buffer("source_var", bn.running_var.detach().clone())

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1) if len(self.dims) == 1 else t.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var_b, mean_b = torch.var_mean(x, dim=self.dims, unbiased=False, keepdim=False)
            mean = (1 - self.alpha) * self.source_mean + self.alpha * mean_b
            var = (1 - self.alpha) * self.source_var + self.alpha * var_b
            with torch.no_grad():
                self.source_mean.copy_(mean.detach())
                self.source_var.copy_(var.detach())
        else:
            mean, var = self.source_mean, self.source_var
        x = (x - self._shape(mean)) / torch.sqrt(self._shape(var) + self.eps)
        return x * self._shape(self.weight) + self._shape(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha={self.alpha}, eps={self.eps}"


def use_robust_batchnorm(net: nn.Module, alpha: float = 0.05) -> int:
    """Replace every BatchNorm1d/2d of ``net`` by :class:`RobustBatchNorm` in place; returns how many."""
    names = [name for name, m in net.named_modules() if isinstance(m, BN_LAYERS)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, RobustBatchNorm(getattr(parent, child), alpha))
    return len(names)


__all__ = ["RobustBatchNorm", "use_robust_batchnorm"]
