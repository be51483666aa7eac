"""Compact stores (store_schema/compact.py): encodings, `combo store compact`, `combo extract --compact`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from combo.cli import app
from fakedata import make_vtab_tree
from store_schema import open_store, validate_store
from store_schema.compact import CompactSpec, CompactSpecError, PcaFit, decode, encode, map_stats
from store_schema.compactor import compact_store
from storefactory import vtab_like_splits, write_store

runner = CliRunner()
N, L, T, D = 48, 3, 16, 32
SPECS = ["int8", "pca:8", "pca:8,int8", f"pca:{D},int8"]


def features(seed: int = 0, *, outliers: bool = True, n: int = N, dim: int = D) -> np.ndarray:
    """Correlated token maps; with `outliers`, ViT-like artifacts: two "massive" channels 300x the rest in every
    token and two high-norm tokens per map (100x the median token norm), within float16 range."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, L, T, dim)).astype(np.float32) @ (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    x += np.linspace(-1, 1, L, dtype=np.float32)[None, :, None, None]  # layers with their own offset
    if outliers:
        x[..., [3, 17]] *= 300
        x[:, :, [5, 11], :] = rng.standard_normal((n, L, 2, dim)) * 60
        x[:, :, [5, 11], 3] *= 3  # the outlier tokens are massive in a massive channel too
    return x.astype(np.float16)


def normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    stats = map_stats(x)
    return (x - stats[..., 0][..., None, None]) / np.sqrt(stats[..., 1][..., None, None] ** 2 + 1e-5)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- the encodings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outliers", [False, True])
def test_int8_round_trip_bounds_with_and_without_outliers(outliers):
    x = features(outliers=outliers)
    spec = CompactSpec(int8=True)
    arrays = encode(x, spec)
    assert [a.dtype.name for a in arrays] == ["int8", "float16", "float16", "int16", "float16", "float32"]
    assert np.abs(arrays[0].astype(int)).max() <= 127
    got, want = decode(arrays, spec, normalised=True), normalised(x)
    assert relative_error(got, want) < 0.01
    # every channel, the small ones too, within 2% (a single scale per layer would lose them next to the massive ones)
    per_channel = np.sqrt(((got - want) ** 2).sum(axis=(0, 1, 2)) / (want ** 2).sum(axis=(0, 1, 2)))
    assert per_channel.max() < 0.02, per_channel.max()
    # the outlier tokens themselves, and the exact map statistics
    assert relative_error(got[:, :, [5, 11]], want[:, :, [5, 11]]) < 0.01
    np.testing.assert_array_equal(arrays[-1], map_stats(x.astype(np.float32)))


def test_a_single_scale_per_layer_would_not_survive_the_outliers():
    """The bound above is not trivially met: int8 with one absmax scale per (image, layer) loses the small channels."""
    x = normalised(features())
    scale = np.abs(x).max(axis=(2, 3), keepdims=True) / 127
    naive = np.rint(x / scale) * scale
    per_channel = np.sqrt(((naive - x) ** 2).sum(axis=(0, 1, 2)) / (x ** 2).sum(axis=(0, 1, 2)))
    assert per_channel.max() > 0.05  # more than twice the bound the two-scale encoding meets


@pytest.mark.parametrize("components", [8, D])
def test_pca_error_is_the_variance_it_drops(components):
    x = features()
    fit = PcaFit(L, D)
    fit.add(x)
    basis = fit.basis(components)
    kept = fit.explained(basis)
    spec = CompactSpec(pca=components)
    got = decode(encode(x, spec, basis), spec, basis, normalised=True)
    error = relative_error(got, normalised(x))
    dropped = np.sqrt(np.clip(1 - kept, 0, 1))
    assert 0.5 * dropped.min() - 1e-3 <= error <= dropped.max() + 0.01
    if components == D:
        assert error < 1e-3  # all components: only float16 rounding of the coefficients
    both = CompactSpec(pca=components, int8=True)
    assert relative_error(decode(encode(x, both, basis), both, basis, normalised=True), got) < 0.01


