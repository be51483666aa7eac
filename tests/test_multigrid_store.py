"""Store format 2.3: multi-grid stores (one array per (grid, width) group of a hierarchical model's layers).

Written straight through StoreWriter (no backbone): three groups like a small hierarchical model's stages,
8x8x16 (layers 0, 1), 4x4x32 (layers 2, 3) and 2x2x64 (layer 4)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from store_schema import (
    BackboneInfo,
    FeatureInfo,
    FeatureStore,
    GridSpec,
    Preprocessing,
    SchemaVersionError,
    ShardWriter,
    StoreError,
    StoreIncompleteError,
    StoreInfo,
    StoreLayout,
    StoreWriter,
    build_sample_table,
    copy_store,
    grid_array,
    group_layers,
    open_store,
    pack_store,
    validate_store,
)
from store_schema.compact import CompactSpec, CompactSpecError
from store_schema.metadata import FORMAT_VERSION
from storefactory import vtab_like_splits, write_store

N = 12
SPLITS = vtab_like_splits(4, 4, 4)
LAYER_GRIDS = [(8, 8), (8, 8), (4, 4), (4, 4), (2, 2)]
LAYER_WIDTHS = [16, 16, 32, 32, 64]
GRIDS = tuple(group_layers(range(5), LAYER_GRIDS, LAYER_WIDTHS))
LAYOUT = StoreLayout(rows_per_shard=4, dtype="float32")
# listing a task folder with plain zarr meets samples.parquet, which zarr notes is not one of its nodes
pytestmark = pytest.mark.filterwarnings("ignore:.*not recognized as a component of a Zarr hierarchy")


def info(grids=GRIDS, *, alias: str = "hiera") -> StoreInfo:
    last = grids[-1]
    return StoreInfo(
        backbone=BackboneInfo(alias=alias, timm_name="synthetic", pretrained_tag=None, weights_source="random-init",
                              weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        features=FeatureInfo(token_grid=last.token_grid, num_prefix_tokens=0,
                             layers=tuple(l for g in grids for l in g.layers), feature_dim=last.feature_dim,
                             grids=tuple(grids) if len(grids) > 1 else None),
        dataset="synthetic",
    )


def group_tokens(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for g in GRIDS:
        x = rng.standard_normal((N, g.num_layers, g.num_tokens, g.feature_dim)).astype(np.float32)
        x += np.arange(g.feature_dim, dtype=np.float32) / g.feature_dim  # some structure for PCA
        out.append(x)
    return out


def table():
    return build_sample_table(sample_ids=[f"task/img{i:03d}.png" for i in range(N)], labels=[i % 3 for i in range(N)],
                              splits=SPLITS, split_names=("train800", "val200", "train800val200", "test"))


def new_task(writer: StoreWriter, name: str = "task", **kwargs):
    last = GRIDS[-1]
    return writer.task(name, samples=table(), num_layers=last.num_layers, num_tokens=last.num_tokens,
                       feature_dim=last.feature_dim, num_prefix_tokens=0,
                       protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")},
                       classes=["a", "b", "c"], **kwargs)


def write_multi(path: Path, tokens: list[np.ndarray] | None = None, *, layout: StoreLayout = LAYOUT,
                compact: CompactSpec | None = None, pca=None) -> Path:
    tokens = group_tokens() if tokens is None else tokens
    with StoreWriter(path, info(), layout, compact=compact) as writer:
        tw = new_task(writer, pca=pca)
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, [t[rows.start:rows.stop] for t in tokens])
        tw.finalize()
    return path


@pytest.fixture
def store(tmp_path) -> Path:
    return write_multi(tmp_path / "hiera" / "synthetic.zarr")


def shard(path: Path, array: str, block: int, task: str = "task") -> Path:
    return path / task / array / "c" / str(block) / "0" / "0" / "0"


# -- the grouping rule ----------------------------------------------------------------------------------------


def test_group_layers_groups_by_grid_and_width_in_layer_order():
    assert [(g.name, g.token_grid, g.feature_dim, g.layers) for g in GRIDS] == [
        ("g0", (8, 8), 16, (0, 1)), ("g1", (4, 4), 32, (2, 3)), ("g2", (2, 2), 64, (4,))]
    assert GRIDS[0].num_tokens == 64 and GRIDS[0].num_layers == 2
    # the order the layers are given in does not matter: index order does
    assert group_layers([4, 0, 2], [(2, 2), (8, 8), (4, 4)], [64, 16, 32]) == [
        GridSpec("g0", (8, 8), 16, (0,)), GridSpec("g1", (4, 4), 32, (2,)), GridSpec("g2", (2, 2), 64, (4,))]
    # one (grid, width): a single-grid store, its group named ""
    assert group_layers([0, 1], [(14, 14)] * 2, [768, 768]) == [GridSpec("", (14, 14), 768, (0, 1))]
    # the same grid with another width is another group
    assert len(group_layers([0, 1], [(7, 7)] * 2, [384, 768])) == 2
    with pytest.raises(ValueError, match=r"layers \[0\] and \[2\] share grid 8x8 and width 16 but are not contiguous"):
        group_layers([0, 1, 2], [(8, 8), (4, 4), (8, 8)], [16, 32, 16])
    with pytest.raises(ValueError, match="one grid and one width per layer"):
        group_layers([0, 1], [(8, 8)], [16, 16])


def test_grid_array_names_group_arrays():
    assert grid_array("tokens", "g1") == "tokens_g1" and grid_array("tokens", "") == "tokens"


def test_feature_info_records_grids_and_refuses_inconsistent_ones():
    attrs = info().to_attrs(storage={}, tasks=[])
    feats = attrs["features"]
    assert attrs["format_version"] == FORMAT_VERSION == "2.3"
    assert feats["grids"][1] == {"name": "g1", "token_grid": [4, 4], "num_tokens": 16, "feature_dim": 32, "layers": [2, 3]}
    assert feats["token_grid"] == [2, 2] and feats["feature_dim"] == 64 and feats["num_layers"] == 5
    assert feats["layers"] == [0, 1, 2, 3, 4] and feats["num_prefix_tokens"] == 0
    assert StoreInfo.from_attrs(attrs).features == info().features  # round trip
    assert "grids" not in write_attrs_single()["features"]  # single-grid: 2.2's document
    with pytest.raises(ValueError, match="not the last group's"):
        FeatureInfo(token_grid=(4, 4), num_prefix_tokens=0, layers=(0, 1, 2, 3, 4), feature_dim=32, grids=GRIDS)
    with pytest.raises(ValueError, match="no prefix tokens"):
        FeatureInfo(token_grid=(2, 2), num_prefix_tokens=1, layers=(0, 1, 2, 3, 4), feature_dim=64, grids=GRIDS)
    with pytest.raises(ValueError, match="expected features.layers"):
        FeatureInfo(token_grid=(2, 2), num_prefix_tokens=0, layers=(0, 1, 2, 3), feature_dim=64, grids=GRIDS)


def write_attrs_single() -> dict:
    return info(group_layers([0, 1], [(4, 4)] * 2, [32, 32])).to_attrs(storage={}, tasks=[])


# -- writing and reading back ---------------------------------------------------------------------------------


def test_multi_grid_task_reads_back_bit_exact_per_group(store):
    tokens = group_tokens()
    fs = open_store(store)
    assert fs.multi_grid and [g.name for g in fs.grids] == ["g0", "g1", "g2"] and fs.grids == list(GRIDS)
    task = fs.task("task")
    assert task.grid is None and task.tokens is None
    parts = task.grid_tasks()
    assert [p.grid for p in parts] == list(GRIDS)
    rows = np.array([7, 0, 11, 3, 3])
    for part, grid, x in zip(parts, GRIDS, tokens):
        assert part.tokens.path == f"task/tokens_{grid.name}"
        assert part.store.token_grid == grid.token_grid and part.store.feature_dim == grid.feature_dim
        assert part.store.num_layers == grid.num_layers and part.store.features["layers"] == list(grid.layers)
        assert part.store.num_prefix_tokens == 0 and part.prefix is None
        assert part.store.url == fs.url and part.store.tasks == fs.tasks and part.store.backbone == fs.backbone
        assert np.array_equal(part.read(rows), x[rows])
        assert np.array_equal(part.read(rows, layers=[grid.num_layers - 1]), x[rows][:, -1:])
        assert np.array_equal(part.rows("train800"), task.rows("train800")) and part.sample_ids == task.sample_ids
        assert part.grid_tasks() == [part] and task.grid_task(grid.name).grid == grid
    assert sum(p.bytes_read for p in parts) > 0
    # the layout: one array and one layer coordinate per group; no tokens, no layer, no prefix
    group = zarr.open_group(store / "task", mode="r")
    names = set(group.array_keys())
    assert {"tokens_g0", "tokens_g1", "tokens_g2", "layer_g0", "layer_g1", "layer_g2"} <= names
    assert not names & {"tokens", "layer", "prefix"}
    assert group["tokens_g1"].metadata.dimension_names == ("sample", "layer_g1", "token_g1", "channel_g1")
    assert list(group["layer_g1"][...]) == [2, 3] and group["layer_g1"].metadata.dimension_names == ("layer_g1",)


def test_the_multi_grid_task_itself_refuses_to_read_pointing_to_grid_tasks(store):
    task = open_store(store).task("task")
    for call in (lambda: task.read([0]), lambda: task.to_dask(), lambda: task.read_encoded([0])):
        with pytest.raises(StoreError, match=r"multi-grid.*groups g0, g1, g2.*grid_tasks\(\)"):
            call()
    assert task.num_samples == N and list(task.labels[:4]) == [0, 1, 2, 0]  # the rest of the task reads as ever


def test_rows_per_shard_are_sized_by_the_whole_rows_bytes(tmp_path):
    row = sum(g.num_layers * g.num_tokens * g.feature_dim for g in GRIDS) * 2  # float16
    layout = StoreLayout(shard_bytes=row * 5)
    path = write_multi(tmp_path / "s.zarr", [t.astype(np.float16) for t in group_tokens()], layout=layout)
    fs = open_store(path)
    assert fs.layout.rows_per_shard == 5
    for grid in GRIDS:
        array = fs.group[f"task/tokens_{grid.name}"]
        assert (array.shards or array.chunks)[0] == 5  # every group shares the row shards
    assert sorted(p.name for p in (path / "task" / "tokens_g2" / "c").iterdir()) == ["0", "1", "2"]


def test_a_single_array_for_a_multi_grid_store_is_refused_naming_the_groups(tmp_path):
    tokens = group_tokens()
    with StoreWriter(tmp_path / "s.zarr", info(), LAYOUT) as writer:
        tw = new_task(writer)
        with pytest.raises(StoreError, match=r"one array per grid group, in order \(g0 \[4, 2, 64, 16\], g1 \[4, 2, 16, 32\], "
                                             r"g2 \[4, 1, 4, 64\]\); got one array of shape \(4, 1, 4, 64\)"):
            tw.write_block(0, tokens[2][:4])
        with pytest.raises(StoreError, match="block 0 of tokens_g1 has shape"):
            tw.write_block(0, [tokens[0][:4], tokens[0][:4], tokens[2][:4]])


def test_shard_writer_open_writes_every_group(tmp_path):
    """A worker of a distributed extraction (extract/cluster.py) knows the groups from the store's metadata."""
    tokens = group_tokens()
    path = tmp_path / "s.zarr"
    with StoreWriter(path, info(), LAYOUT) as writer:
        tw = new_task(writer)
        shards = ShardWriter.open(path, "task")
        assert [n for n, _ in shards.arrays()] == ["tokens_g0", "tokens_g1", "tokens_g2"]
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.record(shards.write(b, [t[rows.start:rows.stop] for t in tokens]))
        tw.finalize()
    parts = open_store(path).task("task").grid_tasks()
    assert all(np.array_equal(p.read(np.arange(N)), x) for p, x in zip(parts, tokens))


