"""Feeding stored features to training: in RAM, on the GPU, or streamed with bounded memory.

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

Streaming keeps at most about six windows and two batches in RAM (the window being cut into
batches and the next one while a batch straddles them, one read ahead, one being read plus the
block zarr decodes it from and its compressed bytes; the batch being trained on and the one being
assembled); `plan_cache` sizes the window so that those fit the budget. A window may be smaller
than a batch: batches are cut across windows. benchmarks/probe_stream.py measures the data buffers
at about 1.0x the budget; the process RSS grows a little more, as glibc keeps freed blocks in the
reader thread's malloc arena (MALLOC_ARENA_MAX=2 trims that).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from store_schema import StoreError, TaskStore, shard_key
from store_schema.writer import PREFIX, TOKENS

from .compact import BatchDecoder, decoder_for
from .stores import AlignedTask
from .train import epoch_permutation

CACHE_MODES = ("auto", "device", "ram", "stream")
# current + next (a batch straddles them) + queued + being read (the output, zarr's decoded block and its
# compressed bytes): measured with benchmarks/probe_stream.py, the data buffers peak near the budget
STREAM_WINDOWS_IN_RAM = 6
STREAM_BATCHES_IN_RAM = 2  # the batch being trained on + the one being assembled (batches are copies)
# evaluation reads a few batches at a time, whatever the split's size: the one being evaluated, the previous
# one while a consumer's loop variable still holds it, one queued and one being read; a batch holds at most
# EVAL_BATCH_BYTES as stored (fewer rows than eval_batch_size if need be)
EVAL_BATCHES_IN_RAM = 4
EVAL_BATCH_BYTES = 16 * 2**20
EVAL_BATCH_SIZE = 256  # rows per evaluation batch asked for by default (`ProbeConfig.eval_batch_size`)
# What a run holds beyond its cache budget and what it held after its imports (peak RSS, measured with
# benchmarks/large_store.py and tests/test_memory_budget.py): torch's kernels, thread pools and the adapter ...
FIXED_OVERHEAD_BYTES = 256 * 2**20
# ... and copies of one training batch's stored bytes: the batch itself and the one being assembled, its float32
# copy (2x for float16), gradients and activations; the bound was measured when the adapter also made a contiguous
# copy of the float32 batch for Lambda (2x), which prepare's token-major layout no longer needs: kept, as a margin
TRAIN_BATCH_COPIES = 10
# ... and of one evaluation batch's: the reads in flight (EVAL_BATCHES_IN_RAM), its float32 copies, and freed blocks glibc keeps
EVAL_BATCH_COPIES = 10
Batch = tuple[list[Tensor], Tensor]


class CachePlanError(ValueError):
    """A cache mode / budget / window that cannot work for this split."""


@dataclass
class SplitSource:
    """One split of one task across K stores: positions 0..n-1 map to stored rows.

    Everything indexed "per store" here is per *part* of the task (`AlignedTask.parts`): a store, or one
    (grid, width) group of a multi-grid store, which reads like a store of its own.
    ``prefix`` reads the prefix-token arrays (cls, registers) instead of the patch tokens; one bool
    for every store, or one per store (the linear probe takes the cls token where a store has one).
    """

    task: AlignedTask
    rows: np.ndarray  # rows of the reference store, ascending
    layers: list[Sequence[int] | None] | None = None  # per store; None = every layer
    prefix: bool | Sequence[bool] = False

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        k = len(self.task.parts)
        if self.layers is not None and len(self.layers) != k:
            raise ValueError(f"SplitSource: {len(self.layers)} layer selections for {k} stores")
        if not isinstance(self.prefix, bool) and len(self.prefix) != k:
            raise ValueError(f"SplitSource: {len(self.prefix)} prefix flags for {k} stores")
        for j, part in enumerate(self.task.parts):
            if self.prefix_of(j) and part.prefix is None:
                raise ValueError(f"store {part.store.url} has no prefix (cls) tokens to read")

    @property
    def n(self) -> int:
        return int(self.rows.size)

    @property
    def labels(self) -> np.ndarray:
        return self.task.labels[self.rows]

    def prefix_of(self, k: int) -> bool:
        return bool(self.prefix) if isinstance(self.prefix, bool) else bool(self.prefix[k])

    def layers_of(self, k: int) -> list[int] | None:
        if not self.layers or self.layers[k] is None:
            return None
        return [int(v) for v in self.layers[k]]

    def compact_of(self, k: int) -> bool:
        """Whether store k's batches hold a compact encoding (its patch tokens; prefix tokens are full-size)."""
        return not self.prefix_of(k) and self.task.parts[k].compact is not None

    @property
    def any_compact(self) -> bool:
        return any(self.compact_of(k) for k in range(len(self.task.parts)))

    def _arrays(self, k: int) -> list:
        part = self.task.parts[k]
        if self.prefix_of(k):
            return [part.prefix]
        return list(part.encoded) if part.compact is not None else [part.tokens]

    def arrays_of(self, k: int) -> int:
        """How many arrays store k contributes to what `read` returns (1, or a compact encoding's arrays)."""
        return len(self.task.parts[k].compact.arrays()) if self.compact_of(k) else 1

    def row_bytes(self) -> int:
        """Bytes of one sample as read (all stores, selected layers, stored dtype; every array of a compact encoding)."""
        return sum(self.store_row_bytes(k) for k in range(len(self.task.parts)))

    def store_row_bytes(self, k: int) -> int:
        """`row_bytes` of store k alone."""
        layers = self.layers_of(k)
        total = 0
        for array in self._arrays(k):
            num_layers = array.shape[1] if layers is None else len(layers)
            total += num_layers * int(np.prod(array.shape[2:])) * array.dtype.itemsize
        return total

    def read(self, positions: np.ndarray, *, direct: bool = False) -> list[np.ndarray]:
        """Features of the given positions (any order), rows in `positions` order: one array per store, or, for a
        compact store, its encoded arrays (`arrays_of`; every one rows first), which `decode` turns into one.
        ``direct``: local shards are read past the page cache (`TaskStore.read`)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = []
        for k, row_map in enumerate(self.task.row_maps):
            out += self.read_part(k, row_map[self.rows[positions]], direct=direct)
        return out

    def read_part(self, k: int, stored: np.ndarray, *, layers: Sequence[int] | None = None,
                  direct: bool = False) -> list[np.ndarray]:
        """Store k's arrays for its rows `stored` (`layers`: these stored layers instead of the selection)."""
        part = self.task.parts[k]
        layers = self.layers_of(k) if layers is None else [int(v) for v in layers]
        if not self.compact_of(k):
            block = part.read(stored, layers=layers, prefix=self.prefix_of(k), direct=direct)
            if block.dtype.kind == "f" and not _all_finite(block):  # one pass per block read
                raise non_finite_error(part, stored, block, prefix=self.prefix_of(k))
            return [block]
        # undecoded: a never-written row (any array's fill: NaN, 2.2's -128 codes, -1 outlier indexes) is refused
        # by read_encoded; integer codes cannot be non-finite
        blocks = part.read_encoded(stored, layers=layers, direct=direct)
        for name, block in zip(part.compact.arrays(), blocks):
            if block.dtype.kind == "f" and not _all_finite(block):
                raise non_finite_error(part, stored, block, prefix=False, array=name)
        return blocks

    def cache_view(self) -> list[tuple[Tensor, np.ndarray]] | None:
        """Where the split already is in RAM (rows held by `probe.heldsplit`): per array of `read`, the held
        tensor (a contiguous layer selection as a view, no copy) and the held row of each position; None when
        any store does not hold them all, or a layer selection is not a range."""
        views: list[tuple[Tensor, np.ndarray]] = []
        for k, (part, row_map) in enumerate(zip(self.task.parts, self.task.row_maps)):
            index = part.held_index(row_map[self.rows]) if hasattr(part, "held_index") and not self.prefix_of(k) else None
            if index is None:
                return None
            layers = self.layers_of(k)
            if layers is not None and layers != list(range(layers[0], layers[0] + len(layers))):
                return None
            for array in part.arrays if self.compact_of(k) else part.arrays[:1]:
                tensor = torch.from_numpy(array)
                views.append((tensor if layers is None else tensor[:, layers[0]:layers[0] + len(layers)], index))
        return views

    @cached_property
    def decoder(self) -> BatchDecoder:
        """Regroups and decodes a batch of `read`'s arrays into one tensor per store (see probe/compact.py)."""
        return BatchDecoder([(self.arrays_of(k), decoder_for(part) if self.compact_of(k) else None, self.layers_of(k))
                             for k, part in enumerate(self.task.parts)])

    def decode(self, tensors, *, normalised: bool | Sequence[bool] = False) -> list[Tensor]:
        """One float tensor per store from a batch of `read`'s arrays (any device): compact stores decoded there,
        in original units or (``normalised``, per store) ComBo-normalised with their stored statistics; full-size
        stores' tensors as they came."""
        tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        return self.decoder(tensors, normalised=normalised)


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


