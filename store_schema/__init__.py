"""The on-disk contract of combo feature stores, shared by `extract` (writes) and `probe` (reads).

A store is a Zarr v3 group per (backbone, dataset) with a group per task; see README.md here
for the layout and metadata. Readable with plain zarr / dask / pyarrow, no combo needed.
"""

from .errors import (
    SchemaVersionError,
    StoreError,
    StoreIncompleteError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreValidationError,
)
from .grids import GridSpec, grid_array, group_layers
from .layout import StoreLayout
from .location import (
    STORE_ROOT_ENV,
    Location,
    default_store_root,
    is_url,
    parse_storage_options,
    resolve,
    store_path,
)
from .metadata import SCHEMA_VERSION, BackboneInfo, FeatureInfo, Preprocessing, StoreInfo
from .reader import FeatureStore, TaskStore, open_store
from .samples import build_table as build_sample_table
from .validate import ValidationReport, validate_store
from .writer import ShardWriter, Skipped, StoreWriter, TaskWriter, shard_key

__all__ = [
    "SCHEMA_VERSION",
    "STORE_ROOT_ENV",
    "BackboneInfo",
    "FeatureInfo",
    "FeatureStore",
    "GridSpec",
    "Location",
    "Preprocessing",
    "SchemaVersionError",
    "Skipped",
    "StoreError",
    "StoreIncompleteError",
    "StoreInfo",
    "StoreLayout",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreValidationError",
    "StoreWriter",
    "TaskStore",
    "ShardWriter",
    "TaskWriter",
    "ValidationReport",
    "build_sample_table",
    "default_store_root",
    "grid_array",
    "group_layers",
    "is_url",
    "open_store",
    "parse_storage_options",
    "resolve",
    "shard_key",
    "store_path",
    "validate_store",
]

# Sharing stores (push / pull / pack / ls / info); see transfer.py, pack.py, catalog.py.
from .catalog import StoreSummary, list_stores, store_info, summarize_store
from .pack import PackResult, pack_store
from .transfer import (
    StoreContents,
    StoreObject,
    TransferProgress,
    TransferResult,
    copy_store,
    pull_store,
    push_store,
    store_objects,
)

__all__ += [
    "PackResult",
    "StoreContents",
    "StoreObject",
    "StoreSummary",
    "TransferProgress",
    "TransferResult",
    "copy_store",
    "list_stores",
    "pack_store",
    "pull_store",
    "push_store",
    "store_info",
    "store_objects",
    "summarize_store",
]
