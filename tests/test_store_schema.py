"""The store contract: round trip, metadata, validation failures, locking, resume."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from store_schema import (
    SCHEMA_VERSION,
    SchemaVersionError,
    StoreError,
    StoreIncompleteError,
    StoreLayout,
    StoreLockedError,
    StoreMismatchError,
    StoreWriter,
    build_sample_table,
    open_store,
    validate_store,
)
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 20, 3, (2, 3), 8


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(N, L, GRID[0] * GRID[1], D)).astype(np.float32)
    prefix = rng.normal(size=(N, L, 1, D)).astype(np.float32)
    labels = rng.integers(0, 4, N)
    return tokens, prefix, labels


@pytest.fixture
def store(tmp_path, arrays):
    tokens, prefix, labels = arrays
    return write_store(tmp_path / "syn" / "data.zarr", tokens=tokens, prefix=prefix, labels=labels,
                       splits=vtab_like_splits(8, 4, 8), grid=GRID, num_classes=4)


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_values_and_metadata(store, arrays):
    tokens, prefix, labels = arrays
    fs = open_store(store)
    task = fs.task("task")
    assert task.tokens.shape == (N, L, 6, D) and task.tokens.dtype == np.float16
    np.testing.assert_allclose(task.read(slice(None)), tokens, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(task.read(slice(None), prefix=True), prefix, atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(task.labels, labels)
    np.testing.assert_array_equal(task.rows("test"), np.arange(12, 20))
    np.testing.assert_array_equal(task.rows("train800val200"), np.arange(12))
    # arbitrary order and layer subsets come back in the asked order
    got = task.read([7, 2, 3, 15], layers=[2, 0])
    np.testing.assert_allclose(got, tokens[[7, 2, 3, 15]][:, [2, 0]], atol=2e-3, rtol=1e-3)
    assert fs.attrs["schema_version"] == SCHEMA_VERSION
    for key in ("backbone", "preprocessing", "features", "storage", "library_versions", "created", "dataset"):
        assert key in fs.attrs
    assert fs.attrs["features"]["token_grid"] == [2, 3]
    assert task.attrs["splits"] == {"train800": 8, "val200": 4, "train800val200": 12, "test": 8}
    assert task.complete
    lazy = task.to_dask(layer=1, split="val200")
    assert lazy.shape == (4, 6, D)
    np.testing.assert_allclose(lazy.compute(), tokens[8:12, 1], atol=2e-3, rtol=1e-3)


def test_float32_is_exact(tmp_path, arrays):
    tokens, _, labels = arrays
    path = write_store(tmp_path / "f32.zarr", tokens=tokens, labels=labels, splits=vtab_like_splits(8, 4, 8),
                       grid=GRID, layout=StoreLayout(dtype="float32", rows_per_shard=8, rows_per_chunk=8))
    np.testing.assert_array_equal(open_store(path).task("task").read(slice(None)), tokens)


def test_bfloat16_refused_with_reason():
    with pytest.raises(ValueError, match="bfloat16"):
        StoreLayout(dtype="bfloat16")


def test_readable_with_plain_zarr_dask_pyarrow(store, arrays):
    tokens, _, labels = arrays
    script = textwrap.dedent(f"""
        import sys, json
        import numpy as np, zarr, dask.array as da, pyarrow.parquet as pq
        g = zarr.open_group({str(store)!r}, mode="r")
        meta = g.attrs["combo"]
        t = g["task/tokens"]
        x = da.from_zarr(t, chunks=(meta["storage"]["rows_per_shard"],) + t.shape[1:]).compute()
        table = pq.read_table({str(store / 'task' / 'samples.parquet')!r})
        assert not any(m.split(".")[0] in ("store_schema", "extract", "probe", "combo") for m in sys.modules)
        np.save(sys.argv[1], x.astype("float32"))
        print(json.dumps({{"labels": table.column("label").to_pylist(), "grid": meta["features"]["token_grid"]}}))
    """)
    out = Path(store).parent / "plain.npy"
    res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True,
                         cwd=Path(store).parent)
    doc = json.loads(res.stdout)
    assert doc["labels"] == list(map(int, labels)) and doc["grid"] == [2, 3]
    np.testing.assert_allclose(np.load(out), tokens, atol=2e-3, rtol=1e-3)


def test_reading_and_validating_never_write(store):
    before = snapshot(store)
    fs = open_store(store)
    fs.task("task").read(slice(None))
    assert validate_store(store).ok
    assert snapshot(store) == before


def test_validate_names_corrupt_chunk(store):
    chunk = store / "task" / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = validate_store(store)
    assert not report.ok
    assert any("array tokens chunk (1, 0, 0, 0)" in p and "corrupt" in p for p in report.problems), report.problems
    assert report.tasks["task"] == "invalid"


def test_validate_reports_missing_chunk(store):
    (store / "task" / "prefix" / "c" / "2" / "0" / "0" / "0").unlink()
    report = validate_store(store, checksums="none")
    assert any("array prefix chunk (2, 0, 0, 0)" in p and "missing" in p for p in report.problems), report.problems


def test_truncated_zarr_json_is_a_clear_error(store):
    meta = store / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(store)
    report = validate_store(store)
    assert not report.ok and "zarr.json" in report.problems[0]


def test_truncated_array_metadata_reported(store):
    meta = store / "task" / "tokens" / "zarr.json"
    meta.write_text(meta.read_text()[:30])
    report = validate_store(store)
    assert any("tokens" in p and "not valid JSON" in p for p in report.problems), report.problems


def test_newer_schema_version_refused(store):
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["combo"]["format_version"] = f"{SCHEMA_VERSION + 1}.0"
    meta.write_text(json.dumps(doc))
    with pytest.raises(SchemaVersionError, match=rf"format {SCHEMA_VERSION + 1}\.0.*pip install -U combo-probe"):
        open_store(store)


def _info_and_table(n=N, dim=D):
    from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo

    info = StoreInfo(
        backbone=BackboneInfo("m", "vit_x", None, "random-init", None, 0),
        preprocessing=Preprocessing(32, (0.5,) * 3, (0.5,) * 3),
        features=FeatureInfo((2, 3), 0, tuple(range(L)), dim),
        dataset="d",
    )
    table = build_sample_table(sample_ids=[f"s{i}" for i in range(n)], labels=[0] * n,
                               splits=vtab_like_splits(8, 4, n - 12), split_names=["train800", "val200", "train800val200", "test"])
    return info, table


def _task(writer, table):
    return writer.task("t", samples=table, num_layers=L, num_tokens=6, feature_dim=D, num_prefix_tokens=0,
                       protocols={"dev": ("train800", "val200")}, classes=["a"])


def test_second_writer_refused_then_allowed(tmp_path):
    info, table = _info_and_table()
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    with StoreWriter(tmp_path / "s.zarr", info, layout):
        with pytest.raises(StoreLockedError, match="being written by pid"):
            StoreWriter(tmp_path / "s.zarr", info, layout)
    with StoreWriter(tmp_path / "s.zarr", info, layout):
        pass


def test_resume_from_journal_and_incomplete_reads_refused(tmp_path):
    info, table = _info_and_table()
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    x = np.ones((N, L, 6, D), np.float32)
    path = tmp_path / "s.zarr"
    with StoreWriter(path, info, layout) as w:
        tw = _task(w, table)
        assert tw.pending() == [0, 1, 2]
        tw.write_block(0, x[:8])
    # a torn last journal line (killed mid-append) is ignored
    with open(path / "t" / ".journal.jsonl", "a") as f:
        f.write('{"block": 1, "check')
    task = open_store(path).task("t")
    assert not task.complete
    with pytest.raises(StoreIncompleteError, match="rerun"):
        task.require_complete()
    report = validate_store(path)
    assert report.tasks["t"] == "incomplete"
    assert any("incomplete" in p for p in report.problems), report.problems
    with StoreWriter(path, info, layout) as w:
        tw = _task(w, table)
        assert tw.pending() == [1, 2]
        for b in tw.pending():
            tw.write_block(b, x[tw.blocks[b].start:tw.blocks[b].stop])
        tw.finalize()
    assert validate_store(path).ok
    assert not (path / "t" / ".journal.jsonl").exists()


def test_other_settings_refused_unless_overwrite(tmp_path):
    info, table = _info_and_table()
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    path = tmp_path / "s.zarr"
    with StoreWriter(path, info, layout):
        pass
    with pytest.raises(StoreMismatchError, match="storage.dtype"):
        StoreWriter(path, info, StoreLayout(dtype="float32", rows_per_shard=8, rows_per_chunk=4))
    with StoreWriter(path, info, StoreLayout(dtype="float32", rows_per_shard=8, rows_per_chunk=4), overwrite=True) as w:
        assert w.attrs["storage"]["dtype"] == "float32"


def _with_backbone(info, **changes):
    from dataclasses import replace

    return replace(info, backbone=replace(info.backbone, **changes))


def test_store_of_another_checkpoint_refused_naming_both(tmp_path):
    """in21k used to name augreg_in21k: a store made with it must not take orig_in21k features."""
    info, _ = _info_and_table()
    augreg = _with_backbone(info, alias="in21k", timm_name="vit_base_patch16_224", pretrained_tag="augreg_in21k")
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    path = tmp_path / "s.zarr"
    with StoreWriter(path, augreg, layout):
        pass
    with pytest.raises(StoreMismatchError) as err:
        StoreWriter(path, _with_backbone(augreg, pretrained_tag="orig_in21k"), layout)
    msg = str(err.value)
    assert (f"store {path} was made with checkpoint vit_base_patch16_224.augreg_in21k, while this run uses "
            "vit_base_patch16_224.orig_in21k") in msg
    assert "--overwrite" in msg and "--out" in msg and "backbone.pretrained_tag" in msg
    # any other architecture or tag reads the same way, untagged names included
    with StoreWriter(tmp_path / "t.zarr", info, layout):
        pass
    with pytest.raises(StoreMismatchError, match=r"checkpoint vit_x \(timm's default tag\), while this run uses vit_y "):
        StoreWriter(tmp_path / "t.zarr", _with_backbone(info, timm_name="vit_y"), layout)
    with StoreWriter(path, _with_backbone(augreg, pretrained_tag="orig_in21k"), layout, overwrite=True) as w:
        assert w.attrs["backbone"]["pretrained_tag"] == "orig_in21k"


def test_model_kwargs_recorded_only_when_given_and_part_of_identity(tmp_path):
    info, _ = _info_and_table()
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    old = tmp_path / "old.zarr"
    with StoreWriter(old, info, layout):
        pass
    # a store written before model_kwargs were recorded has no key, and no key means none
    assert "model_kwargs" not in json.loads((old / "zarr.json").read_text())["attributes"]["combo"]["backbone"]
    for none in (None, {}):
        with StoreWriter(old, _with_backbone(info, model_kwargs=none), layout):
            pass
    with pytest.raises(StoreMismatchError, match=r"(?s)other settings.*backbone.model_kwargs: store has None, asked for \{'depth': 2\}"):
        StoreWriter(old, _with_backbone(info, model_kwargs={"depth": 2}), layout)
    custom = _with_backbone(info, model_kwargs={"depth": 2, "global_attn_indexes": (1,), "act_layer": "gelu"})
    with StoreWriter(tmp_path / "new.zarr", custom, layout) as w:
        assert w.attrs["backbone"]["model_kwargs"] == {"depth": 2, "global_attn_indexes": [1], "act_layer": "gelu"}
    with StoreWriter(tmp_path / "new.zarr", custom, layout):  # resumable: tuples and lists compare equal
        pass
    for other in (None, {"depth": 3, "global_attn_indexes": [1], "act_layer": "gelu"}):
        with pytest.raises(StoreMismatchError, match="backbone.model_kwargs"):
            StoreWriter(tmp_path / "new.zarr", _with_backbone(info, model_kwargs=other), layout)


@pytest.mark.parametrize("value", [object(), float("nan"), {1: 2}, [b"x"]])
def test_model_kwargs_must_be_plain_json(value):
    info, _ = _info_and_table()
    with pytest.raises(ValueError, match=r"model_kwargs\['norm_layer'\] = .* plain JSON"):
        _with_backbone(info, model_kwargs={"depth": 2, "norm_layer": value})


def test_changed_sample_plan_refused(tmp_path):
    info, table = _info_and_table()
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4)
    path = tmp_path / "s.zarr"
    with StoreWriter(path, info, layout) as w:
        _task(w, table)
    _, other = _info_and_table(n=N + 1)
    with StoreWriter(path, info, layout) as w:
        with pytest.raises(StoreMismatchError, match="other samples"):
            _task(w, other)


def test_float16_overflow_is_refused_not_stored_as_inf(tmp_path):
    info, table = _info_and_table()
    with StoreWriter(tmp_path / "s.zarr", info, StoreLayout(rows_per_shard=8, rows_per_chunk=4)) as w:
        tw = _task(w, table)
        x = np.zeros((8, L, 6, D), np.float32)
        x[3, 0, 0, 0] = 1e6
        with pytest.raises(StoreError, match=r"rows \[3\].*float32"):
            tw.write_block(0, x)
        assert tw.pending() == [0, 1, 2]