def test_spec_parsing_and_bad_specs():
    assert CompactSpec.parse("pca:128,int8") == CompactSpec(pca=128, int8=True) == CompactSpec.parse(" INT8 , pca:128")
    assert CompactSpec.parse("int8").name == "int8" and CompactSpec.parse("pca:64").name == "pca64"
    for text, message in [("foo", "unknown format 'foo'"), ("pca", "needs a component count"),
                          ("pca:0", "at least 1 component"), ("pca:-3", "at least 1 component"), ("", "give int8")]:
        with pytest.raises(CompactSpecError, match=message):
            CompactSpec.parse(text)
    with pytest.raises(CompactSpecError, match="more than the features' 32 channels"):
        CompactSpec(pca=33).check_dim(32)


# -- compact stores -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compact")
    rng = np.random.default_rng(1)
    prefix = rng.standard_normal((N, L, 1, D)).astype(np.float32)
    return write_store(folder / "src.zarr", tokens=features(), labels=[i % 3 for i in range(N)],
                       splits=vtab_like_splits(24, 8, 16), grid=(4, 4), prefix=prefix)


@pytest.mark.parametrize("text", SPECS)
def test_compact_store_reads_like_its_source(source, tmp_path, text):
    spec = CompactSpec.parse(text)
    result = compact_store(source, tmp_path / "c.zarr", spec)
    assert validate_store(tmp_path / "c.zarr", checksums="all").ok
    full, small = open_store(source).task("task"), open_store(tmp_path / "c.zarr").task("task")
    assert small.compact == spec and full.compact is None
    rows = np.array([40, 3, 17, 3])
    want = normalised(full.read(rows))
    bound = 0.01 if spec.pca in (None, D) else np.sqrt(1 - min(small.attrs["compact"]["explained_variance"])) + 0.01
    assert relative_error(small.read(rows, normalised=True), want) < bound
    assert small.read(rows, layers=[2]).shape == (4, 1, T, D)
    np.testing.assert_array_equal(small.read(rows, layers=[2]), small.read(rows)[:, [2]])
    np.testing.assert_array_equal(small.read(rows, prefix=True), full.read(rows, prefix=True))  # cls: full size
    np.testing.assert_allclose(small.to_dask()[:8].compute(), small.read(np.arange(8)), rtol=1e-5, atol=1e-4)
    assert small.sample_ids == full.sample_ids and np.array_equal(small.labels, full.labels)
    if spec.pca is not None:
        fit = small.attrs["compact"]
        assert fit["fit_split"] == "train800" and fit["fit_rows"] == 24
    assert result.bytes_on_disk > 0


def test_pca_is_fitted_on_the_training_split_only(tmp_path):
    """Changing only the test rows changes nothing of the basis; changing one training row does."""
    labels, splits = [i % 3 for i in range(N)], vtab_like_splits(24, 8, 16)
    x = features()
    other_test = x.copy()
    other_test[32:] = features(seed=7)[32:]  # rows 32.. are the test split
    other_train = x.copy()
    other_train[0] = features(seed=8)[0]
    bases = []
    for name, tokens in (("a", x), ("b", other_test), ("c", other_train)):
        src = write_store(tmp_path / f"{name}.zarr", tokens=tokens, labels=labels, splits=splits, grid=(4, 4))
        compact_store(src, tmp_path / f"{name}-pca.zarr", CompactSpec(pca=8))
        bases.append((tmp_path / f"{name}-pca.zarr/task/pca_components/c/0/0/0").read_bytes())
    assert bases[0] == bases[1]
    assert bases[0] != bases[2]


