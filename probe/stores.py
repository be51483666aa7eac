"""Which stores a probe reads, and the check that they describe the same samples.

ComBo concatenates the layers of several backbones per image, so every store must hold the same
images with the same labels and the same split memberships. Stores may list the samples in another
order: they are joined by sample id (``AlignedTask.row_maps``). Anything else is refused before
training starts, with a message naming the store and a few of the samples at fault.

A hierarchical backbone's store (format 2.3, several (grid, width) groups) gives one *part* per group
(``TaskStore.grid_tasks()``); every other store gives one part. ``AlignedTask.parts`` are what the probe
reads (one Lambda slice each), ``backbone_of_part`` says which store (backbone) each belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store_schema import (
    FeatureStore,
    StoreMismatchError,
    StoreNotFoundError,
    TaskStore,
    default_store_root,
    is_url,
    open_store,
    store_path,
)
from store_schema.samples import SPLIT_PREFIX

from .align import hierarchical_grid

__all__ = ["AlignedTask", "align_tasks", "backbone_grid", "common_tasks", "open_stores", "store_grids", "resolve_store_refs"]


def _looks_like_path(ref: str) -> bool:
    return (
        is_url(ref)
        or "/" in ref
        or os.sep in ref
        or ref.endswith((".zarr", ".zip"))
        or ref.startswith(("." , "~"))
    )


def resolve_store_refs(refs: Sequence[str], *, store_root: str | None = None, dataset: str = "vtab") -> list[str]:
    """Short names ('clip') become <store root>/clip/<dataset>.zarr; paths and URLs stay as they are.
    A compact store's short name ('sam-int8', 'dinov2-pca128') is <store root>/sam/<dataset>-int8.zarr,
    where `combo extract --compact` writes it, when <store root>/sam-int8/<dataset>.zarr does not exist."""
    root = store_root or default_store_root()
    out = []
    for ref in refs:
        ref = str(ref).strip()
        if not ref:
            raise ValueError("--stores: an empty store name")
        out.append(os.path.expanduser(ref) if _looks_like_path(ref) else _short_name(root, ref, dataset))
    return out


def _short_name(root: str, ref: str, dataset: str) -> str:
    plain = store_path(root, ref, dataset)
    if is_url(plain) or os.path.exists(plain):
        return plain
    for i, char in enumerate(ref):
        if char == "-" and 0 < i < len(ref) - 1:
            compact = store_path(root, ref[:i], f"{dataset}-{ref[i + 1:]}")
            if os.path.exists(compact):
                return compact
    return plain


def open_stores(refs: Sequence[str], *, store_root: str | None = None, dataset: str = "vtab",
                storage_options: dict[str, Any] | None = None) -> list[FeatureStore]:
    """Open every store of --stores read-only; they must hold the same dataset."""
    if not refs:
        raise ValueError("--stores: give at least one store (a short name, a path or a URL)")
    locations = resolve_store_refs(refs, store_root=store_root, dataset=dataset)
    stores = []
    for ref, loc in zip(refs, locations):
        try:
            stores.append(open_store(loc, storage_options=storage_options))
        except StoreNotFoundError as err:
            if _looks_like_path(str(ref)):
                raise
            raise StoreNotFoundError(
                f"{err}. The short name {ref!r} resolves to <store root>/{ref}/{dataset}.zarr with store root "
                f"{store_root or default_store_root()!r}; pass --store-root (or set COMBO_STORE_ROOT), --dataset, "
                "or a path"
            ) from None
    urls = [s.url for s in stores]
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise StoreMismatchError(f"the same store is listed twice in --stores: {', '.join(twice)}")
    datasets = {s.dataset for s in stores}
    if len(datasets) > 1:
        raise StoreMismatchError(
            "stores hold different datasets: " + ", ".join(f"{s.url} ({s.dataset})" for s in stores)
        )
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
        return list(dict.fromkeys(wanted))
    shared = [t for t in stores[0].tasks if all(t in s.tasks for s in stores[1:])]
    if not shared:
        raise StoreMismatchError("the stores have no task in common: " + "; ".join(f"{s.url}: {s.tasks}" for s in stores))
    return shared


@dataclass
class AlignedTask:
    """One task across K stores, with each part's row for every sample of the first store.

    A part is one store's task, or one grid group of it (a hierarchical backbone); the parts of one
    backbone are adjacent and share its row map."""

    name: str
    parts: list[TaskStore]
    row_maps: list[np.ndarray]  # row_maps[j][i] = row in part j's store of the first store's row i
    backbone_of_part: list[int] = field(default_factory=list)  # [] = one part per backbone
    stores: list[FeatureStore] = field(default_factory=list)  # one per backbone; [] = each part's own store

    def __post_init__(self) -> None:
        if not self.backbone_of_part:
            self.backbone_of_part = list(range(len(self.parts)))
        self.backbone_of_part = [int(b) for b in self.backbone_of_part]
        owners = self.backbone_of_part
        if (len(owners) != len(self.parts) or len(self.row_maps) != len(self.parts) or owners[0] != 0
                or any(b - a not in (0, 1) for a, b in zip(owners, owners[1:]))):
            raise ValueError(f"task {self.name}: backbone_of_part {owners} must give each of the {len(self.parts)} "
                             "part(s) its backbone, numbered 0, 1, ... with a backbone's parts adjacent")
        if not self.stores:
            self.stores = [self.parts[self.backbone_parts(k)[0]].store for k in range(self.num_backbones)]
        if len(self.stores) != self.num_backbones:
            raise ValueError(f"task {self.name}: {len(self.stores)} stores for {self.num_backbones} backbones")

    @property
    def num_backbones(self) -> int:
        return self.backbone_of_part[-1] + 1 if self.backbone_of_part else 0

    def backbone_parts(self, k: int) -> list[int]:
        """Indices into ``parts`` of backbone k's parts, in order (its grid groups)."""
        return [j for j, b in enumerate(self.backbone_of_part) if b == k]

    @property
    def grouped(self) -> bool:
        """Whether some backbone has several parts (a multi-grid store)."""
        return len(self.parts) > self.num_backbones

    def last_parts(self) -> "AlignedTask":
        """The task on each backbone's last part (its deepest stage): what the linear probe reads."""
        keep = [self.backbone_parts(k)[-1] for k in range(self.num_backbones)]
        return AlignedTask(name=self.name, parts=[self.parts[j] for j in keep],
                           row_maps=[self.row_maps[j] for j in keep], stores=list(self.stores))

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
        """The token grid of every part."""
        return [tuple(p.store.token_grid) for p in self.parts]

    @property
    def layers_per_backbone(self) -> tuple[int, ...]:
        """L of every part (ComboConfig.layers_per_backbone counts parts; a part is a backbone unless grouped)."""
        return tuple(p.store.num_layers for p in self.parts)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """D of every part (they may differ: ComBo gives each part its own Lambda slice)."""
        return tuple(p.store.feature_dim for p in self.parts)

    def backbone_layer_ids(self, k: int) -> list[int]:
        """Model layer indices of backbone k's stored layers, over its parts in order."""
        ids: list[int] = []
        for j in self.backbone_parts(k):
            store = self.parts[j].store
            ids += [int(i) for i in (store.features.get("layers") or range(store.num_layers))]
        return ids

    def rows(self, split: str) -> np.ndarray:
        """Rows (of the first store) of a split's samples that are valid in every store (a store's parts share
        its samples)."""
        rows = self.reference.rows(split)
        for part, row_map in zip(self.parts[1:], self.row_maps[1:]):
            valid = part.samples.column("valid").to_numpy(zero_copy_only=False)
            rows = rows[valid[row_map[rows]]]
        return rows


