"""Deriving a compact store from a full-size one (`combo store compact`): resumable, shard by shard.

Every task is checked before anything is written (encoding, widths, a training split to fit PCA
on); PCA is fitted on the task's training split only (`compact.fit_split`), streamed a shard of
rows at a time, and stored with the task before its first shard, so a rerun after a kill reuses
that basis and writes the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import samples as sample_table
from .compact import CompactSpec, CompactSpecError, PcaBasis, PcaFit, fit_split, fitted_groups
from .metadata import StoreInfo
from .reader import FeatureStore, TaskStore, open_store
from .writer import Skipped, StoreWriter

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (task, rows) -> advance(n)


@dataclass(frozen=True)
class CompactResult:
    store: Path
    tasks: list[str]
    bytes_on_disk: int
    source_bytes: int | None  # bytes of the source (None when it cannot be listed)


def check_compactable(source: FeatureStore, spec: CompactSpec) -> dict[str, tuple[TaskStore, str | None]]:
    """Refuse what cannot be compacted, before anything is written; returns each task, checked whole, with
    its fit split."""
    if source.compact is not None:
        raise CompactSpecError(
            f"{source.url} is already a compact store ({source.compact.name}); compact its full-size original instead"
        )
    for grid in source.grids:  # each group is encoded on its own: PCA R must fit every group's width
        spec.check_dim(grid.feature_dim, where=f"{source.url}: " + (f"grid group {grid.name}: " if grid.name else ""))
    fits: dict[str, tuple[TaskStore, str | None]] = {}
    for name in source.tasks:
        task = source.task(name)
        task.require_complete()
        split = fit_split(task.protocols, sample_table.split_names(task.samples))
        if spec.pca is not None and (split is None or task.rows(split).size == 0):
            raise CompactSpecError(
                f"task {name} of {source.url} has no training split to fit PCA on (it has: "
                f"{', '.join(sample_table.split_names(task.samples)) or 'none'}); PCA is fitted on the training "
                "split only. Use --int8 alone, which fits nothing"
            )
        fits[name] = (task, split)
    return fits


def fit_pca(task: TaskStore, split: str, components: int, *, rows_per_read: int | None = None) -> tuple[PcaBasis, dict[str, Any]]:
    """PCA of a full-size task's patch tokens over its `split` rows only, streamed; with the record of the fit.
    `task` is one grid group's for a multi-grid store (`fit_task_pca` fits every group)."""
    return _streamed_fit(task, split, rows_per_read=rows_per_read).fitted(components, split)


def _streamed_fit(task: TaskStore, split: str, *, rows_per_read: int | None = None) -> PcaFit:
    """The running covariances of one (single-grid, or one group's) task's `split` rows, read a shard at a time."""
    rows = task.rows(split)
    fit = PcaFit(task.store.num_layers, task.store.feature_dim)
    step = rows_per_read or task.rows_per_shard
    for lo in range(0, rows.size, step):
        fit.add(task.read(rows[lo : lo + step]))
    return fit


def fit_task_pca(task: TaskStore, split: str, components: int) -> tuple[PcaBasis | list[PcaBasis], dict[str, Any]]:
    """The PCA basis of a task (a multi-grid task: a list, one per grid group, each fitted on its own) and the
    fit's record (`store_schema.compact.fitted_groups`)."""
    return fitted_groups([_streamed_fit(part, split) for part in task.grid_tasks()], components, split)


def compact_store(source: str | os.PathLike | FeatureStore, target: str | os.PathLike, spec: CompactSpec, *,
                  overwrite: bool = False, progress: ProgressFactory | None = None,
                  log: Callable[[str], None] | None = None) -> CompactResult:
    """Write `target`, a compact copy of every task of `source` (a path, URL or open store)."""
    src = source if isinstance(source, FeatureStore) else open_store(source)
    fits = check_compactable(src, spec)
    dst = Path(os.path.expanduser(str(target)))
    if src.location.kind == "local" and Path(src.location.root).resolve() == dst.resolve():
        raise CompactSpecError(f"{dst}: the compact store must go to another path than its source")
    layout = replace(src.layout, rows_per_shard=None, rows_per_chunk=None)
    with StoreWriter(dst, StoreInfo.from_attrs(src.attrs), layout, overwrite=overwrite, compact=spec) as writer:
        for name, (task, split) in fits.items():
            pca, record = None, {"fit_split": None, "fit_rows": 0}
            if spec.pca is not None and not writer.has_task(name):
                if log:
                    log(f"{name}: fitting PCA-{spec.pca} on split {split} ({task.rows(str(split)).size} rows)")
                pca, record = fit_task_pca(task, str(split), spec.pca)
            task_writer = writer.task(
                name, samples=task.samples, num_layers=src.num_layers, num_tokens=src.token_grid[0] * src.token_grid[1],
                feature_dim=src.feature_dim, num_prefix_tokens=src.num_prefix_tokens, protocols=task.protocols,
                classes=task.classes, group=task.attrs.get("group"), row_order=task.attrs.get("row_order"),
                pca=pca, compact_fit=record, source=task.attrs.get("source"),
            )
            if task_writer.complete:
                continue
            skipped = {int(s["row"]): Skipped(**s) for s in task.attrs.get("skipped") or []}
            pending = task_writer.pending()
            advance = progress(name, sum(len(task_writer.blocks[b]) for b in pending)) if progress else None
            parts = task.grid_tasks()
            for block in pending:
                rows = task_writer.blocks[block]
                index = np.arange(rows.start, rows.stop)
                # a multi-grid task: one array per grid group, each encoded on its own
                tokens = task.read(index) if not src.multi_grid else [part.read(index) for part in parts]
                prefix = task.read(index, prefix=True) if src.num_prefix_tokens else None
                task_writer.write_block(block, tokens, prefix, skipped=[skipped[r] for r in rows if r in skipped])
                if advance:
                    advance(len(rows))
            task_writer.finalize()
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    source_bytes = None
    if src.location.kind == "local":
        source_bytes = sum(f.stat().st_size for f in Path(src.location.root).rglob("*") if f.is_file())
    return CompactResult(store=dst, tasks=list(src.tasks), bytes_on_disk=size, source_bytes=source_bytes)


__all__ = ["CompactResult", "check_compactable", "compact_store", "fit_pca", "fit_task_pca"]