def test_xarray_opens_a_compact_task(source, tmp_path):
    xr = pytest.importorskip("xarray")
    compact_store(source, tmp_path / "c.zarr", CompactSpec(pca=8, int8=True))
    ds = xr.open_zarr(tmp_path / "c.zarr", group="task", chunks=None)
    assert dict(ds.codes.sizes) == {"sample": N, "layer": L, "token": T, "code": 8}
    assert ds.codes.dtype == np.int8 and ds.pca_components.dims == ("layer", "channel", "code")
    # decoding needs nothing but numpy and the documented formula
    arrays = [ds[name].values for name in CompactSpec(pca=8, int8=True).arrays()]
    from store_schema.compact import PcaBasis

    got = decode(arrays, CompactSpec(pca=8, int8=True), PcaBasis(ds.pca_components.values, ds.pca_mean.values))
    np.testing.assert_array_equal(got, open_store(tmp_path / "c.zarr").task("task").read(slice(None)))


def test_compact_store_travels_by_push_pull_and_pack(source, tmp_path):
    """A compact store's objects are ordinary store objects: push, pull and pack copy them all, each copy validates
    and reads the same encoded tokens and decoded maps."""
    from store_schema.pack import pack_store

    original = tmp_path / "c.zarr"
    compact_store(source, original, CompactSpec.parse("pca:8,int8"))
    shared, back, packed = tmp_path / "shared" / "c.zarr", tmp_path / "back" / "c.zarr", tmp_path / "c.zarr.zip"
    for args in (["store", "push", str(original), str(shared)], ["store", "pull", str(shared), str(back)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    pack_store(back, packed)
    rows = np.array([5, 40, 0])
    want = open_store(original).task("task")
    for copy in (shared, back, packed):
        assert validate_store(copy, checksums="all").ok, copy
        got = open_store(copy).task("task")
        assert got.compact == want.compact
        np.testing.assert_array_equal(got.read(rows), want.read(rows))
        np.testing.assert_array_equal(got.read(rows, normalised=True), want.read(rows, normalised=True))


def test_compact_task_missing_a_shard_is_refused(source, tmp_path):
    compact_store(source, tmp_path / "c.zarr", CompactSpec(int8=True))
    shard = next(p for p in (tmp_path / "c.zarr" / "task" / "token_scale" / "c").rglob("*") if p.is_file())
    shard.unlink()
    from store_schema import StoreError

    with pytest.raises(StoreError, match="token_scale"):
        open_store(tmp_path / "c.zarr").task("task").read([0])
    assert not validate_store(tmp_path / "c.zarr").ok


def test_bad_inputs_write_nothing(source, tmp_path):
    cases = [
        (["--pca", str(D + 1)], f"more than the features' {D} channels"),
        (["--pca", "0"], "at least 1 component"),
        (["--compact", "fp8"], "unknown format 'fp8'"),
        ([], "choose an encoding"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["store", "compact", str(source), str(tmp_path / "out.zarr"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out.zarr").exists()
    compact_store(source, tmp_path / "int8.zarr", CompactSpec(int8=True))
    result = runner.invoke(app, ["store", "compact", str(tmp_path / "int8.zarr"), str(tmp_path / "out.zarr"), "--int8"])
    assert result.exit_code == 2 and "already a compact store (int8)" in result.output
    assert not (tmp_path / "out.zarr").exists()
    no_train = write_store(tmp_path / "nt.zarr", tokens=features(n=12), labels=[i % 3 for i in range(12)],
                           splits=[("test",)] * 12, grid=(4, 4), split_names=("test",))
    result = runner.invoke(app, ["store", "compact", str(no_train), str(tmp_path / "out.zarr"), "--pca", "4"])
    assert result.exit_code == 2 and "task task" in result.output and "no training split" in result.output
    assert not (tmp_path / "out.zarr").exists()
    # int8 fits nothing, so such a store compacts
    assert runner.invoke(app, ["store", "compact", str(no_train), str(tmp_path / "out.zarr"), "--int8"]).exit_code == 0


def test_store_info_says_how_it_was_compacted(source, tmp_path):
    compact_store(source, tmp_path / "c.zarr", CompactSpec(pca=8, int8=True))
    out = runner.invoke(app, ["store", "info", str(tmp_path / "c.zarr")], env={"COLUMNS": "100"}).output
    assert "pca8-int8: PCA to 8 components per layer, then int8" in out
    assert "training split only (train800; 24-24 images)" in " ".join(out.split())
    doc = json.loads(runner.invoke(app, ["store", "info", str(tmp_path / "c.zarr"), "--json"]).output)
    assert doc["storage"]["compact"]["pca_components"] == 8 and doc["task_details"]["task"]["compact"]["fit_split"] == "train800"


# -- extract --compact -------------------------------------------------------------------------------------------

MODEL, SIZE = "vit_tiny_patch16_224", 32
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from extract.pipeline import ExtractConfig, extract
    seen = [0]
    kill_at = int(sys.argv[3])
    store = os.path.join(sys.argv[2], sys.argv[4], "vtab-pca8-int8.zarr")
    def progress(task, total):
        def advance(n):
            if "PCA fit" in task or not kill_at:
                return
            seen[0] += n
            if seen[0] >= kill_at:  # once the first shard is journaled, while later ones are in flight
                journal = os.path.join(store, "eurosat", ".journal.jsonl")
                for _ in range(1000):
                    if os.path.exists(journal) and open(journal).read().strip():
                        break
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
        return advance
    cfg = ExtractConfig(model=sys.argv[4], dataset="vtab", root=sys.argv[1], out=sys.argv[2], image_size=int(sys.argv[5]),
                        random_init=True, batch_size=8, num_workers=0, tasks=("eurosat",), rows_per_shard=32,
                        compact="pca:8,int8", model_kwargs={"depth": 3})
    print(extract(cfg, progress=progress).tasks[0].status)
""")


def _objects(store: Path) -> dict[str, bytes]:
    """Every data object (shards, coordinates, basis, sample table); not the documents that hold timestamps."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name not in ("zarr.json", "manifest.json") and not p.name.startswith(".")}


def test_extract_compact_resumes_after_sigkill_to_identical_bytes(tmp_path):
    root = tmp_path / "vtab"
    make_vtab_tree(root, {"eurosat": 4}, n_train=10, n_val=5, n_test=80, image_size=16)  # 95 rows: 3 shards
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(killed), "48", MODEL, str(SIZE)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr
    path = killed / MODEL / "vtab-pca8-int8.zarr"
    assert not open_store(path).task("eurosat").complete
    assert 1 <= len((path / "eurosat" / ".journal.jsonl").read_text().splitlines()) < 3
    # the rerun and the uninterrupted run in the same kind of process (same threads: same float sums)
    for out in (killed, clean):
        proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(out), "0", MODEL, str(SIZE)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == ("resumed" if out == killed else "extracted")
    reference = clean / MODEL / "vtab-pca8-int8.zarr"
    assert validate_store(path, checksums="all").ok
    got, want = _objects(path), _objects(reference)
    assert got.keys() == want.keys() and any("/codes/c/" in k for k in got)
    assert [k for k in got if got[k] != want[k]] == []
    task = open_store(path).task("eurosat")
    assert task.attrs["compact"]["fit_split"] == "train800" and task.attrs["compact"]["fit_rows"] == 10
    assert not (killed / MODEL / "vtab.zarr").exists()  # the full-size tokens were never written


def test_extract_compact_refuses_bad_specs_before_writing(tmp_path):
    root = tmp_path / "vtab"
    make_vtab_tree(root, {"eurosat": 4}, n_train=6, n_val=2, n_test=4, image_size=16)
    base = ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(root), "--out",
            str(tmp_path / "out"), "--image-size", str(SIZE), "--num-workers", "0"]
    for spec, message in [("pca:193", "more than the features' 192 channels"), ("int4", "unknown format 'int4'"),
                          ("pca:0", "at least 1 component")]:
        result = runner.invoke(app, [*base, "--compact", spec])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
