"""Feeding stored features to training: in RAM, on the GPU, or streamed with bounded memory.

Every mode draws batches in the SAME order (`epoch_order`), so the cache mode changes speed
and memory, never the result. The order shuffles whole shards, then rows within a window of
shards: with a window that holds the whole split it is exactly `probe.train.epoch_permutation`
(a uniform shuffle, what the paper's loader does); a streaming run whose budget holds fewer
rows shuffles within windows instead, and records the window in the run config.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .stores import AlignedTask
from .train import epoch_permutation

CACHE_MODES = ("auto", "device", "ram", "stream")
Batch = tuple[list[Tensor], Tensor]


@dataclass
class SplitSource:
    """One split of one task across K stores: positions 0..n-1 map to stored rows."""

    task: AlignedTask
    rows: np.ndarray  # rows of the reference store, ascending
    layers: list[Sequence[int] | None] | None = None  # per store; None = every layer
    prefix: bool = False  # read the prefix-token arrays instead of the patch tokens

    @property
    def n(self) -> int:
        return int(self.rows.size)

    @property
    def labels(self) -> np.ndarray:
        return self.task.labels[self.rows]

    def shard_of(self) -> np.ndarray:
        return self.rows // self.task.reference.rows_per_shard

    def row_bytes(self) -> int:
        total = 0
        for k, part in enumerate(self.task.parts):
            array = part.prefix if self.prefix else part.tokens
            num_layers = array.shape[1] if not self.layers or self.layers[k] is None else len(self.layers[k])
            total += num_layers * int(np.prod(array.shape[2:])) * array.dtype.itemsize
        return total

    def read(self, positions: np.ndarray) -> list[np.ndarray]:
        """Features of the given positions (any order), one array per store."""
        out = []
        for k, (part, row_map) in enumerate(zip(self.task.parts, self.task.row_maps)):
            layers = None if not self.layers else self.layers[k]
            out.append(part.read(row_map[self.rows[positions]], layers=layers, prefix=self.prefix))
        return out


def epoch_order(source: SplitSource, *, epoch: int, seed: int, window_rows: int | None) -> np.ndarray:
    """Positions of one epoch; shard-windowed shuffle when `window_rows` < n (see module doc)."""
    n = source.n
    if window_rows is None or window_rows >= n:
        return epoch_permutation(n, epoch, seed)
    shard = source.shard_of()
    shards = np.unique(shard)
    rng = np.random.default_rng([seed, epoch, 7919])
    shards = shards[rng.permutation(shards.size)]
    per_shard = {int(s): np.nonzero(shard == s)[0] for s in shards}
    order: list[np.ndarray] = []
    window: list[np.ndarray] = []
    count = 0
    for s in shards:
        window.append(per_shard[int(s)])
        count += per_shard[int(s)].size
        if count >= window_rows:
            members = np.concatenate(window)
            order.append(members[rng.permutation(members.size)])
            window, count = [], 0
    if window:
        members = np.concatenate(window)
        order.append(members[rng.permutation(members.size)])
    return np.concatenate(order).astype(np.int64)


def _epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[s : s + batch_size] for s in range(0, order.size, batch_size)]


def cached_batches(source: SplitSource, *, batch_size: int, seed: int, device: torch.device | None = None,
                   window_rows: int | None = None) -> Iterator[Batch]:
    """Read the split once, keep it in RAM (or on `device`), then serve shuffled batches forever."""
    data = [torch.from_numpy(a) for a in read_all(source)]
    labels = torch.from_numpy(source.labels.astype(np.int64))
    if device is not None:
        data = [d.to(device) for d in data]
        labels = labels.to(device)
    epoch = 0
    while True:
        for idx in _epoch_batches(epoch_order(source, epoch=epoch, seed=seed, window_rows=window_rows), batch_size):
            index = torch.from_numpy(idx).to(labels.device)
            yield [d[index] for d in data], labels[index]
        epoch += 1


def read_all(source: SplitSource, *, chunk_rows: int = 256) -> list[np.ndarray]:
    """The whole split, in position order, read in shard-sized runs."""
    pieces = [source.read(np.arange(s, min(s + chunk_rows, source.n))) for s in range(0, source.n, chunk_rows)]
    return [np.concatenate([p[k] for p in pieces]) for k in range(len(source.task.parts))]


class _Prefetcher:
    """Runs `produce()` items in a background thread, at most `depth` ahead; re-raises its errors."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="combo-prefetch")
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._queue.put(err)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


