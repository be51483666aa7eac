"""What every dataset kind shares: the plan data classes, the readers of non-file sources,
the split constants and the generic train/val/test carving (folder, parquet)."""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
    # Where the images came from, as the store records it (task attribute `source`): a hub repo id and
    # commit, never a local path. None: a local folder or file, which the store does not name.
    source: dict[str, Any] | None = field(default=None, compare=False)
    # What planning found that the user should hear about (duplicates merged, copies unmatched).
    notes: tuple[str, ...] = field(default=(), compare=False)

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


class _RowReader:
    """Opens row `key` (global over the files, in order) of an image-bytes column, one block at a time.

    A block is what one read brings in (a parquet row group, a memory-mapped Arrow file); the last
    two are kept, so a DataLoader worker handed a contiguous batch of rows reads each block about once.
    `names` (optional, per file: display name and the row number of the file's first row) makes
    errors say "repo bramtoula/vtab_cifar100, split test, row 17" instead of a local path.
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
        names: Sequence[tuple[str, int]] | None = None,
    ):
        self.files = list(files)  # absolute paths
        self.columns = list(columns)  # image column per file
        self.struct = list(struct)  # True: HF {"bytes", "path"} struct; False: plain binary
        self.row_groups = [list(r) for r in row_groups]  # block start rows per file
        self.offsets = list(offsets)  # global index of each file's first row
        self.num_rows = int(num_rows)
        self.names = None if names is None else [(str(n), int(b)) for n, b in names]
        self._cache: dict[tuple[int, int], Any] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _locate(self, key: int) -> tuple[int, int]:
        key = int(key)
        if not 0 <= key < self.num_rows:
            raise IndexError(f"row {key} out of range 0..{self.num_rows - 1}")
        fi = bisect.bisect_right(self.offsets, key) - 1
        return fi, key - self.offsets[fi]

    def describe(self, key: int) -> str:
        fi, local = self._locate(key)
        if self.names is not None:
            name, base = self.names[fi]
            return f"{name}, row {base + local}"
        return f"{self.files[fi]}#{local}"

    def _load_block(self, fi: int, block: int) -> Any:
        """The image bytes of one block as a pyarrow (chunked) array of binary values."""
        raise NotImplementedError

    def _block(self, fi: int, local: int) -> tuple[int, int]:
        starts = self.row_groups[fi]
        block = bisect.bisect_right(starts, local) - 1
        return block, starts[block]

    def read_bytes(self, key: int) -> bytes:
        fi, local = self._locate(key)
        block, start = self._block(fi, local)
        col = self._cache.get((fi, block))
        if col is None:
            col = self._load_block(fi, block)
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(fi, block)] = col
        value = col[local - start].as_py()
        if value is None:
            raise ValueError("image bytes are null")
        return value

    def open(self, key: int) -> Image.Image:
        return _open_image_bytes(self.read_bytes(key))

    def map_bytes(self, keys: Sequence[int], fn: Callable[[bytes | None], Any], *, num_workers: int = 0) -> list:
        """fn(image bytes or None) for each key, reading each block once (planning: hashing images).

        Blocks are read one after the other in the calling thread and dropped when done, so memory
        holds one block; fn runs on `num_workers` threads (see `_parallel_map`).
        """
        out: list[Any] = [None] * len(keys)
        located = sorted((self._locate(k), j) for j, k in enumerate(keys))
        k = 0
        while k < len(located):
            (fi, local), _ = located[k]
            block, start = self._block(fi, local)
            end = self.row_groups[fi][block + 1] if block + 1 < len(self.row_groups[fi]) else None
            run = []
            while k < len(located) and located[k][0][0] == fi and (end is None or located[k][0][1] < end):
                run.append(located[k])
                k += 1
            col = self._load_block(fi, block)
            values = [col[local_ - start].as_py() for (_, local_), _ in run]
            for (_, j), result in zip(run, _parallel_map(fn, values, num_workers)):
                out[j] = result
        return out


class ParquetReader(_RowReader):
    """Rows of parquet files (blocks = row groups)."""

    def _load_block(self, fi: int, block: int) -> Any:
        import pyarrow.parquet as pq

        column = self.columns[fi] + (".bytes" if self.struct[fi] else "")
        table = pq.ParquetFile(self.files[fi]).read_row_group(block, columns=[column])
        col = table.column(0).combine_chunks()
        return col.field("bytes") if self.struct[fi] else col


class ArrowStreamReader(_RowReader):
    """Rows of Arrow IPC files, as `datasets.Dataset.save_to_disk` writes them (one block per file,
    memory-mapped: a row costs what its bytes cost, so a shuffled read order needs no cache)."""

    def _load_block(self, fi: int, block: int) -> Any:
        import pyarrow.compute as pc

        col = read_arrow_table(self.files[fi]).column(self.columns[fi])
        return pc.struct_field(col, "bytes") if self.struct[fi] else col


def read_arrow_table(path: str) -> Any:
    """A memory-mapped Arrow IPC file: the stream format `datasets` writes, else the file format."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


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
# Duplicate images (VTAB's train800val200 copies; the same image in two splits of any dataset)

Digests = Callable[[list[Any]], list["bytes | None"]]  # sources -> digest per source (None: unreadable)