def test_a_killed_run_resumes_and_a_damaged_group_shard_is_redone(tmp_path):
    tokens = group_tokens()
    path = tmp_path / "s.zarr"
    with StoreWriter(path, info(), LAYOUT) as writer:
        tw = new_task(writer)
        tw.write_block(0, [t[0:4] for t in tokens])
    shard(path, "tokens_g1", 0).write_bytes(b"cut short")  # a shard of one group killed mid-write
    with StoreWriter(path, info(), LAYOUT) as writer:
        tw = new_task(writer)
        assert tw.pending() == [0, 1, 2]  # the block is redone: one of its group shards does not hash
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, [t[rows.start:rows.stop] for t in tokens])
        tw.finalize()
    shard(path, "tokens_g2", 1).unlink()
    with StoreWriter(path, info(), LAYOUT) as writer:
        assert writer.damaged("task") == ["task/tokens_g2/c/1/0/0/0"]
        tw = new_task(writer)
        assert tw.reopen_for_repair(writer.damaged("task")) == [1]
        assert tw.pending() == [1]
        tw.write_block(1, [t[4:8] for t in tokens])
        tw.finalize()
    assert validate_store(path).ok
    parts = open_store(path).task("task").grid_tasks()
    assert all(np.array_equal(p.read(np.arange(N)), x) for p, x in zip(parts, tokens))


