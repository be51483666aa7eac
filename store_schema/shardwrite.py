"""Shards encoded on a pool of threads, byte for byte as zarr-python writes them.

zarr-python (3.1) runs only the zstd step of a shard's inner chunks in worker threads
(`asyncio.to_thread`); the empty-chunk test (a full scan of every chunk for the fill value), the
crc32c, the copies and the assembly run one after another on its event-loop thread, so a single
writer uses about 1.2 cores (CPU / wall time of a write) whatever `threading.max_workers` and
`async.concurrency` say. Here every inner chunk is tested, serialised, compressed and checksummed
in a thread of a `ThreadPoolExecutor` (numpy, numcodecs' zstd and google_crc32c release the GIL),
each written to the shard's temp file as soon as it and those before it are done (the write, in
the kernel without the GIL, overlaps the later chunks' encoding; no joined copy of the shard), and
the file has the layout zarr's sharding codec gives it:

* inner chunks in Morton order, back to back, from offset 0;
* a chunk that equals the fill value (zarr's `NDBuffer.all_equal`) is left out unless the array
  writes empty chunks; a chunk entirely past the end of the array is never written; a chunk cut
  by the end of the array is padded with the fill value;
* the index at the end: uint64 (offset, length) per chunk in C order, 2**64 - 1 for an absent
  chunk, little endian, then its crc32c; no file at all when every chunk is absent.

Only combo's layout with zstd and one shard across every axis but the first is taken
(store_schema/shardlayout.py); for anything else `shard_plan` returns None and the caller writes
through zarr.
tests/test_threaded_write.py checks the bytes against zarr's own writes; benchmarks/store_layout.py
times both.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.core.indexing import morton_order_iter

from .location import write_file_atomic
from .shardlayout import ABSENT, ShardSpec
from .threads import thread_count

THREADS_ENV = "COMBO_WRITE_THREADS"


def write_threads(threads: int | None = None) -> int:
    """Threads that encode one shard: `threads`, else $COMBO_WRITE_THREADS, else every core."""
    return thread_count(THREADS_ENV, threads)


def _crc32c(data: bytes | np.ndarray) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "little")


def _all_fill(chunk: np.ndarray, fill: np.ndarray) -> bool:
    """zarr's test for a chunk it leaves out (`NDBuffer.all_equal`): a NaN fill matches any NaN, a float
    zero fill only +0.0 (bit for bit), any other fill `==`. The first element is tested first: data
    rarely starts with the fill, so the full scan (1 GB/s for float16) is rarely paid."""
    flat = chunk.reshape(-1)
    if fill.dtype.kind == "f" and np.isnan(fill):
        match: Callable[[np.ndarray], np.ndarray] = np.isnan
    elif fill.dtype.kind == "f" and fill == 0:  # zarr compares the bits here: a chunk of -0.0 is data
        flat, match = flat.view(f"u{flat.dtype.itemsize}"), partial(np.equal, 0)
    else:
        match = partial(np.equal, fill)
    return bool(match(flat[:1]).all()) and bool(match(flat).all())


@dataclass(frozen=True)
class ShardPlan:
    """How one sharded array's shards are encoded (read from its metadata by `shard_plan`)."""

    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: np.ndarray  # 0-d, of `dtype`
    write_empty_chunks: bool
    zstd: Zstd
    checksum: bool  # crc32c after zstd

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard_shape, self.chunk_shape))

    def _chunks(self, rows: int) -> Iterator[tuple[int, ...]]:
        """Inner chunks a write of the shard's first `rows` rows touches, in Morton order."""
        return (c for c in morton_order_iter(self.chunks_per_shard) if c[0] * self.chunk_shape[0] < rows)

    def _encode_chunk(self, data: np.ndarray, coords: tuple[int, ...]) -> list[bytes] | None:
        """One inner chunk's bytes (zstd frame, then crc32c), or None when zarr would leave it out."""
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, self.chunk_shape))
        part = data[region]
        if part.shape == self.chunk_shape:
            chunk = np.ascontiguousarray(part, dtype=self.dtype)
        else:  # cut by the end of the array: zarr pads with the fill value
            chunk = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            chunk[tuple(slice(0, n) for n in part.shape)] = part
        if not self.write_empty_chunks and _all_fill(chunk, self.fill_value):
            return None
        frame = self.zstd.encode(chunk.reshape(-1).view(np.uint8))
        return [frame, _crc32c(frame)] if self.checksum else [frame]

    def _encoded(self, data: np.ndarray, threads: int) -> Iterator[tuple[tuple[int, ...], list[bytes] | None]]:
        """(coords, bytes) of every touched inner chunk in file order, each as soon as it is encoded, while
        the pool goes on with the later ones."""
        coords = list(self._chunks(data.shape[0]))
        if threads == 1 or len(coords) == 1:
            yield from ((c, self._encode_chunk(data, c)) for c in coords)
            return
        pool = ThreadPoolExecutor(max_workers=min(threads, len(coords)), thread_name_prefix="combo-shard")
        try:
            futures = [pool.submit(self._encode_chunk, data, c) for c in coords]
            yield from ((c, f.result()) for c, f in zip(coords, futures))
        finally:  # also when the consumer stops early (a failed write): nothing more is encoded
            pool.shutdown(wait=True, cancel_futures=True)

    def pieces(self, data: np.ndarray, *, threads: int = 1) -> Iterator[bytes]:
        """The shard file for `data` (the shard's rows, the last shard's cut by the end of the array), piece
        by piece in file order as the chunks are encoded; nothing when every chunk is left out (zarr then
        deletes the shard)."""
        if not 1 <= data.shape[0] <= self.shard_shape[0] or tuple(data.shape[1:]) != self.shard_shape[1:]:
            raise ValueError(f"shard data has shape {data.shape}; the shard is {self.shard_shape}")
        index = np.full((*self.chunks_per_shard, 2), ABSENT, dtype="<u8")
        offset, held = 0, 0
        for c, chunk in self._encoded(data, threads):
            if chunk is None:
                continue
            length = sum(len(p) for p in chunk)
            index[c] = (offset, length)
            offset, held = offset + length, held + 1
            yield from chunk
        if held:
            index_bytes = index.tobytes()
            yield from (index_bytes, _crc32c(index_bytes))

    def encode(self, data: np.ndarray, *, threads: int = 1) -> bytes | None:
        """The whole shard file for `data` (see `pieces`), or None when every chunk is left out."""
        return b"".join(self.pieces(data, threads=threads)) or None