def pixel_digest(img: Image.Image) -> bytes:
    """Hash of decoded pixels plus mode, size and palette: equal iff the images are identical."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}|{img.size}".encode())
    if img.mode in ("P", "PA"):
        h.update(bytes(img.getpalette() or []))
        h.update(repr(img.info.get("transparency")).encode())
    h.update(img.tobytes())
    return h.digest()


def bytes_digest(data: bytes | None) -> bytes | None:
    return None if data is None else hashlib.blake2b(data, digest_size=16).digest()


def pixel_digest_of_bytes(data: bytes | None) -> bytes | None:
    """None when the bytes do not decode: extraction reports undecodable images, planning goes on."""
    if data is None:
        return None
    try:
        return pixel_digest(_open_image_bytes(data))
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None


def reader_digests(reader: _RowReader, *, num_workers: int) -> tuple[Digests, Digests]:
    """(bytes, decoded pixels) digests of a reader's rows, for `match_duplicates`."""
    return (
        lambda keys: reader.map_bytes(keys, bytes_digest, num_workers=num_workers),
        lambda keys: reader.map_bytes(keys, pixel_digest_of_bytes, num_workers=num_workers),
    )


def _parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int) -> list:
    n = num_workers if num_workers > 0 else min(8, os.cpu_count() or 1)
    if n <= 1 or len(items) < 2:
        return [fn(p) for p in items]
    # Threads suffice: file reads, PIL decoding and blake2b all release the GIL.
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))


def match_duplicates(
    pool: Sequence[tuple[Any, int]], copies: Sequence[tuple[Any, int]], digests: Sequence[Digests]
) -> dict[int, int]:
    """Map copy index -> pool index: one-to-one, same label, same digest (pool and copies are (source,
    label) pairs). `digests` run in turn on what is still unmatched, cheapest first: byte-identical
    files are identical images, so the byte pass decodes nothing and only the rest is compared by
    decoded pixels. Each pool item is taken at most once, in order, so a split holding two identical
    images still pairs them with two copies.
    """
    matches: dict[int, int] = {}
    free_rows, free_copies = list(range(len(pool))), list(range(len(copies)))
    for digest in digests:
        if not free_rows or not free_copies:
            break
        hashes = digest([pool[i][0] for i in free_rows] + [copies[c][0] for c in free_copies])
        queues: dict[tuple[bytes, int], deque[int]] = {}
        for i, h in zip(free_rows, hashes[: len(free_rows)]):
            if h is not None:
                queues.setdefault((h, pool[i][1]), deque()).append(i)
        used: set[int] = set()
        for c, h in zip(free_copies, hashes[len(free_rows) :]):
            q = queues.get((h, copies[c][1])) if h is not None else None
            if q:
                matches[c] = q.popleft()
                used.add(matches[c])
        free_rows = [i for i in free_rows if i not in used]
        free_copies = [c for c in free_copies if c not in matches]
    return matches


def _memoised(digest: Digests) -> Digests:
    cache: dict[Any, bytes | None] = {}

    def run(sources: list[Any]) -> list[bytes | None]:
        todo = [s for s in dict.fromkeys(sources) if s not in cache]
        if todo:
            cache.update(zip(todo, digest(todo)))
        return [cache[s] for s in sources]

    return run


def fold_duplicates(
    samples: Sequence[Sample], digests: Sequence[Digests], *, splits: Sequence[str] | None = None
) -> tuple[tuple[Sample, ...], dict[str, int]]:
    """Store an image that several splits list once: returns (samples, rows folded away per split).

    Samples are in split order (each sample's first split is the one it was listed in). For each split
    S of `splits` (default: every split but the first), each row listed in S is folded onto an earlier
    row of an earlier split that is not yet in S and has the same label and image (`match_duplicates`):
    that row gains the copy's splits and its id as an alias. VTAB passes ("train800val200",), which
    folds the copies onto train800 / val200 exactly as the folder layout's planning does.
    """
    order = list(dict.fromkeys(s.splits[0] for s in samples))
    targets = order[1:] if splits is None else [s for s in splits if s in order]
    digests = [_memoised(d) for d in digests]
    rows = [[s.splits, s.aliases] for s in samples]
    folded: set[int] = set()
    counts: dict[str, int] = {}
    for split in targets:
        rank = order.index(split)
        copies = [k for k, s in enumerate(samples) if s.splits[0] == split and k not in folded]
        pool = [
            k for k, s in enumerate(samples)
            if k not in folded and order.index(s.splits[0]) < rank and split not in rows[k][0]
        ]  # fmt: skip
        if not copies or not pool:
            continue
        matches = match_duplicates(
            [(samples[k].source, samples[k].label) for k in pool],
            [(samples[k].source, samples[k].label) for k in copies],
            digests,
        )
        for c, p in sorted(matches.items()):
            row, copy = rows[pool[p]], samples[copies[c]]
            row[0] = tuple(dict.fromkeys(row[0] + rows[copies[c]][0]))
            row[1] = row[1] + (copy.sample_id,) + rows[copies[c]][1]
            folded.add(copies[c])
        if matches:
            counts[split] = len(matches)
    kept = tuple(
        Sample(s.sample_id, s.label, rows[k][0], s.source, rows[k][1])
        for k, s in enumerate(samples) if k not in folded
    )  # fmt: skip
    return kept, counts


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
