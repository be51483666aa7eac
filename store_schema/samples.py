"""The per-task sample table (Parquet): which image each row of the token arrays is.

Columns: ``row`` (int64, index into the arrays), ``sample_id`` (path relative to the dataset
root: stable across machines), ``label`` (int64), ``valid`` (false for images skipped with
--skip-bad: their rows hold zeros), ``aliases`` (other ids of the same image, e.g. the
train800val200 copy), ``source_index`` (int64, optional: the sample's position in the dataset's
natural order; the rows of training splits are stored shuffled, see README.md "Row order"), and
one boolean ``in_<split>`` column per split.

``source_index`` was added without a schema version bump: stores written before it lack the
column and are in natural order, so readers must treat it as optional (`source_index()` does).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLIT_PREFIX = "in_"
REQUIRED_COLUMNS = ("row", "sample_id", "label", "valid")
SOURCE_INDEX = "source_index"
METADATA_KEY = "combo"


def build_table(
    *,
    sample_ids: Sequence[str],
    labels: Sequence[int],
    splits: Sequence[Sequence[str]],
    split_names: Sequence[str],
    aliases: Sequence[Sequence[str]] | None = None,
    source_index: Sequence[int] | None = None,
) -> pa.Table:
    n = len(sample_ids)
    if not (len(labels) == len(splits) == n):
        raise ValueError(f"sample table: {n} ids, {len(labels)} labels, {len(splits)} split lists")
    duplicates = n - len(set(sample_ids))
    if duplicates:
        raise ValueError(f"sample table: {duplicates} duplicate sample ids")
    columns: dict[str, pa.Array] = {
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "sample_id": pa.array(list(sample_ids), type=pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "valid": pa.array(np.ones(n, dtype=bool)),
        "aliases": pa.array([list(a) for a in (aliases or [()] * n)], type=pa.list_(pa.string())),
    }
    if source_index is not None:
        index = np.asarray(source_index, dtype=np.int64)
        if index.shape != (n,) or not np.array_equal(np.sort(index), np.arange(n)):
            raise ValueError(f"sample table: source_index must be a permutation of 0..{n - 1}")
        columns[SOURCE_INDEX] = pa.array(index)
    for name in split_names:
        columns[SPLIT_PREFIX + name] = pa.array([name in s for s in splits], type=pa.bool_())
    return pa.table(columns)


def split_names(table: pa.Table) -> list[str]:
    return [c[len(SPLIT_PREFIX):] for c in table.column_names if c.startswith(SPLIT_PREFIX)]


def source_index(table: pa.Table) -> np.ndarray:
    """Each row's position in the dataset's natural order; rows themselves for tables without the
    column (written before rows were shuffled, in natural order). `np.argsort` of it gives the rows
    in natural order."""
    if SOURCE_INDEX in table.column_names:
        return table.column(SOURCE_INDEX).to_numpy().astype(np.int64, copy=False)
    return np.arange(table.num_rows, dtype=np.int64)


def with_invalid(table: pa.Table, rows: Sequence[int]) -> pa.Table:
    valid = table.column("valid").to_numpy(zero_copy_only=False).copy()
    valid[np.asarray(list(rows), dtype=np.int64)] = False
    return table.set_column(table.column_names.index("valid"), "valid", pa.array(valid))


def to_bytes(table: pa.Table, *, classes: Sequence[str] | None = None, task: str | None = None,
             format_version: str | None = None) -> bytes:
    """Parquet bytes; the schema metadata (key ``combo``) carries the format version (the store's: this
    version's unless given), the task and its class names, so the table alone (e.g. in duckdb or pandas)
    says what the labels mean."""
    if classes is not None:
        from .metadata import FORMAT_NAME, FORMAT_VERSION

        doc = {"format": FORMAT_NAME, "format_version": format_version or FORMAT_VERSION, "task": task,
               "classes": list(classes)}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(doc).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def ids_to_bytes(sample_ids: Sequence[str]) -> np.ndarray:
    """The ``sample_id`` coordinate of format 2.2: uint8 [N, W], each id's UTF-8 bytes padded with zeros to the
    longest (W >= 1). Bytes are a core Zarr v3 data type every implementation reads (tensorstore and zarrs
    refuse zarr-python's variable-length strings); an id holding a NUL byte could not be told from its padding."""
    encoded = [str(s).encode("utf-8") for s in sample_ids]
    bad = [s for s, b in zip(sample_ids, encoded) if b"\0" in b]
    if bad:
        raise ValueError(f"sample id {bad[0]!r} contains a NUL character, which a stored id cannot hold")
    width = max([1, *map(len, encoded)])
    return np.array(encoded, dtype=f"S{width}").view(np.uint8).reshape(len(encoded), width)  # numpy pads with NULs


def ids_from_array(values: np.ndarray) -> list[str]:
    """The ids a ``sample_id`` coordinate holds, in either layout: uint8 [N, W] UTF-8 (format 2.2) or the 1-D
    strings of formats 2.0 and 2.1."""
    values = np.asarray(values)
    if values.ndim == 2 and values.dtype == np.uint8:
        return [bytes(row).rstrip(b"\0").decode("utf-8") for row in values]
    if values.ndim == 1 and values.dtype.kind in "UTO":
        return [str(v) for v in values]
    raise ValueError(f"a sample_id coordinate is uint8 [N, W] or 1-D strings, not {values.dtype} {values.shape}")


def table_metadata(table: pa.Table) -> dict:
    """The ``combo`` schema metadata of a sample table ({} for format 1 tables, which have none)."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY.encode())
    return json.loads(raw) if raw else {}


def from_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def same_samples(a: pa.Table, b: pa.Table) -> bool:
    """Same ids, labels and split memberships in the same order (ignores `valid`)."""
    cols = [c for c in a.column_names if c not in ("valid",)]
    if sorted(cols) != sorted(c for c in b.column_names if c != "valid"):
        return False
    return all(a.column(c).equals(b.column(c)) for c in cols)
