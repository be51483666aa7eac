"""Parameter-free alignment of several backbones' token maps (PAPER.md, "Aligning several backbones").

Every layer map is resized to a common grid (bilinear, align_corners=False) and then standardised per
(image, layer) over all tokens and channels together, so that backbones whose residual streams have very
different scales can be concatenated on the layer axis and read by one Lambda. The common grid is, as the
authors ran it (``default_grid``): a backbone's own grid when it is alone or when all share one, else the
smallest grid among them (14x14 for every combination in the paper).
Everything here runs in float32: stores may hold float16/bfloat16, but interpolation and variance in half
precision lose too much.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FeatureShapeError",
    "align_grid",
    "default_grid",
    "hierarchical_grid",
    "normalise_maps",
    "prepare_features",
    "make_prepare",
]


class FeatureShapeError(ValueError):
    """A feature tensor does not have the shape the caller said it has."""


def default_grid(grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The authors' common grid: the shared one when every backbone has it, else the smallest (fewest tokens).

    DINOv2-B/14 alone keeps 16x16 (T = 256); with ViT-B/16 backbones (14x14) everything goes to 14x14; stores of
    64-pixel images (4x4) stay 4x4 instead of being upsampled to 196 tokens.
    """
    grids = [(int(g[0]), int(g[1])) for g in grids]
    if not grids:
        raise FeatureShapeError("default_grid needs at least one backbone grid")
    if len(set(grids)) == 1:
        return grids[0]
    return min(grids, key=lambda g: (g[0] * g[1], g))


PAPER_STRIDE = 16  # pixels per token of the paper's ViT-B/16 grid (14x14 at 224)


def hierarchical_grid(grids: Sequence[tuple[int, int]], image_size: int) -> tuple[int, int]:
    """The grid a hierarchical backbone (one map per stage: 56x56 .. 7x7 at 224) brings to `default_grid`: its
    stage at the paper's stride 16 (14x14 at 224), else the stage nearest it (log scale; a tie goes to the coarser).

    The authors' rule takes the smallest grid among backbones; a hierarchical backbone's smallest is its last
    stage's (7x7 at 224), which alone would run ComBo on 49 tokens and halve every ViT's grid beside it. The stride-16
    stage keeps the paper's grid: ConvNeXt alone, or with ViT-B/16s or DINOv2-B/14, runs on 14x14 as ViTs do."""
    grids = [(int(g[0]), int(g[1])) for g in grids]
    if not grids:
        raise FeatureShapeError("hierarchical_grid needs at least one grid")
    if len(grids) == 1 or image_size < 1:
        return min(grids, key=lambda g: (g[0] * g[1], g))

    def distance(g: tuple[int, int]) -> tuple[float, int]:
        stride = image_size / max(g[0], 1)
        return abs(math.log2(stride / PAPER_STRIDE)), g[0] * g[1]

    return min(grids, key=distance)


def _check_maps(x: Tensor, name: str = "features") -> None:
    if x.ndim != 4:
        raise FeatureShapeError(f"{name}: expected a [B, L, T, D] tensor, got shape {tuple(x.shape)}")