def shard_plan(array: zarr.Array) -> ShardPlan | None:
    """How this module encodes `array`'s shards, or None when it leaves them to zarr (not combo's layout, no
    zstd, several shards across a later axis)."""
    spec = ShardSpec.of(array)
    if spec is None or spec.zstd is None or not spec.dtype.isnative or spec.shape[1:] != spec.shard_shape[1:]:
        return None
    return ShardPlan(
        shard_shape=spec.shard_shape,
        chunk_shape=spec.chunk_shape,
        dtype=spec.dtype,
        fill_value=np.asarray(array.metadata.fill_value, dtype=spec.dtype),
        write_empty_chunks=bool(array.config.write_empty_chunks),
        zstd=Zstd(level=spec.zstd.level, checksum=spec.zstd.checksum),  # as zarr's ZstdCodec configures it
        checksum=spec.checksum,
    )


@dataclass(frozen=True)
class Written:
    """A shard `write_shard` wrote: the sha256 and size of its bytes, hashed as they went to the file (so the
    writer need not read it back), or sha256 None when every chunk was the fill value and no file exists."""

    sha256: str | None
    size: int


def write_shard(array: zarr.Array, data: np.ndarray, path: str | os.PathLike, *,
                threads: int | None = None) -> Written | None:
    """Write one shard of `array` (its rows `data`) to the file `path` (temp file, fsync, rename, folder
    fsync), its inner chunks encoded on `threads` threads (`write_threads`). None, writing nothing, when the
    array's configuration is not one `shard_plan` takes: the caller then writes through zarr."""
    plan = shard_plan(array)
    if plan is None:
        return None
    pieces = plan.pieces(data, threads=write_threads(threads))
    digest, size = hashlib.sha256(), 0

    def hashed(first: bytes) -> Iterator[bytes]:
        nonlocal size
        for piece in itertools.chain((first,), pieces):
            digest.update(piece)
            size += len(piece)
            yield piece

    try:
        first = next(pieces, None)  # checks the shape before anything is written
        path = Path(path)
        if first is None:  # every chunk is the fill value: zarr keeps no shard file
            path.unlink(missing_ok=True)
            return Written(sha256=None, size=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, hashed(first))
    finally:
        pieces.close()  # a failed write: the pool stops at once
    return Written(sha256=digest.hexdigest(), size=size)
