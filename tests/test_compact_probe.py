"""Probing compact stores (int8, per-layer PCA, both): read undecoded, decoded on the device inside `prepare`.

Every store here is tiny (4x4 grid, 3 layers, D = 32; one massive channel, so int8's channel scales matter,
and class directions on layers 1 and 2). A compact store is compared with an fp16 store written from its decoded
tokens (`TaskStore.read`): the same values up to float16 rounding. Layer 0 is noise. Tolerances:

- torch decoder vs numpy `decode`: 1e-5 relative (float32, only the PCA product's summation order differs);
- compact store resized to another grid (decoded in original units, then aligned and normalised like any
  store) vs the fp16 copy: predictions equal on >= 95% of the evaluation rows;
- compact store on the target grid (decoded ComBo-normalised with the maps' exact stored statistics, so not
  re-normalised over its decoded values) vs the fp16 copy (normalised over its values): predictions equal
  on >= 90%, accuracy within 5 points (the two differ by the compression's per-map loss of variance).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probe.atlas import pool_split, run_atlas
from probe.compact import TorchDecoder
from probe.data import SplitSource, eval_batches
from probe.heldout import ShuffledSource
from probe.relevance import run_relevance
from probe.run import ProbeConfig, fit_task, run_probe
from probe.stores import align_tasks, open_stores
from store_schema import StoreLayout, open_store
from store_schema.compact import CompactSpec, decode
from store_schema.compactor import compact_store
from tests.storefactory import vtab_like_splits, write_store

N_TRAIN, N_VAL, N_TEST, CLASSES, DIM, LAYERS, GRID = 48, 24, 48, 4, 32, 3, (4, 4)
SPECS = ("int8", "pca:8", "pca:8,int8")
SMALL = dict(dataset="synthetic", width=16, depth=1, num_heads=2, batch_size=16, lr=3e-3, steps=60, device="cpu",
             eval_batch_size=32)
CPU = torch.device("cpu")


def tokens(seed: int, grid=GRID, strength=0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL + N_TEST
    labels = np.arange(n) % CLASSES
    x = rng.standard_normal((n, LAYERS, grid[0] * grid[1], DIM)).astype(np.float32)
    x[..., 3] *= 10.0  # a massive channel
    directions = np.random.default_rng(99).standard_normal((2, CLASSES, DIM)).astype(np.float32)
    x[:, 1] += strength * directions[0][labels][:, None, :]
    x[:, 2] += 0.5 * strength * directions[1][labels][:, None, :]
    prefix = rng.standard_normal((n, LAYERS, 1, DIM)).astype(np.float32)
    prefix[:, 1:, 0] += x[:, 1:].mean(axis=2)
    return x + 0.5, prefix, labels


def fp16_store(path, x, prefix, labels, grid, alias):
    return write_store(path, tokens=x, prefix=prefix, labels=labels, splits=vtab_like_splits(N_TRAIN, N_VAL, N_TEST),
                       grid=grid, alias=alias, task="shapes", dataset="synthetic",
                       layout=StoreLayout(rows_per_shard=16, rows_per_chunk=8))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{spec: (compact store, fp16 store of its decoded tokens)}, the fp16 source, and an fp16 noise store on a 2x2
    grid. The class signal is weak enough that the probes are not all perfect (ComBo ~0.94, linear ~0.9)."""
    root = tmp_path_factory.mktemp("compact-probe")
    x, prefix, labels = tokens(0)
    source = fp16_store(root / "source.zarr", x, prefix, labels, GRID, "big")
    out = {"source": source}
    for text in SPECS:
        spec = CompactSpec.parse(text)
        compact = root / f"source-{spec.name}.zarr"
        compact_store(source, compact, spec)
        task = open_store(compact).task("shapes")
        decoded = task.read(np.arange(task.num_samples))
        out[text] = (compact, fp16_store(root / f"decoded-{spec.name}.zarr", decoded, task.read(np.arange(task.num_samples), prefix=True),
                                         labels, GRID, "big"))
    y, yprefix, _ = tokens(1, grid=(2, 2), strength=0.0)  # noise
    out["small"] = fp16_store(root / "small.zarr", y, yprefix, labels, (2, 2), "small")
    return out


