"""Training batches from a split held whole: read once into RAM (or moved to the GPU), or served from rows
`probe.heldsplit` already holds, in the epoch order of probe/epochorder.py."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .epochorder import epoch_order
from .source import Batch, SplitSource


def _epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[s : s + batch_size] for s in range(0, order.size, batch_size)]


def read_all(source: SplitSource) -> list[np.ndarray]:
    """The whole split, in position order."""
    return source.read(np.arange(source.n))


def cached_batches(source: SplitSource, *, batch_size: int, seed: int, device: torch.device | None = None,
                   window_rows: int | None = None) -> Iterator[Batch]:
    """Read the split once, keep it in RAM (or on `device`), then serve shuffled batches forever. A split
    already held in RAM (`SplitSource.cache_view`) is served from there, not copied."""
    view = source.cache_view()
    if view is None:
        data = [torch.from_numpy(a) for a in read_all(source)]
        where: list[Tensor | None] = [None] * len(data)
    else:
        data = [d for d, _ in view]
        where = [torch.from_numpy(w) for _, w in view]
    labels = torch.from_numpy(source.labels.astype(np.int64))
    if device is not None:
        data = [d.to(device) for d in data]
        where = [None if w is None else w.to(device) for w in where]
        labels = labels.to(device)
    epoch = 0
    while True:
        for idx in _epoch_batches(epoch_order(source, epoch=epoch, seed=seed, window_rows=window_rows), batch_size):
            index = torch.from_numpy(idx).to(labels.device)
            yield [d[index if w is None else w[index]] for d, w in zip(data, where)], labels[index]
        epoch += 1


__all__ = ["cached_batches", "read_all"]
