"""The hot read path: rows of a sharded token array decoded on a pool of threads into the caller's array.

Why not zarr's own read: for every shard it allocates the whole object, each inner chunk's decoded bytes
and a block for the result, all fresh (tens of MiB each, so glibc hands them out as new mmaps that the
kernel must fault in page by page), then the caller copies the block again. On a ViT-B store that made
reading cost as much system time as user time (issue 24). Here each pool thread keeps one compressed and
one decoded buffer for its whole life, reads an inner chunk into the first (pread, or a range request on
a remote store), checks its crc32c, decompresses it into the second and copies the rows wanted straight
into the output: no allocation per chunk, one copy. zstd and crc32c release the GIL, so chunks decode in
parallel while the caller trains.

Only the layout combo writes is taken (`sharding_indexed`, index at the end with crc32c, inner codecs
bytes [+ zstd] [+ crc32c]; store_schema/shardlayout.py); any other array is read by zarr. The bytes
decoded are the spec's: tests/test_shard_read.py checks them against zarr's on every layout it takes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd

from .errors import StoreError
from .shardlayout import ABSENT, ShardSpec
from .threads import thread_count

READ_THREADS_ENV = "COMBO_READ_THREADS"
VALIDATE = "Run `combo store validate` on the store"


# ------------------------------------------------------------------------------------------------ the pool

_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_pool_lock = threading.Lock()
_local = threading.local()


def read_threads() -> int:
    """Threads that decode shards: $COMBO_READ_THREADS, else every core."""
    return thread_count(READ_THREADS_ENV)


def set_read_threads(threads: int | None) -> None:
    """Use `threads` decode threads from now on (None: `read_threads()`); the pool is rebuilt on next use."""
    global _pool, _pool_threads
    if threads is not None:
        thread_count(READ_THREADS_ENV, threads)  # refuses a count below 1
    with _pool_lock:
        if threads is not None:
            os.environ[READ_THREADS_ENV] = str(int(threads))
        else:
            os.environ.pop(READ_THREADS_ENV, None)
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_threads = None, 0


def pool() -> ThreadPoolExecutor:
    global _pool, _pool_threads
    wanted = read_threads()
    with _pool_lock:
        if _pool is None or _pool_threads != wanted:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_threads = ThreadPoolExecutor(wanted, thread_name_prefix="combo-read"), wanted
        return _pool


def _buffer(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable byte buffer `name`, at least `nbytes` long (grown, never shrunk)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        setattr(_local, name, buf)
    return buf[:nbytes]


# ------------------------------------------------------------------------------------------------ bytes


class ShardFiles:
    """Byte ranges of one array's shard objects: pread on local files, range requests elsewhere (fsspec)."""

    def __init__(self, fs: Any, root: str, array_path: str, *, local: bool, direct: bool = False):
        self.fs, self.local, self.array_path = fs, local, array_path
        # O_DIRECT for local files: a single pass over more data than RAM holds skips the page cache, whose fill,
        # copy and reclaim cost 1-1.5 s of kernel time per GB read (issue 24); dropped where the file system refuses it
        self.direct = bool(direct) and local and hasattr(os, "O_DIRECT")
        self.base = f"{root.rstrip('/')}/{array_path}/c" if root else f"{array_path}/c"
        self._objects: dict[tuple[int, ...], bytes] = {}  # remote shards fetched whole, for this read only

    def name(self, shard: tuple[int, ...]) -> str:
        """The shard's key in the store (what `combo store validate` names)."""
        return f"{self.array_path}/c/" + "/".join(str(i) for i in shard)

    def path(self, shard: tuple[int, ...]) -> str:
        return self.base + "/" + "/".join(str(i) for i in shard)

    def index(self, shard: tuple[int, ...], nbytes: int, *, where: str, whole: bool = False) -> bytes | None:
        """The last `nbytes` of the shard object; None when it does not exist (never written: fill value).

        ``whole`` (remote stores): fetch the whole object in one request and serve the chunk reads from it,
        one round trip instead of three or more, for a shard that is mostly needed."""
        path = self.path(shard)
        if whole and not self.local:
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
            self._check_size(shard, len(data), nbytes, where)
            self._objects[shard] = data
            return data[-nbytes:]
        if self.local:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                size = os.fstat(fd).st_size
                self._check_size(shard, size, nbytes, where)
                return os.pread(fd, nbytes, size - nbytes)
            finally:
                os.close(fd)
        try:
            size = int(self.fs.size(path))
        except FileNotFoundError:
            return None
        self._check_size(shard, size, nbytes, where)
        return self.fs.cat_file(path, start=size - nbytes, end=size)

    def _check_size(self, shard: tuple[int, ...], size: int, nbytes: int, where: str) -> None:
        if size < nbytes:
            raise StoreError(f"{where}: shard {self.name(shard)} holds {size} bytes, too few for its index "
                             f"({nbytes}): truncated. {VALIDATE}")

    def read_into(self, shard: tuple[int, ...], offset: int, out: np.ndarray, *, where: str) -> None:
        """Exactly out.size bytes at `offset` of the shard object into `out`."""
        path = self.path(shard)
        if self.local and self.direct:
            done = self._read_direct(path, offset, out)
            if done is None:  # refused (tmpfs, some network file systems): the page cache from now on
                self.direct = False
        if self.local and not self.direct:
            fd = os.open(path, os.O_RDONLY)
            try:
                done, view = 0, memoryview(out)
                while done < out.size:
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n == 0:
                        break
                    done += n
            finally:
                os.close(fd)
        elif not self.local:
            whole = self._objects.get(shard)
            data = (whole[offset : offset + out.size] if whole is not None
                    else self.fs.cat_file(path, start=offset, end=offset + out.size))
            done = len(data)
            out[:done] = np.frombuffer(data, dtype=np.uint8)
        if done != out.size:
            raise StoreError(f"{where}: shard {self.name(shard)} ends before byte {offset + out.size} its index "
                             f"points to: truncated. {VALIDATE}")


    @staticmethod
    def _read_direct(path: str, offset: int, out: np.ndarray) -> int | None:
        """`out.size` bytes at `offset`, read with O_DIRECT through an aligned buffer of this thread; the bytes
        read (fewer at the end of the file), or None when the file system refuses O_DIRECT."""
        lo = offset // DIRECT_ALIGN * DIRECT_ALIGN
        hi = -(-(offset + out.size) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = getattr(_local, "direct", None)
        if buf is None or len(buf) < hi - lo:
            buf = _local.direct = mmap.mmap(-1, hi - lo)  # page-aligned, as O_DIRECT needs
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as err:
            if err.errno == errno.EINVAL:
                return None
            raise
        try:
            got, view = 0, memoryview(buf)[: hi - lo]
            while got < hi - lo:
                n = os.preadv(fd, [view[got:]], lo + got)
                if n == 0:
                    break
                got += n
        except OSError as err:
            if err.errno == errno.EINVAL:
                return None
            raise
        finally:
            os.close(fd)
        done = max(0, min(out.size, got - (offset - lo)))
        out[:done] = np.frombuffer(buf, dtype=np.uint8, count=done, offset=offset - lo)
        return done


DIRECT_ALIGN = 4096  # O_DIRECT's offset, length and buffer alignment (the logical block size is at most this)


def files_for(location: Any, array: zarr.Array, *, direct: bool = False) -> ShardFiles | None:
    """Where `array`'s shards of a store at `location` are read from; None for a zip (zarr reads those).
    ``direct``: local files are read with O_DIRECT (see `ShardFiles`)."""
    if location.kind == "zip":
        return None
    return ShardFiles(location.fs, location.root, array.path, local=location.kind == "local", direct=direct)


# ------------------------------------------------------------------------------------------------ decoding


def _shard_index(spec: ShardSpec, raw: bytes, where: str) -> np.ndarray:
    """The [*chunks_per_shard, 2] (offset, length) table of a shard, its crc32c checked."""
    body, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
    if google_crc32c.value(body) != stored:
        raise StoreError(f"{where}: its index fails its crc32c check: damaged. {VALIDATE}")
    return np.frombuffer(body, dtype="<u8").reshape(*spec.chunks_per_shard, 2)


def _decode_chunk(spec: ShardSpec, files: ShardFiles, shard: tuple[int, ...], offset: int, length: int,
                  where: str) -> np.ndarray:
    """One inner chunk, decoded into this thread's reusable buffer (valid until its next call)."""
    raw = _buffer("raw", length)
    files.read_into(shard, offset, raw, where=where)
    body = raw[:-4] if spec.checksum else raw
    if spec.checksum and google_crc32c.value(body) != int.from_bytes(raw[-4:].tobytes(), "little"):
        raise StoreError(f"{where} fails its crc32c check: damaged. {VALIDATE}")
    if spec.zstd is None:
        if body.size != spec.chunk_nbytes:
            raise StoreError(f"{where} holds {body.size} bytes, not {spec.chunk_nbytes}: damaged. {VALIDATE}")
        return body.view(spec.dtype).reshape(spec.chunk_shape)
    out = _buffer("decoded", spec.chunk_nbytes)
    try:
        _ZSTD.decode(body, out=out)
    except Exception as err:  # noqa: BLE001 - numcodecs raises RuntimeError / ValueError for a bad frame
        raise StoreError(f"{where} cannot be decompressed ({err}): damaged. {VALIDATE}") from err
    return out.view(spec.dtype).reshape(spec.chunk_shape)


_ZSTD = Zstd()


@dataclass
class _Job:
    """One inner chunk to decode, and which of its (row, layer) cells go where in the output."""

    shard: tuple[int, ...]
    coords: tuple[int, ...]  # the inner chunk's position in its shard
    offset: int
    length: int
    src_rows: np.ndarray | slice
    dst_rows: np.ndarray | slice
    src_layers: np.ndarray
    dst_layers: np.ndarray


def read_into(spec: ShardSpec, files: ShardFiles, out: np.ndarray, sorted_rows: np.ndarray, dst: np.ndarray,
              *, layers: Sequence[int] | None, where: str) -> None:
    """Stored rows `sorted_rows` (ascending, repeats allowed) of layers `layers` (None: all) into `out[dst]`
    (`out`'s second axis: the selected layers, in order).

    Shard indexes, then inner chunks, are fetched and decoded on the pool; a chunk or shard never written
    reads as the fill value (NaN in format 2, which the caller refuses for valid rows)."""
    if sorted_rows.size == 0:
        return
    ndim = len(spec.shape)
    if ndim < 2 or spec.chunk_shape[2:] != spec.shape[2:] or spec.shard_shape[2:] != spec.shape[2:]:
        raise StoreError(f"{where}: chunks split an axis after the layer axis, which the shard reader does not take")
    cr, cl = spec.chunk_shape[:2]
    sr, sl = spec.shard_shape[:2]
    layer_list = np.arange(spec.shape[1]) if layers is None else np.asarray(layers, dtype=np.int64)
    slots = np.arange(layer_list.size)
    tail = (0,) * (ndim - 2)
    # one entry per (row shard, layer shard) touched: its stored rows and their output positions
    groups: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = []
    row_shard = sorted_rows // sr
    firsts = np.flatnonzero(np.r_[True, np.diff(row_shard) != 0])
    for a, b in zip(firsts.tolist(), [*firsts[1:].tolist(), sorted_rows.size]):
        for ls in np.unique(layer_list // sl).tolist():
            groups.append(((int(row_shard[a]), ls, *tail), sorted_rows[a:b], dst[a:b]))

    chunks_per_shard = int(np.prod(spec.chunks_per_shard))

    def load_index(group: tuple[tuple[int, ...], np.ndarray, np.ndarray]) -> np.ndarray | None:
        key, rows, _ = group
        layers_here = layer_list[(layer_list // sl) == key[1]] - key[1] * sl
        needed = np.unique((rows - key[0] * sr) // cr).size * np.unique(layers_here // cl).size
        raw = files.index(key, spec.index_bytes, where=where, whole=2 * needed >= chunks_per_shard)
        return None if raw is None else _shard_index(spec, raw, f"{where}: shard {files.name(key)}")

    indexes = list(pool().map(load_index, groups))
    fill = np.asarray(0 if spec.fill_value is None else spec.fill_value).astype(out.dtype)
    jobs: list[_Job] = []
    for (key, rows, dst_rows), index in zip(groups, indexes):
        local = rows - key[0] * sr
        in_shard = (layer_list // sl) == key[1]
        layers_here, slots_here = layer_list[in_shard] - key[1] * sl, slots[in_shard]
        for ci in np.unique(local // cr).tolist():
            take = (local // cr) == ci
            src_rows, drows = local[take] - ci * cr, dst_rows[take]
            for cj in np.unique(layers_here // cl).tolist():
                pick = (layers_here // cl) == cj
                coords = (ci, cj, *tail)
                entry = None if index is None else index[coords]
                if entry is None or int(entry[0]) == ABSENT:
                    out[np.ix_(drows, slots_here[pick])] = fill
                    continue
                jobs.append(_Job(key, coords, int(entry[0]), int(entry[1]), _as_slice(src_rows), _as_slice(drows),
                                 layers_here[pick] - cj * cl, slots_here[pick]))

    def run(job: _Job) -> None:
        chunk = _decode_chunk(spec, files, job.shard, job.offset, job.length,
                              f"{where}: shard {files.name(job.shard)}, inner chunk {job.coords}")
        for src_layer, dst_layer in zip(job.src_layers.tolist(), job.dst_layers.tolist()):
            out[job.dst_rows, dst_layer] = chunk[job.src_rows, src_layer]

    for _ in pool().map(run, jobs):
        pass


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """A contiguous ascending index as a slice: numpy copies a slice without a gather."""
    if index.size and int(index[-1]) - int(index[0]) == index.size - 1 and bool(np.all(np.diff(index) == 1)):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index
