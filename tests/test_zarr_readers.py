"""Stores as Zarr implementations other than zarr-python read them (issue 23, findings 2 and 3).

Google's tensorstore shares no code with zarr-python: it reads every array of a full-size and of a compact
store (sharding_indexed with crc32c, zstd, every coordinate including sample_id) to the same values. And a
plain reader (zarr + numpy, the decode formula of store_schema/README.md written out here, no combo) reads a
compact store's never-written rows as NaN, whichever array's shard is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr

from probe.compact import torch_decode
from store_schema import StoreError, StoreLayout, open_store, validate_store
from store_schema.compact import CompactSpec, PcaBasis, decode
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 24, 2, (2, 2), 8
T = GRID[0] * GRID[1]
ROWS_PER_SHARD = 8
IDS = [f"task/img{i:05d}.png" for i in range(N)]
IDS[3] = "täsk/ünïcödé 画像.png"  # not ASCII, and the longest id in UTF-8 bytes
IDS[7] = "x"


def tokens(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, L, T, D)).astype(np.float32)
    x[..., 3] *= 50  # a massive channel
    x[:, :, 1] *= 20  # a high-norm token
    return x.astype(np.float16)


def make(path: Path, compact: str | None) -> Path:
    rng = np.random.default_rng(1)
    return write_store(path, tokens=tokens(), labels=[i % 3 for i in range(N)], splits=vtab_like_splits(8, 8, 8),
                       grid=GRID, prefix=rng.standard_normal((N, L, 1, D)).astype(np.float16), sample_ids=IDS,
                       layout=StoreLayout(rows_per_shard=ROWS_PER_SHARD),
                       compact=None if compact is None else CompactSpec.parse(compact))


def arrays(store: Path) -> dict[str, zarr.Array]:
    """Every array of the store's hierarchy, by path."""
    group = zarr.open_group(store, mode="r")
    return {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def ts_read(store: Path, name: str) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / name)}}
    return np.asarray(ts.open(spec).result().read().result())


@pytest.mark.parametrize("compact", [None, "int8", "pca:4,int8", "pca:4"])
def test_tensorstore_reads_every_array_as_zarr_python_does(tmp_path, compact):
    store = make(tmp_path / "s.zarr", compact)
    found = arrays(store)
    spec = None if compact is None else CompactSpec.parse(compact)
    main = {"tokens"} if spec is None else {*spec.arrays(), *(["pca_components", "pca_mean"] if spec.pca else [])}
    want = {f"task/{n}" for n in main | {"prefix", "layer", "sample_id", "label", "valid", "train800", "val200",
                                          "train800val200", "test"}}
    assert set(found) == want
    for name, array in found.items():
        got = ts_read(store, name)
        assert got.dtype == array.dtype and got.shape == array.shape, name
        np.testing.assert_array_equal(got, array[...], err_msg=name)
    # every reader can tell which image a row is: the ids decode from what tensorstore read
    raw = ts_read(store, "task/sample_id")
    assert [bytes(row).rstrip(b"\0").decode("utf-8") for row in raw] == IDS == open_store(store).task("task").sample_ids


def readme_decode(arrays: dict[str, np.ndarray], spec: CompactSpec) -> np.ndarray:
    """store_schema/README.md "Decoding, for a reader without combo", written out in numpy (no combo code)."""
    stats = arrays["map_stats"].astype(np.float32)
    if spec.int8:
        codes = arrays["codes"]
        token_scale = arrays["token_scale"].astype(np.float32)
        channel_scale = arrays["channel_scale"].astype(np.float32)
        index, value = arrays["outlier_index"], arrays["outlier_value"].astype(np.float32)
        v = codes * np.abs(token_scale)[..., None] * np.where(token_scale[..., None] > 0, channel_scale[:, :, None, :], 1)
        np.put_along_axis(v, np.maximum(index, 0).astype(np.int64), value, axis=-1)
        never = ((codes == -128).any(-1) | (index == -1).any(-1) | np.isnan(token_scale)
                 | np.isnan(channel_scale).any(-1)[:, :, None] | np.isnan(value).any(-1))
        v[never] = np.nan
    else:
        v = arrays["codes"].astype(np.float32)
    if spec.pca is not None:
        components, mean = arrays["pca_components"], arrays["pca_mean"]
        v = np.stack([v[:, l] @ components[l].T + mean[l] for l in range(v.shape[1])], axis=1)
    return v * stats[..., 1][..., None, None] + stats[..., 0][..., None, None]


def plain_read(store: Path, spec: CompactSpec, reader: str) -> dict[str, np.ndarray]:
    names = [*spec.arrays(), *(["pca_components", "pca_mean"] if spec.pca is not None else [])]
    if reader == "tensorstore":
        return {n: ts_read(store, f"task/{n}") for n in names}
    group = zarr.open_group(store, mode="r")
    return {n: group[f"task/{n}"][...] for n in names}


ROW_ARRAYS = {"int8": ["codes", "token_scale", "channel_scale", "outlier_index", "outlier_value", "map_stats"],
              "pca:4": ["codes", "map_stats"]}


@pytest.mark.parametrize("reader", ["zarr", "tensorstore"])
@pytest.mark.parametrize(("encoding", "lost"), [(e, a) for e, names in ROW_ARRAYS.items() for a in names]
                         + [("pca:4,int8", "codes"), ("pca:4,int8", "outlier_index")])
