"""Store format 2: each fault of format 1 (issue 8) as a test that failed there and passes now.

Missing data, damaged data, locked-out teammates, xarray, plain HTTP, versioning, crash safety,
push that re-downloads, and the small things (lock file, local paths, warnings, Parquet metadata).
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from probe.run import ProbeConfig, run_probe
from servers import static_http_server
from store_schema import (
    SchemaVersionError,
    StoreError,
    StoreIncompleteError,
    StoreLayout,
    StoreWriter,
    copy_store,
    open_store,
    validate_store,
)
from store_schema.location import FILE_MODE, Location
from store_schema.metadata import FORMAT_VERSION
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 24, 2, (2, 2), 8
LAYOUT = StoreLayout(rows_per_shard=8, dtype="float32")


def make(path: Path, *, seed: int = 0, skipped=()) -> Path:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((N, L, GRID[0] * GRID[1], D)).astype(np.float32)
    labels = np.arange(N) % 3
    return write_store(path, tokens=tokens, labels=labels, splits=vtab_like_splits(8, 8, 8), grid=GRID,
                       num_classes=3, layout=LAYOUT)


@pytest.fixture
def store(tmp_path) -> Path:
    return make(tmp_path / "stores" / "synthetic" / "vtab.zarr")


def shard(store: Path, block: int, array: str = "tokens", task: str = "task") -> Path:
    return store / task / array / "c" / str(block) / "0" / "0" / "0"


def probe(store: Path, out: Path):
    return run_probe(ProbeConfig(stores=(str(store),), dataset="synthetic", out=str(out), width=16, depth=1, num_heads=2,
                                 batch_size=8, grid=GRID, device="cpu", steps=4))


# -- 1. missing data never reads as data -----------------------------------------------------------------


def test_deleted_shard_is_refused_by_read_dask_and_probe_naming_it(store, tmp_path):
    shard(store, 1).unlink()
    key = "task/tokens/c/1/0/0/0"
    task = open_store(store).task("task")
    with pytest.raises(StoreIncompleteError, match=key):
        task.read([9])
    with pytest.raises(StoreIncompleteError, match=key):
        task.to_dask()
    with pytest.raises(StoreError, match=key):
        probe(store, tmp_path / "runs")
    # a plain zarr reader sees NaN there, never zeros that pass for features
    plain = zarr.open_group(store, mode="r")["task/tokens"][8:16]
    assert np.isnan(plain).all()


def test_shard_lost_where_nothing_can_be_listed_reads_as_an_error(store):
    task = open_store(store).task("task")
    task.read([0])  # opened and checked while the shard was there
    shard(store, 2).unlink()
    with pytest.raises(StoreIncompleteError, match="task/tokens/c/2/0/0/0"):
        task.read([17, 3])


def test_skipped_rows_read_as_nan_and_are_invalid(tmp_path):
    from store_schema import Skipped, build_sample_table

    path = tmp_path / "s.zarr"
    make(path)  # reuse its info by writing a second task through the writer
    from test_store_sharing import open_info

    table = build_sample_table(sample_ids=[f"x{i}" for i in range(8)], labels=[0] * 8, splits=[("train",)] * 8,
                               split_names=["train"])
    with StoreWriter(path, open_info(path), LAYOUT) as writer:
        tw = writer.task("other", samples=table, num_layers=L, num_tokens=4, feature_dim=D, num_prefix_tokens=0,
                         protocols={"final": ("train", "train")}, classes=["a"])
        data = np.ones((8, L, 4, D), np.float32)
        tw.write_block(0, data, skipped=[Skipped(row=3, sample_id="x3", error="cannot decode")])
        tw.finalize()
    task = open_store(path).task("other")
    assert np.isnan(task.read([3])).all() and not task.samples.column("valid").to_pylist()[3]
    assert np.isfinite(task.read([2, 4])).all()
    assert validate_store(path).ok


@pytest.mark.parametrize("writer", ["threaded", "zarr"])
def test_a_block_whose_rows_are_all_skipped_is_written_and_valid(tmp_path, monkeypatch, writer):
    """Every row of a shard skipped (--skip-bad): all its chunks are the fill value, which neither zarr nor the
    threaded writer keeps as a file; the shard is written anyway, so the manifest lists every shard."""
    from store_schema import Skipped, build_sample_table

    if writer == "zarr":
        monkeypatch.setattr("store_schema.writer.shard.write_shard", lambda *a, **k: None)  # the zarr path
    path = tmp_path / "s.zarr"
    make(path)
    from test_store_sharing import open_info

    table = build_sample_table(sample_ids=[f"x{i}" for i in range(16)], labels=[0] * 16, splits=[("train",)] * 16,
                               split_names=["train"])
    data = np.ones((16, L, 4, D), np.float32)
    with StoreWriter(path, open_info(path), LAYOUT) as writer_:
        tw = writer_.task("other", samples=table, num_layers=L, num_tokens=4, feature_dim=D, num_prefix_tokens=0,
                          protocols={"final": ("train", "train")}, classes=["a"])
        rows = tw.blocks[1]
        tw.write_block(0, data[: tw.blocks[0].stop])
        tw.write_block(1, data[rows.start:rows.stop],
                       skipped=[Skipped(row=r, sample_id=f"x{r}", error="cannot decode") for r in rows])
        for b in tw.pending():
            tw.write_block(b, data[tw.blocks[b].start:tw.blocks[b].stop])
        tw.finalize()
    task = open_store(path).task("other")
    assert np.isnan(task.read(list(rows))).all() and not any(task.samples.column("valid").to_pylist()[rows.start:rows.stop])
    assert np.isfinite(task.read([0, rows.start - 1])).all()
    report = validate_store(path)
    assert report.ok, report.problems


# -- 2. damaged data never reads as data ------------------------------------------------------------------


def flip_byte(path: Path, offset: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def test_bit_flip_fails_plain_zarr_and_probe(store, tmp_path):
    flip_byte(shard(store, 0))
    with pytest.raises((ValueError, RuntimeError), match="checksum|corrupt"):
        zarr.open_group(store, mode="r")["task/tokens"][0:8]
    with pytest.raises(StoreError, match="task/tokens/c/0/0/0/0"):
        open_store(store).task("task").read([1])
    with pytest.raises(StoreError, match="damaged"):
        probe(store, tmp_path / "runs")
    report = validate_store(store)
    assert not report.ok and any("chunk (0, 0, 0, 0)" in p and "corrupt" in p for p in report.problems)


def test_shifted_labels_in_the_sample_table_are_caught(store):
    path = store / "task" / "samples.parquet"
    table = pq.read_table(path)
    shifted = table.set_column(table.column_names.index("label"), "label",
                               pa.array((table.column("label").to_numpy() + 1) % 3))
    pq.write_table(shifted, path)
    report = validate_store(store)
    assert not report.ok and any("task/samples.parquet" in p for p in report.problems), report.problems
    with pytest.raises(StoreError, match="does not match the store's manifest"):
        open_store(store).task("task").samples


def test_edited_attribute_fails_validation(store):
    path = store / "task" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["combo_task"]["classes"] = ["a", "b", "c"]
    path.write_text(json.dumps(doc))
    report = validate_store(store)
    assert any("task/zarr.json" in p for p in report.problems) and any("consolidated" in p for p in report.problems)


# -- 3. teammates can read what combo writes ----------------------------------------------------------


def test_files_are_group_and_world_readable_as_the_umask_says(store, tmp_path):
    assert FILE_MODE == 0o666 & ~_umask()
    for path in [store / "manifest.json", store / "task" / "samples.parquet", store / "zarr.json", shard(store, 0)]:
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE, path
    copy = tmp_path / "copy.zarr"
    copy_store(str(store), str(copy))
    modes = {stat.S_IMODE(p.stat().st_mode) for p in copy.rglob("*") if p.is_file()}
    assert modes == {FILE_MODE}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- 4. xarray, dask and duckdb read a task with no combo code (the README's snippets) -------------------


def test_xarray_opens_a_task_as_a_labelled_dataset(store):
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(store, group="task")
    assert set(ds.tokens.dims) == {"sample", "layer", "token", "channel"}
    assert {"sample_id", "label", "valid", "train800", "val200", "test", "layer"} <= set(ds.coords)
    x = ds.tokens.sel(layer=1).isel(sample=ds.train800.values)
    table = open_store(store).task("task").samples
    rows = np.flatnonzero(table.column("in_train800").to_numpy(zero_copy_only=False))
    assert np.array_equal(x.values, open_store(store).task("task").read(rows, layers=[1])[:, 0])
    assert ds.tokens.attrs["long_name"].startswith("patch tokens")
    # format 2.2: sample_id is zero-padded UTF-8 bytes; the README's line makes them the rows' labels
    assert ds.sample_id.dims == ("sample", "sample_id_byte") and ds.sample_id.dtype == np.uint8
    ids = ds.sample_id.values.view(f"S{ds.sizes['sample_id_byte']}")[:, 0]
    ds = ds.assign_coords(sample_id=("sample", np.char.decode(ids, "utf-8")))
    assert list(ds.sample_id.values) == table.column("sample_id").to_pylist()
    assert list(ds.tokens.isel(sample=ds.train800.values).sample_id.values) == [
        table.column("sample_id")[int(r)].as_py() for r in rows]


def test_non_ascii_sample_ids_round_trip_and_a_nul_is_refused_before_writing(tmp_path):
    import xarray as xr

    ids = [f"i{i}" for i in range(N)]
    ids[4], ids[9] = "dtd/ünïcödé/画像 01.jpg", "Ørsted/çà.png"
    path = write_store(tmp_path / "u.zarr", tokens=np.zeros((N, L, 4, D), np.float32), labels=np.arange(N) % 3,
                       splits=vtab_like_splits(8, 8, 8), grid=GRID, layout=LAYOUT, sample_ids=ids)
    assert open_store(path).task("task").sample_ids == ids
    ds = xr.open_zarr(path, group="task")
    raw = ds.sample_id.values.view(f"S{ds.sizes['sample_id_byte']}")[:, 0]
    assert list(np.char.decode(raw, "utf-8")) == ids
    assert validate_store(path).ok
    from store_schema import build_sample_table
    from test_store_sharing import open_info

    table = build_sample_table(sample_ids=["a", "b\0c"], labels=[0, 0], splits=[("train",)] * 2, split_names=["train"])
    with StoreWriter(path, open_info(path), LAYOUT) as writer:
        with pytest.raises(StoreError, match=r"task 'bad'.*'b\\x00c' contains a NUL"):
            writer.task("bad", samples=table, num_layers=L, num_tokens=4, feature_dim=D, num_prefix_tokens=0,
                        protocols={"final": ("train", "train")}, classes=["a"])
    assert not (path / "bad").exists() and open_store(path).tasks == ["task"]


def test_readme_snippets_run(store):
    import dask.array as da
    import duckdb
    import xarray as xr

    ds = xr.open_zarr(store, group="task", chunks={"layer": -1})
    assert ds.tokens.data.chunksize[:2] == (8, L)  # a shard's rows x every layer
    ids = ds.sample_id.values.view(f"S{ds.sizes['sample_id_byte']}")[:, 0]
    ds = ds.assign_coords(sample_id=("sample", np.char.decode(ids, "utf-8")))
    x = ds.tokens.sel(layer=1).isel(sample=ds.train800.values)
    assert list(x.sample_id.values) == open_store(store).task("task").sample_ids[:8]  # train800: the first 8 rows
    tokens = zarr.open_group(store, mode="r")["task/tokens"]
    x = da.from_zarr(tokens, chunks=tokens.shards)
    assert x.chunksize == tokens.shards and x.mean(dtype="float32").compute() == pytest.approx(
        float(np.nanmean(tokens[:].astype(np.float32))), rel=1e-4)
    counts = duckdb.sql(f"select label, count(*) n from '{store}/task/samples.parquet' group by label order by label").fetchall()
    assert counts == [(0, 8), (1, 8), (2, 8)]


# -- 5. plain HTTP: consolidated metadata, few requests ------------------------------------------------


def test_http_open_costs_at_most_four_requests_and_no_404(store, tmp_path):
    with static_http_server(store.parent.parent) as server:
        url = f"{server.url}/synthetic/vtab.zarr"
        server.requests.clear()
        task = open_store(url).task("task")
        task.samples
        assert len(server.requests) <= 4, server.requests
        missing = [r for r in server.requests if not (server.folder / r.split(" ", 1)[1].lstrip("/")).is_file()]
        assert not missing, missing  # no 404s (no zarr v2 probes)
        assert np.array_equal(task.read([5, 2]), open_store(store).task("task").read([5, 2]))
        group = zarr.open_group(url, mode="r")
        assert {"task", "task/tokens", "task/label"} <= set(dict(group.members(max_depth=None)))


# -- 6. versioning ----------------------------------------------------------------------------------------


def test_minor_versions_read_major_refused_with_the_right_hint(store):
    doc = json.loads((store / "zarr.json").read_text())
    assert doc["attributes"]["combo"]["format_version"] == FORMAT_VERSION == "2.3"
    doc["attributes"]["combo"]["format_version"] = "2.9"  # a later minor: readers of 2.x read it
    doc.pop("consolidated_metadata")
    (store / "zarr.json").write_text(json.dumps(doc))
    assert open_store(store).task("task").num_samples == N
    doc["attributes"]["combo"]["format_version"] = "3.0"
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(SchemaVersionError, match=r"format 3\.0.*pip install -U combo-probe"):
        open_store(store)


def test_format_1_store_reads_read_only_and_overwrite_makes_format_2(tmp_path):
    from test_store_sharing import open_info

    path = write_v1_store(tmp_path / "v1.zarr")
    task = open_store(path).task("task")
    assert open_store(path).format_major == 1
    assert np.array_equal(task.read([3, 0]), V1_TOKENS[[3, 0]])
    assert validate_store(path).ok
    info = open_info(path)
    with pytest.raises(SchemaVersionError, match="store format 1.0.*--overwrite"):
        StoreWriter(path, info, LAYOUT)
    with StoreWriter(path, info, LAYOUT, overwrite=True) as writer:
        assert writer.attrs["format_version"] == FORMAT_VERSION and writer.attrs["schema_version"] == 2


FORMAT_21 = Path(__file__).parent / "data" / "format-2.1"  # stores as the 2.1 writer made them (its README.md)


def copy_21(tmp_path: Path, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(FORMAT_21 / name, tmp_path / name))


def test_format_2_1_stores_read_as_they_always_did(tmp_path):
    """2.1's layout (string sample_id, 0-filled compact integers) is still read, validated and decoded: the
    2.1 int8 store decodes exactly as a 2.3 compaction of the same source does (2.2's layout for one grid), whose
    codes are its codes."""
    import xarray as xr

    from store_schema.compact import CompactSpec
    from store_schema.compactor import compact_store

    full, small = open_store(FORMAT_21 / "full.zarr"), open_store(FORMAT_21 / "int8.zarr")
    assert full.format_version == small.format_version == (2, 1)
    tokens = np.load(FORMAT_21 / "tokens.npy")
    task = full.task("task")
    assert np.array_equal(task.read(np.arange(12)), tokens) and task.sample_ids[5] == "täsk/ünïcödé 画像.png"
    for path in ("full.zarr", "int8.zarr"):
        assert validate_store(FORMAT_21 / path, checksums="all").ok, path
        ds = xr.open_zarr(FORMAT_21 / path, group="task")
        assert list(ds.sample_id.values) == task.sample_ids  # 2.1: zarr-python strings, labels as they are
    zarr_json = json.loads((FORMAT_21 / "int8.zarr" / "task" / "codes" / "zarr.json").read_text())
    assert zarr_json["fill_value"] == 0
    fresh = compact_store(FORMAT_21 / "full.zarr", tmp_path / "int8.zarr", CompactSpec(int8=True)).store
    old, new = small.task("task"), open_store(fresh).task("task")
    assert open_store(fresh).format_version == (2, 3)
    for a, b in zip(old.read_encoded(np.arange(12)), new.read_encoded(np.arange(12))):
        assert np.array_equal(a, b, equal_nan=True)
    assert np.array_equal(old.read(np.arange(12)), new.read(np.arange(12)))
    assert np.isfinite(old.read(np.arange(12))).all()


@pytest.mark.parametrize("name", ["full.zarr", "int8.zarr"])
def test_a_2_1_store_extended_keeps_its_version_and_layout(tmp_path, name):
    """A task added to a 2.1 store by this writer is written as 2.1 wrote it, so the store stays one 2.1
    store (its version describes every task)."""
    from store_schema import build_sample_table
    from store_schema.compact import CompactSpec
    from store_schema.metadata import StoreInfo

    path = copy_21(tmp_path, name)
    attrs = open_store(path).attrs
    storage = attrs["storage"]
    layout = StoreLayout.from_attrs(storage)
    compact = CompactSpec.from_attrs(storage.get("compact"))
    ids = [f"new/{i}.png" for i in range(6)]
    ids[2] = "nëw/画.png"
    table = build_sample_table(sample_ids=ids, labels=[i % 2 for i in range(6)], splits=[("train",)] * 3 + [("test",)] * 3,
                               split_names=["train", "test"])
    data = np.random.default_rng(3).standard_normal((6, 2, 4, 8)).astype(np.float16)
    prefix = np.random.default_rng(4).standard_normal((6, 2, 1, 8)).astype(np.float16)
    with StoreWriter(path, StoreInfo.from_attrs(attrs), layout, compact=compact) as writer:
        assert writer.format_version == (2, 1)
        tw = writer.task("added", samples=table, num_layers=2, num_tokens=4, feature_dim=8, num_prefix_tokens=1,
                         protocols={"final": ("train", "test")}, classes=["a", "b"])
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, data[rows.start:rows.stop], prefix[rows.start:rows.stop])
        tw.finalize()
    store = open_store(path)
    assert store.attrs["format_version"] == "2.1" and store.tasks == ["added", "task"]
    meta = json.loads((path / "added" / "sample_id" / "zarr.json").read_text())
    assert meta["data_type"] == "string" and meta["dimension_names"] == ["sample"]
    assert json.loads(pq.read_schema(path / "added" / "samples.parquet").metadata[b"combo"])["format_version"] == "2.1"
    if compact is not None:
        for array in ("codes", "outlier_index"):
            assert json.loads((path / "added" / array / "zarr.json").read_text())["fill_value"] == 0, array
    added = store.task("added")
    assert added.sample_ids == ids
    got = added.read(np.arange(6))
    assert np.allclose(got, data, atol=0.05 if compact else 0) and np.array_equal(added.read(np.arange(6), prefix=True), prefix)
    report = validate_store(path, checksums="all")
    assert report.ok, report.problems
    # --overwrite with the store's own settings recomputes a run's tasks and keeps the others: the store stays 2.1
    with StoreWriter(path, StoreInfo.from_attrs(attrs), layout, compact=compact, overwrite=True) as writer:
        assert writer.attrs["format_version"] == "2.1" and writer.format_version == (2, 1)
        assert writer.has_task("task") and writer.has_task("added")


def test_validate_checks_the_sample_id_coordinate_against_the_version_and_the_table(store):
    """The layout follows the version: a 2.3 store with a string sample_id, or ids that disagree with the
    sample table, fails validation, naming the coordinate."""
    array = zarr.open_group(store, mode="r+")["task/sample_id"]
    array[:] = np.zeros(array.shape, np.uint8)  # ids gone
    report = validate_store(store)
    assert any("coordinate sample_id disagrees with samples.parquet from row 0" in p for p in report.problems), report.problems
    meta_path = store / "task" / "sample_id" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.update(data_type="string", fill_value="", shape=[N], dimension_names=["sample"],
                chunk_grid={"name": "regular", "configuration": {"chunk_shape": [N]}})
    meta["codecs"] = [{"name": "vlen-utf8", "configuration": {}}] + meta["codecs"][1:]
    meta_path.write_text(json.dumps(meta))
    report = validate_store(store)
    assert any("coordinate sample_id" in p and "format 2.3 stores it as 'uint8'" in p for p in report.problems), report.problems


V1_TOKENS = np.arange(16 * 2 * 4 * 8, dtype=np.float32).reshape(16, 2, 4, 8) / 100


def write_v1_store(path: Path) -> Path:
    """A store exactly as format 1 wrote it: fill 0, no checksum codec, no coordinates, no consolidated
    metadata, per-task checksums.json of the shards, integer schema_version 1."""
    import hashlib

    from zarr.codecs import BytesCodec, ZstdCodec

    from store_schema import build_sample_table

    root = {
        "schema_version": 1, "format": "combo-feature-store",
        "backbone": {"alias": "old", "timm_name": "synthetic", "pretrained_tag": None, "weights_source": "random-init",
                     "weights_sha256": None, "seed": 0},
        "preprocessing": {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                          "resize": "square, no crop", "crop": "none"},
        "features": {"token_grid": [2, 2], "num_prefix_tokens": 0, "layers": [0, 1], "feature_dim": 8,
                     "kind": "block output (residual stream), patch tokens", "num_tokens": 4, "num_layers": 2},
        "storage": {"dtype": "float32", "rows_per_shard": 8, "rows_per_chunk": 4, "layers_per_chunk": 1,
                    "codec": "zstd", "clevel": 1, "shuffle": "shuffle", "chunk_checksum": "sha256 of each stored shard object"},
        "dataset": {"name": "synthetic", "root": "/home/someone/data"}, "tasks": ["task"],
        "library_versions": {}, "created": "2026-01-01T00:00:00+00:00",
    }
    group = zarr.create_group(zarr.storage.LocalStore(path), zarr_format=3, attributes={"combo": root})
    task = group.create_group("task")
    tokens = task.create_array("tokens", shape=V1_TOKENS.shape, dtype="float32", chunks=(4, 1, 4, 8), shards=(8, 2, 4, 8),
                               compressors=(ZstdCodec(level=1),), serializer=BytesCodec(endian="little"), fill_value=0,
                               dimension_names=("sample", "layer", "token", "channel"))
    tokens[:] = V1_TOKENS
    table = build_sample_table(sample_ids=[f"i{i}" for i in range(16)], labels=[i % 2 for i in range(16)],
                               splits=vtab_like_splits(4, 4, 8), split_names=("train800", "val200", "train800val200", "test"))
    pq.write_table(table, path / "task" / "samples.parquet")
    sums = {f"c/{b}/0/0/0": hashlib.sha256((path / "task" / "tokens" / "c" / str(b) / "0" / "0" / "0").read_bytes()).hexdigest()
            for b in range(2)}
    (path / "task" / "checksums.json").write_text(json.dumps({"algorithm": "sha256", "arrays": {"tokens": sums}}))
    task.attrs["combo_task"] = {"task": "task", "group": None, "num_samples": 16,
                                "splits": {"train800": 4, "val200": 4, "train800val200": 8, "test": 8},
                                "protocols": {"dev": ["train800", "val200"], "final": ["train800val200", "test"]},
                                "classes": ["a", "b"], "complete": True, "skipped": []}
    return path


# -- 7. crash safety ---------------------------------------------------------------------------------------


def _writer_task(path: Path):
    from test_store_sharing import open_info

    writer = StoreWriter(path, open_info(path), LAYOUT)
    table = open_store(path).task("task").samples
    tw = writer.task("again", samples=table.replace_schema_metadata(None), num_layers=L, num_tokens=4, feature_dim=D,
                     num_prefix_tokens=0, protocols={"final": ("train800val200", "test")}, classes=["0", "1", "2"])
    return writer, tw


def test_resume_redoes_a_journaled_shard_that_was_cut_short(store):
    data = np.random.default_rng(1).standard_normal((N, L, 4, D)).astype(np.float32)
    writer, tw = _writer_task(store)
    for b in (0, 1):
        tw.write_block(b, data[tw.blocks[b].start:tw.blocks[b].stop])
    writer.close()  # killed here
    cut = shard(store, 1, task="again")
    cut.write_bytes(cut.read_bytes()[:-20])  # the page cache never reached the disk
    writer, tw = _writer_task(store)
    assert tw.pending() == [1, 2]  # block 0 re-verified and kept, block 1 redone
    for b in tw.pending():
        tw.write_block(b, data[tw.blocks[b].start:tw.blocks[b].stop])
    tw.finalize()
    writer.close()
    assert validate_store(store).ok
    assert np.allclose(open_store(store).task("again").read(np.arange(N)), data)


@pytest.mark.parametrize("step", ["consolidate", "manifest", "journal"])
def test_kill_anywhere_in_finalize_is_completed_by_the_next_writer(store, monkeypatch, step):
    data = np.random.default_rng(2).standard_normal((N, L, 4, D)).astype(np.float32)
    writer, tw = _writer_task(store)
    for b in tw.pending():
        tw.write_block(b, data[tw.blocks[b].start:tw.blocks[b].stop])

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    if step == "consolidate":
        monkeypatch.setattr(StoreWriter, "consolidate", die)
    elif step == "manifest":
        monkeypatch.setattr(Location, "write_bytes", die)
    else:
        monkeypatch.setattr(Path, "unlink", die)
    with pytest.raises(Killed):
        tw.finalize()
    monkeypatch.undo()
    writer.close()
    shards_before = sorted(p.name for p in (store / "again" / "tokens" / "c").iterdir())
    if step != "journal":
        with pytest.raises(StoreError):
            open_store(store).task("again").read([0])
    writer, tw = _writer_task(store)  # the next run
    assert tw.complete
    writer.close()
    assert sorted(p.name for p in (store / "again" / "tokens" / "c").iterdir()) == shards_before  # nothing deleted
    assert not (store / "again" / ".journal.jsonl").exists()
    assert validate_store(store).ok
    assert np.allclose(open_store(store).task("again").read(np.arange(N)), data)


# -- 9. push / pull ---------------------------------------------------------------------------------------


def test_push_of_an_identical_store_transfers_no_object_bodies(store, tmp_path, monkeypatch):
    dest = tmp_path / "team" / "vtab.zarr"
    first = copy_store(str(store), str(dest))
    assert first.copied == first.objects and first.verified == first.copied
    reads: list[str] = []
    real = Location.read_bytes

    def spy(self, key):
        if str(self.root).startswith(str(dest)):
            reads.append(key)
        return real(self, key)

    monkeypatch.setattr(Location, "read_bytes", spy)
    again = copy_store(str(store), str(dest))
    assert again.copied == 0 and again.skipped == again.objects and again.verified == 0
    # the destination's manifest decides; only small metadata is read (by the final structure check)
    assert "manifest.json" in reads and not [k for k in reads if "/tokens/c/" in k], reads


def test_default_verify_reads_back_only_what_was_written(store, tmp_path, monkeypatch):
    dest = tmp_path / "team" / "vtab.zarr"
    copy_store(str(store), str(dest))
    shard(dest, 2).unlink()  # an interrupted re-copy lost one object
    (dest / "manifest.json").unlink()
    again = copy_store(str(store), str(dest))
    assert again.copied == 2 and again.verified == 2  # the shard, then the manifest


# -- 10. the small things ----------------------------------------------------------------------------------


def test_no_lock_no_local_paths_no_warnings_and_parquet_metadata(store, tmp_path):
    assert not (store / ".combo-write.lock").exists()
    text = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file() and p.suffix in (".json", ""))
    assert str(tmp_path).encode() not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(store, mode="r").members(max_depth=None))
    assert "task/tokens" in members
    meta = json.loads(pq.read_schema(store / "task" / "samples.parquet").metadata[b"combo"])
    assert meta["classes"] == ["0", "1", "2"] and meta["format_version"] == FORMAT_VERSION and meta["task"] == "task"


def test_weights_file_is_recorded_by_name_and_hash_only():
    from store_schema import BackboneInfo

    info = BackboneInfo(alias="a", timm_name="t", pretrained_tag=None, weights_source="file:/home/me/w/model.safetensors",
                        weights_sha256="0" * 64)
    assert info.to_attrs()["weights_source"] == "file:model.safetensors"


def test_validate_checks_the_published_json_schema(store):
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["combo"]["storage"]["dtype"] = "int8"
    path.write_text(json.dumps(doc))
    report = validate_store(store)
    assert any("storage.dtype" in p and "format-2.schema.json" in p for p in report.problems), report.problems


def test_unreadable_task_metadata_with_shards_is_never_deleted(store):
    (store / "task" / "zarr.json").write_text('{"attributes": {"combo_ta')  # cut short (zarr < 3.1.3, or bit rot)
    with pytest.raises(StoreError, match="nothing was deleted"):
        _writer_task_named(store, "task")
    assert shard(store, 0).exists() and shard(store, 2).exists()


def _writer_task_named(path: Path, name: str):
    from test_store_sharing import open_info

    table = pq.read_table(path / "task" / "samples.parquet")
    with StoreWriter(path, open_info(path), LAYOUT) as writer:
        return writer.task(name, samples=table, num_layers=L, num_tokens=4, feature_dim=D, num_prefix_tokens=0,
                           protocols={"final": ("train800val200", "test")}, classes=["0", "1", "2"])
