"""The ComBo adapter (PAPER.md, "The adapter"): Lambda (token-wise affine over all layers) -> F (small ViT) -> head.

As the authors' code builds it:
- LayerNorm eps 1e-5 (``torch.nn.LayerNorm``'s default, which their F uses; timm's ViT would use 1e-6).
- Initialisation ``init="timm"`` (the default, the authors'): timm's VisionTransformer scheme, i.e. position
  embedding trunc-normal std 0.02, cls token normal std 1e-6, every Linear in F and the head trunc-normal
  std 0.02 with zero bias, LayerNorm ones/zeros. Lambda keeps PyTorch's default Conv2d init
  (kaiming-uniform a=sqrt(5), i.e. U(+-1/sqrt(L*D)) for weight and bias), which is what the authors'
  Conv2d(L, 128, (1, D)) gets. ``init="torch"`` gives F's and the head's Linears PyTorch's default init
  instead (everything else unchanged): it leaves the long plateau at chance that the authors' init shows on
  spatial tasks in short runs (benchmarks/init_plateau.py).
- F's blocks are timm's ``Block`` (pre-norm, fused attention when available), so the architecture is the
  ViT one exactly: x + attn(norm1(x)); x + mlp(norm2(x)).

Backbones of different widths (this project's extension, PAPER.md "Aligning several backbones"): Lambda is
Σ_k Σ_l W_{k,l} x_{k,l} + b with one slice W_k [width, L_k, D_k] per backbone. Its weight is kept as one flat
parameter [width, Σ_k L_k·D_k] (the "Linear over the flattened L*D" form of the paper), initialised as one
tensor with fan-in Σ_k L_k·D_k, so with equal widths it is the paper's [width, L, D] Lambda exactly, value
for value and init for init; ``lambda_slices()`` gives the per-backbone views.

Hierarchical backbones (issue 22): a backbone whose layers have several (grid, width) groups (ConvNeXt's
stages) is read as several *parts*, one per group, each with its own slice; ``backbone_of_part`` says which
backbone each part belongs to. ``layers_per_backbone`` / ``feature_dims`` then count parts (the name is kept
for old run folders, where parts are backbones), s_k groups a backbone's parts (``backbone_norms``), and
``layer_slices()`` gives W_l [width, D_l] for every layer whatever its width. Lambda is still one flat
parameter with one init draw, so one part per backbone is exactly the Lambda above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .align import FeatureShapeError

__all__ = ["AdapterConfigError", "ComboConfig", "ComboAdapter", "expected_num_params"]

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default, as in the authors' F
INITS = ("timm", "torch")


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
    # D_k per backbone when widths differ, e.g. (1024, 768); () = every backbone has feature_dim
    feature_dims: tuple[int, ...] = ()
    init: str = "timm"  # "timm" (the authors') or "torch" (PyTorch's default Linear init in F and the head)
    # the backbone of every part (one entry per layers_per_backbone entry), e.g. (0, 0, 0, 1) for a 3-stage
    # hierarchical backbone and a ViT; () = one part per backbone. A backbone's parts are adjacent.
    backbone_of_part: tuple[int, ...] = ()

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
        object.__setattr__(self, "feature_dims", tuple(int(n) for n in self.feature_dims))
        object.__setattr__(self, "backbone_of_part", tuple(int(n) for n in self.backbone_of_part))
        if self.init not in INITS:
            raise AdapterConfigError(f"ComboConfig.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.feature_dims:
            backbones = len(self.layers_per_backbone) or 1
            if len(self.feature_dims) != backbones or min(self.feature_dims) < 1:
                raise AdapterConfigError(
                    f"ComboConfig.feature_dims={self.feature_dims} must give one positive width per part "
                    f"({backbones} part(s) from layers_per_backbone={self.layers_per_backbone})"
                )
        if self.layers_per_backbone:
            if min(self.layers_per_backbone) < 1 or sum(self.layers_per_backbone) != self.num_layers:
                raise AdapterConfigError(
                    f"ComboConfig.layers_per_backbone={self.layers_per_backbone} must be positive and sum to "
                    f"num_layers={self.num_layers}"
                )
        if self.backbone_of_part:
            owners, parts = self.backbone_of_part, len(self.layers_per_backbone) or 1
            adjacent = owners[0] == 0 and all(b - a in (0, 1) for a, b in zip(owners, owners[1:]))
            if len(owners) != parts or not adjacent:
                raise AdapterConfigError(
                    f"ComboConfig.backbone_of_part={owners} must give one backbone per part ({parts} part(s) from "
                    f"layers_per_backbone={self.layers_per_backbone}), numbered 0, 1, ... with a backbone's parts "
                    "adjacent"
                )

    @property
    def mlp_hidden(self) -> int:
        # Same rounding as timm's Block: int(dim * mlp_ratio).
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_record(cls, doc: Mapping[str, Any]) -> "ComboConfig":
        """The config a run folder recorded (``asdict`` plus extra keys such as grid; lists for tuples)."""
        names = {f.name for f in fields(cls)}
        cfg = {k: v for k, v in doc.items() if k in names}
        cfg["layers_per_backbone"] = tuple(cfg.get("layers_per_backbone", ()))
        cfg["feature_dims"] = tuple(cfg.get("feature_dims", ()))
        cfg["backbone_of_part"] = tuple(cfg.get("backbone_of_part") or ())  # run folders before issue 22: ()
        return cls(**cfg)

    @property
    def layer_counts(self) -> tuple[int, ...]:
        """L_k of every part (a backbone, or one grid group of a hierarchical backbone), in order."""
        return self.layers_per_backbone or (self.num_layers,)

    @property
    def dims(self) -> tuple[int, ...]:
        """D_k of every part, in order."""
        return self.feature_dims or (self.feature_dim,) * len(self.layer_counts)

    @property
    def owners(self) -> tuple[int, ...]:
        """The backbone of every part (identity when ``backbone_of_part`` is ())."""
        return self.backbone_of_part or tuple(range(len(self.layer_counts)))

    @property
    def num_backbones(self) -> int:
        return self.owners[-1] + 1

    def backbone_parts(self, k: int) -> list[int]:
        """The parts of backbone k, in order."""
        return [j for j, b in enumerate(self.owners) if b == k]

    @property
    def backbone_layer_counts(self) -> tuple[int, ...]:
        """Σ of L over each backbone's parts."""
        return tuple(sum(self.layer_counts[j] for j in self.backbone_parts(k)) for k in range(self.num_backbones))

    @property
    def mixed_widths(self) -> bool:
        return len(set(self.dims)) > 1

    @property
    def lambda_fan_in(self) -> int:
        """Σ_k L_k·D_k: the length of one token's concatenated layer embeddings."""
        return sum(n * d for n, d in zip(self.layer_counts, self.dims))

    @property
    def part_slices(self) -> list[slice]:
        """Which Lambda layer indices read each part, in order."""
        counts = self.layer_counts
        starts = [sum(counts[:k]) for k in range(len(counts))]
        return [slice(s, s + n) for s, n in zip(starts, counts)]

    @property
    def backbone_slices(self) -> list[slice]:
        """Which Lambda layer indices read each backbone (all its parts: they are adjacent), in order."""
        counts = self.backbone_layer_counts
        starts = [sum(counts[:k]) for k in range(len(counts))]
        return [slice(s, s + n) for s, n in zip(starts, counts)]


