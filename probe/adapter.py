"""The ComBo adapter (PAPER.md, "The adapter"): Lambda (token-wise affine over all layers) -> F (small ViT) -> head.

Choices the paper leaves open, made here so results are reproducible:
- LayerNorm eps is 1e-6, as in timm's VisionTransformer (the paper only says "LayerNorm").
- Initialisation follows timm's VisionTransformer ("" mode): position embedding trunc-normal std 0.02,
  cls token normal std 1e-6, every Linear in F and the head trunc-normal std 0.02 with zero bias, LayerNorm
  ones/zeros. Lambda keeps PyTorch's default Conv2d init (kaiming-uniform a=sqrt(5), i.e. U(+-1/sqrt(L*D))
  for weight and bias), which is what the authors' Conv2d(L, 128, (1, D)) gets.
- F's blocks are timm's ``Block`` (pre-norm, fused attention when available), so the architecture is the
  ViT one exactly: x + attn(norm1(x)); x + mlp(norm2(x)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .align import FeatureShapeError

__all__ = ["AdapterConfigError", "ComboConfig", "ComboAdapter", "expected_num_params"]

LAYER_NORM_EPS = 1e-6


class AdapterConfigError(ValueError):
    """A ComboConfig that cannot describe a valid adapter."""


@dataclass(frozen=True)
class ComboConfig:
    num_layers: int  # L = sum of layers over backbones
    feature_dim: int  # D
    num_tokens: int  # T (196 for 14x14)
    num_classes: int
    width: int = 128
    depth: int = 6
    num_heads: int = 2
    mlp_ratio: float = 4.0
    layers_per_backbone: tuple[int, ...] = ()  # e.g. (12, 12); () = one backbone with all L layers

    def __post_init__(self) -> None:
        for name in ("num_layers", "feature_dim", "num_tokens", "num_classes", "width", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise AdapterConfigError(f"ComboConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0:
            raise AdapterConfigError(f"ComboConfig.depth must be >= 0, got {self.depth}")
        if self.width % self.num_heads:
            raise AdapterConfigError(
                f"ComboConfig.width={self.width} is not divisible by num_heads={self.num_heads}"
            )
        if self.mlp_ratio <= 0:
            raise AdapterConfigError(f"ComboConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        object.__setattr__(self, "layers_per_backbone", tuple(int(n) for n in self.layers_per_backbone))
        if self.layers_per_backbone:
            if min(self.layers_per_backbone) < 1 or sum(self.layers_per_backbone) != self.num_layers:
                raise AdapterConfigError(
                    f"ComboConfig.layers_per_backbone={self.layers_per_backbone} must be positive and sum to "
                    f"num_layers={self.num_layers}"
                )

    @property
    def mlp_hidden(self) -> int:
        # Same rounding as timm's Block: int(dim * mlp_ratio).
        return int(self.width * self.mlp_ratio)

    @property
    def backbone_slices(self) -> list[slice]:
        """Which Lambda layer indices read each backbone, in order."""
        counts = self.layers_per_backbone or (self.num_layers,)
        starts = [sum(counts[:k]) for k in range(len(counts))]
        return [slice(s, s + n) for s, n in zip(starts, counts)]


def expected_num_params(cfg: ComboConfig) -> int:
    """Trainable parameters of ``ComboAdapter(cfg)``, counted by hand (w = width, h = mlp hidden).

    Lambda:          w*L*D + w                      (weight [w, L, D] + bias)
    cls token:       w
    pos embed:       (T + 1) * w
    per block:       norm1 2w
                     qkv   3w*w + 3w                (qkv bias)
                     proj  w*w + w
                     norm2 2w
                     fc1   w*h + h
                     fc2   h*w + w
                   = 4w^2 + 2wh + 9w + h
    final norm:      2w
    head:            w*C + C

    For L=12, D=768, w=128: Lambda = 1,179,776 (the paper's "about 1.2M per ViT-B"); with T=196 the
    encoder (cls + pos + 6 blocks + norm) is 1,215,232 (the paper's "about 1.2M for F").
    """
    w, h = cfg.width, cfg.mlp_hidden
    lam = w * cfg.num_layers * cfg.feature_dim + w
    cls_token = w
    pos_embed = (cfg.num_tokens + 1) * w
    block = (2 * w) + (3 * w * w + 3 * w) + (w * w + w) + (2 * w) + (w * h + h) + (h * w + w)
    final_norm = 2 * w
    head = w * cfg.num_classes + cfg.num_classes
    return lam + cls_token + pos_embed + cfg.depth * block + final_norm + head


def _init_vit_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ComboAdapter(nn.Module):
    """[B, L, T, D] normalised layer maps -> logits [B, C]."""

    def __init__(self, cfg: ComboConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        # Lambda, laid out as the authors' Conv2d weight [w, L, 1, D] without the unit axis.
        self.lambda_weight = nn.Parameter(torch.empty(w, cfg.num_layers, cfg.feature_dim))
        self.lambda_bias = nn.Parameter(torch.empty(w))
        # F: a pre-norm ViT encoder over the T projected tokens.
        self.cls_token = nn.Parameter(torch.empty(1, 1, w))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens + 1, w))
        norm_layer = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=w,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=True,
                    proj_drop=0.0,
                    attn_drop=0.0,
                    init_values=None,  # no LayerScale
                    drop_path=0.0,
                    act_layer=nn.GELU,
                    norm_layer=norm_layer,
                )
                for _ in range(cfg.depth)
            ]
        )
        self.norm = norm_layer(w)
        self.head = nn.Linear(w, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Lambda: PyTorch's Conv2d default (kaiming_uniform a=sqrt(5) == U(+-1/sqrt(fan_in))).
        bound = 1.0 / math.sqrt(self.cfg.num_layers * self.cfg.feature_dim)
        nn.init.uniform_(self.lambda_weight, -bound, bound)
        nn.init.uniform_(self.lambda_bias, -bound, bound)
        # F + head: timm VisionTransformer init.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.blocks.apply(_init_vit_linear)
        _init_vit_linear(self.head)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def project(self, x: Tensor) -> Tensor:
        """Lambda: [B, L, T, D] -> [B, T, width], one affine map shared by every token."""
        cfg = self.cfg
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.num_layers, cfg.num_tokens, cfg.feature_dim):
            raise FeatureShapeError(
                f"ComboAdapter expects [B, L={cfg.num_layers}, T={cfg.num_tokens}, D={cfg.feature_dim}] "
                f"features, got shape {tuple(x.shape)}"
            )
        return torch.einsum("bltd,cld->btc", x, self.lambda_weight) + self.lambda_bias

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised cls output [B, width]."""
        tokens = self.project(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.blocks(tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def layer_norms(self) -> Tensor:
        """||W[:, l, :]||_F for each of the L layers -> [L] ("where to find" features inside a model)."""
        return torch.linalg.vector_norm(self.lambda_weight, dim=(0, 2))

    def backbone_norms(self) -> Tensor:
        """s_k = ||W[:, layers_of_k, :]||_F for each backbone k -> [K] (task relevance)."""
        w = self.lambda_weight
        return torch.stack([torch.linalg.vector_norm(w[:, s, :]) for s in self.cfg.backbone_slices])
