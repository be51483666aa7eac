"""The per-layer linear-probe atlas: finds the informative layer, reads each store once, trains all heads together."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import probe.atlas as atlas_module
from combo.cli import app
from probe.atlas import AtlasError, best_per_task, parse_poolings, pool_split, run_atlas
from probe.data import SplitSource
from probe.report import read_csv
from store_schema import StoreLayout, open_store
from tests.storefactory import vtab_like_splits, write_store


N_TRAIN, N_VAL, CLASSES, DIM, GRID = 64, 32, 4, 16, (2, 2)
FAST = dict(dataset="synthetic", steps=100, batch_size=32, lr=1e-2, device="cpu")


def layered_store(path, *, num_layers, signal_layer, alias, prefix_tokens=0, register_signal_layer=None, seed=0, scale=None):
    """Noise everywhere; a class direction on every patch token of ``signal_layer`` and on the cls token (prefix 0)
    of that layer. ``register_signal_layer`` puts a (different) class signal on prefix token 1 (a register) only,
    so a reader that took the wrong prefix token would find that layer instead."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VAL
    labels = np.arange(n) % CLASSES
    dirs = np.random.default_rng(7).standard_normal((2, CLASSES, DIM)).astype(np.float32)
    x = rng.standard_normal((n, num_layers, GRID[0] * GRID[1], DIM)).astype(np.float32)
    x[:, signal_layer] += dirs[0][labels][:, None, :]
    prefix = None
    if prefix_tokens:
        prefix = rng.standard_normal((n, num_layers, prefix_tokens, DIM)).astype(np.float32)
        prefix[:, signal_layer, 0] += 1.5 * dirs[0][labels]
        if register_signal_layer is not None:
            prefix[:, register_signal_layer, 1] += 3.0 * dirs[1][labels]
    if scale is not None:  # per-layer raw scales that differ by orders of magnitude
        x *= np.asarray(scale, dtype=np.float32)[None, :, None, None]
    return write_store(path, tokens=x, prefix=prefix, labels=labels, splits=vtab_like_splits(N_TRAIN, N_VAL, 0), grid=GRID,
                       alias=alias, task="shapes", layout=StoreLayout(rows_per_shard=16, rows_per_chunk=8, dtype="float32"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas-stores")
    return {
        "cls": layered_store(root / "cls.zarr", num_layers=4, signal_layer=2, alias="withcls", prefix_tokens=2, register_signal_layer=1),
        "patch": layered_store(root / "patch.zarr", num_layers=3, signal_layer=1, alias="patchonly", seed=1),
        "one": layered_store(root / "one.zarr", num_layers=1, signal_layer=0, alias="one", seed=2),
        "six": layered_store(root / "six.zarr", num_layers=6, signal_layer=4, alias="six", seed=3, prefix_tokens=1),
        "scaled": layered_store(root / "scaled.zarr", num_layers=3, signal_layer=0, alias="scaled", seed=4, scale=[1e-2, 1.0, 1e3]),
    }


def test_atlas_finds_the_informative_layer(stores, tmp_path):
    run = run_atlas([stores["cls"], stores["patch"]], out=tmp_path, **FAST)
    rows = run.rows
    # withcls: cls + mean for 4 layers; patchonly: no cls token stored -> mean only, 3 layers
    assert len(rows) == 2 * 4 + 3
    assert {(r["backbone"], r["pooling"]) for r in rows} == {("withcls", "cls"), ("withcls", "mean"), ("patchonly", "mean")}
    for backbone, pooling, layer in (("withcls", "cls", 2), ("withcls", "mean", 2), ("patchonly", "mean", 1)):
        line = {r["layer"]: r["accuracy"] for r in rows if r["backbone"] == backbone and r["pooling"] == pooling}
        best = max(line, key=line.get)
        assert best == layer, (backbone, pooling, line)  # cls is prefix token 0, not the register at layer 1
        assert line[layer] >= 0.8 and max(v for k, v in line.items() if k != layer) <= 0.6, line
    best = run.best
    assert len(best) == 1 and best[0]["task"] == "shapes" and best[0]["backbone"] in ("withcls", "patchonly")
    assert best[0]["accuracy"] == max(r["accuracy"] for r in rows)

    folder = run.run_dir
    table = read_csv(folder / "atlas.csv")
    assert {"task", "backbone", "layer", "pooling", "accuracy"} <= set(table[0]) and len(table) == len(rows)
    assert (folder / "atlas.parquet").exists() and len(read_csv(folder / "atlas_best.csv")) == 1
    doc = json.loads((folder / "config.json").read_text())
    assert doc["kind"] == "atlas" and doc["protocol"] == "dev" and doc["poolings"] == ["cls", "mean"]
    assert run.figures == [folder / "atlas-other.png"]
    with Image.open(run.figures[0]) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_pooled_features_are_standardised_per_image_and_layer(stores):
    store = open_store(stores["scaled"])
    rows = store.task("shapes").rows("train800")
    pooled = pool_split(store, "shapes", rows, poolings=("cls", "mean"), device=torch.device("cpu"))
    assert list(pooled) == ["mean"]  # no prefix tokens in this store: cls is left out
    v = pooled["mean"]
    assert v.shape == (rows.size, 3, DIM)
    torch.testing.assert_close(v.mean(dim=-1), torch.zeros(rows.size, 3), atol=1e-5, rtol=0)
    # unit variance where the raw variance dwarfs eps = 1e-5 (layers scaled by 1 and 1e3)
    torch.testing.assert_close(v[:, 1:].var(dim=-1, correction=0), torch.ones(rows.size, 2), atol=1e-3, rtol=0)
    # every layer against a direct computation: (v - mean) / sqrt(var + 1e-5) over channels
    raw = store.task("shapes").read(rows).astype(np.float64).mean(axis=2)
    ref = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(v.numpy(), ref, atol=1e-4)


def test_layers_with_wildly_different_scales_train_with_one_learning_rate(stores, tmp_path):
    run = run_atlas([stores["scaled"]], out=tmp_path, figures=False, **FAST)
    line = {r["layer"]: r["accuracy"] for r in run.rows}
    assert max(line, key=line.get) == 0 and line[0] >= 0.8, line  # signal on the layer scaled by 1e-2


def _count_reads(monkeypatch):
    """Record every SplitSource.read (the one door from a split to the store's arrays)."""
    calls = []
    original = SplitSource.read

    def counting(self, positions, **kwargs):
        calls.append({"store": self.task.reference.store.backbone["alias"], "rows": self.rows[np.asarray(positions)].tolist(),
                      "layers": self.layers, "prefix": self.prefix})
        return original(self, positions, **kwargs)

    monkeypatch.setattr(SplitSource, "read", counting)
    return calls


def test_the_store_is_read_once_per_pass_not_once_per_layer(stores, tmp_path, monkeypatch):
    calls = _count_reads(monkeypatch)
    trainings = []
    original_train = atlas_module.train_steps

    def counting_train(model, batches, cfg, **kw):
        trainings.append(model.num_layers)
        return original_train(model, batches, cfg, **kw)

    monkeypatch.setattr(atlas_module, "train_steps", counting_train)
    run_atlas([stores["one"], stores["six"]], out=tmp_path, figures=False, **{**FAST, "steps": 5})
    assert calls and all(c["layers"] is None for c in calls)  # every read takes all layers at once
    counts = {}
    for store in ("one", "six"):
        for prefix in (False, True):
            mine = [c for c in calls if c["store"] == store and c["prefix"] == prefix]
            if store == "one" and prefix:
                assert not mine  # no prefix tokens stored
                continue
            read_rows = [r for c in mine for r in c["rows"]]
            assert sorted(read_rows) == list(range(N_TRAIN + N_VAL)), (store, prefix)  # each row exactly once
            counts[(store, prefix)] = len(mine)
    assert counts[("six", False)] == counts[("one", False)]  # 6 layers cost the same number of reads as 1
    # one training run per store, holding every (pooling, layer) head
    assert trainings == [1, 2 * 6]


def test_chunked_reads_still_cover_every_row_once(stores, tmp_path, monkeypatch):
    calls = _count_reads(monkeypatch)
    monkeypatch.setattr(atlas_module, "READ_BUDGET_BYTES", 4 * 6 * 4 * DIM * 4)  # ~4 rows of the six-layer store
    run_atlas([stores["six"]], poolings="mean", out=tmp_path, figures=False, **{**FAST, "steps": 5})
    read_rows = [r for c in calls for r in c["rows"]]
    assert sorted(read_rows) == list(range(N_TRAIN + N_VAL))
    assert all(c["layers"] is None and not c["prefix"] for c in calls) and len(calls) > 2


def test_pooling_choice_and_errors(stores, tmp_path):
    assert parse_poolings("mean") == ("mean",) and parse_poolings(["cls", "mean", "cls"]) == ("cls", "mean")
    for bad in ("max", "", "cls,avg"):
        with pytest.raises(AtlasError, match="--pooling"):
            parse_poolings(bad)
    only_mean = run_atlas([stores["cls"]], poolings="mean", out=tmp_path, figures=False, **{**FAST, "steps": 5})
    assert {r["pooling"] for r in only_mean.rows} == {"mean"} and len(only_mean.rows) == 4
    with pytest.raises(AtlasError, match="nothing was probed"):
        run_atlas([stores["patch"]], poolings="cls", out=tmp_path, figures=False, **FAST)
    with pytest.raises(AtlasError, match="--task nope"):
        run_atlas([stores["patch"]], tasks=["nope"], out=tmp_path, **FAST)
    with pytest.raises(AtlasError, match="--protocol"):
        run_atlas([stores["patch"]], protocol="weird", out=tmp_path, **FAST)


def test_best_per_task_breaks_ties_by_table_order():
    rows = [
        {"task": "a", "backbone": "x", "layer": 0, "layer_position": 0, "pooling": "cls", "accuracy": 0.5, "split": "v", "n": 2},
        {"task": "a", "backbone": "x", "layer": 1, "layer_position": 1, "pooling": "cls", "accuracy": 0.9, "split": "v", "n": 2},
        {"task": "a", "backbone": "y", "layer": 0, "layer_position": 0, "pooling": "cls", "accuracy": 0.9, "split": "v", "n": 2},
        {"task": "b", "backbone": "y", "layer": 3, "layer_position": 0, "pooling": "mean", "accuracy": 0.2, "split": "v", "n": 2},
    ]
    best = {b["task"]: b for b in best_per_task(rows)}
    assert (best["a"]["backbone"], best["a"]["layer"], best["a"]["last_layer_accuracy"]) == ("x", 1, 0.9)
    assert (best["b"]["layer"], best["b"]["last_layer"]) == (3, 3)


def test_cli_atlas(stores, tmp_path):
    result = CliRunner().invoke(app, ["atlas", "--stores", f"{stores['cls']},{stores['patch']}", "--dataset", "synthetic",
                                      "--steps", "20", "--batch-size", "32", "--lr", "1e-2", "--device", "cpu",
                                      "--pooling", "cls,mean", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Best layer per task" in result.output and "run folder" in result.output
    folders = list(tmp_path.glob("*atlas-withcls+patchonly*"))
    assert len(folders) == 1
    for name in ("atlas.csv", "atlas_best.csv", "atlas-other.png", "config.json"):
        assert (folders[0] / name).exists(), name
    bad = CliRunner().invoke(app, ["atlas", "--stores", str(stores["cls"]), "--dataset", "synthetic", "--pooling", "max",
                                   "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--pooling" in bad.output
