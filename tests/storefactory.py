"""Write small feature stores straight through the `store_schema` API (no backbone needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, StoreLayout, StoreWriter, build_sample_table
from store_schema.compact import CompactSpec, PcaFit


def vtab_like_splits(n_train: int, n_val: int, n_test: int) -> list[tuple[str, ...]]:
    """Split memberships in store row order: train800 rows, val200 rows, test rows."""
    return (
        [("train800", "train800val200")] * n_train
        + [("val200", "train800val200")] * n_val
        + [("test",)] * n_test
    )


def write_store(
    path: str | Path,
    *,
    tokens: np.ndarray,
    labels: Sequence[int],
    splits: Sequence[Sequence[str]],
    grid: tuple[int, int],
    task: str = "task",
    alias: str = "synthetic",
    dataset: str = "synthetic",
    prefix: np.ndarray | None = None,
    num_classes: int | None = None,
    sample_ids: Sequence[str] | None = None,
    layout: StoreLayout | None = None,
    split_names: Sequence[str] = ("train800", "val200", "train800val200", "test"),
    compact: CompactSpec | None = None,
) -> Path:
    """tokens [N, L, T, D] (T = grid h*w); prefix [N, L, P, D] or None. Returns the store path.

    ``compact``: write a compact store straight away (its PCA, if any, fitted on the train800 rows), with the
    layout's rows per shard, where `compact_store` would size shards by bytes (one shard for test data)."""
    n, num_layers, num_tokens, dim = tokens.shape
    assert num_tokens == grid[0] * grid[1]
    layout = layout or StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    info = StoreInfo(
        backbone=BackboneInfo(alias=alias, timm_name="synthetic", pretrained_tag=None, weights_source="random-init", weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=grid[0] * 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        features=FeatureInfo(token_grid=grid, num_prefix_tokens=0 if prefix is None else prefix.shape[2], layers=tuple(range(num_layers)), feature_dim=dim),
        dataset=dataset,
    )
    ids = list(sample_ids) if sample_ids is not None else [f"{task}/img{i:05d}.png" for i in range(n)]
    table = build_sample_table(sample_ids=ids, labels=list(labels), splits=splits, split_names=split_names)
    classes = [str(c) for c in range(num_classes or int(max(labels)) + 1)]
    pca, fit = None, None
    if compact is not None and compact.pca is not None:
        rows = [i for i, s in enumerate(splits) if "train800" in s]
        pcafit = PcaFit(num_layers, dim)
        pcafit.add(tokens[rows])
        pca, fit = pcafit.fitted(compact.pca, "train800")
    with StoreWriter(path, info, layout, compact=compact) as writer:
        tw = writer.task(
            task, samples=table, num_layers=num_layers, num_tokens=num_tokens, feature_dim=dim,
            num_prefix_tokens=0 if prefix is None else prefix.shape[2],
            protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")}, classes=classes,
            pca=pca, compact_fit=fit,
        )
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, tokens[rows.start:rows.stop], None if prefix is None else prefix[rows.start:rows.stop])
        tw.finalize()
    return Path(path)


MULTI_TASKS = ("cifar", "dtd", "eurosat")
MULTI_N = (16, 8, 8)  # train800, val200, test rows


def write_multi_store(path: Path, tasks=MULTI_TASKS, *, alias: str = "tinyvit", dataset: str = "synthetic",
                      labels: dict[str, np.ndarray] | None = None) -> Path:
    """One store holding several tasks (2x2 grid, 2 layers, width 8); labels cycle over 3 classes."""
    grid, layers, dim, total = (2, 2), 2, 8, sum(MULTI_N)
    info = StoreInfo(
        backbone=BackboneInfo(alias=alias, timm_name="synthetic", pretrained_tag=None, weights_source="random-init",
                              weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        features=FeatureInfo(token_grid=grid, num_prefix_tokens=0, layers=tuple(range(layers)), feature_dim=dim),
        dataset=dataset,
    )
    with StoreWriter(path, info, StoreLayout(rows_per_shard=8, rows_per_chunk=4, dtype="float32")) as writer:
        for k, task in enumerate(tasks):
            y = (labels or {}).get(task, np.arange(total) % 3)
            tokens = np.random.default_rng(k).standard_normal((total, layers, 4, dim)).astype(np.float32)
            tokens[:, :, 0, :] += 2.0 * np.asarray(y, dtype=np.float32)[:, None, None]  # learnable
            table = build_sample_table(sample_ids=[f"{task}/{i:03d}.png" for i in range(total)], labels=list(y),
                                       splits=vtab_like_splits(*MULTI_N),
                                       split_names=("train800", "val200", "train800val200", "test"))
            tw = writer.task(task, samples=table, num_layers=layers, num_tokens=4, feature_dim=dim, num_prefix_tokens=0,
                             protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")},
                             classes=["a", "b", "c", "d"])
            for b in tw.pending():
                rows = tw.blocks[b]
                tw.write_block(b, tokens[rows.start:rows.stop], None)
            tw.finalize()
    return path
