"""What a fit reads: one split of one task across its stores (`SplitSource`), read by position, a part at a time,
decoded to one float tensor per store; and `Batch`, what every feeder of batches yields (probe/cachedbatches.py,
probe/stream.py, probe/evalbatches.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from .compact import BatchDecoder, decoder_for
from .nonfinite import _all_finite, non_finite_error
from .stores import AlignedTask

Batch = tuple[list[Tensor], Tensor]
  # one tensor per array of `SplitSource.read` (rows first), and the labels


@dataclass
class SplitSource:
    """One split of one task across K stores: positions 0..n-1 map to stored rows.

    Everything indexed "per store" here is per *part* of the task (`AlignedTask.parts`): a store, or one
    (grid, width) group of a multi-grid store, which reads like a store of its own.
    ``prefix`` reads the prefix-token arrays (cls, registers) instead of the patch tokens; one bool
    for every store, or one per store (the linear probe takes the cls token where a store has one).
    """

    task: AlignedTask
    rows: np.ndarray  # rows of the reference store, ascending
    layers: list[Sequence[int] | None] | None = None  # per store; None = every layer
    prefix: bool | Sequence[bool] = False

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        k = len(self.task.parts)
        if self.layers is not None and len(self.layers) != k:
            raise ValueError(f"SplitSource: {len(self.layers)} layer selections for {k} stores")
        if not isinstance(self.prefix, bool) and len(self.prefix) != k:
            raise ValueError(f"SplitSource: {len(self.prefix)} prefix flags for {k} stores")
        for j, part in enumerate(self.task.parts):
            if self.prefix_of(j) and part.prefix is None:
                raise ValueError(f"store {part.store.url} has no prefix (cls) tokens to read")

    @property
    def n(self) -> int:
        return int(self.rows.size)

    @property
    def labels(self) -> np.ndarray:
        return self.task.labels[self.rows]

    def prefix_of(self, k: int) -> bool:
        return bool(self.prefix) if isinstance(self.prefix, bool) else bool(self.prefix[k])

    def layers_of(self, k: int) -> list[int] | None:
        if not self.layers or self.layers[k] is None:
            return None
        return [int(v) for v in self.layers[k]]

    def compact_of(self, k: int) -> bool:
        """Whether store k's batches hold a compact encoding (its patch tokens; prefix tokens are full-size)."""
        return not self.prefix_of(k) and self.task.parts[k].compact is not None

    @property
    def any_compact(self) -> bool:
        return any(self.compact_of(k) for k in range(len(self.task.parts)))

    def _arrays(self, k: int) -> list:
        part = self.task.parts[k]
        if self.prefix_of(k):
            return [part.prefix]
        return list(part.encoded) if part.compact is not None else [part.tokens]

    def arrays_of(self, k: int) -> int:
        """How many arrays store k contributes to what `read` returns (1, or a compact encoding's arrays)."""
        return len(self.task.parts[k].compact.arrays()) if self.compact_of(k) else 1

    def row_bytes(self) -> int:
        """Bytes of one sample as read (all stores, selected layers, stored dtype; every array of a compact encoding)."""
        return sum(self.store_row_bytes(k) for k in range(len(self.task.parts)))

    def store_row_bytes(self, k: int) -> int:
        """`row_bytes` of store k alone."""
        layers = self.layers_of(k)
        total = 0
        for array in self._arrays(k):
            num_layers = array.shape[1] if layers is None else len(layers)
            total += num_layers * int(np.prod(array.shape[2:])) * array.dtype.itemsize
        return total

    def read(self, positions: np.ndarray, *, direct: bool = False) -> list[np.ndarray]:
        """Features of the given positions (any order), rows in `positions` order: one array per store, or, for a
        compact store, its encoded arrays (`arrays_of`; every one rows first), which `decode` turns into one.
        ``direct``: local shards are read past the page cache (`TaskStore.read`)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = []
        for k, row_map in enumerate(self.task.row_maps):
            out += self.read_part(k, row_map[self.rows[positions]], direct=direct)
        return out

    def read_part(self, k: int, stored: np.ndarray, *, layers: Sequence[int] | None = None,
                  direct: bool = False) -> list[np.ndarray]:
        """Store k's arrays for its rows `stored` (`layers`: these stored layers instead of the selection)."""
        part = self.task.parts[k]
        layers = self.layers_of(k) if layers is None else [int(v) for v in layers]
        if not self.compact_of(k):
            block = part.read(stored, layers=layers, prefix=self.prefix_of(k), direct=direct)
            if block.dtype.kind == "f" and not _all_finite(block):  # one pass per block read
                raise non_finite_error(part, stored, block, prefix=self.prefix_of(k))
            return [block]
        # undecoded: a never-written row (any array's fill: NaN, 2.2's -128 codes, -1 outlier indexes) is refused
        # by read_encoded; integer codes cannot be non-finite
        blocks = part.read_encoded(stored, layers=layers, direct=direct)
        for name, block in zip(part.compact.arrays(), blocks):
            if block.dtype.kind == "f" and not _all_finite(block):
                raise non_finite_error(part, stored, block, prefix=False, array=name)
        return blocks

    def cache_view(self) -> list[tuple[Tensor, np.ndarray]] | None:
        """Where the split already is in RAM (rows held by `probe.heldsplit`): per array of `read`, the held
        tensor (a contiguous layer selection as a view, no copy) and the held row of each position; None when
        any store does not hold them all, or a layer selection is not a range."""
        views: list[tuple[Tensor, np.ndarray]] = []
        for k, (part, row_map) in enumerate(zip(self.task.parts, self.task.row_maps)):
            index = part.held_index(row_map[self.rows]) if hasattr(part, "held_index") and not self.prefix_of(k) else None
            if index is None:
                return None
            layers = self.layers_of(k)
            if layers is not None and layers != list(range(layers[0], layers[0] + len(layers))):
                return None
            for array in part.arrays if self.compact_of(k) else part.arrays[:1]:
                tensor = torch.from_numpy(array)
                views.append((tensor if layers is None else tensor[:, layers[0]:layers[0] + len(layers)], index))
        return views

    @cached_property
    def decoder(self) -> BatchDecoder:
        """Regroups and decodes a batch of `read`'s arrays into one tensor per store (see probe/compact.py)."""
        return BatchDecoder([(self.arrays_of(k), decoder_for(part) if self.compact_of(k) else None, self.layers_of(k))
                             for k, part in enumerate(self.task.parts)])

    def decode(self, tensors, *, normalised: bool | Sequence[bool] = False) -> list[Tensor]:
        """One float tensor per store from a batch of `read`'s arrays (any device): compact stores decoded there,
        in original units or (``normalised``, per store) ComBo-normalised with their stored statistics; full-size
        stores' tensors as they came."""
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        return self.decoder(tensors, normalised=normalised)


__all__ = ["Batch", "SplitSource"]
