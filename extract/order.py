"""Store row order: training rows shuffled at extraction, so no reader sees the classes in order.

Plans list samples in the dataset's *natural* order (sorted paths, split-file order), which is
often class by class (an image folder always is). A reader that cannot shuffle the whole split
(`probe.data` streaming with a shuffle window smaller than the split) would then train on a few
classes at a time. So `row_order` permutes a plan before it is written:

- rows are grouped by their exact split membership (e.g. VTAB {train800, train800val200},
  {val200, train800val200}, {train800val200}, {test}); a group is shuffled only among its own
  positions, so every split occupies exactly the rows it would in natural order (the training
  splits stay contiguous at the start of the arrays: streaming a split still touches only its shards);
- only groups that belong to a training split of some protocol (`train800`, `train800val200`,
  `train`, `trainval`) are shuffled. Eval-only groups (`test`) keep the natural order: nothing
  trains on them, evaluation does not depend on order, and the largest split keeps sequential
  reads of its source (a parquet source decodes a whole row group to read one image);
- within a group, samples are sorted by sha256("combo-row-order/<seed>/<sample_id>"): a seeded
  pseudo-random permutation that depends on the sample ids only, so it is the same on every
  machine, NumPy version, batch size, worker count and rerun (resume compares sample tables), and
  stores of different backbones over the same data get the same row order.

The sample table records each row's natural position (`source_index`) and the task group's
`combo_task.row_order` attribute records the method and seed. Stores written before this change
have neither and are in natural order (`natural_order`); they stay valid.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .datasets import ParquetReader, TaskPlan

ROW_ORDER_SEED = 0
ROW_ORDER_METHOD = "sha256 of seed and sample_id, within each training split-membership group"
PARQUET_CACHE_BYTES = 512 * 2**20  # row groups kept per process while reading a shuffled parquet plan

__all__ = ["ROW_ORDER_METHOD", "ROW_ORDER_SEED", "RowOrder", "natural_order", "row_order", "training_splits"]


@dataclass(frozen=True)
class RowOrder:
    """A plan with its samples in store row order, and how that order relates to the natural one."""

    plan: TaskPlan  # samples in store row order
    source_index: tuple[int, ...] | None  # natural position of each row's sample; None: natural, not recorded
    attrs: dict[str, Any] | None  # the task group's `row_order` attribute; None: not recorded


def training_splits(plan: TaskPlan) -> tuple[str, ...]:
    """The splits some protocol trains on (VTAB: train800, train800val200; generic: train, trainval)."""
    return tuple(sorted({train for train, _eval in plan.protocols.values()}))


def _key(seed: int, sample_id: str) -> bytes:
    return hashlib.sha256(f"combo-row-order/{int(seed)}/{sample_id}".encode()).digest()


def row_order(plan: TaskPlan, *, seed: int = ROW_ORDER_SEED) -> RowOrder:
    """The store row order of `plan` (see the module doc): a pure function of ids, splits and seed."""
    train = set(training_splits(plan))
    groups: dict[frozenset[str], list[int]] = {}
    for k, sample in enumerate(plan.samples):
        groups.setdefault(frozenset(sample.splits), []).append(k)
    order = list(range(len(plan.samples)))
    for membership, positions in groups.items():
        if not membership & train:
            continue
        members = sorted(positions, key=lambda k: (_key(seed, plan.samples[k].sample_id), k))
        for position, k in zip(positions, members):
            order[position] = k
    reader = plan.reader
    if isinstance(reader, ParquetReader) and order != sorted(order):
        reader = ShuffledParquetReader(reader)
    shuffled = dataclasses.replace(plan, samples=tuple(plan.samples[k] for k in order), reader=reader)
    attrs = {"method": ROW_ORDER_METHOD, "seed": int(seed), "shuffled_splits": sorted(train)}
    return RowOrder(plan=shuffled, source_index=tuple(order), attrs=attrs)


def natural_order(plan: TaskPlan) -> RowOrder:
    """The order combo used before rows were shuffled: the plan's, with no `source_index` recorded."""
    return RowOrder(plan=plan, source_index=None, attrs=None)


class ShuffledParquetReader:
    """A `ParquetReader` for rows requested in shuffled order.

    The plain reader keeps the last two row groups, which suits rows read in file order; shuffled,
    almost every image would decode a whole row group again. This one keeps the image bytes of
    whole row groups up to `budget_bytes` per process (at least the last two, as before), so a
    shuffled training split that fits is read once per DataLoader worker.
    """

    def __init__(self, base: ParquetReader, budget_bytes: int = PARQUET_CACHE_BYTES):
        self.base = base
        self.budget_bytes = int(budget_bytes)
        self._groups: OrderedDict[tuple[int, int], tuple[int, list[bytes | BaseException]]] = OrderedDict()
        self._bytes = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_groups"], state["_bytes"] = OrderedDict(), 0
        return state

    def describe(self, key: int) -> str:
        return self.base.describe(key)

    def _group_of(self, key: int) -> tuple[int, int, int, int]:
        """(file, row group, first global key, end global key) of `key`."""
        base = self.base
        fi, local = base._locate(key)
        starts = base.row_groups[fi]
        rg = bisect.bisect_right(starts, local) - 1
        file_rows = (base.offsets[fi + 1] if fi + 1 < len(base.offsets) else base.num_rows) - base.offsets[fi]
        end = starts[rg + 1] if rg + 1 < len(starts) else file_rows
        return fi, rg, base.offsets[fi] + starts[rg], base.offsets[fi] + end

    def read_bytes(self, key: int) -> bytes:
        fi, rg, first, end = self._group_of(key)
        entry = self._groups.get((fi, rg))
        if entry is None:
            values: list[bytes | BaseException] = []
            for k in range(first, end):  # the base reader decodes the row group once for all of them
                try:
                    values.append(self.base.read_bytes(k))
                except Exception as err:  # noqa: BLE001 - raised when that row is asked for
                    values.append(err)
            size = sum(len(v) for v in values if isinstance(v, bytes))
            while len(self._groups) >= 2 and self._bytes + size > self.budget_bytes:
                _, (dropped, _) = self._groups.popitem(last=False)
                self._bytes -= dropped
            entry = self._groups[(fi, rg)] = (size, values)
            self._bytes += size
        else:
            self._groups.move_to_end((fi, rg))
        value = entry[1][int(key) - first]
        if isinstance(value, BaseException):
            raise value
        return value

    def open(self, key: int):
        from .datasets import _open_image_bytes

        return _open_image_bytes(self.read_bytes(key))