# -- plain readers: xarray, dask ------------------------------------------------------------------------------


def test_xarray_opens_a_multi_grid_task_each_group_with_its_own_dims(store):
    """store_schema/README.md's multi-grid xarray snippet."""
    import xarray as xr

    tokens = group_tokens()
    ds = xr.open_zarr(store, group="task", chunks={"layer_g0": -1, "layer_g1": -1, "layer_g2": -1})
    assert ds.tokens_g0.dims == ("sample", "layer_g0", "token_g0", "channel_g0")
    assert ds.tokens_g2.dims == ("sample", "layer_g2", "token_g2", "channel_g2")
    assert ds.sizes["token_g0"] == 64 and ds.sizes["channel_g1"] == 32 and ds.sizes["layer_g2"] == 1
    assert list(ds.layer_g1.values) == [2, 3]
    x = ds.tokens_g1.sel(layer_g1=3).isel(sample=ds.train800.values)  # a layer of a split, by model layer index
    assert np.array_equal(x.values, tokens[1][np.asarray(ds.train800.values)][:, 1])
    assert ds.tokens_g0.data.chunksize[:2] == (4, 2)  # a shard's rows x every layer of the group


def test_dask_reads_each_group(store):
    import dask.array as da

    tokens = group_tokens()
    task = open_store(store).task("task")
    for part, x in zip(task.grid_tasks(), tokens):
        lazy = part.to_dask(split="test", layer=0)
        assert lazy.chunks[0][0] <= 4
        assert np.array_equal(lazy.compute(), x[task.rows("test")][:, 0])
    t = zarr.open_group(store, mode="r")["task/tokens_g1"]  # the README's plain dask line
    assert np.array_equal(da.from_zarr(t, chunks=t.shards).compute(), tokens[1])


