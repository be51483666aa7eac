"""Which stores a probe reads, and the check that they describe the same samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from store_schema import (
    FeatureStore,
    StoreMismatchError,
    TaskStore,
    default_store_root,
    is_url,
    open_store,
    store_path,
)


def resolve_store_refs(refs: Sequence[str], *, store_root: str | None = None, dataset: str = "vtab") -> list[str]:
    """Short names ('clip') become <store root>/clip/<dataset>.zarr; paths and URLs stay as they are."""
    root = store_root or default_store_root()
    out = []
    for ref in refs:
        looks_like_path = is_url(ref) or "/" in ref or ref.endswith((".zarr", ".zip")) or ref.startswith(".")
        out.append(ref if looks_like_path else store_path(root, ref, dataset))
    return out


def open_stores(refs: Sequence[str], *, store_root: str | None = None, dataset: str = "vtab",
                storage_options: dict[str, Any] | None = None) -> list[FeatureStore]:
    locations = resolve_store_refs(refs, store_root=store_root, dataset=dataset)
    stores = [open_store(loc, storage_options=storage_options) for loc in locations]
    names = [s.backbone["alias"] for s in stores]
    if len(set(s.url for s in stores)) < len(stores):
        raise StoreMismatchError(f"the same store is listed twice in --stores: {', '.join(s.url for s in stores)}")
    datasets = {s.dataset for s in stores}
    if len(datasets) > 1:
        raise StoreMismatchError(
            "stores hold different datasets: " + ", ".join(f"{s.url} ({s.dataset})" for s in stores)
        )
    del names
    return stores


def common_tasks(stores: Sequence[FeatureStore], wanted: Sequence[str] | None = None) -> list[str]:
    """Tasks every store holds (in the first store's order); a wanted task missing anywhere is an error."""
    if wanted:
        for store in stores:
            missing = [t for t in wanted if t not in store.tasks]
            if missing:
                raise StoreMismatchError(
                    f"store {store.url} has no task {', '.join(missing)}; it holds: {', '.join(store.tasks) or 'none'}"
                )
        return list(wanted)
    shared = [t for t in stores[0].tasks if all(t in s.tasks for s in stores[1:])]
    if not shared:
        raise StoreMismatchError("the stores have no task in common: " + "; ".join(f"{s.url}: {s.tasks}" for s in stores))
    return shared


@dataclass
class AlignedTask:
    """One task across K stores, with each store's row for every sample of the first store."""

    name: str
    parts: list[TaskStore]
    row_maps: list[np.ndarray]  # row_maps[k][i] = row in store k of the first store's row i

    @property
    def reference(self) -> TaskStore:
        return self.parts[0]

    @property
    def labels(self) -> np.ndarray:
        return self.reference.labels

    @property
    def classes(self) -> list[str]:
        return self.reference.classes

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [p.store.token_grid for p in self.parts]

    @property
    def layers_per_backbone(self) -> tuple[int, ...]:
        return tuple(p.store.num_layers for p in self.parts)

    @property
    def feature_dim(self) -> int:
        return self.parts[0].store.feature_dim

    def rows(self, split: str) -> np.ndarray:
        """Rows (of the first store) of a split's samples that are valid in every store."""
        rows = self.reference.rows(split)
        for part, row_map in zip(self.parts[1:], self.row_maps[1:]):
            valid = part.samples.column("valid").to_numpy(zero_copy_only=False)
            rows = rows[valid[row_map[rows]]]
        return rows


def align_tasks(stores: Sequence[FeatureStore], task: str) -> AlignedTask:
    """Open `task` in every store and check they hold the same samples with the same labels."""
    parts = [s.task(task) for s in stores]
    for part in parts:
        part.require_complete()
    dims = {p.store.feature_dim for p in parts}
    if len(dims) > 1:
        raise StoreMismatchError(
            "stores have different feature widths ("
            + ", ".join(f"{p.store.url}: D={p.store.feature_dim}" for p in parts)
            + "); ComBo as in the paper concatenates backbones of equal width only"
        )
    ref = parts[0]
    ref_ids = ref.sample_ids
    row_maps = [np.arange(len(ref_ids), dtype=np.int64)]
    for part in parts[1:]:
        ids = part.sample_ids
        if ids == ref_ids:
            row_map = np.arange(len(ids), dtype=np.int64)
        else:
            index = {sid: i for i, sid in enumerate(ids)}
            missing = [sid for sid in ref_ids if sid not in index]
            extra = [sid for sid in ids if sid not in set(ref_ids)]
            if missing or extra:
                raise StoreMismatchError(
                    f"task {task}: {part.store.url} and {ref.store.url} hold different samples: "
                    f"{len(missing)} only in the latter (e.g. {missing[:3]}), {len(extra)} only in the former (e.g. {extra[:3]})"
                )
            row_map = np.array([index[sid] for sid in ref_ids], dtype=np.int64)
        labels = part.labels[row_map]
        wrong = np.nonzero(labels != ref.labels)[0]
        if wrong.size:
            examples = ", ".join(f"{ref_ids[i]} ({ref.labels[i]} vs {labels[i]})" for i in wrong[:3])
            raise StoreMismatchError(
                f"task {task}: {part.store.url} labels {wrong.size} sample(s) differently from {ref.store.url}: {examples}"
            )
        row_maps.append(row_map)
    return AlignedTask(name=task, parts=parts, row_maps=row_maps)
