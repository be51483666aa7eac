"""Write small feature stores straight through the `store_schema` API (no backbone needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, StoreLayout, StoreWriter, build_sample_table


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
) -> Path:
    """tokens [N, L, T, D] (T = grid h*w); prefix [N, L, P, D] or None. Returns the store path."""
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
    with StoreWriter(path, info, layout) as writer:
        tw = writer.task(
            task, samples=table, num_layers=num_layers, num_tokens=num_tokens, feature_dim=dim,
            num_prefix_tokens=0 if prefix is None else prefix.shape[2],
            protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")}, classes=classes,
        )
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, tokens[rows.start:rows.stop], None if prefix is None else prefix[rows.start:rows.stop])
        tw.finalize()
    return Path(path)