def expected_num_params(cfg: ComboConfig) -> int:
    """Trainable parameters of ``ComboAdapter(cfg)``, counted by hand (w = width, h = mlp hidden).

    Lambda:          w*Σ_k L_k*D_k + w              (weight [w, L, D] when all D_k = D, + bias)
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
    lam = w * cfg.lambda_fan_in + w
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


def _contract_layers(x: Tensor, weight: Tensor) -> Tensor:
    """out[b, t, c] = sum over (l, d) of x[b, l, t, d] * weight[c, l, d], as one [B*T, L*D] x [L*D, C] product.
    Maps laid out token-major in memory (`probe.align` writes them so) are read in place; any other layout is
    copied once into that order, as an einsum would."""
    b, layers, tokens, width = x.shape
    rows = x.permute(0, 2, 1, 3).reshape(b * tokens, layers * width)
    return (rows @ weight.reshape(weight.shape[0], layers * width).t()).view(b, tokens, -1)


class ComboAdapter(nn.Module):
    """Normalised layer maps -> logits [B, C].

    Input: one tensor [B, L, T, D] when every part has the same width (the paper's stacked x), or a
    sequence of per-part tensors [B, L_k, T, D_k] (any widths), in ``layers_per_backbone`` order.
    """

    def __init__(self, cfg: ComboConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        # Lambda: all backbones' slices side by side, [w, Σ L_k·D_k] (see the module doc).
        self.lambda_weight = nn.Parameter(torch.empty(w, cfg.lambda_fan_in))
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
        # Lambda: PyTorch's Conv2d default (kaiming_uniform a=sqrt(5) == U(+-1/sqrt(fan_in))), one draw for all
        # slices, so equal widths give the paper's init exactly.
        bound = 1.0 / math.sqrt(self.cfg.lambda_fan_in)
        nn.init.uniform_(self.lambda_weight, -bound, bound)
        nn.init.uniform_(self.lambda_bias, -bound, bound)
        # F + head: timm VisionTransformer init (the authors'), or PyTorch's Linear default.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.cfg.init == "timm":
            self.blocks.apply(_init_vit_linear)
            _init_vit_linear(self.head)
        else:
            for m in [*self.blocks.modules(), self.head]:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        # Run folders written before per-backbone widths stored Lambda as [w, L, D]: same values, flat here.
        key = prefix + "lambda_weight"
        old = state_dict.get(key)
        if old is not None and old.ndim == 3 and tuple(old.shape[:1]) == (self.cfg.width,):
            state_dict[key] = old.reshape(old.shape[0], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lambda_slices(self) -> list[Tensor]:
        """W_k as views [width, L_k, D_k], one per part (writes go to the parameter)."""
        out, start = [], 0
        for n, d in zip(self.cfg.layer_counts, self.cfg.dims):
            out.append(self.lambda_weight[:, start : start + n * d].view(self.cfg.width, n, d))
            start += n * d
        return out

    @property
    def lambda_map(self) -> Tensor:
        """The paper's Lambda weight [width, L, D] (a view); only when every backbone has the same width."""
        if self.cfg.mixed_widths:
            raise AdapterConfigError(f"backbones have different widths {self.cfg.dims}: use lambda_slices() or layer_slices()")
        return self.lambda_weight.view(self.cfg.width, self.cfg.num_layers, self.cfg.feature_dim)

    def _split_input(self, x: Tensor | Sequence[Tensor]) -> list[Tensor]:
        cfg = self.cfg
        counts = cfg.layer_counts
        if isinstance(x, Tensor):
            if cfg.mixed_widths:
                raise FeatureShapeError(
                    f"ComboAdapter: backbones have widths {cfg.dims}; pass one [B, L_k, T, D_k] tensor per backbone "
                    "(per part: a multi-grid backbone has one per grid group)"
                )
            if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.num_layers, cfg.num_tokens, cfg.feature_dim):
                raise FeatureShapeError(
                    f"ComboAdapter expects [B, L={cfg.num_layers}, T={cfg.num_tokens}, D={cfg.feature_dim}] "
                    f"features, got shape {tuple(x.shape)}"
                )
            return [x]
        parts = list(x)
        if len(parts) != len(counts):
            raise FeatureShapeError(f"ComboAdapter: got {len(parts)} feature tensors for {len(counts)} backbones "
                                     "(parts: a multi-grid backbone has one per grid group)")
        for k, (part, n, d) in enumerate(zip(parts, counts, cfg.dims)):
            if part.ndim != 4 or tuple(part.shape[1:]) != (n, cfg.num_tokens, d):
                raise FeatureShapeError(
                    f"ComboAdapter: part {k} (backbone {cfg.owners[k]}) expects [B, L={n}, T={cfg.num_tokens}, D={d}] features, "
                    f"got shape {tuple(part.shape)}"
                )
        return parts

    def project(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Lambda: layer maps -> [B, T, width], one affine map shared by every token."""
        parts = self._split_input(x)
        if self.cfg.mixed_widths:
            out = sum(_contract_layers(p, w) for p, w in zip(parts, self.lambda_slices()))
        else:  # the paper's Lambda over the stacked layers
            stacked = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            out = _contract_layers(stacked, self.lambda_map)
        return out + self.lambda_bias

    def forward_features(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Normalised cls output [B, width]."""
        tokens = self.project(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.blocks(tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        return self.head(self.forward_features(x))

    def layer_norms(self) -> Tensor:
        """||W[:, l, :]||_F for each of the L layers -> [L] ("where to find" features inside a model)."""
        return torch.cat([torch.linalg.vector_norm(w, dim=(0, 2)) for w in self.lambda_slices()])

    def layer_slices(self) -> list[Tensor]:
        """W_l as views [width, D_l], one per Lambda layer, in order (any widths; writes go to the parameter)."""
        return [w[:, pos] for w in self.lambda_slices() for pos in range(w.shape[1])]

    def backbone_norms(self) -> Tensor:
        """s_k = ||W_k||_F for each backbone k -> [K] (task relevance); any widths. A backbone of several parts
        has s_k = sqrt(Σ over its parts of ||W_part||_F^2), the norm of all its slices together."""
        slices = self.lambda_slices()
        if self.cfg.num_backbones == len(slices):  # one part per backbone: as before
            return torch.stack([torch.linalg.vector_norm(w) for w in slices])
        # a backbone's parts are adjacent in the flat weight: its columns are one range
        cols = [0]
        for n, d in zip(self.cfg.layer_counts, self.cfg.dims):
            cols.append(cols[-1] + n * d)
        norms = []
        for k in range(self.cfg.num_backbones):
            parts = self.cfg.backbone_parts(k)
            norms.append(torch.linalg.vector_norm(self.lambda_weight[:, cols[parts[0]] : cols[parts[-1] + 1]]))
        return torch.stack(norms)
