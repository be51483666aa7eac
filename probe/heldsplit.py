"""Rows of a task held in RAM once, for every fit that trains or is measured on them (`combo study`).

A study trains several heads per task on the same training split (relevance on train800, then ComBo on
all stores, on the selected ones, on each alone, and linear on each), and each of those would read its
stores again. `hold_rows` reads the rows every fit needs, from every store, once; the task it returns
is made of `HeldPart`s, which answer `read` / `read_encoded` from RAM for held rows and from the store
for any other, so every `SplitSource`, `ShuffledSource` and cache plan built on it works unchanged and
reads nothing twice. `SplitSource.cache_view` hands a cached fit the held arrays themselves (a layer
range as a view), so holding costs the split's bytes once, not once per fit.

Held rows are the ones valid in every store of the study. A head on a subset of the stores whose rows
include samples another store skipped reads those from its own store (as a standalone probe would).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from store_schema import TaskStore

from .stores import AlignedTask

__all__ = ["HeldPart", "hold_rows", "subset_task"]


class HeldPart:
    """A `TaskStore` with some of its rows (every layer of the patch tokens, or of a compact encoding's
    arrays) in RAM. Everything else is the store's own."""

    def __init__(self, part: TaskStore, rows: np.ndarray, arrays: list[np.ndarray]):
        self._part = part
        self.held_rows = np.asarray(rows, dtype=np.int64)  # stored rows, in the order of `arrays`' first axis
        self.arrays = arrays  # the token array, or a compact encoding's arrays in CompactSpec.arrays() order
        self._where = np.full(part.num_samples, -1, dtype=np.int64)
        self._where[self.held_rows] = np.arange(self.held_rows.size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._part, name)

    @property
    def store_part(self) -> TaskStore:
        return self._part

    def held_index(self, stored: np.ndarray) -> np.ndarray | None:
        """Positions in the held arrays of these stored rows; None when any of them is not held."""
        stored = np.asarray(stored, dtype=np.int64)
        index = self._where[stored]
        return None if index.size and index.min() < 0 else index

    @staticmethod
    def _take(array: np.ndarray, index: np.ndarray, layers: Sequence[int] | None) -> np.ndarray:
        block = array[index]
        return block if layers is None else np.ascontiguousarray(block[:, [int(v) for v in layers]])

    def read(self, rows: Any, *, layers: Sequence[int] | None = None, prefix: bool = False,
             normalised: bool = False, direct: bool = False) -> np.ndarray:
        index = None if prefix or self._part.compact is not None else self.held_index(self._part._rows(rows))
        if index is None:
            return self._part.read(rows, layers=layers, prefix=prefix, normalised=normalised, direct=direct)
        return self._take(self.arrays[0], index, layers)

    def read_encoded(self, rows: Any, *, layers: Sequence[int] | None = None, direct: bool = False) -> list[np.ndarray]:
        index = self.held_index(self._part._rows(rows))
        if index is None:
            return self._part.read_encoded(rows, layers=layers, direct=direct)
        return [self._take(a, index, layers) for a in self.arrays]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))


def _store_part(part: Any) -> TaskStore:
    return part.store_part if isinstance(part, HeldPart) else part


def hold_rows(aligned: AlignedTask, rows: np.ndarray) -> AlignedTask:
    """``aligned`` with these rows (of its reference store) read once from every store into RAM."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    parts: list[Any] = []
    for part, row_map in zip(aligned.parts, aligned.row_maps):
        part = _store_part(part)
        stored = np.sort(row_map[rows])
        arrays = part.read_encoded(stored) if part.compact is not None else [part.read(stored)]
        parts.append(HeldPart(part, stored, arrays))
    return AlignedTask(name=aligned.name, parts=parts, row_maps=list(aligned.row_maps),
                       backbone_of_part=list(aligned.backbone_of_part), stores=list(aligned.stores))


def subset_task(aligned: AlignedTask, keep: Sequence[int]) -> AlignedTask:
    """The task on backbones ``keep`` (indices into ``aligned.stores``, i.e. --stores; every part of each), the
    first of them its reference: what `align_tasks` gives for those stores alone, on the same (possibly held)
    parts."""
    keep = [int(k) for k in keep]
    if not keep:
        raise ValueError("a subset needs at least one store")
    parts = [(k, j) for k in keep for j in aligned.backbone_parts(k)]
    first = aligned.row_maps[parts[0][1]]
    to_study = np.empty_like(first)
    to_study[first] = np.arange(first.size)  # the first store's row -> the study reference's row
    return AlignedTask(name=aligned.name, parts=[aligned.parts[j] for _, j in parts],
                       row_maps=[aligned.row_maps[j][to_study] for _, j in parts],
                       backbone_of_part=[i for i, k in enumerate(keep) for _ in aligned.backbone_parts(k)],
                       stores=[aligned.stores[k] for k in keep])
