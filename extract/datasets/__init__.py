"""Plan which images go into a feature store, in which row order, with which split memberships.

A `TaskPlan` is everything stage 1 needs to know about one task before touching a backbone: one
`Sample` per *unique* image (store row order), each sample's label and split memberships, and the
(train, eval) split pairs of the dev and final protocols. Planning reads split files / directory
listings and, for VTAB, hashes images to fold the train800val200 copies onto the train800/val200
rows; it never resizes or normalises (that is `extract.images`).

Row order is a pure function of the dataset on disk (file order, sorted names, fixed seeds), so two
plans of the same data are equal and a store can be resumed or verified against `fingerprint()`.

The kinds live in one module each (`vtab`, `folder`, `parquet`, `digits`; VTAB from Hugging Face
datasets in `hfvtab`, its hf:// roots resolved in the hub cache by `hfhub`); `common` holds what they
share (Sample, TaskPlan, readers, duplicate folding, DatasetError, split constants). Import from here.
"""

from __future__ import annotations

import os
from typing import Iterable

from .common import (  # noqa: F401 - _digits_arrays, _open_image_bytes: used by extract.order, benchmarks
    DATASET_KINDS,
    GENERIC_PROTOCOLS,
    IMAGE_EXTENSIONS,
    VTAB_PROTOCOLS,
    VTAB_SPLITS,
    DatasetError,
    DigitsReader,
    ParquetReader,
    Sample,
    TaskPlan,
    _digits_arrays,
    _existing_dir,
    _open_image_bytes,
    open_image_file,
)
from .digits import plan_digits
from .folder import plan_folder
from .hfhub import HubRepo, hub_cache_dir, is_hf_root, resolve_hf_root
from .hfvtab import HF_VTAB_REPOS, hf_task_name, is_hf_dataset_dir, plan_hf_vtab
from .parquet import plan_parquet
from .vtab import VTAB_NUM_CLASSES, VTAB_TASKS, discover_vtab_tasks, plan_vtab, read_split_file, vtab_group

__all__ = [
    "DATASET_KINDS",
    "DatasetError",
    "DigitsReader",
    "GENERIC_PROTOCOLS",
    "HF_VTAB_REPOS",
    "HubRepo",
    "IMAGE_EXTENSIONS",
    "ParquetReader",
    "Sample",
    "TaskPlan",
    "VTAB_NUM_CLASSES",
    "VTAB_PROTOCOLS",
    "VTAB_SPLITS",
    "VTAB_TASKS",
    "discover_vtab_tasks",
    "hf_task_name",
    "hub_cache_dir",
    "is_hf_dataset_dir",
    "is_hf_root",
    "is_vtab_hf_folder",
    "open_image_file",
    "plan_dataset",
    "plan_digits",
    "plan_folder",
    "plan_hf_vtab",
    "plan_parquet",
    "plan_vtab",
    "read_split_file",
    "resolve_hf_root",
    "vtab_group",
]


def plan_dataset(
    kind: str,
    *,
    root: str | os.PathLike | None = None,
    tasks: Iterable[str] | None = None,
    num_workers: int = 0,
    dedup: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    task_name: str | None = None,
    download: bool = False,
) -> list[TaskPlan]:
    """Plan a dataset of the given kind ("vtab", "folder", "parquet", "digits").

    vtab's root is a folder of task folders (../shared/VTAB.md), or Hugging Face datasets: hf://datasets/ORG/REPO
    (a comma-separated list, globs over the cached repos), a downloaded repo folder or a save_to_disk folder,
    one task per repo (`hfvtab`; `task_name` names a single repo's task, `download` lets a missing repo be fetched).
    """
    if kind not in DATASET_KINDS:
        raise DatasetError(
            f"option dataset: unknown kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}"
        )
    if is_hf_root(root) and kind != "vtab":
        raise DatasetError(f"--root {root}: hf:// roots are read by --dataset vtab (this run: --dataset {kind})")
    if kind == "vtab":
        if is_hf_root(root):
            return plan_hf_vtab(str(root), tasks, task_name=task_name, dedup=dedup, num_workers=num_workers,
                                download=download)
        root = _existing_dir(root, option="root")
        if is_vtab_hf_folder(root):
            return plan_hf_vtab(root, tasks, task_name=task_name, dedup=dedup, num_workers=num_workers)
        if task_name is not None:
            raise DatasetError(
                f"--task-name: {root} is a VTAB folder, whose tasks are named by their folders; --task-name names"
                " the task of one Hugging Face dataset (hf://datasets/ORG/REPO or a save_to_disk folder)"
            )
        return plan_vtab(root, tasks, dedup=dedup, num_workers=num_workers)
    if task_name is not None:
        raise DatasetError(f"--task-name: only --dataset vtab with a Hugging Face root names its task (this run: --dataset {kind})")
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
    return plan_parquet(root, image_column=image_column, label_column=label_column, split_column=split_column,
                        dedup=dedup, num_workers=num_workers)


def is_vtab_hf_folder(root: str | os.PathLike) -> bool:
    """A local --root that `--dataset vtab` reads as one Hugging Face dataset (a save_to_disk or repo
    folder), not as a folder of VTAB task folders."""
    return not _has_task_folders(os.fspath(root)) and is_hf_dataset_dir(root)


def _has_task_folders(root: str) -> bool:
    """Whether some folder under root holds a VTAB split file (a folder layout, broken or not)."""
    for entry in os.scandir(root):
        if entry.is_dir() and not entry.name.startswith(".") and any(
            os.path.isfile(os.path.join(entry.path, f"{s}.txt")) for s in VTAB_SPLITS
        ):
            return True
    return False
