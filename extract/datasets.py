"""Plan which images go into a feature store, in which row order, with which split memberships.

A `TaskPlan` is everything stage 1 needs to know about one task before touching a backbone: one
`Sample` per *unique* image (store row order), each sample's label and split memberships, and the
(train, eval) split pairs of the dev and final protocols. Planning reads split files / directory
listings and, for VTAB, hashes images to fold the train800val200 copies onto the train800/val200
rows; it never resizes or normalises (that is `extract.images`).

Row order is a pure function of the dataset on disk (file order, sorted names, fixed seeds), so two
plans of the same data are equal and a store can be resumed or verified against `fingerprint()`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
import posixpath
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "DigitsReader",
    "GENERIC_PROTOCOLS",
    "IMAGE_EXTENSIONS",
    "ParquetReader",
    "Sample",
    "TaskPlan",
    "VTAB_NUM_CLASSES",
    "VTAB_PROTOCOLS",
    "VTAB_SPLITS",
    "VTAB_TASKS",
    "discover_vtab_tasks",
    "plan_dataset",
    "plan_digits",
    "plan_folder",
    "plan_parquet",
    "plan_vtab",
    "read_split_file",
    "vtab_group",
]


class DatasetError(ValueError):
    """Bad dataset on disk or bad option; the message names the file (and line) or the option."""


# --------------------------------------------------------------------------------------------------
# Constants


VTAB_TASKS: dict[str, str] = {
    "cifar": "natural",
    "caltech101": "natural",
    "dtd": "natural",
    "oxford_flowers102": "natural",
    "oxford_iiit_pet": "natural",
    "svhn": "natural",
    "sun397": "natural",
    "patch_camelyon": "specialised",
    "eurosat": "specialised",
    "resisc45": "specialised",
    "diabetic_retinopathy": "specialised",
    "clevr_count": "structured",
    "clevr_dist": "structured",
    "dmlab": "structured",
    "kitti": "structured",
    "dsprites_loc": "structured",
    "dsprites_ori": "structured",
    "smallnorb_azi": "structured",
    "smallnorb_ele": "structured",
}

# Used as a floor for the class count: a 1k subset may miss a class that only the test set has.
VTAB_NUM_CLASSES: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip

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

_VAL_DIR_NAMES = ("val", "valid", "validation")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


def vtab_group(task: str) -> str:
    """Group of a VTAB task; "other" for a user-added task folder that is not one of the 19."""
    return VTAB_TASKS.get(task, "other")


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


# --------------------------------------------------------------------------------------------------
# VTAB


def read_split_file(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Parse a VTAB split file into (relative POSIX path, label, line number) triples.

    Tolerates a UTF-8 BOM, CRLF/CR line ends, surrounding whitespace, blank lines, several
    spaces or tabs between path and label, and backslashes in paths; anything else is an error
    naming file and line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read split file ({e})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None
    entries: list[tuple[str, int, int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        parts = stripped.rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9]+", parts[1]):
            raise DatasetError(
                f"{path}:{lineno}: expected '<relative/image/path> <non-negative integer label>',"
                f" got {line!r}"
            )
        rel = parts[0].strip().replace("\\", "/")
        if rel.startswith("/") or re.match(r"^[A-Za-z]:/", rel):
            raise DatasetError(
                f"{path}:{lineno}: image path {rel!r} must be relative to the task folder"
            )
        rel = posixpath.normpath(rel)
        if rel == ".." or rel.startswith("../") or rel == ".":
            raise DatasetError(f"{path}:{lineno}: image path {parts[0]!r} leaves the task folder")
        entries.append((rel, int(parts[1]), lineno))
    if not entries:
        raise DatasetError(f"{path}: split file lists no images")
    return entries


def discover_vtab_tasks(root: str | os.PathLike) -> list[str]:
    """Sorted names of the folders under root that hold VTAB split files.

    A folder with some but not all four split files is an error (a broken copy), not skipped.
    Folders that are not among the 19 VTAB tasks are accepted, so users can add their own tasks.
    """
    root = _existing_dir(root, option="root")
    tasks = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        present = [s for s in VTAB_SPLITS if os.path.isfile(os.path.join(entry.path, f"{s}.txt"))]
        if not present:
            continue
        if len(present) < len(VTAB_SPLITS):
            missing = [f"{s}.txt" for s in VTAB_SPLITS if s not in present]
            raise DatasetError(f"{entry.path}: VTAB task folder lacks {', '.join(missing)}")
        tasks.append(entry.name)
    if not tasks:
        hint = ""
        if all(os.path.isfile(os.path.join(root, f"{s}.txt")) for s in VTAB_SPLITS):
            hint = f" ({root} itself looks like a task folder: pass its parent as the root)"
        raise DatasetError(
            f"{root}: no VTAB task folders (expected <root>/<task>/train800.txt, val200.txt,"
            f" train800val200.txt, test.txt){hint}"
        )
    return tasks


def plan_vtab(
    root: str | os.PathLike,
    tasks: Iterable[str] | None = None,
    *,
    dedup: bool = True,
    num_workers: int = 0,
) -> list[TaskPlan]:
    """Plan VTAB-1k tasks under `root` (`tasks=None`: every task folder found, sorted).

    Row order per task: train800, val200, train800val200 copies that match nothing, test; within
    a split, file order. With `dedup`, each train800val200 copy whose decoded pixels (and label)
    equal a train800/val200 image is folded onto that row (the row gets both splits and the copy's
    id as an alias). `num_workers` threads hash images (0: min(8, CPU count); 1: serial).
    """
    root = _existing_dir(root, option="root")
    found = discover_vtab_tasks(root)
    if tasks is None:
        wanted = found
    else:
        wanted = list(dict.fromkeys(tasks))
        if not wanted:
            raise DatasetError("option tasks: empty task list")
        missing = [t for t in wanted if t not in found]
        if missing:
            raise DatasetError(
                f"{root}: no VTAB task folder {', '.join(repr(t) for t in missing)};"
                f" tasks there: {', '.join(found)}"
            )
    return [_plan_vtab_task(root, t, dedup=dedup, num_workers=num_workers) for t in wanted]


class _Row:
    __slots__ = ("sample_id", "label", "splits", "source", "aliases")

    def __init__(self, sample_id: str, label: int, split: str, source: str):
        self.sample_id, self.label, self.source = sample_id, label, source
        self.splits, self.aliases = [split], []

    def freeze(self) -> Sample:
        return Sample(
            self.sample_id, self.label, tuple(self.splits), self.source, tuple(self.aliases)
        )


def _plan_vtab_task(root: str, task: str, *, dedup: bool, num_workers: int) -> TaskPlan:
    task_dir = os.path.join(root, task)
    split_files = {s: os.path.join(task_dir, f"{s}.txt") for s in VTAB_SPLITS}
    entries = {s: read_split_file(split_files[s]) for s in VTAB_SPLITS}
    _check_images_exist(task_dir, entries, split_files)

    rows: list[_Row] = []
    by_id: dict[str, int] = {}
    seen: dict[tuple[str, str], int] = {}  # (split, id) -> line, to report duplicate lines
    copies: list[tuple[str, int, str]] = []  # train800val200 entries that are separate files

    def add(split: str, rel: str, label: int, lineno: int, *, defer: bool = False) -> None:
        sid = f"{task}/{rel}"
        where = f"{split_files[split]}:{lineno}"
        if (split, sid) in seen:
            raise DatasetError(f"{where}: {rel} is already listed on line {seen[split, sid]}")
        seen[split, sid] = lineno
        if sid in by_id:  # same file listed by two splits: one row, two memberships
            row = rows[by_id[sid]]
            if row.label != label:
                raise DatasetError(
                    f"{where}: {rel} has label {label} here but {row.label} in {row.splits[0]}.txt"
                )
            row.splits.append(split)
        elif defer:
            copies.append((sid, label, os.path.join(task_dir, rel)))
        else:
            by_id[sid] = len(rows)
            rows.append(_Row(sid, label, split, os.path.join(task_dir, rel)))

    for split in ("train800", "val200"):
        for rel, label, lineno in entries[split]:
            add(split, rel, label, lineno)
    for rel, label, lineno in entries["train800val200"]:
        add("train800val200", rel, label, lineno, defer=True)

    if copies:
        pool = [
            i for i, r in enumerate(rows)
            if "train800val200" not in r.splits and ("train800" in r.splits or "val200" in r.splits)
        ]  # fmt: skip
        matches = _match_copies(rows, pool, copies, num_workers=num_workers) if dedup else {}
        for c, (sid, label, src) in enumerate(copies):
            if c in matches:
                rows[matches[c]].splits.append("train800val200")
                rows[matches[c]].aliases.append(sid)
            else:
                by_id[sid] = len(rows)
                rows.append(_Row(sid, label, "train800val200", src))

    for rel, label, lineno in entries["test"]:
        add("test", rel, label, lineno)

    samples = tuple(r.freeze() for r in rows)
    max_label = max(s.label for s in samples)
    num_classes = max(VTAB_NUM_CLASSES.get(task, 0), max_label + 1)
    return _vtab_split_plan(
        dataset="vtab", task=task, root=root, samples=samples, classes=tuple(str(k) for k in range(num_classes))
    )


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


def _check_images_exist(
    task_dir: str, entries: dict[str, list[tuple[str, int, int]]], split_files: dict[str, str]
) -> None:
    """One directory listing per folder instead of one stat per image (73k test images)."""
    listings: dict[str, set[str]] = {}
    missing: list[tuple[str, int, str, str]] = []
    for split, items in entries.items():
        for rel, _, lineno in items:
            full = os.path.join(task_dir, rel)
            folder, name = os.path.split(full)
            if folder not in listings:
                try:
                    listings[folder] = set(os.listdir(folder))
                except OSError:
                    listings[folder] = set()
            if name not in listings[folder] and not os.path.isfile(full):
                missing.append((split_files[split], lineno, rel, full))
    if missing:
        file, lineno, rel, full = missing[0]
        more = f" ({len(missing) - 1} more listed images are missing)" if len(missing) > 1 else ""
        raise DatasetError(f"{file}:{lineno}: image {rel} not found ({full}){more}")


def _file_hash(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).digest()
    except OSError:
        return None


def _pixel_hash(path: str) -> bytes | None:
    """Hash of decoded pixels plus mode, size and palette; None when the file cannot be decoded."""
    try:
        img = open_image_file(path)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{img.mode}|{img.size}".encode())
        if img.mode in ("P", "PA"):
            h.update(bytes(img.getpalette() or []))
            h.update(repr(img.info.get("transparency")).encode())
        h.update(img.tobytes())
        return h.digest()
    except Exception:  # noqa: BLE001 - extraction reports undecodable images, planning goes on
        return None


def _parallel_map(fn: Callable[[str], bytes | None], paths: list[str], num_workers: int) -> list:
    n = num_workers if num_workers > 0 else min(8, os.cpu_count() or 1)
    if n <= 1 or len(paths) < 2:
        return [fn(p) for p in paths]
    # Threads suffice: file reads, PIL decoding and blake2b all release the GIL.
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, paths))


def _match_copies(
    rows: list[_Row], pool: list[int], copies: list[tuple[str, int, str]], *, num_workers: int
) -> dict[int, int]:
    """Map copy index -> row index: one-to-one, same label, same bytes or else same pixels.

    Byte-identical files are identical images, so the byte pass decodes nothing; only copies left
    unmatched (re-encoded containers) are compared by decoded pixels. Each row is consumed at most
    once, in row order, so a split holding two identical images still pairs them with two copies.
    """
    matches: dict[int, int] = {}
    free_rows, free_copies = list(pool), list(range(len(copies)))
    for hasher in (_file_hash, _pixel_hash):
        if not free_rows or not free_copies:
            break
        paths = [rows[i].source for i in free_rows] + [copies[c][2] for c in free_copies]
        hashes = _parallel_map(hasher, paths, num_workers)
        queues: dict[tuple[bytes, int], deque[int]] = {}
        for i, h in zip(free_rows, hashes[: len(free_rows)]):
            if h is not None:
                queues.setdefault((h, rows[i].label), deque()).append(i)
        used: set[int] = set()
        for c, h in zip(free_copies, hashes[len(free_rows) :]):
            q = queues.get((h, copies[c][1])) if h is not None else None
            if q:
                matches[c] = q.popleft()
                used.add(matches[c])
        free_rows = [i for i in free_rows if i not in used]
        free_copies = [c for c in free_copies if c not in matches]
    return matches


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
# Image folder


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _walk_images(folder: str) -> list[str]:
    """Image files under folder, recursively, sorted by relative path (deterministic)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return sorted(out, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def plan_folder(root: str | os.PathLike) -> list[TaskPlan]:
    """Plan an ImageFolder tree: <root>/<class>/**/<image>, classes = sorted folder names.

    If <root>/train/ exists the tree is read as <root>/{train,val|valid|validation,test}/<class>/
    (missing val: 1/8 of train, stratified by a hash of the path; missing test: error); other
    folders beside them are ignored. Otherwise the images are cut 70/10/20 per class by a hash of
    their relative path. Splits: train, val, trainval (= train | val), test.
    """
    root = _existing_dir(root, option="root")
    top = _subdirs(root)
    if "train" in top and _subdirs(os.path.join(root, "train")):
        split_dirs = {"train": "train", "test": "test" if "test" in top else None}
        split_dirs["val"] = next((d for d in _VAL_DIR_NAMES if d in top), None)
        if split_dirs["test"] is None:
            raise DatasetError(f"{root}: has a train/ folder but no test/ folder")
        used = {s: d for s, d in split_dirs.items() if d is not None}
        classes = tuple(sorted({c for d in used.values() for c in _subdirs(os.path.join(root, d))}))
        parts = [
            (split, os.path.join(used[split], c))
            for split in ("train", "val", "test")
            if split in used
            for c in _subdirs(os.path.join(root, used[split]))
        ]
    else:
        classes = tuple(top)
        parts = [(None, c) for c in top]
    label_of = {c: k for k, c in enumerate(classes)}
    items: list[tuple[str, int, str | int, str | None]] = []
    for split, rel_dir in parts:
        label = label_of[os.path.basename(rel_dir)]
        for path in _walk_images(os.path.join(root, rel_dir)):
            sid = os.path.relpath(path, root).replace(os.sep, "/")
            items.append((sid, label, os.path.abspath(path), split))
    if not items:
        loose = [f for f in os.listdir(root) if _is_image(f)]
        hint = (
            f"; {len(loose)} images lie directly in it, but each class needs its own sub-folder"
            if loose
            else ""
        )
        raise DatasetError(
            f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders{hint}"
        )
    return [_generic_plan(dataset="folder", root=root, items=items, classes=classes, where=root)]


# --------------------------------------------------------------------------------------------------
# Parquet


def _is_binary(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _image_column_kind(t: Any) -> bool | None:
    """True for an HF image struct ({bytes, path}), False for plain binary, None otherwise."""
    import pyarrow as pa

    if _is_binary(t):
        return False
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        if idx >= 0 and _is_binary(t.field(idx).type):
            return True
    return None


def _describe_columns(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _hf_class_names(schema: Any, column: str) -> list[str] | None:
    """Class names from the ClassLabel feature HF `datasets` stores in the schema metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feats = json.loads(meta)["info"]["features"][column]
        names = feats.get("names") if feats.get("_type") == "ClassLabel" else None
        return [str(n) for n in names] if names else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _split_from_filename(rel: str) -> str | None:
    """HF exports name shards '<split>-00000-of-00003.parquet' or keep them in '<split>/' dirs."""
    stem = posixpath.basename(rel)[: -len(".parquet")]
    m = re.fullmatch(r"(.+?)-\d+-of-\d+", stem)
    for candidate in ([m.group(1)] if m else []) + [stem] + rel.split("/")[:-1][::-1]:
        if candidate.lower() in _SPLIT_ALIASES or candidate in VTAB_SPLITS:
            return candidate
    return None


@dataclass
class _ParquetPart:
    """What planning reads from one parquet file (everything but the image bytes)."""

    path: str
    rel: str
    image_column: str
    struct: bool
    labels: list[Any]
    label_kind: str  # "int" | "str"
    splits: list[str | None]
    paths: list[str | None]
    row_group_starts: list[int]
    class_names: list[str] | None


def _pick_image_column(f: str, schema: Any, image_column: str | None) -> tuple[str, bool]:
    if image_column is not None:
        if image_column not in schema.names:
            raise DatasetError(
                f"{f}: no image column {image_column!r}; columns: {_describe_columns(schema)}"
            )
        kind = _image_column_kind(schema.field(image_column).type)
        if kind is None:
            raise DatasetError(
                f"{f}: column {image_column!r} has type {schema.field(image_column).type}, not"
                " image bytes (binary or struct<bytes, path>)"
            )
        return image_column, kind
    usual = ("image", "img", "image_bytes", "jpg", "png", "bytes")
    preferred = [n for n in usual if n in schema.names]
    for name in preferred + schema.names:
        kind = _image_column_kind(schema.field(name).type)
        if kind is not None:
            return name, kind
    raise DatasetError(
        f"{f}: no image column (binary or struct<bytes, path>); set image_column."
        f" Columns: {_describe_columns(schema)}"
    )


def _read_parquet_part(
    f: str, rel: str, image_column: str | None, label_column: str | None
) -> _ParquetPart:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DatasetError(f"{f}: cannot read parquet file ({e})") from None
    schema = pf.schema_arrow
    img_col, struct = _pick_image_column(f, schema, image_column)
    lab_col = label_column or next(
        (n for n in ("label", "labels", "target") if n in schema.names), None
    )
    if lab_col is None or lab_col not in schema.names:
        what = (
            f"no label column {lab_col!r}"
            if lab_col
            else "no label column (label/labels/target); set label_column"
        )
        raise DatasetError(f"{f}: {what}. Columns: {_describe_columns(schema)}")
    lt = schema.field(lab_col).type
    if pa.types.is_dictionary(lt):
        lt = lt.value_type
    if pa.types.is_integer(lt):
        label_kind = "int"
    elif pa.types.is_string(lt) or pa.types.is_large_string(lt):
        label_kind = "str"
    else:
        raise DatasetError(f"{f}: label column {lab_col!r} has type {lt}; need integers or strings")

    has_split = "split" in schema.names and lab_col != "split"
    has_path = struct and schema.field(img_col).type.get_field_index("path") >= 0
    read = [lab_col] + (["split"] if has_split else []) + ([f"{img_col}.path"] if has_path else [])
    table = pf.read(columns=read)  # nested "col.path" reads the names, not the image bytes
    labels = table.column(0)
    if labels.null_count:
        raise DatasetError(f"{f}: row {pc.index(pc.is_null(labels), True).as_py()}: label is null")
    n = table.num_rows
    if has_split:
        splits = [None if v is None else str(v) for v in table.column(1).to_pylist()]
    else:
        splits = [_split_from_filename(rel)] * n
    paths: list[str | None] = [None] * n
    if has_path:
        col = table.column(table.num_columns - 1)
        if pa.types.is_struct(col.type):
            col = col.combine_chunks().field("path")
        paths = col.to_pylist()
    starts = np.cumsum(
        [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    )[:-1]
    return _ParquetPart(
        path=f,
        rel=rel,
        image_column=img_col,
        struct=struct,
        labels=labels.to_pylist(),
        label_kind=label_kind,
        splits=splits,
        paths=paths,
        row_group_starts=[int(x) for x in starts],
        class_names=_hf_class_names(schema, lab_col),
    )


def plan_parquet(
    path_or_dir: str | os.PathLike,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
) -> list[TaskPlan]:
    """Plan one parquet file, or every *.parquet under a folder (sorted, recursive).

    Image column: an HF image struct {bytes, path} or plain binary; auto-detected ("image", "img",
    ... or the first column of such a type) unless given. Label column: "label" / "labels" /
    "target" unless given; integers (class names from HF ClassLabel metadata when present) or
    strings (classes = sorted distinct values). Splits: a "split" column, else the HF shard file
    name ("train-00000-of-00001.parquet") or folder; VTAB split names keep the VTAB protocols
    (rows are not deduplicated), other names map to train/val/test. Sample id: the struct's path
    when every row has one and they are unique, else "<file relative to the folder>#<row>".
    """
    p = Path(path_or_dir).expanduser()
    if p.is_file():
        base, files = os.path.abspath(p.parent), [os.path.abspath(p)]
    elif p.is_dir():
        base = os.path.abspath(p)
        files = sorted(
            (os.path.abspath(f) for f in p.rglob("*.parquet")),
            key=lambda f: os.path.relpath(f, base),
        )
        if not files:
            raise DatasetError(f"{base}: no *.parquet files")
    else:
        raise DatasetError(f"option root: {os.path.abspath(p)} does not exist")
    where = os.path.abspath(p)

    parts = [
        _read_parquet_part(
            f, os.path.relpath(f, base).replace(os.sep, "/"), image_column, label_column
        )
        for f in files
    ]
    kinds = {part.label_kind for part in parts}
    if len(kinds) > 1:
        raise DatasetError(f"{where}: label columns are integers in some files, strings in others")
    offsets = np.cumsum([0] + [len(part.labels) for part in parts])
    num_rows = int(offsets[-1])
    if not num_rows:
        raise DatasetError(f"{where}: parquet files hold no rows")

    paths = [x for part in parts for x in part.paths]
    if all(x is not None for x in paths) and len(set(paths)) == len(paths):
        ids = [str(x) for x in paths]
    else:
        ids = [f"{part.rel}#{r}" for part in parts for r in range(len(part.labels))]
    raw = [v for part in parts for v in part.labels]
    if kinds == {"str"}:
        classes = tuple(sorted(set(raw)))
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[v] for v in raw]
    else:
        labels = [int(v) for v in raw]
        neg = next((k for k, v in enumerate(labels) if v < 0), None)
        if neg is not None:
            fi = int(np.searchsorted(offsets, neg, side="right")) - 1
            raise DatasetError(
                f"{files[fi]}: row {neg - int(offsets[fi])}: label {labels[neg]}"
                " (unlabelled rows are not supported)"
            )
        k = max(labels) + 1
        names = next((part.class_names for part in parts if part.class_names), None)
        classes = tuple(names) if names and len(names) >= k else tuple(str(c) for c in range(k))

    reader = ParquetReader(
        files,
        [part.image_column for part in parts],
        [part.struct for part in parts],
        [part.row_group_starts for part in parts],
        [int(x) for x in offsets[:-1]],
        num_rows=num_rows,
    )
    given = [s for part in parts for s in part.splits]
    present = {s for s in given if s is not None}
    if present and present <= set(VTAB_SPLITS) and None not in given:
        order = sorted(range(num_rows), key=lambda k: VTAB_SPLITS.index(given[k]))  # stable
        samples = tuple(Sample(ids[k], labels[k], (given[k],), k) for k in order)
        return [
            _vtab_split_plan(dataset="parquet", task="default", root=where, samples=samples, classes=classes, reader=reader)
        ]
    unknown = sorted({s for s in present if s.lower() not in _SPLIT_ALIASES})
    if unknown:
        raise DatasetError(
            f"{where}: unrecognised split names {unknown}; use train/val/test"
            f" (or validation/valid/dev) or the VTAB names {list(VTAB_SPLITS)}"
        )
    items = [
        (ids[k], labels[k], k, None if given[k] is None else _SPLIT_ALIASES[given[k].lower()])
        for k in range(num_rows)
    ]
    plan = _generic_plan(
        dataset="parquet", root=where, items=items, classes=classes, reader=reader, where=where
    )
    return [plan]


# --------------------------------------------------------------------------------------------------
# Digits


def plan_digits() -> list[TaskPlan]:
    """sklearn's 1,797 8x8 digits with VTAB-like splits, so the VTAB protocols apply unchanged.

    A seed-0 `RandomState` permutation (NumPy keeps that stream stable across versions) picks
    train800 / val200 / test (the remaining 797); rows are in ascending original index per split.
    """
    images, targets = _digits_arrays()
    perm = np.random.RandomState(0).permutation(len(images))
    parts = [
        (sorted(perm[:800].tolist()), ("train800", "train800val200")),
        (sorted(perm[800:1000].tolist()), ("val200", "train800val200")),
        (sorted(perm[1000:].tolist()), ("test",)),
    ]
    samples = tuple(
        Sample(f"digits/{k:04d}", int(targets[k]), splits, k) for idx, splits in parts for k in idx
    )
    return [
        _vtab_split_plan(
            dataset="digits", task="digits", root=None, samples=samples,
            classes=tuple(str(c) for c in range(10)), reader=DigitsReader(),
        )
    ]


# --------------------------------------------------------------------------------------------------
# Dispatch


def _existing_dir(path: str | os.PathLike | None, *, option: str) -> str:
    if path is None:
        raise DatasetError(f"option {option}: a dataset folder is required")
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(full):
        what = "is not a folder" if os.path.exists(full) else "does not exist"
        raise DatasetError(f"option {option}: {full} {what}")
    return full


def plan_dataset(
    kind: str,
    *,
    root: str | os.PathLike | None = None,
    tasks: Iterable[str] | None = None,
    num_workers: int = 0,
    dedup: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
) -> list[TaskPlan]:
    """Plan a dataset of the given kind ("vtab", "folder", "parquet", "digits")."""
    if kind not in DATASET_KINDS:
        raise DatasetError(
            f"option dataset: unknown kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}"
        )
    if kind == "vtab":
        root = _existing_dir(root, option="root")
        return plan_vtab(root, tasks, dedup=dedup, num_workers=num_workers)
    if tasks is not None:
        own = "digits" if kind == "digits" else "default"
        if list(tasks) not in ([], [own]):
            raise DatasetError(
                f"option tasks: only vtab has several tasks; {kind} has the one task {own!r}"
            )
    if kind == "digits":
        return plan_digits()
    if root is None:
        raise DatasetError(f"option root: --dataset {kind} needs a root")
    if kind == "folder":
        return plan_folder(root)
    return plan_parquet(root, image_column=image_column, label_column=label_column)
