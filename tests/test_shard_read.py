"""The shard reader (store_schema/shardread.py): the same bytes as zarr's read and as itself on one thread,
damage named, and an evaluation stream that holds a fixed number of batches whatever the split's size."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import zarr

from probe.data import EVAL_BATCHES_IN_RAM, SplitSource, eval_batch_rows, eval_batches
from probe.stores import align_tasks, open_stores
from servers import static_http_server
from store_schema import StoreError, StoreLayout, open_store
from store_schema import shardread
from store_schema.shardread import ShardSpec
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 40, 6, (2, 3), 6

LAYOUTS = {
    "float16 zstd, chunk = shard rows x 1 layer": StoreLayout(rows_per_shard=8),
    "float32 zstd, 4-row chunks": StoreLayout(rows_per_shard=8, rows_per_chunk=4, dtype="float32"),
    "float16, 2 layers per chunk": StoreLayout(rows_per_shard=8, rows_per_chunk=4, layers_per_chunk=2),
    "no compressor": StoreLayout(rows_per_shard=16, rows_per_chunk=8, codec="none"),
}


def make(path: Path, layout: StoreLayout, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((N, L, GRID[0] * GRID[1], D)).astype(np.float32)
    labels = np.arange(N) % 3
    prefix = rng.standard_normal((N, L, 1, D)).astype(np.float32)
    return write_store(path, tokens=tokens, labels=labels, splits=vtab_like_splits(16, 8, 16), grid=GRID, prefix=prefix,
                       num_classes=3, layout=layout)


def zarr_read(task, rows, layers, monkeypatch, *, prefix=False) -> np.ndarray:
    monkeypatch.setenv("COMBO_SHARD_READER", "zarr")
    try:
        return task.read(rows, layers=layers, prefix=prefix)
    finally:
        monkeypatch.delenv("COMBO_SHARD_READER")


SELECTIONS = [
    (np.arange(N), None),  # every row, every layer
    (np.array([39, 0, 17, 17, 8, 3, 31]), None),  # any order, repeats, across shards
    (np.arange(5, 29), [4, 0, 2]),  # layers in any order
    (np.array([12, 11, 10, 33]), [3, 3, 1]),  # a layer twice
]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_shard_reader_returns_zarrs_bytes_at_every_thread_count(tmp_path, monkeypatch, name):
    store = make(tmp_path / "s.zarr", LAYOUTS[name])
    task = open_store(store).task("task")
    assert ShardSpec.of(task.tokens) is not None and task.files(task.tokens) is not None  # the fast path is taken
    try:
        for rows, layers in SELECTIONS:
            expected = zarr_read(task, rows, layers, monkeypatch)
            plain = zarr.open_array(store / "task" / "tokens", mode="r")[...][rows][:, layers or slice(None)]
            assert expected.tobytes() == plain.tobytes()
            for threads in (1, 2, 5):
                shardread.set_read_threads(threads)
                got = task.read(rows, layers=layers)
                assert got.dtype == expected.dtype and got.shape == expected.shape
                assert got.tobytes() == expected.tobytes(), (name, threads, rows, layers)
            got = task.read(rows, layers=layers, prefix=True)
            assert got.tobytes() == zarr_read(task, rows, layers, monkeypatch, prefix=True).tobytes()
    finally:
        shardread.set_read_threads(None)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_direct_reads_return_the_same_bytes(tmp_path, monkeypatch, name):
    """O_DIRECT (past the page cache, for one pass over more than RAM) reads what the buffered path reads; a file
    system that refuses O_DIRECT (tmpfs) is read through the page cache instead."""
    store = make(tmp_path / "s.zarr", LAYOUTS[name])
    task = open_store(store).task("task")
    files = task.files(task.tokens, direct=True)
    assert files is not None and files.direct
    real_open, opened = shardread.os.open, []

    def watch(path, flags, *args):
        opened.append(bool(flags & shardread.os.O_DIRECT))
        return real_open(path, flags, *args)

    monkeypatch.setattr(shardread.os, "open", watch)
    task.read([0], direct=True)
    monkeypatch.setattr(shardread.os, "open", real_open)
    try:  # where this file system takes O_DIRECT (ext4, xfs: not tmpfs), the direct reads used it
        shardread.os.close(real_open(str(store / "task" / "zarr.json"), shardread.os.O_RDONLY | shardread.os.O_DIRECT))
        assert any(opened), opened
    except OSError:
        pass
    for rows, layers in SELECTIONS:
        buffered = task.read(rows, layers=layers)
        assert task.read(rows, layers=layers, direct=True).tobytes() == buffered.tobytes(), (name, rows, layers)
        assert task.read(rows, layers=layers, prefix=True, direct=True).tobytes() == \
            task.read(rows, layers=layers, prefix=True).tobytes()
    real_open = shardread.os.open

    def refuse(path, flags, *args):
        if flags & shardread.os.O_DIRECT:
            raise OSError(22, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(shardread.os, "open", refuse)
    rows, layers = SELECTIONS[1]
    assert task.read(rows, layers=layers, direct=True).tobytes() == task.read(rows, layers=layers).tobytes()


def test_the_eval_stream_reads_past_the_page_cache_only_when_the_split_outgrows_ram(tmp_path, monkeypatch):
    from probe import data

    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=4, rows_per_chunk=4))
    aligned = align_tasks(open_stores([str(store)]), "task")
    seen = []
    real = SplitSource.read

    def spy(self, positions, *, direct=False):
        seen.append(direct)
        return real(self, positions, direct=direct)

    monkeypatch.setattr(SplitSource, "read", spy)
    source = SplitSource(aligned, np.arange(N))
    buffered = [f[0].numpy().tobytes() for f, _ in eval_batches(source, batch_size=4)]
    assert seen and not any(seen)  # a small split: the page cache
    assert data.direct_reads(2**60) and not data.direct_reads(2**20)
    seen.clear()
    monkeypatch.setenv("COMBO_DIRECT_READS", "1")
    assert [f[0].numpy().tobytes() for f, _ in eval_batches(source, batch_size=4)] == buffered
    assert seen and all(seen)
    monkeypatch.setenv("COMBO_DIRECT_READS", "0")
    assert not data.direct_reads(2**60)


def test_a_layout_the_reader_does_not_take_is_read_by_zarr(tmp_path):
    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=8, codec="blosc-zstd"))
    task = open_store(store).task("task")
    assert ShardSpec.of(task.tokens) is None
    plain = zarr.open_array(store / "task" / "tokens", mode="r")[...]
    assert task.read([7, 1, 30]).tobytes() == plain[[7, 1, 30]].tobytes()


def test_compact_arrays_read_the_same_through_the_shard_reader(tmp_path, monkeypatch):
    from store_schema.compact import CompactSpec
    from store_schema.compactor import compact_store

    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=8))
    compact = compact_store(store, tmp_path / "c.zarr", CompactSpec.parse("int8")).store
    task = open_store(compact).task("task")
    assert ShardSpec.of(task.tokens) is not None  # the codes; the small side arrays are not sharded (zarr reads them)
    rows = np.array([3, 38, 3, 20])
    fast = task.read_encoded(rows, layers=[4, 1])
    monkeypatch.setenv("COMBO_SHARD_READER", "zarr")
    slow = task.read_encoded(rows, layers=[4, 1])
    assert [a.tobytes() for a in fast] == [a.tobytes() for a in slow]


def test_http_store_reads_the_same_through_range_requests(tmp_path):
    store = make(tmp_path / "stores" / "s.zarr", StoreLayout(rows_per_shard=8))
    local = open_store(store).task("task")
    with static_http_server(tmp_path / "stores") as server:
        remote = open_store(f"{server.url}/s.zarr").task("task")
        assert remote.files(remote.tokens) is not None and not remote.files(remote.tokens).local
        for rows, layers in SELECTIONS:
            assert remote.read(rows, layers=layers).tobytes() == local.read(rows, layers=layers).tobytes()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x08
    path.write_bytes(bytes(data))


def test_damage_is_named_never_returned(tmp_path):
    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=8))
    shard = store / "task" / "tokens" / "c" / "2" / "0" / "0" / "0"
    flip(shard, 10)  # inside the first inner chunk's bytes
    task = open_store(store).task("task")
    with pytest.raises(StoreError, match=r"task/tokens/c/2/0/0/0, inner chunk \(0, \d, 0, 0\) fails its crc32c check: damaged"):
        task.read([17])
    other = task.read([3, 39])  # other shards still read, and as zarr reads them
    assert other.tobytes() == zarr.open_array(store / "task" / "tokens", mode="r")[[3, 39]].tobytes()
    flip(shard, 10)
    flip(shard, shard.stat().st_size - 6)  # inside the shard index
    with pytest.raises(StoreError, match=r"task/tokens/c/2/0/0/0: its index fails its crc32c check: damaged"):
        open_store(store).task("task").read([20])


def test_a_shard_cut_short_is_named(tmp_path):
    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=8))
    shard = store / "task" / "tokens" / "c" / "1" / "0" / "0" / "0"
    task = open_store(store).task("task")
    task.require_complete()  # the size check passed before the cut: as if the file changed after opening
    shard.write_bytes(shard.read_bytes()[:12])
    with pytest.raises(StoreError, match=r"task/tokens/c/1/0/0/0 holds 12 bytes, too few for its index"):
        task.read([9])


def test_read_threads_option_is_checked(monkeypatch):
    monkeypatch.setenv("COMBO_READ_THREADS", "zero")
    with pytest.raises(ValueError, match="COMBO_READ_THREADS='zero': expected a whole number"):
        shardread.read_threads()
    monkeypatch.setenv("COMBO_READ_THREADS", "3")
    assert shardread.read_threads() == 3
    with pytest.raises(ValueError, match="must be >= 1"):
        shardread.set_read_threads(0)


# -- the evaluation stream holds a fixed number of batches --------------------------------------------------------


class CountingSource(SplitSource):
    """Counts the reads alive at once (each read's arrays are released when nothing holds a batch of them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alive = 0
        self.most_alive = 0
        self.reads = 0
        self.lock = threading.Lock()

    def read(self, positions, *, direct=False):
        arrays = super().read(positions, direct=direct)
        with self.lock:
            self.reads += 1
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(arrays[0], self._released)
        return arrays

    def _released(self) -> None:
        with self.lock:
            self.alive -= 1


@pytest.mark.parametrize("cap_rows", [None, 2])
def test_eval_stream_holds_at_most_a_fixed_number_of_reads(tmp_path, cap_rows):
    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=4, rows_per_chunk=4))
    aligned = align_tasks(open_stores([str(store)]), "task")
    source = CountingSource(aligned, np.arange(N))
    max_batch_bytes = None if cap_rows is None else cap_rows * source.row_bytes()
    rows = eval_batch_rows(source, 4, max_batch_bytes=max_batch_bytes)
    assert rows == (cap_rows or 4)
    seen = []
    for features, labels in eval_batches(source, batch_size=4, max_batch_bytes=max_batch_bytes):
        assert features[0].shape[0] <= rows
        seen.append(labels.numpy())
        del features, labels
        gc.collect()
    assert source.reads >= N // 4
    assert 1 <= source.most_alive <= EVAL_BATCHES_IN_RAM, source.most_alive
    assert np.array_equal(np.concatenate(seen), source.labels)  # every row once, in order


def test_eval_batch_rows_caps_bytes_in_whole_shards(tmp_path):
    store = make(tmp_path / "s.zarr", StoreLayout(rows_per_shard=4, rows_per_chunk=4))
    aligned = align_tasks(open_stores([str(store)]), "task")
    source = SplitSource(aligned, np.arange(N))
    row = source.row_bytes()
    assert eval_batch_rows(source, 256, max_batch_bytes=row * 10) == 8  # 10 rows fit: two whole 4-row shards
    assert eval_batch_rows(source, 256, max_batch_bytes=row * 3) == 3  # under a shard: as many rows as fit
    assert eval_batch_rows(source, 6, max_batch_bytes=row * 100) == 6  # the asked size when it fits
    assert eval_batch_rows(source, 256, max_batch_bytes=1) == 1
