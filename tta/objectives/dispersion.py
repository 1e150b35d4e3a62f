"""C-TPT's text-feature dispersion (Yoon et al., ICLR 2024; hee-suk-yoon/C-TPT @ 085e6c2,
``clip/custom_clip.py:319-330``).

The average text feature dispersion (ATFD) of the L2-normalised class embeddings ``t_c`` (C, D):
``mean_c || t_c - mean_c' t_c' ||_2`` -- the Euclidean norm, not its square, of the normalised
features. C-TPT *subtracts* ``lambda * ATFD`` from TPT's loss (``tpt_classification.py:155-160``):
spreading the class embeddings apart lowers the calibration error of the tuned prompt.
"""
from __future__ import annotations

import torch


def text_feature_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """ATFD of (C, D) text features (differentiable; normalise them first, as C-TPT does)."""
    return torch.linalg.norm(text_features - text_features.mean(dim=0), dim=-1).mean()


__all__ = ["text_feature_dispersion"]
