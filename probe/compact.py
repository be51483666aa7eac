"""Decoding a compact store's tokens in torch, in the batch, on the device the batch is on.

A compact task (store_schema/compact.py: int8, per-layer PCA, or both) is read undecoded: its row
arrays (``CompactSpec.arrays()``: codes, [token_scale, channel_scale, outlier_index, outlier_value,]
map_stats) travel through the probe's batching like any other row array (every one has rows on axis 0
and layers on axis 1), at their compact size, and are decoded here, inside ``prepare``, where the batch
already is (the GPU during a run). `TorchDecoder` mirrors ``store_schema.compact.decode`` step by step
in float32:

    v = codes * |token_scale| * channel_scale   (a negative token scale: no channel scales), outliers put back,
                                                never-written tokens (any array at its fill value) NaN
    u = v @ pca_components[l].T + pca_mean[l]   (PCA)
    x = u * std + mean                          (original units), or  u * std / sqrt(std^2 + eps)  (normalised)

The normalised form is ComBo's per-map normalisation with the map's exact stored statistics, so a
caller that asks for it skips ``probe.align.normalise_maps`` for that backbone.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from store_schema import TaskStore
from store_schema.compact import CODE_FILL, INDEX_FILL, CompactSpec, PcaBasis

__all__ = ["BatchDecoder", "TorchDecoder", "decoder_for", "torch_decode"]

EPS = 1e-5


def _layers_key(layers: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if layers is None else tuple(int(v) for v in layers)


class TorchDecoder:
    """Decodes one compact task's encoded arrays (torch tensors, any device) to float32 token maps.

    The PCA basis is moved to a device once per (device, layer selection) and kept."""

    def __init__(self, spec: CompactSpec, basis: PcaBasis | None = None):
        if spec.pca is not None and basis is None:
            raise ValueError(f"{spec.name}: decoding a PCA encoding needs the task's basis (pca_components, pca_mean)")
        self.spec = spec
        self.basis = basis
        self._bases: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def count(self) -> int:
        """How many arrays one batch of this task holds."""
        return len(self.spec.arrays())

    def basis_on(self, device: torch.device, layers: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        """(components [L, D, R], mean [L, D]) float32 on `device`, for the selected layers."""
        key = (str(torch.device(device)), _layers_key(layers))
        cached = self._bases.get(key)
        if cached is None:
            assert self.basis is not None
            chosen = self.basis.select(None if layers is None else list(key[1]))
            cached = (torch.from_numpy(np.ascontiguousarray(chosen.components, dtype=np.float32)).to(device),
                      torch.from_numpy(np.ascontiguousarray(chosen.mean, dtype=np.float32)).to(device))
            self._bases[key] = cached
        return cached

    def _check(self, arrays: Sequence[Tensor]) -> list[Tensor]:
        arrays = list(arrays)
        if len(arrays) != self.count:
            raise ValueError(f"decode: {self.spec.name} needs {self.count} arrays ({', '.join(self.spec.arrays())}), "
                             f"got {len(arrays)}")
        return arrays

    def values(self, arrays: Sequence[Tensor]) -> Tensor:
        """v: the int8 codes dequantised (or the float16 codes), float32 [n, L, T, C]."""
        arrays = self._check(arrays)
        if not self.spec.int8:
            return arrays[0].float()
        codes, token_scale, channel_scale, outlier_index, outlier_value = arrays[:5]
        token = token_scale.float()
        channel = torch.where(token[..., None] < 0, 1.0, channel_scale.float()[:, :, None, :])
        v = codes.float() * token.abs()[..., None] * channel
        index = outlier_index.long()
        v = v.scatter_(3, index.clamp(min=0), outlier_value.float())  # a never-written -1 is masked below
        # store_schema.compact.never_written: a token any of whose arrays holds its fill value is NaN
        never = torch.isnan(token) | torch.isnan(channel_scale).any(dim=-1)[:, :, None]
        never |= torch.isnan(outlier_value).any(dim=-1) | (index == INDEX_FILL).any(dim=-1) | (codes == CODE_FILL).any(dim=-1)
        return v.masked_fill_(never[..., None], float("nan"))

    def __call__(self, arrays: Sequence[Tensor], *, layers: Sequence[int] | None = None, normalised: bool = False,
                 eps: float = EPS) -> Tensor:
        """Token maps [n, L, T, D] float32 (``normalised``: ComBo's per-map normalisation, exact statistics)."""
        arrays = self._check(arrays)
        stats = arrays[-1].float()
        v = self.values(arrays)
        if self.spec.pca is not None:
            components, mean = self.basis_on(v.device, layers)
            v = torch.einsum("nltr,ldr->nltd", v, components) + mean[None, :, None, :]
        std = stats[..., 1][..., None, None]
        if normalised:
            return v * (std / torch.sqrt(std * std + eps))
        return v * torch.where(std > 0, std, 1.0) + stats[..., 0][..., None, None]

    def mean_tokens(self, arrays: Sequence[Tensor], *, layers: Sequence[int] | None = None) -> Tensor:
        """The mean over tokens of every decoded map, [n, L, D] float32 in original units: PCA is linear, so the
        codes are averaged before they are projected (T times fewer products than decoding every token)."""
        arrays = self._check(arrays)
        stats = arrays[-1].float()
        v = self.values(arrays).mean(dim=2)
        if self.spec.pca is not None:
            components, mean = self.basis_on(v.device, layers)
            v = torch.einsum("nlr,ldr->nld", v, components) + mean[None]
        std = stats[..., 1][..., None]
        return v * torch.where(std > 0, std, 1.0) + stats[..., 0][..., None]


def torch_decode(arrays: Sequence[Tensor], spec: CompactSpec, basis: PcaBasis | None = None, *,
                 layers: Sequence[int] | None = None, normalised: bool = False, eps: float = EPS) -> Tensor:
    """One-off torch twin of ``store_schema.compact.decode`` (a `TorchDecoder` keeps the basis on the device)."""
    return TorchDecoder(spec, basis)(arrays, layers=layers, normalised=normalised, eps=eps)


_DECODERS: "weakref.WeakKeyDictionary[TaskStore, TorchDecoder]" = weakref.WeakKeyDictionary()


def decoder_for(part: TaskStore) -> TorchDecoder:
    """The task's decoder, one per opened task (so its basis is moved to the device once)."""
    decoder = _DECODERS.get(part)
    if decoder is None:
        if part.compact is None:
            raise ValueError(f"task {part.name} of {part.store.url} holds full-size tokens, not a compact encoding")
        decoder = TorchDecoder(part.compact, part.pca)
        _DECODERS[part] = decoder
    return decoder


@dataclass(frozen=True)
class _Slot:
    count: int  # arrays this store contributes to a batch
    decoder: TorchDecoder | None  # None: a full-size array, passed through
    layers: tuple[int, ...] | None


class BatchDecoder:
    """Regroups a batch's flat tensor list (what ``SplitSource.read`` returns) into one tensor per store,
    decoding the compact stores' arrays; full-size stores' tensors pass through untouched."""

    def __init__(self, slots: Sequence[tuple[int, TorchDecoder | None, Sequence[int] | None]]):
        self.slots = [_Slot(int(c), d, _layers_key(layers)) for c, d, layers in slots]
        self.width = sum(s.count for s in self.slots)

    @property
    def compact(self) -> list[bool]:
        return [s.decoder is not None for s in self.slots]

    def groups(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        tensors = list(tensors)
        if len(tensors) != self.width:
            raise ValueError(f"a batch of these stores holds {self.width} arrays, got {len(tensors)}")
        out, at = [], 0
        for slot in self.slots:
            out.append(tensors[at : at + slot.count])
            at += slot.count
        return out

    def __call__(self, tensors: Sequence[Tensor], *, normalised: bool | Sequence[bool] = False) -> list[Tensor]:
        flags = [bool(normalised)] * len(self.slots) if isinstance(normalised, bool) else [bool(f) for f in normalised]
        if len(flags) != len(self.slots):
            raise ValueError(f"{len(flags)} normalised flags for {len(self.slots)} stores")
        return [group[0] if slot.decoder is None else slot.decoder(group, layers=slot.layers, normalised=flag)
                for slot, group, flag in zip(self.slots, self.groups(tensors), flags)]

    def mean_tokens(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Per store, the token mean of its maps [n, L, D] float32 (original units)."""
        return [group[0].float().mean(dim=2) if slot.decoder is None else slot.decoder.mean_tokens(group, layers=slot.layers)
                for slot, group in zip(self.slots, self.groups(tensors))]