def agree(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def fit(paths, *, method="combo", protocol="final", **kw):
    cfg = ProbeConfig(stores=tuple(str(p) for p in paths), protocol=protocol, method=method, **{**SMALL, **kw})
    aligned = align_tasks(open_stores(cfg.stores, dataset="synthetic"), "shapes")
    return fit_task(aligned, cfg, device=CPU)


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("text", SPECS)
def test_torch_decoder_matches_numpy_decode(stores, text):
    task = open_store(stores[text][0]).task("shapes")
    decoder = TorchDecoder(task.compact, task.pca)
    rows = [5, 1, 30, 7]
    for layers in (None, [2, 0]):
        arrays = task.read_encoded(rows, layers=layers)
        tensors = [torch.from_numpy(a) for a in arrays]
        for normalised in (False, True):
            ref = decode(arrays, task.compact, task.pca, layers=layers, normalised=normalised)
            got = decoder(tensors, layers=layers, normalised=normalised)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
        pooled = decoder.mean_tokens(tensors, layers=layers)
        ref = decode(arrays, task.compact, task.pca, layers=layers).mean(axis=2)
        np.testing.assert_allclose(pooled.numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert np.allclose(task.read(rows, normalised=True), decoder([torch.from_numpy(a) for a in task.read_encoded(rows)],
                                                                 normalised=True).numpy(), rtol=1e-5, atol=1e-5)


def test_split_source_reads_encoded_arrays_and_decodes_them(stores):
    compact, _ = stores["pca:8,int8"]
    aligned = align_tasks(open_stores([str(compact), str(stores["source"])], dataset="synthetic"), "shapes")
    rows = aligned.rows("train800")
    source = SplitSource(aligned, rows)
    spec = aligned.parts[0].compact
    assert [source.arrays_of(k) for k in range(2)] == [len(spec.arrays()), 1]
    assert source.row_bytes() == spec.row_bytes(LAYERS, 16, DIM) + LAYERS * 16 * DIM * 2
    arrays = source.read(np.array([3, 0, 9]))
    assert len(arrays) == len(spec.arrays()) + 1 and all(a.shape[0] == 3 for a in arrays)
    maps = source.decode([torch.from_numpy(a) for a in arrays])
    np.testing.assert_allclose(maps[0].numpy(), aligned.parts[0].read(rows[[3, 0, 9]]), rtol=1e-5, atol=1e-4)
    assert np.array_equal(maps[1].numpy(), aligned.parts[1].read(rows[[3, 0, 9]]))
    # batches of the encoded arrays, decoded afterwards, are the decoded rows
    seen = [source.decode(parts)[0] for parts, _ in eval_batches(source, batch_size=5)]
    np.testing.assert_allclose(torch.cat(seen).numpy(), aligned.parts[0].read(rows), rtol=1e-5, atol=1e-4)


def test_shuffled_source_moves_every_encoded_array(stores):
    compact, _ = stores["pca:8,int8"]
    aligned = align_tasks(open_stores([str(compact)], dataset="synthetic"), "shapes")
    rows = aligned.rows("val200")
    perm = np.random.default_rng(0).permutation(rows.size)
    part = aligned.parts[0]
    plain = part.read(rows)
    whole = ShuffledSource(aligned, rows, shuffled=0, permutation=perm)
    got = whole.decode([torch.from_numpy(a) for a in whole.read(np.arange(rows.size))])[0].numpy()
    np.testing.assert_allclose(got, plain[perm], rtol=1e-5, atol=1e-4)
    one = ShuffledSource(aligned, rows, shuffled=0, permutation=perm, layer=1)
    got = one.decode([torch.from_numpy(a) for a in one.read(np.arange(rows.size))])[0].numpy()
    expected = plain.copy()
    expected[:, 1] = plain[perm, 1]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------- probing


@pytest.mark.parametrize("text", SPECS)
def test_combo_on_a_compact_store_matches_its_decoded_fp16_copy(stores, text):
    compact, decoded = stores[text]
    a, b = fit([compact]), fit([decoded])
    assert agree(a.predictions, b.predictions) >= 0.90
    assert abs(a.metrics["accuracy"] - b.metrics["accuracy"]) <= 0.05
    assert a.metrics["accuracy"] > 0.8  # the probe learnt the task (chance: 0.25)


def test_mixed_compact_and_fp16_run_probe(stores, tmp_path):
    """A compact 4x4 store beside an fp16 2x2 one: the compact store is decoded in original units and resized."""
    compact, decoded = stores["pca:8,int8"]
    base = dict(protocol="final", **SMALL)
    mixed = run_probe(ProbeConfig(stores=(str(compact), str(stores["small"])), out=str(tmp_path / "a"), **base))
    plain = run_probe(ProbeConfig(stores=(str(decoded), str(stores["small"])), out=str(tmp_path / "b"), **base))
    assert mixed.metrics[0]["grid"] == "2x2"
    assert agree(mixed.fits[0].predictions, plain.fits[0].predictions) >= 0.95
    assert abs(mixed.metrics[0]["accuracy"] - plain.metrics[0]["accuracy"]) <= 0.05
    config = json.loads((mixed.run_dir / "config.json").read_text())
    assert config["stores"][0]["storage"]["compact"]["name"] == "pca8-int8"


def test_streamed_compact_batches_equal_cached_ones(stores):
    compact, _ = stores["int8"]
    cached = fit([compact, stores["source"]], cache="ram", shuffle_window=16)
    streamed = fit([compact, stores["source"]], cache="stream", shuffle_window=16, cache_budget=2**20)
    assert streamed.metrics["cache"] == "stream" and cached.metrics["cache"] == "ram"
    assert np.array_equal(cached.predictions, streamed.predictions)
    assert cached.history["loss"] == pytest.approx(streamed.history["loss"], rel=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_linear_probe_on_a_compact_store(stores, pool):
    compact, decoded = stores["pca:8,int8"]
    a = fit([compact], method="linear", pool=pool, steps=100, lr=1e-2)
    b = fit([decoded], method="linear", pool=pool, steps=100, lr=1e-2)
    if pool == "cls":  # prefix tokens are stored full-size in a compact store: the very same run
        assert np.array_equal(a.predictions, b.predictions) and a.history["loss"] == b.history["loss"]
    else:
        assert a.metrics["accuracy"] > 0.8
        assert agree(a.predictions, b.predictions) >= 0.9


def test_atlas_on_a_compact_store(stores, tmp_path):
    compact, decoded = stores["pca:8,int8"]
    rows = open_store(compact).task("shapes").rows("train800")
    pooled = pool_split(open_store(compact), "shapes", rows, poolings=["mean", "cls"], device=CPU)
    ref = pool_split(open_store(decoded), "shapes", rows, poolings=["mean", "cls"], device=CPU)
    assert torch.equal(pooled["cls"], ref["cls"])
    torch.testing.assert_close(pooled["mean"], ref["mean"], rtol=1e-2, atol=2e-2)  # the copy's float16 rounding
    run = run_atlas([compact], dataset="synthetic", steps=60, batch_size=16, lr=1e-2, device="cpu", out=tmp_path,
                    figures=False)
    accuracy = {(r["pooling"], r["layer"]): r["accuracy"] for r in run.rows}
    assert run.best[0]["accuracy"] > 0.8 and run.best[0]["layer"] in (1, 2)
    assert accuracy[("mean", 0)] < 0.6 and accuracy[("cls", 0)] < 0.6  # the noise layer


def test_relevance_on_compact_and_fp16_stores(stores, tmp_path):
    compact, _ = stores["int8"]
    cfg = ProbeConfig(stores=(str(compact), str(stores["small"])), out=str(tmp_path), **SMALL)
    run = run_relevance(cfg, group_lambda=0.01, layer_heldout=True)
    rows = {r["backbone"]: r for r in run.importances}
    assert set(rows) == {"big", "small"}
    assert rows["big"]["heldout_drop"] > 0.2  # the informative (compact) store costs accuracy when shuffled
    layer = [r for r in run.layer_importances if r["backbone"] == "big"]
    assert min(layer, key=lambda r: r["heldout_drop"])["layer"] == 0  # the noise layer