def test_tensorstore_reads_a_group_array(store):
    ts = pytest.importorskip("tensorstore")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "task" / "tokens_g1")}}
    assert np.array_equal(ts.open(spec).result().read().result(), group_tokens()[1])


# -- validation and missing data ------------------------------------------------------------------------------


def test_validate_passes_and_names_a_corrupt_or_missing_group_shard(store):
    report = validate_store(store, checksums="all")
    assert report.ok, report.problems
    assert report.chunks_checked == 9  # 3 shards x 3 groups
    path = shard(store, "tokens_g1", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    shard(store, "tokens_g2", 2).unlink()
    problems = validate_store(store, checksums="all").problems
    assert any("array tokens_g1 chunk (1, 0, 0, 0) [task/tokens_g1/c/1/0/0/0] is corrupt" in p for p in problems), problems
    assert any("array tokens_g2 chunk (2, 0, 0, 0) [task/tokens_g2/c/2/0/0/0] is missing" in p for p in problems), problems


def test_validate_catches_grids_that_disagree_with_the_arrays(store):
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["combo"]["features"]["grids"][1]["feature_dim"] = 48
    (store / "zarr.json").write_text(json.dumps(doc))
    problems = validate_store(store).problems
    assert any("array tokens_g1 has shape (12, 2, 16, 32), expected (12, 2, 16, 48)" in p for p in problems), problems
    doc["attributes"]["combo"]["features"]["grids"][1]["feature_dim"] = 32
    doc["attributes"]["combo"]["features"]["grids"][1]["layers"] = [3, 2]
    (store / "zarr.json").write_text(json.dumps(doc))
    problems = validate_store(store).problems
    assert any("features.grids hold layers [0, 1, 3, 2, 4]" in p for p in problems), problems
    doc["attributes"]["combo"]["features"]["grids"][1]["layers"] = [2, 3]
    (store / "zarr.json").write_text(json.dumps(doc))
    zarr.open_group(store, mode="r+", use_consolidated=False)["task/layer_g1"][:] = [5, 6]
    problems = validate_store(store).problems
    assert any("coordinate layer_g1 holds layers [5, 6]; features.grids says [2, 3]" in p for p in problems), problems


def test_a_missing_group_shard_is_refused_naming_it(store, monkeypatch):
    shard(store, "tokens_g2", 1).unlink()
    task = open_store(store).task("task")
    with pytest.raises(StoreIncompleteError, match=r"task/tokens_g2/c/1/0/0/0"):
        task.grid_tasks()[0].read([0])  # the task is checked whole, whichever group is read
    # where nothing can be listed (plain HTTP), the rows that read NaN are refused naming their shard
    import store_schema.reader as reader

    monkeypatch.setattr(reader, "list_sizes", lambda *a, **k: None)
    part = open_store(store).task("task").grid_tasks()[2]
    assert np.isfinite(part.read([0, 9])).all()
    with pytest.raises(StoreIncompleteError, match=r"rows \[5\] read as never written: shard task/tokens_g2/c/1/0/0/0"):
        part.read([0, 5])


# -- compact multi-grid stores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, atol", [("int8", 0.1), ("pca:8", None)])
def test_store_compact_encodes_every_group_on_its_own(store, tmp_path, encoding, atol):
    from store_schema.compactor import compact_store

    spec = CompactSpec.parse(encoding)
    out = compact_store(store, tmp_path / "small.zarr", spec).store
    fs = open_store(out)
    assert fs.multi_grid and fs.compact == spec and fs.grids == list(GRIDS)
    report = validate_store(out, checksums="all")
    assert report.ok, report.problems
    names = set(zarr.open_group(out / "task", mode="r").array_keys())
    for g in ("g0", "g1", "g2"):
        assert {f"{n}_{g}" for n in spec.arrays()} <= names
        if spec.pca:
            assert {f"pca_components_{g}", f"pca_mean_{g}"} <= names
    assert not names & {"codes", "map_stats", "pca_components", "tokens"}
    group = zarr.open_group(out / "task", mode="r")
    assert group["codes_g1"].metadata.dimension_names == ("sample", "layer_g1", "token_g1", "code_g1")
    assert group["map_stats_g2"].metadata.dimension_names == ("sample", "layer_g2", "stat_g2")
    rows = np.arange(N)
    task = fs.task("task")
    for part, grid, x in zip(task.grid_tasks(), GRIDS, group_tokens()):
        got = part.read(rows)
        assert got.shape == x.shape
        if spec.pca:
            basis = part.pca
            assert basis.components.shape == (grid.num_layers, grid.feature_dim, 8)
            # the group's own projection onto its own basis (the float16 codes aside)
            from store_schema.compact import map_stats, standardise
            stats = map_stats(x)
            u = standardise(x, stats)
            z = np.einsum("nltd,ldr->nltr", u - basis.mean[None, :, None], basis.components)
            u_hat = np.einsum("nltr,ldr->nltd", z, basis.components) + basis.mean[None, :, None]
            want = u_hat * stats[..., 1][..., None, None] + stats[..., 0][..., None, None]
            assert np.allclose(got, want, atol=0.02 * np.abs(x).max()), np.abs(got - want).max()
            assert not np.allclose(got, x, atol=0.02 * np.abs(x).max())  # 8 of 16..64 directions: lossy
        else:
            assert np.allclose(got, x, atol=atol * np.abs(x).max()), np.abs(got - x).max()
        assert np.allclose(part.to_dask().compute(), got)
    if spec.pca:
        assert len(task.attrs["compact"]["explained_variance"]) == 5  # every layer, group after group


def test_pca_wider_than_a_group_is_refused_naming_it(store, tmp_path):
    from store_schema.compactor import compact_store

    with pytest.raises(CompactSpecError, match=r"grid group g0: PCA to 32 components is more than the features' 16"):
        compact_store(store, tmp_path / "small.zarr", CompactSpec(pca=32))
    assert not (tmp_path / "small.zarr").exists()


def test_a_multi_grid_pca_task_takes_one_basis_per_group(tmp_path):
    from store_schema.compact import PcaFit

    tokens = group_tokens()
    bases = []
    for grid, x in zip(GRIDS, tokens):
        fit = PcaFit(grid.num_layers, grid.feature_dim)
        fit.add(x[:4])
        bases.append(fit.basis(4))
    with StoreWriter(tmp_path / "bad.zarr", info(), LAYOUT, compact=CompactSpec(pca=4)) as writer:
        with pytest.raises(StoreError, match="one per grid group"):
            new_task(writer)
        with pytest.raises(StoreError, match="a list of PCA bases, one per grid group"):
            new_task(writer, pca=bases[0])
    path = write_multi(tmp_path / "pca.zarr", compact=CompactSpec(pca=4), pca=bases)
    for part, basis in zip(open_store(path).task("task").grid_tasks(), bases):
        assert np.array_equal(part.pca.components, basis.components)


# -- sharing ----------------------------------------------------------------------------------------------------


def test_copy_and_pack_carry_every_group_array(store, tmp_path):
    tokens = group_tokens()
    copied = tmp_path / "copy.zarr"
    result = copy_store(str(store), str(copied))
    group_shards = {f"task/tokens_{g}/c/{b}/0/0/0" for g in ("g0", "g1", "g2") for b in range(3)}
    assert result.copied == result.objects and all((copied / k).is_file() for k in group_shards)
    packed = tmp_path / "s.zip"
    pack = pack_store(copied, packed)
    assert pack.report is not None and pack.report.ok, pack.report.problems
    assert pack.objects > 9  # 9 shards, their zarr.json, coordinates, ...
    for where in (copied, packed):
        assert validate_store(where).ok, where
        parts = open_store(where).task("task").grid_tasks()
        assert all(np.array_equal(p.read(np.arange(N)), x) for p, x in zip(parts, tokens)), where


# -- versions ---------------------------------------------------------------------------------------------------


def test_a_2_2_reader_finds_no_tokens_and_refuses(store, monkeypatch):
    """A 2.2 combo knows nothing of features.grids: it looks for `tokens`, finds none and refuses (never
    reading one group as the task's tokens). Simulated by a reader that ignores `grids`."""
    assert "tokens" not in zarr.open_group(store / "task", mode="r")
    monkeypatch.setattr(FeatureStore, "grids", property(lambda self: [GridSpec("", self.token_grid, self.feature_dim,
                                                                               tuple(self.features["layers"]))]))
    with pytest.raises(StoreError, match="the 'tokens' array is missing"):
        open_store(store).task("task")


def as_version(path: Path, version: str) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["combo"]["format_version"] = version
    (path / "zarr.json").write_text(json.dumps(doc))


def test_writing_multi_grid_into_a_2_2_store_is_refused(tmp_path):
    path = write_store(tmp_path / "s.zarr", tokens=np.zeros((N, 5, 4, 64), np.float32), labels=[i % 3 for i in range(N)],
                       splits=SPLITS, grid=(2, 2), alias="hiera", layout=LAYOUT)
    as_version(path, "2.2")
    with pytest.raises(SchemaVersionError, match=r"format 2\.2, which cannot describe this model's layers: they have 3 "
                                                 r"token grids.*from format 2\.3 on.*--overwrite"):
        StoreWriter(path, info(), LAYOUT)
    # a resumed or extended 2.2 single-grid store keeps its version
    single = StoreInfo.from_attrs(open_store(path).attrs)
    with StoreWriter(path, single, LAYOUT) as writer:
        assert writer.format_text == "2.2"
    with StoreWriter(path, info(), LAYOUT, overwrite=True) as writer:  # rebuilt: a 2.3 multi-grid store
        assert writer.format_text == "2.3" and writer.attrs["features"]["grids"]


def test_validate_refuses_grids_in_a_store_whose_version_has_none(store):
    as_version(store, "2.2")
    problems = validate_store(store).problems
    assert any("features.grids is recorded, but format 2.2 has no multi-grid layout" in p for p in problems), problems


# -- single-grid stores are 2.2's, byte for byte -----------------------------------------------------------------

# sha256 over every chunk file of the task, as the 2.2 writer (before multi-grid) made them for these inputs
SINGLE_GRID_DIGESTS = {
    "full": "909a53e1ef04a7ce56607d234b5ba0d943dba0a3855660ff74513aa652d17907",
    "int8": "2a3421f0eca8904c42bda64cf057dd8b72564d7603037576efcfa7105b3ac0aa",
    "pca": "37adb71abc60f599d0763498964c27b274db1be55ca3ab22d6adfa0f7ec87685",
}


@pytest.mark.parametrize("name, compact", [("full", None), ("int8", CompactSpec(int8=True)), ("pca", CompactSpec(pca=4))])
def test_single_grid_stores_keep_2_2s_bytes(tmp_path, name, compact):
    rng = np.random.default_rng(7)
    tokens = rng.standard_normal((12, 3, 16, 8)).astype(np.float32)
    prefix = rng.standard_normal((12, 3, 1, 8)).astype(np.float32)
    path = write_store(tmp_path / f"{name}.zarr", tokens=tokens, prefix=prefix, labels=np.arange(12) % 3,
                       splits=vtab_like_splits(4, 4, 4), grid=(4, 4), layout=StoreLayout(rows_per_shard=4, rows_per_chunk=4),
                       compact=compact)
    h = hashlib.sha256()
    for f in sorted((path / "task").rglob("*")):
        if f.is_file() and "/c/" in f.as_posix():
            h.update(f.relative_to(path / "task").as_posix().encode())
            h.update(f.read_bytes())
    # (a zstd or numpy upgrade may change the bytes of both writers alike: then recompute them from the 2.2 commit)
    assert h.hexdigest() == SINGLE_GRID_DIGESTS[name]
    fs = open_store(path)
    assert not fs.multi_grid and fs.grids == [GridSpec("", (4, 4), 8, (0, 1, 2))]
    task = fs.task("task")
    assert task.grid == fs.grids[0] and task.grid_tasks() == [task] and task.store is fs
    assert "grids" not in fs.features and {"tokens" if compact is None else "codes", "layer"} <= set(
        zarr.open_group(path / "task", mode="r").array_keys())


def test_the_readmes_multi_grid_snippet_runs(tmp_path, monkeypatch):
    """store_schema/README.md's multi-grid lines, run as written on a ConvNeXt-like store (4 stages, one layer
    each, small grids) at the path they name."""
    import dask.array as da
    import xarray as xr

    text = (Path(__file__).parent.parent / "store_schema" / "README.md").read_text()
    start = text.index("```python\n", text.index("A *multi-grid* store")) + len("```python\n")
    snippet = text[start:text.index("```", start)]
    grids = group_layers(range(4), [(8, 8), (4, 4), (2, 2), (1, 1)], [8, 16, 32, 64])
    rng = np.random.default_rng(1)
    tokens = [rng.standard_normal((N, 1, g.num_tokens, g.feature_dim)).astype(np.float32) for g in grids]
    with StoreWriter(tmp_path / "stores" / "convnext" / "vtab.zarr", info(grids, alias="convnext"), LAYOUT) as writer:
        tw = writer.task("dtd", samples=table(), num_layers=1, num_tokens=1, feature_dim=64, num_prefix_tokens=0,
                         protocols={"dev": ("train800", "val200")}, classes=["a", "b", "c"])
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, [t[rows.start:rows.stop] for t in tokens])
        tw.finalize()
    monkeypatch.chdir(tmp_path)
    scope = {"np": np, "xr": xr, "zarr": zarr, "da": da}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["ds"].tokens_g0.dims == ("sample", "layer_g0", "token_g0", "channel_g0")
    assert np.array_equal(scope["x"].values, tokens[3][:4, 0])  # train800: the first 4 rows
    assert [g["name"] for g in scope["grids"]] == ["g0", "g1", "g2", "g3"]
    assert np.array_equal(scope["lazy"].compute(), tokens[1])


