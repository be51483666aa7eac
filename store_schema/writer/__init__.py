"""Creating and filling a store: one writer process per store, whole shards per write.

Completeness is recorded, never inferred. Every finished shard is fsync'ed, then appended with
its sha256 to a per-task journal (fsync'ed too); a killed run resumes from the journal after
re-hashing each journaled shard, so a shard cut short by the kill is simply redone. `finalize`
flips the task's `complete` flag, then `publish` rewrites the consolidated metadata and the
root manifest (manifest.json) last, and only then is the journal removed: a kill anywhere in
between leaves a store the next writer completes (`_repair`), never one it deletes.

A multi-grid store (format 2.3, store_schema/grids.py) has each row array once per grid group (`tokens_g0`, ...):
every module treats each of them as a single-grid store treats `tokens`.

Modules, each importing only those above it: `keys` (array, file and shard-key names), `disk`
(zarr.json reading, fsync), `skipped` (`Skipped`), `journal` (journal -> manifest entries),
`shard` (`ShardWriter`), `task` (`TaskWriter`), `lock` (the write lock: an flock, and an object in a remote
store), `store` (`StoreWriter`, which holds the lock).
This module re-exports their public names, so `from store_schema.writer import ...` works as before.
"""

from __future__ import annotations

from .journal import task_entries
from .keys import (
    ARRAY_DESCRIPTIONS,
    CHECKSUMS_NAME,
    COMPACT_ROW_ARRAYS,
    COORDINATES,
    JOURNAL_NAME,
    LOCK_NAME,
    PREFIX,
    PREFIX_DIMS,
    RESERVED_NAMES,
    ROW_ARRAYS,
    SAMPLE_ID,
    SAMPLE_ID_BYTE,
    SAMPLES_NAME,
    TOKEN_DIMS,
    TOKENS,
    grid_dims,
    is_reserved,
    is_row_array,
    is_row_shard,
    shard_block,
    shard_key,
)
from .shard import ShardWriter
from .skipped import Skipped
from .store import StoreWriter
from .task import TaskWriter

__all__ = [
    "ARRAY_DESCRIPTIONS",
    "CHECKSUMS_NAME",
    "COMPACT_ROW_ARRAYS",
    "COORDINATES",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "PREFIX",
    "PREFIX_DIMS",
    "RESERVED_NAMES",
    "ROW_ARRAYS",
    "SAMPLE_ID",
    "SAMPLE_ID_BYTE",
    "SAMPLES_NAME",
    "TOKEN_DIMS",
    "TOKENS",
    "ShardWriter",
    "Skipped",
    "StoreWriter",
    "TaskWriter",
    "grid_dims",
    "is_reserved",
    "is_row_array",
    "is_row_shard",
    "shard_block",
    "shard_key",
    "task_entries",
]
