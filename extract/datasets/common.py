"""What every dataset kind shares: the plan data classes, the readers of non-file sources,
the split constants and the generic train/val/test carving (folder, parquet)."""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image


class DatasetError(ValueError):
    """Bad dataset on disk or bad option; the message names the file (and line) or the option."""


VTAB_SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
VTAB_PROTOCOLS: dict[str, tuple[str, str]] = {
    "dev": ("train800", "val200"),
    "final": ("train800val200", "test"),
}
GENERIC_PROTOCOLS: dict[str, tuple[str, str]] = {
    "dev": ("train", "val"),
    "final": ("trainval", "test"),
}
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
)  # fmt: skip
DATASET_KINDS: tuple[str, ...] = ("vtab", "folder", "parquet", "digits")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Plan data classes


@dataclass(frozen=True)
class Sample:
    """One unique image = one store row."""

    sample_id: str  # path relative to the dataset root, POSIX separators; or "<file>#<row>"
    label: int
    splits: tuple[str, ...]
    source: str | int  # absolute file path, or a key understood by the plan's reader
    aliases: tuple[str, ...] = ()  # ids of other files with the same pixels (train800val200 copies)


@dataclass(frozen=True)
class TaskPlan:
    """Which images one task's store holds, in row order, and how the splits map onto rows."""

    dataset: str
    task: str
    root: str | None
    samples: tuple[Sample, ...]
    splits: dict[str, int]
    protocols: dict[str, tuple[str, str]]
    classes: tuple[str, ...]
    # Opens non-file sources (digits arrays, parquet rows); picklable so DataLoader workers get it.
    reader: Any = field(default=None, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(s.label for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def split_rows(self, split: str) -> tuple[int, ...]:
        """Row indices (ascending = store order) of the members of `split`."""
        if split not in self.splits:
            raise DatasetError(
                f"{self.dataset}/{self.task}: no split {split!r}; splits are {sorted(self.splits)}"
            )
        return tuple(i for i, s in enumerate(self.samples) if split in s.splits)

    def describe(self, i: int) -> str:
        """What to name in an error about row i: the file path, or the reader's key, or the id."""
        src = self.samples[i].source
        if isinstance(src, str):
            return src
        if self.reader is not None and hasattr(self.reader, "describe"):
            return self.reader.describe(src)
        return self.samples[i].sample_id

    def load_image(self, i: int) -> Image.Image:
        """Decode row i as stored (any PIL mode, fully loaded). Raises whatever decoding raises;
        `extract.images.PlanImages` turns that into an error message instead."""
        src = self.samples[i].source
        if isinstance(src, str):
            return open_image_file(src)
        if self.reader is None:
            raise DatasetError(f"{self.dataset}/{self.task}: row {i} has key {src!r} but no reader")
        return self.reader.open(src)

    def fingerprint(self) -> str:
        """Hash of (ids, labels, splits, aliases, classes): equal iff the store layout is equal."""
        h = hashlib.sha256()
        h.update(json.dumps([self.dataset, self.task, list(self.classes)]).encode())
        for s in self.samples:
            h.update(json.dumps([s.sample_id, s.label, list(s.splits), list(s.aliases)]).encode())
        return h.hexdigest()


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, closing the file handle (first frame of animations)."""
    with Image.open(path) as img:
        img.load()
    return img


def _open_image_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return img


# --------------------------------------------------------------------------------------------------
# Readers for in-memory / packed sources


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Grey levels 0..16 -> 0..255 so the images look like ordinary 8-bit scans.
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


@dataclass(frozen=True)
class DigitsReader:
    """Opens sklearn digit `key` as an 8x8 "L" image (the array is loaded once per process)."""

    def open(self, key: int) -> Image.Image:
        return Image.fromarray(_digits_arrays()[0][int(key)], mode="L")

    def describe(self, key: int) -> str:
        return f"digits/{int(key):04d}"


class ParquetReader:
    """Opens row `key` (global over the files, in order) of parquet files' image columns.

    Reads one row group at a time and keeps the last two, so a DataLoader worker that is handed
    a contiguous batch of rows reads each row group about once.
    """

    def __init__(
        self,
        files: Sequence[str],
        columns: Sequence[str],
        struct: Sequence[bool],
        row_groups: Sequence[Sequence[int]],
        offsets: Sequence[int],
        *,
        num_rows: int,
    ):
        self.files = list(files)  # absolute paths
        self.columns = list(columns)  # image column per file
        self.struct = list(struct)  # True: HF {"bytes", "path"} struct; False: plain binary
        self.row_groups = [list(r) for r in row_groups]  # row-group start rows per file
        self.offsets = list(offsets)  # global index of each file's first row
        self.num_rows = int(num_rows)
        self._cache: dict[tuple[int, int], Any] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _locate(self, key: int) -> tuple[int, int]:
        key = int(key)
        if not 0 <= key < self.num_rows:
            raise IndexError(f"parquet row {key} out of range 0..{self.num_rows - 1}")
        fi = bisect.bisect_right(self.offsets, key) - 1
        return fi, key - self.offsets[fi]

    def describe(self, key: int) -> str:
        fi, local = self._locate(key)
        return f"{self.files[fi]}#{local}"

    def read_bytes(self, key: int) -> bytes:
        import pyarrow.parquet as pq

        fi, local = self._locate(key)
        starts = self.row_groups[fi]
        rg = bisect.bisect_right(starts, local) - 1
        col = self._cache.get((fi, rg))
        if col is None:
            column = self.columns[fi] + (".bytes" if self.struct[fi] else "")
            table = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=[column])
            col = table.column(0).combine_chunks()
            if self.struct[fi]:
                col = col.field("bytes")
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(fi, rg)] = col
        value = col[local - starts[rg]].as_py()
        if value is None:
            raise ValueError("image bytes are null")
        return value

    def open(self, key: int) -> Image.Image:
        return _open_image_bytes(self.read_bytes(key))


def _vtab_split_plan(*, dataset: str, task: str, root: str | None, samples: tuple[Sample, ...],
                     classes: tuple[str, ...], reader=None) -> TaskPlan:
    """A plan whose samples use the VTAB split names, so the VTAB protocols apply unchanged."""
    return TaskPlan(
        dataset=dataset,
        task=task,
        root=root,
        samples=samples,
        splits={s: sum(s in x.splits for x in samples) for s in VTAB_SPLITS},
        protocols=dict(VTAB_PROTOCOLS),
        classes=classes,
        reader=reader,
    )


# --------------------------------------------------------------------------------------------------
# Generic splitting (folder, parquet)


def _stable_key(sample_id: str) -> bytes:
    return hashlib.sha1(sample_id.encode("utf-8")).digest()


def _carve(ids_labels: list[tuple[str, int]], fractions: Sequence[float]) -> list[int]:
    """Deterministic stratified split: per class, order by a hash of the id and cut by fractions.

    Returns a part index per item (0 = the remainder, 1.. = the fractions in order). A class
    with fewer items than parts keeps them all in part 0. Hashing (not Python's hash()) makes
    the cut the same on every machine and independent of listing order.
    """
    part = [0] * len(ids_labels)
    by_class: dict[int, list[int]] = {}
    for k, (_, label) in enumerate(ids_labels):
        by_class.setdefault(label, []).append(k)
    for members in by_class.values():
        n = len(members)
        if n <= len(fractions):
            continue
        members = sorted(members, key=lambda k: _stable_key(ids_labels[k][0]))
        start = 0
        for p, frac in enumerate(fractions, start=1):
            take = max(1, round(frac * n))
            for k in members[start : start + take]:
                part[k] = p
            start += take
    return part


def _generic_plan(
    *,
    dataset: str,
    root: str,
    items: list[tuple[str, int, str | int, str | None]],
    classes: tuple[str, ...],
    reader: Any = None,
    where: str,
) -> TaskPlan:
    """Assign train/val/test (+ trainval = train | val) and build the plan.

    items: (sample_id, label, source, given split or None), in file order. No split given -> a
    stratified 70/10/20 cut; train and test given without val -> 1/8 of train becomes val.
    """
    given = {s for *_, s in items}
    if given == {None} or given == {"train"}:
        part = _carve([(i, lab) for i, lab, *_ in items], (0.1, 0.2))
        names = ("train", "val", "test")
        split_of = [names[p] for p in part]
    elif None in given:
        raise DatasetError(f"{where}: some images have a split and some do not")
    else:
        if "test" not in given:
            raise DatasetError(f"{where}: splits {sorted(given)} have no test split")
        if "train" not in given:
            raise DatasetError(f"{where}: splits {sorted(given)} have no train split")
        split_of = [s for *_, s in items]
        if "val" not in given:
            train = [k for k, s in enumerate(split_of) if s == "train"]
            part = _carve([(items[k][0], items[k][1]) for k in train], (1 / 8,))
            for k, p in zip(train, part):
                if p == 1:
                    split_of[k] = "val"
    memberships = {"train": ("train", "trainval"), "val": ("val", "trainval"), "test": ("test",)}
    samples = [
        Sample(sid, label, member, source)
        for split, member in memberships.items()
        for (sid, label, source, _), s in zip(items, split_of)
        if s == split
    ]
    counts = {s: sum(s in x.splits for x in samples) for s in ("train", "val", "trainval", "test")}
    return TaskPlan(
        dataset=dataset,
        task="default",
        root=root,
        samples=tuple(samples),
        splits=counts,
        protocols=dict(GENERIC_PROTOCOLS),
        classes=classes,
        reader=reader,
    )


# --------------------------------------------------------------------------------------------------
# Options


def _existing_dir(path: str | os.PathLike | None, *, option: str) -> str:
    if path is None:
        raise DatasetError(f"option {option}: a dataset folder is required")
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(full):
        what = "is not a folder" if os.path.exists(full) else "does not exist"
        raise DatasetError(f"option {option}: {full} {what}")
    return full