def align_grid(x: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Resize token maps [B, L, h*w, D] (row-major grid) to [B, L, th*tw, D], float32.

    Equal grids return ``x`` as float32 (no copy when it already is float32).
    """
    _check_maps(x)
    h, w = (int(v) for v in grid)
    th, tw = (int(v) for v in target)
    if min(h, w, th, tw) < 1:
        raise FeatureShapeError(f"grid {grid} and target {target} must be positive")
    b, l, t, d = x.shape
    if t != h * w:
        raise FeatureShapeError(f"features have {t} tokens but grid {h}x{w} has {h * w}")
    x = x.float()
    if (h, w) == (th, tw):
        return x
    # [B, L, h*w, D] -> [B*L, D, h, w]: every (image, layer) map is one multi-channel image.
    maps = x.reshape(b * l, h, w, d).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=(th, tw), mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(b, l, th * tw, d)


def normalise_maps(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardise each (image, layer) map over all its tokens and channels together (biased variance).

    No learnable affine: the paper's LayerNorm-like step only equalises scales across layers/backbones.
    """
    _check_maps(x)
    x = x.float()
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def prepare_features(
    parts: Sequence[tuple[Tensor, tuple[int, int]]],
    target: tuple[int, int] = (14, 14),
    eps: float = 1e-5,
    prenormalised: Sequence[bool] | None = None,
    reuse: bool = False,
) -> Tensor | list[Tensor]:
    """Align and normalise several backbones' maps -> float32 on the common grid.

    ``parts`` is a sequence of ``(maps [B, L_k, T_k, D_k], grid_k)`` in backbone order; that order fixes which
    Lambda slices read which backbone (``ComboConfig.layers_per_backbone``). Equal widths give the paper's
    stacked x, one tensor [B, Σ L_k, T, D]; different widths give a list of [B, L_k, T, D_k], which
    ``ComboAdapter`` reads slice by slice.

    ``prenormalised`` (one flag per backbone): maps that are already normalised per (image, layer), e.g. a
    compact store decoded with its stored statistics (probe/compact.py); they must be on ``target`` and are
    passed through as float32.

    ``reuse`` (CPU only): write into this thread's output buffers of the previous call when the shapes agree,
    so a training loop does not get fresh pages (zeroed by the kernel) for every batch; the previous call's
    result is overwritten, so only for loops that are done with each batch before preparing the next.
    """
    if len(parts) == 0:
        raise FeatureShapeError("prepare_features needs at least one backbone's features")
    for k, (x, _) in enumerate(parts):
        _check_maps(x, name=f"backbone {k}")
    widths = [int(x.shape[-1]) for x, _ in parts]
    batches = [int(x.shape[0]) for x, _ in parts]
    if len(set(batches)) > 1:
        raise FeatureShapeError(f"backbones have different batch sizes {batches}; they must hold the same images")
    flags = [False] * len(parts) if prenormalised is None else [bool(f) for f in prenormalised]
    if len(flags) != len(parts):
        raise FeatureShapeError(f"{len(flags)} prenormalised flags for {len(parts)} backbones")
    for k, ((_, grid), flag) in enumerate(zip(parts, flags)):
        if flag and tuple(int(v) for v in grid) != tuple(int(v) for v in target):
            raise FeatureShapeError(f"backbone {k}: normalised maps on grid {tuple(grid)} cannot be resized to {tuple(target)}; "
                                    "decode them in original units")
    th, tw = (int(v) for v in target)
    if len(set(widths)) > 1:
        return [_aligned_into(_token_major(int(x.shape[0]), int(x.shape[1]), th * tw, int(x.shape[-1]), x.device,
                                           slot=k if reuse else None),
                              x, grid, target, normalise=not flag, eps=eps)
                for k, ((x, grid), flag) in enumerate(zip(parts, flags))]
    # equal widths: every backbone is written (and normalised in place) into its slice of one float32 tensor,
    # so a batch costs one float32 copy of itself, not three (cast, centred, scaled) plus a concatenation
    first = parts[0][0]
    out = _token_major(batches[0], sum(int(x.shape[1]) for x, _ in parts), th * tw, widths[0], first.device,
                       slot=0 if reuse else None)
    start = 0
    for (x, grid), flag in zip(parts, flags):
        _aligned_into(out[:, start : start + int(x.shape[1])], x, grid, target, normalise=not flag, eps=eps)
        start += int(x.shape[1])
    return out


_BUFFERS = threading.local()  # this thread's reusable output buffers: slot -> tensor


def _token_major(batch: int, layers: int, tokens: int, width: int, device: torch.device, *,
                 slot: int | None = None) -> Tensor:
    """A [B, L, T, D] float32 tensor laid out [B, T, L, D] in memory: what Lambda contracts over (l, d) for each
    token, so ComBo's projection reads it as a [B * T, L * D] matrix without a permuted copy of the batch (at
    ViT-B geometry and batch 64 that copy is 462 MiB of fresh pages, zeroed by the kernel, every step).
    ``slot``: reuse this thread's buffer of that slot when its shape agrees (CPU; CUDA's allocator caches)."""
    shape = (batch, tokens, layers, width)
    device = torch.device(device)
    if slot is None or device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, device=device).permute(0, 2, 1, 3)
    buffers = getattr(_BUFFERS, "slots", None)
    if buffers is None:
        buffers = _BUFFERS.slots = {}
    held = buffers.get(slot)
    if held is None or tuple(held.shape) != shape:
        del held
        buffers.pop(slot, None)  # the old buffer goes before the new one is allocated
        buffers[slot] = held = torch.empty(shape, dtype=torch.float32, device=device)
    return held.permute(0, 2, 1, 3)


def _aligned_into(out: Tensor | None, x: Tensor, grid: tuple[int, int], target: tuple[int, int], *, normalise: bool,
                  eps: float) -> Tensor:
    """`align_grid` (and `normalise_maps`, in place: the same arithmetic) written into `out` (None: a new tensor)."""
    if tuple(int(v) for v in grid) == tuple(int(v) for v in target):
        if out is None:
            out = x.to(torch.float32, copy=True)  # a copy even of float32: never normalise the caller's tensor
        else:
            out.copy_(x)
    else:
        resized = align_grid(x, grid, target)
        out = resized if out is None else out.copy_(resized)
    if normalise:
        var, mean = torch.var_mean(out, dim=(2, 3), correction=0, keepdim=True)
        out.sub_(mean).mul_(torch.rsqrt(var + eps))
    return out


def make_prepare(
    grids: Sequence[tuple[int, int]],
    target: tuple[int, int] = (14, 14),
    eps: float = 1e-5,
    prenormalised: Sequence[bool] | None = None,
    reuse: bool = False,
) -> Callable[[Tensor | Sequence[Tensor]], Tensor | list[Tensor]]:
    """Build the ``prepare`` callable for ``train_steps``/``evaluate`` from the backbones' grids.

    The callable takes one tensor (one backbone) or a sequence of tensors in the same order as ``grids``.
    ``prenormalised``, ``reuse``: see `prepare_features` (``reuse``: each call overwrites the last one's result).
    """
    grids = [tuple(int(v) for v in g) for g in grids]
    if len(grids) == 0:
        raise FeatureShapeError("make_prepare needs at least one grid")

    def prepare(features: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        tensors = [features] if isinstance(features, Tensor) else list(features)
        if len(tensors) != len(grids):
            raise FeatureShapeError(f"got {len(tensors)} feature tensors for {len(grids)} backbone grids")
        return prepare_features(list(zip(tensors, grids)), target=target, eps=eps, prenormalised=prenormalised,
                                reuse=reuse)

    return prepare