def _examples(ids: Sequence[str], index: np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(str(ids[int(i)]) for i in index[:limit])
    return shown + (f" (+{index.size - limit} more)" if index.size > limit else "")


def store_grids(store: FeatureStore) -> list[tuple[int, int]]:
    """The token grid of each of a store's (grid, width) groups (one for a single-grid store)."""
    return [tuple(int(v) for v in g.token_grid) for g in store.grids]


def backbone_grid(store: FeatureStore) -> tuple[int, int]:
    """The grid a store brings to the common-grid rule (`align.default_grid`): its own, or for a multi-grid store
    its stride-16 stage's (`align.hierarchical_grid`)."""
    grids = store_grids(store)
    if len(grids) == 1:
        return grids[0]
    return hierarchical_grid(grids, int((store.attrs.get("preprocessing") or {}).get("image_size") or 0))


def align_tasks(stores: Sequence[FeatureStore], task: str) -> AlignedTask:
    """Open `task` in every store and check they hold the same samples, labels, splits and classes; each
    store's task becomes its parts (`TaskStore.grid_tasks()`), which share its row map."""
    parts = [s.task(task) for s in stores]
    for part in parts:
        part.require_complete()
    ref = parts[0]
    ref_ids = ref.sample_ids
    ref_splits = {c for c in ref.samples.column_names if c.startswith(SPLIT_PREFIX)}
    row_maps = [np.arange(len(ref_ids), dtype=np.int64)]
    for part in parts[1:]:
        where = f"task {task}: {part.store.url} (compared with {ref.store.url})"
        ids = part.sample_ids
        if ids == ref_ids:
            row_map = np.arange(len(ids), dtype=np.int64)
        else:
            index = {sid: i for i, sid in enumerate(ids)}
            ref_set = set(ref_ids)
            missing = [sid for sid in ref_ids if sid not in index]
            extra = [sid for sid in ids if sid not in ref_set]
            if missing or extra:
                raise StoreMismatchError(
                    f"{where} holds different samples: {len(missing)} missing from it (e.g. {missing[:3]}), "
                    f"{len(extra)} only in it (e.g. {extra[:3]}). Extract both from the same dataset folder."
                )
            row_map = np.array([index[sid] for sid in ref_ids], dtype=np.int64)
        labels = part.labels[row_map]
        wrong = np.nonzero(labels != ref.labels)[0]
        if wrong.size:
            examples = ", ".join(f"{ref_ids[i]} ({labels[i]} there vs {ref.labels[i]})" for i in wrong[:3])
            raise StoreMismatchError(f"{where} labels {wrong.size} sample(s) differently: {examples}")
        if part.classes and ref.classes and part.classes != ref.classes:
            raise StoreMismatchError(
                f"{where} names the classes differently: {part.classes[:5]}... vs {ref.classes[:5]}..."
            )
        splits = {c for c in part.samples.column_names if c.startswith(SPLIT_PREFIX)}
        for column in sorted(ref_splits & splits):
            a = ref.samples.column(column).to_numpy(zero_copy_only=False)
            b = part.samples.column(column).to_numpy(zero_copy_only=False)[row_map]
            differ = np.nonzero(a != b)[0]
            if differ.size:
                raise StoreMismatchError(
                    f"{where} puts {differ.size} sample(s) in split {column[len(SPLIT_PREFIX):]!r} differently: "
                    f"{_examples(ref_ids, differ)}"
                )
        row_maps.append(row_map)
    grid_parts_of = [p.grid_tasks() for p in parts]  # a multi-grid store's (grid, width) groups, else [task]
    return AlignedTask(name=task, parts=[g for group in grid_parts_of for g in group],
                       row_maps=[m for m, group in zip(row_maps, grid_parts_of) for _ in group],
                       backbone_of_part=[k for k, group in enumerate(grid_parts_of) for _ in group],
                       stores=list(stores))
