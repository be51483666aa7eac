"""Linear-probe baselines (PAPER.md, "Baselines"): last-layer probe and the per-layer "atlas".

``MultiLayerLinearProbe`` trains L independent heads in one pass: the loss is the *sum* of the per-layer
cross-entropies, so each head's gradient is exactly the one it would get alone, and AdamW's update is
per-parameter, so each head follows the same trajectory as if it were trained by itself.
Both use ``nn.Linear``'s default init (U(+-1/sqrt(D)) for weight and bias); the paper does not give one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .align import FeatureShapeError

__all__ = ["pool_tokens", "LinearProbe", "MultiLayerLinearProbe", "per_layer_loss"]


def pool_tokens(x: Tensor) -> Tensor:
    """Mean of the patch tokens: [..., T, D] -> [..., D] (float32), the pooled input of the linear probes."""
    if x.ndim < 2:
        raise FeatureShapeError(f"pool_tokens expects [..., T, D], got shape {tuple(x.shape)}")
    return x.float().mean(dim=-2)


class LinearProbe(nn.Module):
    """Linear(D -> C) on one pooled feature per image: [B, D] -> [B, C]."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise FeatureShapeError(f"LinearProbe expects [B, D={self.feature_dim}], got shape {tuple(x.shape)}")
        return self.fc(x)


class MultiLayerLinearProbe(nn.Module):
    """L independent linear heads, one per layer: [B, L, D] -> logits [B, L, C] (one batched einsum)."""

    def __init__(self, num_layers: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.num_layers, self.feature_dim, self.num_classes = int(num_layers), int(feature_dim), int(num_classes)
        self.weight = nn.Parameter(torch.empty(num_layers, num_classes, feature_dim))
        self.bias = nn.Parameter(torch.empty(num_layers, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.feature_dim)  # what nn.Linear gives each head
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.num_layers, self.feature_dim):
            raise FeatureShapeError(
                f"MultiLayerLinearProbe expects [B, L={self.num_layers}, D={self.feature_dim}], "
                f"got shape {tuple(x.shape)}"
            )
        return torch.einsum("bld,lcd->blc", x, self.weight) + self.bias


def per_layer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over layers of each layer's mean cross-entropy; logits [B, L, C], labels [B]."""
    b, l, c = logits.shape
    per_sample = F.cross_entropy(logits.float().reshape(b * l, c), labels.repeat_interleave(l), reduction="none")
    return per_sample.reshape(b, l).mean(dim=0).sum()