def test_a_skipped_image_reads_nan_in_every_group_and_split_names_cannot_take_group_array_names(tmp_path):
    from store_schema import Skipped

    tokens = group_tokens()
    path = tmp_path / "s.zarr"
    with StoreWriter(path, info(), LAYOUT) as writer:
        tw = new_task(writer)
        for b in tw.pending():
            rows = tw.blocks[b]
            skipped = [Skipped(row=5, sample_id="task/img005.png", error="unreadable")] if 5 in rows else []
            tw.write_block(b, [t[rows.start:rows.stop] for t in tokens], skipped=skipped)
        tw.finalize()
        bad = build_sample_table(sample_ids=["a", "b"], labels=[0, 0], splits=[("tokens_g1",)] * 2,
                                 split_names=["tokens_g1"])
        with pytest.raises(StoreError, match=r"split name\(s\) \['tokens_g1'\] clash with the store's array names"):
            writer.task("bad", samples=bad, num_layers=1, num_tokens=4, feature_dim=64, num_prefix_tokens=0,
                        protocols={}, classes=["a"])
    task = open_store(path).task("task")
    assert 5 not in task.rows("test") and 5 not in task.rows("val200")
    for part, x in zip(task.grid_tasks(), tokens):
        got = part.read([4, 5, 6])
        assert np.isnan(got[1]).all() and np.array_equal(got[[0, 2]], x[[4, 6]])
    assert validate_store(path).ok
