"""VTAB-1k in the layout of ../shared/VTAB.md: <root>/<task>/{train800,val200,train800val200,test}.txt."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path
from typing import Iterable

from .common import (
    VTAB_SPLITS,
    DatasetError,
    Sample,
    TaskPlan,
    _existing_dir,
    _parallel_map,
    _vtab_split_plan,
    match_duplicates,
    open_image_file,
    pixel_digest,
)


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


def vtab_group(task: str) -> str:
    """Group of a VTAB task; "other" for a user-added task folder that is not one of the 19."""
    return VTAB_TASKS.get(task, "other")


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
        return pixel_digest(open_image_file(path))
    except Exception:  # noqa: BLE001 - extraction reports undecodable images, planning goes on
        return None


def _match_copies(
    rows: list[_Row], pool: list[int], copies: list[tuple[str, int, str]], *, num_workers: int
) -> dict[int, int]:
    """Map copy index -> row index: one-to-one, same label, same bytes or else same pixels."""
    found = match_duplicates(
        [(rows[i].source, rows[i].label) for i in pool],
        [(path, label) for _, label, path in copies],
        [lambda paths, fn=fn: _parallel_map(fn, paths, num_workers) for fn in (_file_hash, _pixel_hash)],
    )
    return {c: pool[p] for c, p in found.items()}