def stream_batches(source: SplitSource, *, batch_size: int, seed: int, window_rows: int,
                   device: torch.device | None = None) -> Iterator[Batch]:
    """Shuffled batches read window by window in a background thread: RAM ~ 3 windows."""
    if window_rows < batch_size:
        raise ValueError(f"the stream window ({window_rows} rows) must hold at least one batch ({batch_size})")
    labels_all = source.labels.astype(np.int64)

    def windows() -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        epoch = 0
        while True:
            order = epoch_order(source, epoch=epoch, seed=seed, window_rows=window_rows)
            for s in range(0, order.size, window_rows):
                positions = order[s : s + window_rows]
                yield positions, source.read(positions)
            epoch += 1

    prefetch = _Prefetcher(windows(), depth=1)
    buffered_pos = np.zeros(0, dtype=np.int64)
    buffered: list[np.ndarray] | None = None
    feed = iter(prefetch)
    epoch = 0
    try:
        while True:
            order = epoch_order(source, epoch=epoch, seed=seed, window_rows=window_rows)
            for idx in _epoch_batches(order, batch_size):
                while buffered_pos.size < idx.size:
                    pos, arrays = next(feed)
                    buffered_pos = np.concatenate([buffered_pos, pos])
                    buffered = arrays if buffered is None else [np.concatenate([b, a]) for b, a in zip(buffered, arrays)]
                assert np.array_equal(buffered_pos[: idx.size], idx), "stream order diverged from epoch_order"
                take = [torch.from_numpy(np.ascontiguousarray(b[: idx.size])) for b in buffered]
                buffered_pos = buffered_pos[idx.size :]
                buffered = [b[idx.size :] for b in buffered]
                labels = torch.from_numpy(labels_all[idx])
                if device is not None:
                    take = [t.to(device, non_blocking=True) for t in take]
                    labels = labels.to(device)
                yield take, labels
            epoch += 1
    finally:
        prefetch.close()


def eval_batches(source: SplitSource, *, batch_size: int) -> Iterator[Batch]:
    """The split in stored order, read ahead in a background thread (any split size)."""
    labels = source.labels.astype(np.int64)
    rows_per_read = max(batch_size, source.task.reference.rows_per_shard)

    def reads() -> Iterator[tuple[int, list[np.ndarray]]]:
        for s in range(0, source.n, rows_per_read):
            yield s, source.read(np.arange(s, min(s + rows_per_read, source.n)))

    for start, arrays in _Prefetcher(reads(), depth=2):
        for b in range(0, arrays[0].shape[0], batch_size):
            take = [torch.from_numpy(np.ascontiguousarray(a[b : b + batch_size])) for a in arrays]
            lo = start + b
            yield take, torch.from_numpy(labels[lo : lo + take[0].shape[0]])


@dataclass(frozen=True)
class CachePlan:
    mode: str  # "device" | "ram" | "stream"
    window_rows: int | None  # rows per shuffle window (None: the whole split)
    split_bytes: int


def plan_cache(source: SplitSource, *, mode: str, budget_bytes: int, device: torch.device, batch_size: int) -> CachePlan:
    """Pick where the training split lives. `auto`: GPU if it fits the budget there, else RAM, else stream."""
    if mode not in CACHE_MODES:
        raise ValueError(f"--cache {mode!r}: choose one of {', '.join(CACHE_MODES)}")
    split_bytes = source.n * source.row_bytes()
    fits = split_bytes <= budget_bytes
    if mode == "auto":
        mode = ("device" if device.type == "cuda" else "ram") if fits else "stream"
    if mode == "device" and device.type != "cuda":
        mode = "ram"
    window = None
    if mode == "stream":
        window = max(batch_size, int(budget_bytes // max(1, 3 * source.row_bytes())))
        window = min(window, source.n)
    return CachePlan(mode=mode, window_rows=window, split_bytes=split_bytes)


def training_batches(source: SplitSource, plan: CachePlan, *, batch_size: int, seed: int, device: torch.device) -> Iterator[Batch]:
    if plan.mode == "stream":
        return stream_batches(source, batch_size=batch_size, seed=seed, window_rows=int(plan.window_rows or source.n),
                              device=device if device.type == "cuda" else None)
    return cached_batches(source, batch_size=batch_size, seed=seed, window_rows=plan.window_rows,
                          device=device if plan.mode == "device" else None)


def budget_from_text(text: str) -> int:
    """'8GiB', '512MB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}
    raw = text.strip().lower().replace(" ", "")
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if raw.endswith(unit):
            return int(float(raw[: -len(unit)]) * factor)
    try:
        return int(float(raw))
    except ValueError:
        raise ValueError(f"--cache-budget {text!r}: expected a size like 8GiB or 500MB") from None


def default_budget() -> int:
    """Half the machine's RAM (at least 1 GiB) when the OS tells us; else 4 GiB."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(2**30, int(pages // 2))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


__all__ = [
    "CACHE_MODES",
    "CachePlan",
    "SplitSource",
    "budget_from_text",
    "cached_batches",
    "default_budget",
    "epoch_order",
    "eval_batches",
    "plan_cache",
    "read_all",
    "stream_batches",
    "training_batches",
]