# ----------------------------------------------------------------------------------------------- sample order


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


def _epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[s : s + batch_size] for s in range(0, order.size, batch_size)]


# ------------------------------------------------------------------------------------------------ in memory


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


# ------------------------------------------------------------------------------------------------ streaming


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Pulls items from an iterator in a background thread, at most `depth` ready ahead.

    Errors in the thread are re-raised in the consumer. `close()` (also on garbage collection of
    the consuming generator) stops the thread at its next hand-over and drops what it holds.
    """

    _END = object()

    def __init__(self, items: Iterator, *, depth: int = 1, name: str = "combo-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._items = items
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(err))

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # free what is queued; the thread sees the flag at its next put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break


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


# --------------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class CachePlan:
    mode: str  # "device" | "ram" | "stream"
    window_rows: int | None  # rows per shuffle window (None: the whole split)
    split_bytes: int
    budget_bytes: int | None = None
    note: str = ""  # why the plan differs from what was asked, if it does
    cache_bytes: int | None = None  # RAM the training split takes at most (whole, or the stream's windows)
    overhead_bytes: int | None = None  # RAM beyond that: batches, the adapter, torch (`memory_overhead`)

    def describe(self) -> str:
        window = "whole split" if self.window_rows is None else f"{self.window_rows} rows"
        text = f"cache {self.mode} ({self.split_bytes / 2**20:.1f} MiB, shuffle window {window})"
        if self.cache_bytes is not None and self.overhead_bytes is not None:
            text += (f"; holds at most {(self.cache_bytes + self.overhead_bytes) / 2**20:.0f} MiB of RAM after the "
                     f"imports (training data {self.cache_bytes / 2**20:.0f} MiB, batches and adapter "
                     f"{self.overhead_bytes / 2**20:.0f} MiB)")
        return f"{text}; {self.note}" if self.note else text


def memory_overhead(source: SplitSource, *, batch_size: int, eval_batch_size: int = EVAL_BATCH_SIZE) -> int:
    """Bytes a fit holds on top of its cache budget (and of the process after its imports), whatever the split's
    size: a fixed part plus a fixed number of training and evaluation batches (see the constants above)."""
    row = source.row_bytes()
    return (FIXED_OVERHEAD_BYTES + TRAIN_BATCH_COPIES * batch_size * row
            + EVAL_BATCH_COPIES * eval_batch_rows(source, eval_batch_size) * row)


def _device_room(device: torch.device) -> int | None:
    """Bytes we allow a cached split to take on a CUDA device: half of what is free now."""
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except Exception:  # noqa: BLE001
        return None
    return int(free // 2)


def plan_cache(source: SplitSource, *, mode: str, budget_bytes: int, device: torch.device, batch_size: int,
               shuffle_window: int | None = None, eval_batch_size: int = EVAL_BATCH_SIZE) -> CachePlan:
    """Pick where the training split lives.

    `auto`: on the GPU when there is one and the split fits both the budget and half the free GPU
    memory; else in RAM when it fits the budget; else streamed. `stream` sizes its shuffle window
    so that `STREAM_WINDOWS_IN_RAM` windows and `STREAM_BATCHES_IN_RAM` batches fit the budget
    (never below one shard: pieces are whole shards unless the store is class-clustered). `shuffle_window` (rows) overrides the window
    in every mode; `ram`/`device` default to the whole split.
    """
    if mode not in CACHE_MODES:
        raise CachePlanError(f"--cache {mode!r}: choose one of {', '.join(CACHE_MODES)}")
    if budget_bytes <= 0:
        raise CachePlanError(f"--cache-budget must be positive, got {budget_bytes} bytes")
    if shuffle_window is not None and shuffle_window < 1:
        raise CachePlanError(f"shuffle window must hold at least one row, got {shuffle_window}")
    row_bytes = source.row_bytes()
    split_bytes = source.n * row_bytes
    fits = split_bytes <= budget_bytes
    note = ""
    if mode == "auto":
        room = _device_room(device)
        if device.type == "cuda" and fits and room is not None and split_bytes <= room:
            mode = "device"
        else:
            mode = "ram" if fits else "stream"
    if mode == "device" and device.type != "cuda":
        mode, note = "ram", f"no CUDA device ({device}): cached in RAM"
    if mode in ("ram", "device") and not fits:  # asked for: the whole split is read, whatever the budget
        over = (f"warning: --cache {mode} holds the whole training split ({split_bytes / 2**20:.1f} MiB) in "
                f"{'RAM' if mode == 'ram' else 'GPU memory'}, over the cache budget ({budget_bytes / 2**20:.1f} MiB), "
                "which it does not honour; use --cache stream (or auto) to stay within --cache-budget")
        note = f"{note}; {over}" if note else over
    window: int | None = None
    if mode == "stream":
        if shuffle_window is not None:
            window = shuffle_window
        else:
            budget_rows = int(budget_bytes // max(1, row_bytes))
            window = (budget_rows - STREAM_BATCHES_IN_RAM * batch_size) // STREAM_WINDOWS_IN_RAM
            floor = source.task.reference.rows_per_shard
            if window < floor:
                note = (f"budget {budget_bytes / 2**20:.1f} MiB leaves {max(window, 0)} rows per window; raised to "
                        f"one shard ({floor} rows), so RAM use exceeds the budget")
                window = floor
    elif shuffle_window is not None:
        window = shuffle_window
    if window is not None and window >= source.n:
        window = None
    pieces = piece_rows(source) if window is not None else None
    if pieces is not None and pieces < source.task.reference.rows_per_shard:
        clustered = ("the split is stored class by class (a store written before combo shuffled training rows): "
                     f"windows are built from {pieces}-row pieces, more reads per window; "
                     "extract it again for whole-shard reads")
        note = f"{note}; {clustered}" if note else clustered
    if window is None:
        cache_bytes = split_bytes  # read into RAM whole (and from there to the GPU in `device` mode)
    else:
        cache_bytes = min(split_bytes, (STREAM_WINDOWS_IN_RAM * window + STREAM_BATCHES_IN_RAM * batch_size) * row_bytes)
    return CachePlan(mode=mode, window_rows=window, split_bytes=split_bytes, budget_bytes=budget_bytes, note=note,
                     cache_bytes=int(cache_bytes),
                     overhead_bytes=memory_overhead(source, batch_size=batch_size, eval_batch_size=eval_batch_size))


def training_batches(source: SplitSource, plan: CachePlan, *, batch_size: int, seed: int, device: torch.device) -> Iterator[Batch]:
    if plan.mode == "stream":
        return stream_batches(source, batch_size=batch_size, seed=seed, window_rows=int(plan.window_rows or source.n),
                              device=device if device.type == "cuda" else None)
    return cached_batches(source, batch_size=batch_size, seed=seed, window_rows=plan.window_rows,
                          device=device if plan.mode == "device" else None)


_UNITS = {
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1,
}  # fmt: skip


def budget_from_text(text: str) -> int:
    """'8GiB', '8G' (binary), '512MB' (decimal), '1e9' -> bytes."""
    raw = str(text).strip().lower().replace(" ", "")
    number, factor = raw, 1
    for unit, size in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if raw.endswith(unit):
            number, factor = raw[: -len(unit)], size
            break
    try:
        value = float(number) * factor
    except ValueError:
        raise CachePlanError(f"--cache-budget {text!r}: expected a size like 8GiB, 500MB or 2e9") from None
    if not value > 0 or value != value:
        raise CachePlanError(f"--cache-budget {text!r}: must be a positive size")
    return int(value)


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
    "CachePlanError",
    "Prefetcher",
    "SplitSource",
    "budget_from_text",
    "cached_batches",
    "default_budget",
    "direct_reads",
    "epoch_order",
    "epoch_windows",
    "eval_batch_rows",
    "eval_batches",
    "label_clustered",
    "memory_overhead",
    "piece_rows",
    "plan_cache",
    "read_all",
    "stream_batches",
    "training_batches",
]
