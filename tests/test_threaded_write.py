"""Threaded shard encoding (store_schema/shardwrite.py): the same bytes as zarr's own write, at any thread count."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from store_schema import StoreLayout, open_store, shardwrite, validate_store
from store_schema.shardwrite import THREADS_ENV, shard_plan, write_shard, write_threads
from storefactory import vtab_like_splits, write_store

# float16 as combo extracts it (NaN fill, crc32c, inner chunk = the shard's rows x 1 layer), and float32
# on format 1's grid (zero fill, no checksum, 4 inner chunks of rows per layer: a Morton order of 2 axes)
LAYOUTS = {
    "float16": StoreLayout(rows_per_shard=6),
    "float32-grid": StoreLayout(dtype="float32", rows_per_shard=8, rows_per_chunk=2, checksum=False, fill_nan=False),
}
SHAPE = (15, 3, 4, 8)  # the last shard is cut by the end of the array in both layouts


def tokens(layout: StoreLayout) -> np.ndarray:
    """Values with every kind of inner chunk: data, a row of fill (a skipped image), a chunk that is all
    fill (left out of the shard), and one of -0.0 (not the +0.0 fill: kept)."""
    data = np.random.default_rng(0).standard_normal(SHAPE).astype(layout.dtype)
    fill = np.nan if layout.fill_nan else 0
    data[1] = fill
    data[:6, 2] = fill  # float16: shard 0's layer-2 chunk; float32-grid: inner chunks (0..2, 2)
    data[8:10, 1] = -0.0
    return data


def create(path: Path, layout: StoreLayout) -> zarr.Array:
    layout = layout.for_rows(int(np.prod(SHAPE[1:])) * layout.itemsize)
    return zarr.create_array(LocalStore(path), **layout.array_kwargs(SHAPE))


def shard_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted((path / "c").rglob("*")) if p.is_file()}


def write_all(array: zarr.Array, data: np.ndarray, path: Path, threads: int | None) -> None:
    """Every shard: zarr's own single-threaded write (`threads` None) or shardwrite's."""
    rows = array.shards[0]
    for block, start in enumerate(range(0, data.shape[0], rows)):
        if threads is None:
            with zarr.config.set({"async.concurrency": 1}):
                array[start : start + rows] = data[start : start + rows]
        else:
            key = array.metadata.encode_chunk_key((block,) + (0,) * (data.ndim - 1))
            written = write_shard(array, data[start : start + rows], path / key, threads=threads)
            assert written
            if written.sha256 is None:  # every chunk the fill value: no file
                assert not (path / key).exists()
            else:  # hashed as written: what the journal records without reading the file back
                on_disk = (path / key).read_bytes()
                assert (written.sha256, written.size) == (hashlib.sha256(on_disk).hexdigest(), len(on_disk))


@pytest.mark.parametrize("name", LAYOUTS)
def test_shards_are_zarrs_bytes_at_any_thread_count(tmp_path, name):
    layout = LAYOUTS[name]
    data = tokens(layout)
    written = {}
    for threads in (None, 1, 4):
        path = tmp_path / f"threads-{threads}"
        array = create(path, layout)
        assert shard_plan(array) is not None
        write_all(array, data, path, threads)
        written[threads] = shard_files(path)
        np.testing.assert_array_equal(zarr.open_array(LocalStore(path), mode="r")[...], data)
    assert len(written[None]) == -(-SHAPE[0] // array.shards[0])  # one file per shard
    assert written[1] == written[None]
    assert written[4] == written[None]


def test_all_fill_shard_has_no_file(tmp_path):
    """zarr deletes a shard whose every chunk is the fill value; so does shardwrite."""
    array = create(tmp_path / "a", LAYOUTS["float16"])
    shard = tmp_path / "a" / "c" / "0" / "0" / "0" / "0"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"old")
    assert write_shard(array, np.full((6, *SHAPE[1:]), np.nan, dtype=np.float16), shard, threads=2).sha256 is None
    assert not shard.exists()


def test_shard_data_of_the_wrong_shape_is_refused(tmp_path):
    plan = shard_plan(create(tmp_path / "a", LAYOUTS["float16"]))
    assert plan is not None
    with pytest.raises(ValueError, match="shard data has shape"):
        plan.encode(np.zeros((7, *SHAPE[1:]), dtype=np.float16))


def store_tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((20, 3, 4, 8)).astype(np.float16),  # 20 rows in shards of 6: the last one cut
            rng.standard_normal((20, 3, 1, 8)).astype(np.float16))


def test_store_written_on_threads_reads_back_and_validates(tmp_path, monkeypatch):
    feats, prefix = store_tokens()
    layout = StoreLayout(rows_per_shard=6)
    monkeypatch.setattr("store_schema.writer.shard.write_shard", lambda *a, **k: False)  # zarr writes every shard
    reference = write_store(tmp_path / "zarr.zarr", tokens=feats, prefix=prefix, labels=np.arange(20) % 2,
                            splits=vtab_like_splits(8, 4, 8), grid=(2, 2), layout=layout)
    monkeypatch.undo()
    monkeypatch.setenv(THREADS_ENV, "4")
    path = write_store(tmp_path / "threads.zarr", tokens=feats, prefix=prefix, labels=np.arange(20) % 2,
                       splits=vtab_like_splits(8, 4, 8), grid=(2, 2), layout=layout)
    group = zarr.open_group(path, mode="r")
    for name, values in (("tokens", feats), ("prefix", prefix)):
        assert shard_plan(group[f"task/{name}"]) is not None
        np.testing.assert_array_equal(group[f"task/{name}"][...], values)
        assert shard_files(path / "task" / name) == shard_files(reference / "task" / name)
    assert validate_store(path).ok
    np.testing.assert_array_equal(open_store(path).task("task").read(slice(None)), feats)


def test_other_codecs_are_written_by_zarr(tmp_path, monkeypatch):
    feats, _ = store_tokens(1)
    layout = StoreLayout(rows_per_shard=6, codec="blosc-zstd")
    calls = []
    monkeypatch.setattr(shardwrite, "shard_plan", lambda array: calls.append(array) or shard_plan(array))
    path = write_store(tmp_path / "blosc.zarr", tokens=feats, labels=np.arange(20) % 2,
                       splits=vtab_like_splits(8, 4, 8), grid=(2, 2), layout=layout)
    tokens_array = zarr.open_group(path, mode="r")["task/tokens"]
    assert calls and shard_plan(tokens_array) is None
    assert shard_plan(zarr.open_group(path, mode="r")["task/label"]) is None  # unsharded: zarr's too
    np.testing.assert_array_equal(tokens_array[...], feats)
    assert validate_store(path).ok


def test_thread_count_from_keyword_environment_or_cores(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert write_threads() >= 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert write_threads() == 3
    assert write_threads(2) == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match=THREADS_ENV):
        write_threads()
    with pytest.raises(ValueError, match=">= 1"):
        write_threads(0)
