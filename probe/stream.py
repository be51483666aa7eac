"""Training batches streamed with bounded memory: the epoch's shuffle windows (probe/epochorder.py) read one
ahead in a background thread and cut into batches across windows.

Streaming keeps at most about six windows and two batches in RAM (the window being cut into
batches and the next one while a batch straddles them, one read ahead, one being read plus the
block zarr decodes it from and its compressed bytes; the batch being trained on and the one being
assembled); `plan_cache` (probe/cacheplan.py) sizes the window so that those fit the budget. A
window may be smaller than a batch: batches are cut across windows. benchmarks/probe_stream.py measures the data buffers
at about 1.0x the budget; the process RSS grows a little more, as glibc keeps freed blocks in the
reader thread's malloc arena (MALLOC_ARENA_MAX=2 trims that).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from .cacheerror import CachePlanError
from .epochorder import epoch_windows
from .prefetch import Prefetcher
from .source import Batch, SplitSource

# current + next (a batch straddles them) + queued + being read (the output, zarr's decoded block and its
# compressed bytes): measured with benchmarks/probe_stream.py, the data buffers peak near the budget
STREAM_WINDOWS_IN_RAM = 6
STREAM_BATCHES_IN_RAM = 2  # the batch being trained on + the one being assembled (batches are copies)


class _WindowBuffer:
    """Windows of (positions, arrays) consumed front to back, `n` rows at a time."""

    def __init__(self) -> None:
        self.windows: deque[tuple[np.ndarray, list[np.ndarray]]] = deque()
        self.offset = 0

    @property
    def rows(self) -> int:
        return sum(p.size for p, _ in self.windows) - self.offset

    def add(self, positions: np.ndarray, arrays: list[np.ndarray]) -> None:
        self.windows.append((positions, arrays))

    def take(self, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        pos_parts: list[np.ndarray] = []
        arr_parts: list[list[np.ndarray]] = []
        while n > 0:
            positions, arrays = self.windows[0]
            k = min(n, positions.size - self.offset)
            pos_parts.append(positions[self.offset : self.offset + k])
            arr_parts.append([a[self.offset : self.offset + k] for a in arrays])
            self.offset += k
            n -= k
            if self.offset == positions.size:
                self.windows.popleft()
                self.offset = 0
        # always a copy: a batch must not keep a consumed window alive (that would break the memory bound)
        return np.concatenate(pos_parts), [np.concatenate(group) for group in zip(*arr_parts)]


def stream_batches(source: SplitSource, *, batch_size: int, seed: int, window_rows: int,
                   device: torch.device | None = None) -> Iterator[Batch]:
    """Shuffled batches read window by window in a background thread (RAM: a few windows)."""
    if window_rows < 1 or batch_size < 1:
        raise CachePlanError(f"stream window ({window_rows} rows) and batch size ({batch_size}) must be >= 1")
    labels_all = source.labels.astype(np.int64)

    def windows() -> Iterator[tuple[int, bool, np.ndarray, list[np.ndarray]]]:
        epoch = 0
        while True:
            parts = epoch_windows(source, epoch=epoch, seed=seed, window_rows=window_rows)
            for i, positions in enumerate(parts):
                yield epoch, i == len(parts) - 1, positions, source.read(positions)
            epoch += 1

    prefetch = Prefetcher(windows(), depth=1, name="combo-stream")
    feed = iter(prefetch)
    buffer = _WindowBuffer()
    try:
        epoch_done = False
        while True:
            while buffer.rows < batch_size and not epoch_done:
                _, last, positions, arrays = next(feed)
                buffer.add(positions, arrays)
                epoch_done = last
            size = min(batch_size, buffer.rows)
            idx, arrays = buffer.take(size)
            if epoch_done and buffer.rows == 0:
                epoch_done = False  # the epoch's last (possibly smaller) batch; the next one starts fresh
            take = [torch.from_numpy(a) for a in arrays]
            labels = torch.from_numpy(labels_all[idx])
            if device is not None:
                take = [t.to(device, non_blocking=True) for t in take]
                labels = labels.to(device)
            yield take, labels
    finally:
        prefetch.close()


__all__ = ["STREAM_BATCHES_IN_RAM", "STREAM_WINDOWS_IN_RAM", "stream_batches"]