def test_a_lost_compact_shard_decodes_to_nan_for_a_plain_reader(tmp_path, encoding, lost, reader):
    """One shard of one array missing (an interrupted copy): the README's formula, on what plain zarr (or
    tensorstore) returns, gives NaN for exactly that shard's rows, and the other rows decode as combo does."""
    spec = CompactSpec.parse(encoding)
    store = make(tmp_path / "c.zarr", encoding)
    whole = open_store(store).task("task").read(slice(None))
    assert np.isfinite(whole).all()
    np.testing.assert_allclose(readme_decode(plain_read(store, spec, reader), spec), whole, rtol=1e-5, atol=1e-3)
    ndim = len(arrays(store)[f"task/{lost}"].shape)
    shard = store / "task" / lost / "c" / "1" / Path(*["0"] * (ndim - 1))
    shard.unlink()
    plain = plain_read(store, spec, reader)
    got = readme_decode(plain, spec)
    # combo's decoders (numpy, and the probe's torch twin) agree with the formula, NaN for NaN
    row_arrays = [plain[n] for n in spec.arrays()]
    basis = PcaBasis(plain["pca_components"], plain["pca_mean"]) if spec.pca is not None else None
    np.testing.assert_allclose(decode(row_arrays, spec, basis), got, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(torch_decode([torch.from_numpy(a) for a in row_arrays], spec, basis).numpy(), got,
                               rtol=1e-5, atol=1e-3)
    lost_rows = np.arange(ROWS_PER_SHARD, 2 * ROWS_PER_SHARD)
    assert np.isnan(got[lost_rows]).all(), f"{lost}: {np.isfinite(got[lost_rows]).sum()} finite values in lost rows"
    kept = np.setdiff1d(np.arange(N), lost_rows)
    np.testing.assert_allclose(got[kept], whole[kept], rtol=1e-5, atol=1e-3)
    # combo's own reader refuses them, naming the shard, as it does for a full-size store
    key = f"task/{lost}/c/1/" + "/".join(["0"] * (ndim - 1))
    with pytest.raises(StoreError, match=key):
        open_store(store).task("task").read([9])
    assert not validate_store(store).ok


@pytest.mark.parametrize("lost", ["codes", "outlier_index", "token_scale"])
def test_combo_refuses_a_compact_row_lost_where_nothing_is_listed(tmp_path, lost):
    """A shard lost after the task was opened (or on a server that cannot list): the never-written marker of
    each array (-128 codes, -1 outlier_index, NaN) is refused for valid rows, naming the shard."""
    store = make(tmp_path / "c.zarr", "int8")
    task = open_store(store).task("task")
    task.read([0])  # opened and checked while every shard was there
    ndim = len(arrays(store)[f"task/{lost}"].shape)
    (store / "task" / lost / "c" / "2" / Path(*["0"] * (ndim - 1))).unlink()
    with pytest.raises(StoreError, match=f"task/{lost}/c/2/"):
        task.read([17, 3])
    with pytest.raises(StoreError, match=f"task/{lost}/c/2/"):
        task.read_encoded([20])
    assert np.isfinite(task.read([3, 9])).all()


def test_skipped_images_hold_the_fill_values_in_a_compact_store(tmp_path):
    """An image skipped with --skip-bad is never written: every compact array holds its fill value there (-128
    codes, -1 outlier indexes, NaN), so it decodes to NaN for a plain reader; combo reads it as NaN (an
    invalid row, not refused), and a block of only skipped images is still written and valid."""
    from store_schema import Skipped, StoreWriter, build_sample_table
    from test_store_sharing import open_info

    store = make(tmp_path / "c.zarr", "int8")
    table = build_sample_table(sample_ids=[f"s{i}" for i in range(16)], labels=[0] * 16, splits=[("train",)] * 16,
                               split_names=["train"])
    data = tokens()[:16]
    spec = CompactSpec(int8=True)
    with StoreWriter(store, open_info(store), StoreLayout(rows_per_shard=ROWS_PER_SHARD), compact=spec) as writer:
        tw = writer.task("skips", samples=table, num_layers=L, num_tokens=T, feature_dim=D, num_prefix_tokens=1,
                         protocols={"final": ("train", "train")}, classes=["a"])
        prefix = np.ones((8, L, 1, D), np.float16)
        tw.write_block(0, data[:8], prefix, skipped=[Skipped(row=3, sample_id="s3", error="cannot decode")])
        tw.write_block(1, data[8:], prefix, skipped=[Skipped(row=r, sample_id=f"s{r}", error="x") for r in range(8, 16)])
        tw.finalize()
    group = zarr.open_group(store, mode="r")
    assert (group["skips/codes"][3] == -128).all() and (group["skips/outlier_index"][3] == -1).all()
    assert (group["skips/codes"][8:] == -128).all() and np.isnan(group["skips/map_stats"][8:]).all()
    assert (group["skips/codes"][2] > -128).all() and (group["skips/outlier_index"][2] >= 0).all()
    plain = readme_decode({n: group[f"skips/{n}"][...] for n in spec.arrays()}, spec)
    assert np.isnan(plain[[3, *range(8, 16)]]).all() and np.isfinite(plain[[0, 1, 2, 4, 5, 6, 7]]).all()
    task = open_store(store).task("skips")
    assert np.isnan(task.read([3, 9])).all() and np.isfinite(task.read([2, 4])).all()
    report = validate_store(store, checksums="all")
    assert report.ok, report.problems
