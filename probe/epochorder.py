"""The order in which training sees a split: an epoch's shuffle windows, and the batches cut from them.

Every mode draws batches in the SAME order (`epoch_order`), so the cache mode changes speed and
memory, never the result. An epoch's order is a list of *shuffle windows*:

- window >= the split (the default for `ram` / `device`): one window, a uniform shuffle, exactly
  `probe.train.epoch_permutation` (what the paper's loader does);
- smaller windows (`stream` when the split does not fit the budget): the split's *pieces* are
  shuffled, grouped into windows of at most `window_rows` rows, and rows are shuffled within each
  window. A piece is a whole shard (each window is read with one request per shard): stores
  written by `combo extract` hold training rows in a seeded shuffled order (extract/order.py), so
  a shard is already a random sample of its split. When the split's stored order is class-clustered
  instead (stores from before that change, in the dataset's natural order, e.g. an image folder
  class by class; see `label_clustered`), a piece is one inner chunk (`rows_per_chunk` rows), so a
  window mixes rows from many places of the split; that costs one request per layer per piece
  instead of one per shard (benchmarks/stream_order.py measures it).

Batches are cut from the concatenated windows, `batch_size` at a time, the last batch of an epoch
smaller (DataLoader's drop_last=False), so the step count per epoch is the same in every mode.
A cached run given the same `shuffle_window` as a streamed one sees identical batches.
"""

from __future__ import annotations

import numpy as np

from .cacheerror import CachePlanError
from .source import SplitSource
from .train import epoch_permutation


def label_clustered(labels: np.ndarray) -> bool:
    """Whether neighbouring rows share a label far more often than in a uniform shuffle: the rate of
    equal neighbours is more than halfway from a shuffle's expected rate to 1 (classes one after another)."""
    labels = np.asarray(labels)
    n = labels.size
    if n < 3:
        return False
    same = float(np.mean(labels[1:] == labels[:-1]))
    counts = np.unique(labels, return_counts=True)[1].astype(np.float64)
    expected = float((counts * (counts - 1)).sum() / (n * (n - 1)))  # a random neighbour pair, without replacement
    return same > (1.0 + expected) / 2


def piece_rows(source: SplitSource) -> int:
    """Rows per piece of the shuffle windows: a shard, or an inner chunk when the stored order is
    class-clustered (see module doc). Depends on the split only, so every cache mode agrees."""
    store = source.task.reference
    if label_clustered(source.labels):
        return max(1, int(store.store.layout.rows_per_chunk))
    return store.rows_per_shard


def epoch_windows(source: SplitSource, *, epoch: int, seed: int, window_rows: int | None) -> list[np.ndarray]:
    """The shuffle windows of one epoch (positions), in the order they are trained on (see module doc)."""
    n = source.n
    if window_rows is None or window_rows >= n:
        return [epoch_permutation(n, epoch, seed)]
    if window_rows < 1:
        raise CachePlanError(f"shuffle window must hold at least one row, got {window_rows}")
    piece = source.rows // piece_rows(source)
    pieces, first = np.unique(piece, return_index=True)
    members = np.split(np.argsort(piece, kind="stable"), first[1:])  # positions of each piece, ascending
    rng = np.random.default_rng([int(seed), int(epoch), 7919])
    windows: list[np.ndarray] = []
    current: list[np.ndarray] = []
    count = 0
    for s in rng.permutation(pieces.size):
        block = members[s]
        if current and count + block.size > window_rows:
            windows.append(np.concatenate(current))
            current, count = [], 0
        current.append(block)
        count += block.size
    if current:
        windows.append(np.concatenate(current))
    return [w[rng.permutation(w.size)].astype(np.int64) for w in windows]


def epoch_order(source: SplitSource, *, epoch: int, seed: int, window_rows: int | None) -> np.ndarray:
    """Positions of one epoch: its shuffle windows, concatenated."""
    return np.concatenate(epoch_windows(source, epoch=epoch, seed=seed, window_rows=window_rows))


__all__ = ["epoch_order", "epoch_windows", "label_clustered", "piece_rows"]
