"""The names a store's objects go by: row arrays and their dimensions, coordinates, file names, shard keys.

Kept apart from the writers because the readers, the validator and the transfer code need the same
names without pulling in any writing machinery.
"""

from __future__ import annotations

from ..compact import (
    CHANNEL_SCALE,
    CODES,
    MAP_STATS,
    OUTLIER_INDEX,
    OUTLIER_VALUE,
    PCA_COMPONENTS,
    PCA_MEAN,
    TOKEN_SCALE,
)
from ..grids import grid_array, split_array


LOCK_NAME = ".combo-write.lock"
JOURNAL_NAME = ".journal.jsonl"
CHECKSUMS_NAME = "checksums.json"  # format 1 only (see manifest.py)
SAMPLES_NAME = "samples.parquet"
TOKENS = "tokens"
PREFIX = "prefix"
TOKEN_DIMS = ("sample", "layer", "token", "channel")
PREFIX_DIMS = ("sample", "layer", "prefix_token", "channel")
# coordinate arrays of a task along its rows (besides one boolean per split, named after the split)
SAMPLE_ID = "sample_id"
COORDINATES = (SAMPLE_ID, "label", "valid")
SAMPLE_ID_BYTE = "sample_id_byte"  # format 2.2: sample_id is uint8 [N, W] (UTF-8), dims (sample, sample_id_byte)
# arrays of a compact task (store_schema/compact.py), written a shard of rows at a time like tokens
COMPACT_ROW_ARRAYS = {  # name -> dimension names
    CODES: ("sample", "layer", "token", "code"),
    TOKEN_SCALE: ("sample", "layer", "token"),
    CHANNEL_SCALE: ("sample", "layer", "code"),
    OUTLIER_INDEX: ("sample", "layer", "token", "kept"),
    OUTLIER_VALUE: ("sample", "layer", "token", "kept"),
    MAP_STATS: ("sample", "layer", "stat"),
}
ROW_ARRAYS = frozenset({TOKENS, PREFIX, *COMPACT_ROW_ARRAYS})  # one shard per block of rows
RESERVED_NAMES = frozenset({TOKENS, PREFIX, "layer", *COORDINATES, SAMPLE_ID_BYTE, *TOKEN_DIMS, *PREFIX_DIMS, *COMPACT_ROW_ARRAYS,
                            PCA_COMPONENTS, PCA_MEAN, "code", "kept", "stat"})
ARRAY_DESCRIPTIONS = {
    CODES: "encoded patch tokens (store_schema/compact.py: int8 codes, or PCA coefficients in float16)",
    TOKEN_SCALE: "int8 scale of every token (negative: the token ignores channel_scale)",
    CHANNEL_SCALE: "int8 scale of every channel of every (image, layer) map",
    OUTLIER_INDEX: "channels of each token's largest values, kept beside the int8 codes",
    OUTLIER_VALUE: "each token's largest values, kept at float16",
    MAP_STATS: "mean and std of every (image, layer) map of the original tokens (ComBo's normalisation)",
}


def is_row_array(name: str) -> bool:
    """A task's row array, of a single-grid store ("tokens") or of one group of a multi-grid one ("tokens_g1")."""
    return name in ROW_ARRAYS or split_array(name)[0] in ROW_ARRAYS


def is_reserved(name: str) -> bool:
    """A name a split cannot take: one of the store's arrays or dimensions, with or without a group suffix."""
    return name in RESERVED_NAMES or split_array(name)[0] in RESERVED_NAMES


def grid_dims(dims: tuple[str, ...], grid: str) -> tuple[str, ...]:
    """An array's dimension names in group `grid`: every one but `sample` (shared by all groups) suffixed, so
    xarray sees each group's layer, token and channel axes as its own."""
    return tuple(d if d == "sample" else grid_array(d, grid) for d in dims)


def shard_key(task: str, array: str, block: int, ndim: int = 4) -> str:
    """Store key of shard `block` of an `ndim`-dimensional row array (zarr v3 default chunk-key encoding)."""
    return f"{task}/{array}/c/{block}" + "/0" * (ndim - 1)


def shard_block(task: str, key: str) -> int | None:
    """Block index of a shard key of one of `task`'s row arrays (inverse of `shard_key`); None otherwise."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == task and is_row_array(parts[1]) and parts[2] == "c" \
            and parts[3].isdigit() and all(p == "0" for p in parts[4:]):
        return int(parts[3])
    return None


def is_row_shard(key: str) -> bool:
    """A shard of a task's row arrays ("task/tokens/c/3/0/0/0", "task/tokens_g1/c/3/0/0/0"): written (and, for a remote store, uploaded)
    by the shard writers, journaled, never mirrored."""
    parts = key.split("/")
    return len(parts) >= 3 and is_row_array(parts[1]) and parts[2] == "c"
