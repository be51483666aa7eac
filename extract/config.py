"""What one extraction run is asked to do: `ExtractConfig` and its defaults.

A module of its own because both the single-process pipeline (extract/pipeline.py) and the dask
workers (extract/cluster.py) take the same config, and neither should import the other for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from store_schema import StoreLayout, default_store_root
from store_schema.compact import CompactSpec


def default_num_workers() -> int:
    """Image-decoding worker processes: up to 4, leaving one CPU to the backbone's own threads (on a
    one-CPU machine, 0: images are decoded in the main process between forward passes)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(4, max(0, cpus - 1))


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    dataset: str
    root: str | None = None
    tasks: tuple[str, ...] | None = None
    out: str = field(default_factory=default_store_root)
    image_size: int = 224
    random_init: bool = False
    weights: str | None = None
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    dtype: str = "float16"
    rows_per_shard: int | None = None  # None: sized by bytes (StoreLayout.shard_bytes)
    skip_bad: bool = False
    overwrite: bool = False
    num_workers: int = field(default_factory=default_num_workers)
    layout: StoreLayout | None = None
    model_kwargs: dict[str, Any] | None = None
    # which layer outputs to store (extract.backbones.parse_layers): None / "all" (the paper's), "last:N", "0,5,11"
    layers: str | tuple[int, ...] | None = None
    # --dataset parquet: column names (default: detected, see extract.datasets.parquet)
    image_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    # --dataset vtab from Hugging Face datasets (--root hf://datasets/ORG/REPO, a save_to_disk folder):
    # the task name of a repo outside extract.datasets.HF_VTAB_REPOS, and whether a repo missing from the
    # local hub cache may be downloaded (off: such a repo is an error saying how to fill the cache)
    task_name: str | None = None
    download: bool = False
    # --compact: write the tokens encoded (store_schema/compact.py), e.g. "int8", "pca:128", "pca:128,int8";
    # the store goes to OUT/<model>/<dataset>-<encoding>.zarr and the full-size tokens are never written
    compact: str | None = None
    # fsspec options of a remote --out (endpoint_url, profile ...; never credentials), also used by the workers
    storage_options: dict[str, Any] | None = None
    # --break-lock: take over a remote store's write lock held by a writer that died (store_schema/writer/lock.py)
    break_lock: bool = False

    @property
    def compact_spec(self) -> CompactSpec | None:
        return CompactSpec.parse(self.compact) if self.compact else None
