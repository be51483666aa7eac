"""Refusing stored features that read NaN or inf: a fast check per block read and the sentence that names
the store, the array, the rows and their shards (`SplitSource.read_part` runs both on every block)."""

from __future__ import annotations

import numpy as np

from store_schema import StoreError, TaskStore, shard_key
from store_schema.writer import PREFIX, TOKENS


def _all_finite(block: np.ndarray, max_values: int = 2**24) -> bool:
    """np.isfinite(block).all(), a slice of rows at a time: the temporary mask stays small (16 MiB) however
    large the block, so the check does not add a block-sized allocation to a budgeted stream."""
    rows = max(1, max_values // max(1, int(np.prod(block.shape[1:]))))
    if block.dtype == np.float16 and block.flags.c_contiguous:
        # exponent bits all ones = inf or NaN: 3x faster than np.isfinite, which has no float16 fast path
        bits = block.view(np.uint16)
        return not any(bool(((bits[i:i + rows] & 0x7C00) == 0x7C00).any()) for i in range(0, block.shape[0], rows))
    return all(bool(np.isfinite(block[i:i + rows]).all()) for i in range(0, block.shape[0], rows))


def non_finite_error(part: TaskStore, stored_rows: np.ndarray, block: np.ndarray, *, prefix: bool,
                     array: str | None = None) -> StoreError:
    """The sentence for rows that read NaN or inf (a format 1 store's damage, or a row never written that
    slipped through): the store, the array, the rows and their shards, and what to run. Training on them
    would only say "loss became nan"."""
    bad_at = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
    rows = np.unique(stored_rows[bad_at])
    base = array or (PREFIX if prefix else TOKENS)
    name = part.array_name(base) if hasattr(part, "array_name") and base != PREFIX else base  # a grid group's: tokens_g1
    array = f"{part.name}/{name}"
    per_shard = part.rows_per_shard
    shards = sorted({int(r) // per_shard for r in rows})
    keys = [shard_key(part.name, name, b, block.ndim) for b in shards[:3]]
    more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
    shown = ", ".join(str(int(r)) for r in rows[:5]) + (f" (+{rows.size - 5} more)" if rows.size > 5 else "")
    where = f"row {shown}" if rows.size == 1 else f"{rows.size} rows from {int(rows[0])} to {int(rows[-1])} (rows {shown})"
    url = part.store.url
    return StoreError(
        f"{url}: array {array} holds non-finite values (NaN or inf) in {where}, shard {', '.join(keys)}{more}: "
        f"damaged, or never written. Nothing is trained on them; run `combo store validate {url}`"
    )


__all__ = ["non_finite_error"]
