"""Evaluation batches: a split in stored order, a few bounded batches read ahead at a time, past the page cache
when the split outgrows the RAM."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from .prefetch import Prefetcher
from .source import Batch, SplitSource

# evaluation reads a few batches at a time, whatever the split's size: the one being evaluated, the previous
# one while a consumer's loop variable still holds it, one queued and one being read; a batch holds at most
# EVAL_BATCH_BYTES as stored (fewer rows than eval_batch_size if need be)
EVAL_BATCHES_IN_RAM = 4
EVAL_BATCH_BYTES = 16 * 2**20
EVAL_BATCH_SIZE = 256  # rows per evaluation batch asked for by default (`ProbeConfig.eval_batch_size`)


def eval_batch_rows(source: SplitSource, batch_size: int, *, max_batch_bytes: int | None = EVAL_BATCH_BYTES) -> int:
    """Rows per evaluation batch: `batch_size`, fewer when its stored bytes would pass `max_batch_bytes`
    (at ViT-B geometry 256 rows are 0.9 GiB per store as stored and twice that as float32 once prepared;
    a sample's prediction does not depend on the batch it is in)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_bytes is None:
        return batch_size
    rows = max(1, min(batch_size, int(max_batch_bytes // max(1, source.row_bytes()))))
    shard = source.task.reference.rows_per_shard
    return rows if rows >= batch_size or rows < shard else rows // shard * shard  # capped: whole shards per batch


def direct_reads(split_bytes: int) -> bool:
    """Whether one pass over `split_bytes` should skip the page cache: when it is more than half the RAM, the
    pages could not stay cached anyway, and filling, copying and reclaiming them cost 1.0-1.5 s of kernel time
    per GB (O_DIRECT: 0.44; benchmarks/RESULTS.md, issue 24). $COMBO_DIRECT_READS=1 / 0 forces it on / off."""
    forced = os.environ.get("COMBO_DIRECT_READS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return split_bytes > ram // 2


def eval_batches(source: SplitSource, *, batch_size: int, max_batch_bytes: int | None = EVAL_BATCH_BYTES) -> Iterator[Batch]:
    """The split in stored order, read ahead in a background thread: at most `EVAL_BATCHES_IN_RAM` reads
    (of whole batches of `eval_batch_rows` rows, at least a shard) exist at once, whatever the split's size. A
    split larger than half the RAM is read past the page cache (`direct_reads`)."""
    labels = source.labels.astype(np.int64)
    direct = direct_reads(source.n * source.row_bytes())
    batch_size = eval_batch_rows(source, batch_size, max_batch_bytes=max_batch_bytes)
    # whole batches per read, at least a shard's worth (an inner chunk holds all its shard's rows, so a read
    # of part of a shard decodes all of it); only the split's last batch is smaller
    rows_per_read = batch_size * max(1, -(-source.task.reference.rows_per_shard // batch_size))

    def reads() -> Iterator[tuple[int, list[np.ndarray]]]:
        for s in range(0, source.n, rows_per_read):
            yield s, source.read(np.arange(s, min(s + rows_per_read, source.n)), direct=direct)

    # one read queued, one being read, the consumer's and (in its loop variable) the one before: EVAL_BATCHES_IN_RAM
    prefetch = Prefetcher(reads(), depth=1, name="combo-eval")
    try:
        for start, arrays in prefetch:
            for b in range(0, arrays[0].shape[0], batch_size):
                take = [torch.from_numpy(np.ascontiguousarray(a[b : b + batch_size])) for a in arrays]
                lo = start + b
                yield take, torch.from_numpy(labels[lo : lo + take[0].shape[0]])
            del arrays, take  # ours go before the next read is taken
    finally:
        prefetch.close()


__all__ = ["EVAL_BATCHES_IN_RAM", "EVAL_BATCH_BYTES", "EVAL_BATCH_SIZE", "direct_reads", "eval_batch_rows", "eval_batches"]
