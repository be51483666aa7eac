"""Stage 2 end to end: stores in, trained ComBo / linear probe and run folder out (`combo probe`).

Stores come from two ways: `extract` over a generated VTAB-layout task with tiny random-init timm ViTs
(32px inputs -> a 2x2 token grid, 12 blocks, D = 192), where the label is the number of bright squares
(see countdata.py), and `storefactory.write_store` for shapes the backbones cannot give cheaply (16x16 vs
14x14 grids, mismatched stores). Adapters are small (width 32, depth 1) so a run takes about a second.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

import store_schema.reader
from combo.cli import app
from combo.cli_probe import results_table
from combo.clikit import parse_grid
from countdata import count_tree
from extract.pipeline import ExtractConfig, extract
from probe.align import normalise_maps
from probe.data import (
    CachePlanError,
    Prefetcher,
    SplitSource,
    budget_from_text,
    cached_batches,
    epoch_order,
    epoch_windows,
    eval_batches,
    plan_cache,
    stream_batches,
)
from probe.results import group_means, markdown_table, read_metrics, sanitise_url
from probe.run import (
    ProbeConfig,
    build_model,
    fit_task,
    linear_prepare,
    model_and_prepare,
    probe_grid,
    run_probe,
    sources_for,
)
from probe.stores import align_tasks, open_stores
from probe.train import epoch_permutation, evaluate
from servers import static_http_server
from store_schema import StoreError, StoreLayout, StoreMismatchError
from store_schema.reader import read_rows
from storefactory import vtab_like_splits, write_store


MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")
TASK = "clevr_count"
CPU = torch.device("cpu")
SMALL = dict(width=32, depth=1, num_heads=2, batch_size=32, grid=(2, 2), device="cpu", steps=120)
runner = CliRunner()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """Two random-init ViTs (different seeds) extracted over the count task: 96 train800val200, 40 test;
    shards of 8 rows, so a budget below the split still leaves room for shuffle windows of several shards."""
    root = tmp_path_factory.mktemp("count")
    count_tree(root / "vtab", TASK, n_train=64, n_val=32, n_test=40)
    for seed, model in enumerate(MODELS):
        extract(ExtractConfig(model=model, dataset="vtab", root=str(root / "vtab"), out=str(root / "stores"),
                              image_size=32, random_init=True, seed=seed, num_workers=0, batch_size=32,
                              layout=StoreLayout(rows_per_shard=8, rows_per_chunk=8)))
    return root / "stores"


def store(root: Path, model: str = MODELS[0]) -> str:
    return str(root / model / "vtab.zarr")


def config(stores, out, **kw) -> ProbeConfig:
    args = {**SMALL, **kw}
    return ProbeConfig(stores=tuple(str(s) for s in stores), dataset="vtab", out=str(out), **args)


def synthetic(path, *, n=(16, 8, 8), grid=(2, 2), layers=1, dim=4, seed=0, task="task", labels=None, ids=None,
              prefix_tokens=0, dataset="synthetic", alias="synthetic", splits=None, rows_per_shard=8):
    """A small store written straight through store_schema; labels cycle over 3 classes."""
    total = sum(n)
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((total, layers, grid[0] * grid[1], dim)).astype(np.float32)
    prefix = rng.standard_normal((total, layers, prefix_tokens, dim)).astype(np.float32) if prefix_tokens else None
    labels = np.arange(total) % 3 if labels is None else np.asarray(labels)
    return write_store(path, tokens=tokens, labels=labels, splits=splits or vtab_like_splits(*n), grid=grid, task=task,
                       alias=alias, dataset=dataset, prefix=prefix, sample_ids=ids, num_classes=3,
                       layout=StoreLayout(rows_per_shard=rows_per_shard, rows_per_chunk=4, dtype="float32"))


# ------------------------------------------------------------------------------------------------ learning


def test_combo_learns_a_visible_count_end_to_end(store_root, tmp_path):
    run = run_probe(config([store(store_root)], tmp_path))
    m = run.metrics[0]
    assert (m["task"], m["split"], m["n"], m["n_train"]) == (TASK, "test", 40, 96)
    assert m["method"] == "combo" and m["group"] == "structured" and m["cache"] == "ram"
    assert m["accuracy"] >= 0.85, m  # chance is 0.25
    loss = run.fits[0].history["loss"]
    assert np.mean(loss[-10:]) < 0.4 * np.mean(loss[:10]), loss


def test_two_backbones_stack_their_layers(store_root, tmp_path):
    run = run_probe(config([store(store_root, m) for m in MODELS], tmp_path))
    model = run.fits[0].model
    assert model.cfg.layers_per_backbone == (12, 12) and model.lambda_map.shape == (32, 24, 192)
    assert model.backbone_norms().shape == (2,)
    assert run.metrics[0]["accuracy"] >= 0.85, run.metrics


def test_run_folder_holds_weights_predictions_metrics_and_tables(store_root, tmp_path):
    run = run_probe(config([store(store_root, m) for m in MODELS], tmp_path))
    folder = run.run_dir
    assert folder.parent == tmp_path
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", f"adapter-{TASK}.safetensors", f"predictions-{TASK}.parquet", "metrics.csv",
            "metrics.parquet", "results.md"} <= names
    doc = json.loads((folder / "config.json").read_text())
    assert doc["kind"] == "probe" and doc["method"] == "combo" and doc["steps"] == 120
    assert [s["backbone"]["alias"] for s in doc["stores"]] == list(MODELS)
    assert doc["stores"][0]["backbone"]["weights_source"] == "random-init" and doc["stores"][1]["backbone"]["seed"] == 1
    assert doc["tasks"][TASK]["classes"] == [str(i) for i in range(8)]  # VTAB's clevr_count has 8 classes
    assert doc["tasks"][TASK]["model"]["kind"] == "combo" and doc["train"]["lr"] == 1e-3
    assert "storage_options" not in doc
    # the saved weights rebuild the model and give the recorded predictions
    model = build_model("combo", doc["tasks"][TASK]["model"])
    model.load_state_dict(load_file(str(folder / f"adapter-{TASK}.safetensors")))
    aligned = align_tasks(open_stores(doc["store_refs"], dataset="vtab"), TASK)
    source = sources_for(aligned, aligned.rows("test"), "combo")
    prepare = model_and_prepare(aligned, source, config(doc["store_refs"], tmp_path))[3]
    accuracy, n, preds = evaluate(model, eval_batches(source, batch_size=7), device=CPU, prepare=prepare)
    table = pq.read_table(folder / f"predictions-{TASK}.parquet").to_pydict()
    assert list(table) == ["row", "sample_id", "label", "prediction"]
    assert table["prediction"] == preds.tolist() and n == 40
    assert table["sample_id"][0] == f"{TASK}/images/test/000000.png"
    assert accuracy == pytest.approx(run.metrics[0]["accuracy"])
    # metrics.csv: one row per task with at least these columns
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and {"task", "split", "accuracy", "n", "group", "method", "steps"} <= set(rows[0])
    assert read_metrics(folder)[0]["accuracy"] == pytest.approx(run.metrics[0]["accuracy"])
    assert pq.read_table(folder / "metrics.parquet").num_rows == 1
    text = (folder / "results.md").read_text()
    assert f"| {TASK} | structured | test | 40 |" in text and "Overall" in text


def test_linear_probe_default_is_the_authors_mean_of_normalised_patch_tokens(store_root, tmp_path):
    """PAPER.md: the authors' linear probe reads the last block's patch tokens after the per-map normalisation,
    mean-pooled; the cls token is an option."""
    stores = [store(store_root, m) for m in MODELS]
    run = run_probe(config(stores, tmp_path, method="linear", lr=1e-2))
    fit = run.fits[0]
    assert fit.model_config == {"kind": "linear", "feature_dim": 384, "num_classes": 8, "uses_prefix": [False, False],
                                "pool": "mean", "pooled": ["mean", "mean"], "normalise": "map, then pool"}
    assert run.metrics[0]["method"] == "linear" and run.metrics[0]["pool"] == "mean"
    assert json.loads((run.run_dir / "config.json").read_text())["pool"] == "mean"
    aligned = align_tasks(open_stores(stores), TASK)
    source = sources_for(aligned, aligned.rows("train800val200"), "linear")
    assert source.layers == [[11], [11]] and source.row_bytes() == 2 * (1 * 4 * 192 * 2)  # last layer, 2x2 tokens
    parts = source.read(np.arange(6))
    x = model_and_prepare(aligned, source, config(stores, tmp_path, method="linear"))[3]([torch.from_numpy(p) for p in parts])
    # by hand: each image's last-layer map [T, D] standardised over all its values, then the mean over T
    hand = []
    for p in parts:
        m = p[:, 0].astype(np.float64)
        mu = m.mean(axis=(1, 2), keepdims=True)
        sd = np.sqrt(m.var(axis=(1, 2), keepdims=True) + 1e-5)
        hand.append(((m - mu) / sd).mean(axis=1))
    np.testing.assert_allclose(x.numpy(), np.concatenate(hand, axis=1), rtol=1e-4, atol=1e-5)

    cls_run = run_probe(config(stores, tmp_path, method="linear", lr=1e-2, pool="cls"))
    assert cls_run.fits[0].model_config["uses_prefix"] == [True, True]
    assert cls_run.fits[0].model_config["pooled"] == ["cls", "cls"] and cls_run.metrics[0]["pool"] == "cls"
    source = sources_for(aligned, aligned.rows("train800val200"), "linear", pool="cls")
    assert source.row_bytes() == 2 * (1 * 1 * 192 * 2)  # one layer, one cls token, float16, per store
    with pytest.raises(ValueError, match="--pool 'max'"):
        config(stores, tmp_path, method="linear", pool="max")


def test_linear_prepare_keeps_the_pre_recorded_pooling_for_old_runs():
    """Run folders from before the pooling was recorded pooled first, then standardised over channels;
    `combo predict` rebuilds those with legacy=True (no "normalise" key in their model config)."""
    torch.manual_seed(0)
    x = torch.randn(5, 1, 9, 6) * torch.linspace(0.5, 4, 9)[None, None, :, None] + 3
    old = linear_prepare([False], legacy=True)([x])
    pooled = x[:, 0].mean(dim=1)
    torch.testing.assert_close(old, (pooled - pooled.mean(1, keepdim=True)) / torch.sqrt(pooled.var(1, unbiased=False, keepdim=True) + 1e-5))
    new = linear_prepare([False])([x])
    torch.testing.assert_close(new, normalise_maps(x)[:, 0].mean(dim=1))
    assert not torch.allclose(old, new, atol=1e-3)


def test_linear_probe_mixes_cls_and_mean_pooled_stores(tmp_path):
    with_cls = synthetic(tmp_path / "a.zarr", layers=2, prefix_tokens=2, alias="a")
    patch_only = synthetic(tmp_path / "b.zarr", layers=3, seed=1, alias="b")
    aligned = align_tasks(open_stores([str(with_cls), str(patch_only)]), "task")
    source = sources_for(aligned, aligned.rows("train800"), "linear", pool="cls")
    assert [source.prefix_of(0), source.prefix_of(1)] == [True, False]  # no cls in b: its patch tokens
    assert source.layers == [[1], [2]]
    parts = source.read(np.arange(3))
    assert parts[0].shape == (3, 1, 2, 4) and parts[1].shape == (3, 1, 4, 4)
    cfg = ProbeConfig(stores=(str(with_cls), str(patch_only)), dataset="synthetic", method="linear", protocol="dev",
                      steps=5, batch_size=8, device="cpu", out=str(tmp_path / "runs"), pool="cls")
    kind, model_config, _, prepare = model_and_prepare(aligned, source, cfg)
    x = prepare([torch.from_numpy(p) for p in parts])
    # cls token 0 of the last layer standardised over its channels; the patch map standardised, then averaged
    expect_a = normalise_maps(torch.from_numpy(parts[0][:, 0, 0, :])[:, None, None, :])[:, 0, 0]
    expect_b = normalise_maps(torch.from_numpy(parts[1][:, :1]))[:, 0].mean(dim=1)
    assert torch.allclose(x, torch.cat([expect_a, expect_b], dim=1), atol=1e-6)
    assert kind == "linear" and model_config["uses_prefix"] == [True, False]
    assert model_config["pooled"] == ["cls", "mean"]
    fit = fit_task(aligned, cfg, device=CPU)
    assert fit.metrics["n"] == 8


# --------------------------------------------------------------------------------------------- alignment


def test_grid_alignment_of_a_16x16_store_with_a_14x14_one(tmp_path):
    big = synthetic(tmp_path / "dinolike.zarr", grid=(16, 16), layers=2, dim=8, alias="dinolike")
    small = synthetic(tmp_path / "vitlike.zarr", grid=(14, 14), layers=3, dim=8, seed=1, alias="vitlike")
    cfg = ProbeConfig(stores=(str(big), str(small)), dataset="synthetic", protocol="dev", steps=3, batch_size=8,
                      width=16, depth=1, device="cpu", out=str(tmp_path / "runs"))
    assert cfg.grid is None  # the authors' rule: the smallest grid when the stores' grids differ
    aligned = align_tasks(open_stores(cfg.stores), "task")
    assert aligned.grids == [(16, 16), (14, 14)] and probe_grid(aligned, cfg) == (14, 14)
    source = sources_for(aligned, aligned.rows("train800"), "combo")
    _, model_config, model, prepare = model_and_prepare(aligned, source, cfg)
    parts = [torch.from_numpy(p) for p in source.read(np.arange(5))]
    x = prepare(parts)
    assert x.shape == (5, 5, 196, 8)  # [B, L = 2 + 3, T = 14 * 14, D]
    assert model_config["num_tokens"] == 196 and model.pos_embed.shape == (1, 197, 16)
    # the 16x16 maps: bilinear, align_corners=False, then standardised per (image, layer)
    maps = parts[0].reshape(5 * 2, 16, 16, 8).permute(0, 3, 1, 2)
    resized = F.interpolate(maps, size=(14, 14), mode="bilinear", align_corners=False)
    expect = normalise_maps(resized.permute(0, 2, 3, 1).reshape(5, 2, 196, 8))
    assert torch.allclose(x[:, :2], expect, atol=1e-5)
    assert torch.allclose(x[:, 2:], normalise_maps(parts[1]), atol=1e-6)  # 14x14 is not resampled
    seen = []
    run = run_probe(cfg)
    run.fits[0].model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    evaluate(run.fits[0].model, eval_batches(sources_for(aligned, aligned.rows("val200"), "combo"), batch_size=8),
             device=CPU, prepare=prepare)
    assert seen == [(8, 5, 196, 8)]
    assert json.loads((run.run_dir / "config.json").read_text())["tasks"]["task"]["grids"] == [[16, 16], [14, 14]]


def test_default_grid_follows_the_authors_and_is_recorded(tmp_path):
    """One store keeps its native grid (DINOv2-B/14 alone: 16x16); several share theirs or take the smallest."""
    dino = synthetic(tmp_path / "dino.zarr", grid=(16, 16), dim=8, alias="dino")
    small = synthetic(tmp_path / "small.zarr", grid=(4, 4), dim=8, seed=1, alias="small")
    small2 = synthetic(tmp_path / "small2.zarr", grid=(4, 4), dim=8, seed=2, alias="small2")
    base = dict(dataset="synthetic", protocol="dev", steps=2, batch_size=8, width=16, depth=1, device="cpu")
    cases = [((dino,), (16, 16)), ((small, small2), (4, 4)), ((dino, small), (4, 4))]
    for stores, grid in cases:
        run = run_probe(ProbeConfig(stores=tuple(str(p) for p in stores), out=str(tmp_path / "runs"), **base))
        assert run.fits[0].model.cfg.num_tokens == grid[0] * grid[1]
        doc = json.loads((run.run_dir / "config.json").read_text())
        assert doc["grid"] == list(grid) and doc["grid_requested"].startswith("auto")
        assert doc["tasks"]["task"]["model"]["grid"] == list(grid)
        assert run.metrics[0]["grid"] == f"{grid[0]}x{grid[1]}"
    run = run_probe(ProbeConfig(stores=(str(dino), str(small)), out=str(tmp_path / "runs"), grid=(14, 14), **base))
    doc = json.loads((run.run_dir / "config.json").read_text())
    assert doc["grid"] == doc["grid_requested"] == [14, 14] and run.fits[0].model.cfg.num_tokens == 196


def test_backbones_of_different_widths_train_rank_and_select(tmp_path):
    """A ViT-Ti-like store (D = 192, 12 layers) with a ViT-S-like one (D = 384, 24 layers): per-backbone slices."""
    n = (48, 16, 24)
    labels = np.arange(sum(n)) % 3
    rng = np.random.default_rng(0)
    tiny = rng.standard_normal((sum(n), 12, 4, 192)).astype(np.float32)
    onehot = np.repeat(np.eye(3, dtype=np.float32)[labels], 32, axis=1)  # 96 channels, a block per class
    tiny[:, 5, :, :96] += 2.0 * onehot[:, None, :]  # the label, visible in one layer
    write_store(tmp_path / "tiny.zarr", tokens=tiny, labels=labels, splits=vtab_like_splits(*n), grid=(2, 2),
                alias="tiny", dataset="synthetic", num_classes=3, layout=StoreLayout(rows_per_shard=8, rows_per_chunk=4))
    # the wider, deeper store: one fixed map shared by every image (plus 1% noise), so it holds no per-image
    # information and cannot be memorised either (independent noise of this size is: see issue 13)
    noise = (rng.standard_normal((1, 24, 4, 384)) + 0.01 * rng.standard_normal((sum(n), 24, 4, 384))).astype(np.float32)
    write_store(tmp_path / "small.zarr", tokens=noise, labels=labels, splits=vtab_like_splits(*n), grid=(2, 2),
                alias="small", dataset="synthetic", num_classes=3, layout=StoreLayout(rows_per_shard=8, rows_per_chunk=4))
    stores = (str(tmp_path / "tiny.zarr"), str(tmp_path / "small.zarr"))
    # init torch: with the authors' init this 48-image fit sat on ComBo's start plateau (31-56%) on some CPUs and
    # thread counts (benchmarks/init_plateau.py); this test is about the mixed widths, not the init
    cfg = ProbeConfig(stores=stores, dataset="synthetic", protocol="dev", steps=150, batch_size=16, width=16, depth=1,
                      init="torch",
                      lr=3e-3, device="cpu", out=str(tmp_path / "runs"))
    run = run_probe(cfg)
    model = run.fits[0].model
    assert model.cfg.layers_per_backbone == (12, 24) and model.cfg.dims == (192, 384)
    assert [tuple(w.shape) for w in model.lambda_slices()] == [(16, 12, 192), (16, 24, 384)]
    assert model.lambda_weight.numel() == 16 * (12 * 192 + 24 * 384)
    assert run.metrics[0]["accuracy"] >= 0.6, run.metrics  # chance 1/3
    doc = json.loads((run.run_dir / "config.json").read_text())
    rebuilt = build_model("combo", doc["tasks"]["task"]["model"])
    rebuilt.load_state_dict(load_file(str(run.run_dir / "adapter-task.safetensors")))
    assert rebuilt.cfg.dims == (192, 384)
    from probe.adapter import expected_num_params
    from probe.report import render_report

    render_report(run.run_dir)  # the report's setup covers the mixed case
    text = (run.run_dir / "report.md").read_text()
    assert "| tiny | synthetic (random init) | 12 | 192 | 2x2 | 36,864 |" in text
    assert "| small | synthetic (random init) | 24 | 384 | 2x2 | 147,456 |" in text
    assert f"Trainable parameters (first task): {expected_num_params(model.cfg):,}." in text
    assert expected_num_params(model.cfg) == sum(p.numel() for p in model.parameters())
    assert "Common grid: **2x2** (the authors' rule" in text

    from probe.relevance import run_relevance, run_select

    rel = run_relevance(cfg, group_lambda=0.05)
    ranks = {r["backbone"]: r["rank"] for r in rel.importances}
    assert ranks == {"tiny": 1, "small": 2}, rel.importances
    layers = [r for r in rel.layer_importances if r["backbone"] == "small"]
    assert len(layers) == 24
    chosen = run_select(cfg, select="top-1", group_lambda=0.05)
    assert chosen.chosen["task"] == ["tiny"]


def test_grid_option_sets_the_common_grid(tmp_path):
    big = synthetic(tmp_path / "a.zarr", grid=(16, 16), dim=8)
    run = run_probe(ProbeConfig(stores=(str(big),), dataset="synthetic", protocol="dev", steps=2, batch_size=8,
                                width=16, depth=1, grid=parse_grid("8x8"), device="cpu", out=str(tmp_path)))
    assert run.fits[0].model.cfg.num_tokens == 64
    assert parse_grid("14") == (14, 14) and parse_grid("7x9") == (7, 9)
    for bad in ("0", "1x2x3", "abc", "x"):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad)


# --------------------------------------------------------------------------------------------- mismatches


def _refused(tmp_path, refs, match, **kw):
    out = tmp_path / "runs"
    with pytest.raises((StoreMismatchError, StoreError, ValueError), match=match) as err:
        run_probe(ProbeConfig(stores=tuple(str(r) for r in refs), dataset="synthetic", protocol="dev", steps=2,
                              batch_size=8, width=8, depth=1, device="cpu", out=str(out), **kw))
    assert not out.exists() or not any(out.iterdir()), "nothing may be trained or written before the check"
    return str(err.value)


def test_mismatched_stores_are_refused_naming_the_store(tmp_path):
    ref = synthetic(tmp_path / "ref.zarr")
    labels = np.arange(32) % 3
    labels[5] = (labels[5] + 1) % 3
    relabelled = synthetic(tmp_path / "relabelled.zarr", labels=labels, seed=1)
    message = _refused(tmp_path, [ref, relabelled], "labels 1 sample")
    assert str(relabelled) in message and "task/img00005.png" in message

    ids = [f"task/other{i:05d}.png" for i in range(32)]
    others = synthetic(tmp_path / "others.zarr", ids=ids, seed=2)
    message = _refused(tmp_path, [ref, others], "different samples")
    assert str(others) in message and "task/other00000.png" in message

    elsewhere = synthetic(tmp_path / "elsewhere.zarr", task="another")
    message = _refused(tmp_path, [ref, elsewhere], "has no task task", tasks=("task",))
    assert str(elsewhere) in message
    assert "no task in common" in _refused(tmp_path, [ref, elsewhere], "no task in common")

    split_rows = vtab_like_splits(16, 8, 8)
    split_rows[0], split_rows[20] = split_rows[20], split_rows[0]
    resplit = synthetic(tmp_path / "resplit.zarr", splits=split_rows, seed=4)
    message = _refused(tmp_path, [ref, resplit], "differently")
    assert str(resplit) in message and "task/img00000.png" in message

    other_data = synthetic(tmp_path / "otherdata.zarr", dataset="digits")
    assert str(other_data) in _refused(tmp_path, [ref, other_data], "different datasets")
    assert str(ref) in _refused(tmp_path, [ref, ref], "listed twice")
    assert "does-not-exist" in _refused(tmp_path, [ref, tmp_path / "does-not-exist.zarr"], "no feature store")


def test_stores_listing_samples_in_another_order_are_joined_by_id(tmp_path):
    ref = synthetic(tmp_path / "ref.zarr")
    perm = np.random.default_rng(0).permutation(32)
    base_ids = [f"task/img{i:05d}.png" for i in range(32)]
    rng = np.random.default_rng(7)
    tokens = rng.standard_normal((32, 1, 4, 4)).astype(np.float32)
    shuffled = write_store(tmp_path / "shuffled.zarr", tokens=tokens[perm], labels=(np.arange(32) % 3)[perm],
                           splits=[vtab_like_splits(16, 8, 8)[i] for i in perm], grid=(2, 2),
                           sample_ids=[base_ids[i] for i in perm], num_classes=3,
                           layout=StoreLayout(rows_per_shard=8, rows_per_chunk=4, dtype="float32"))
    aligned = align_tasks(open_stores([str(ref), str(shuffled)]), "task")
    source = SplitSource(aligned, aligned.rows("train800"))
    got = source.read(np.array([3, 0, 15]))[1]
    assert np.array_equal(got, tokens[[3, 0, 15]])  # sample i of the reference, whatever its row in the other store


def test_short_names_resolve_under_the_store_root(store_root, tmp_path):
    stores = open_stores(list(MODELS), store_root=str(store_root), dataset="vtab")
    assert [s.backbone["alias"] for s in stores] == list(MODELS)
    with pytest.raises(FileNotFoundError, match="short name 'nothere' resolves to"):
        open_stores(["nothere"], store_root=str(store_root), dataset="vtab")


# ---------------------------------------------------------------------------------------- order and caching


@pytest.mark.parametrize("span_bytes", [1, 10**9])  # one zarr call per shard / neighbouring shards merged
def test_read_rows_gives_exactly_the_requested_rows(tmp_path, monkeypatch, span_bytes):
    path = synthetic(tmp_path / "s.zarr", n=(30, 5, 6), layers=3, rows_per_shard=8)
    monkeypatch.setattr(store_schema.reader, "SPAN_BYTES", span_bytes)
    tokens = open_stores([str(path)])[0].task("task").tokens
    full = tokens[:]
    picks = [np.random.default_rng(0).permutation(41)[:17], np.array([40, 0, 3, 3, 9]), np.arange(41)[::-1], np.array([0, 0, 2, 3, 4, 5, 6, 7]),
             np.array([7, 8]), np.array([], dtype=np.int64)]
    for rows in picks:
        assert np.array_equal(read_rows(tokens, rows, layers=None, rows_per_shard=8), full[rows])
        assert np.array_equal(read_rows(tokens, rows, layers=[2, 0], rows_per_shard=8), full[rows][:, [2, 0]])
    with pytest.raises(IndexError, match="s.zarr: rows outside 0..40"):
        read_rows(tokens, np.array([41]), layers=None, rows_per_shard=8, where="s.zarr")


def test_epoch_windows_shuffle_whole_shards_within_bounded_windows(tmp_path):
    path = synthetic(tmp_path / "s.zarr", n=(40, 8, 8), rows_per_shard=8)
    aligned = align_tasks(open_stores([str(path)]), "task")
    source = SplitSource(aligned, aligned.rows("train800val200"))  # 48 rows = 6 shards of 8
    assert np.array_equal(epoch_order(source, epoch=3, seed=5, window_rows=None), epoch_permutation(48, 3, 5))
    assert np.array_equal(epoch_order(source, epoch=3, seed=5, window_rows=48), epoch_permutation(48, 3, 5))
    windows = epoch_windows(source, epoch=0, seed=5, window_rows=20)
    assert np.array_equal(np.sort(np.concatenate(windows)), np.arange(48))
    shard = source.rows // 8  # the store row's shard
    for w in windows:
        assert w.size <= 20 and w.size % 8 == 0  # whole shards, at most the window
        assert all((shard == s).sum() == (shard[w] == s).sum() for s in np.unique(shard[w]))
    assert not np.array_equal(epoch_order(source, epoch=0, seed=5, window_rows=20),
                              epoch_order(source, epoch=1, seed=5, window_rows=20))


@pytest.mark.parametrize("window, batch, sizes", [(16, 10, [10, 10, 10, 10, 10, 3]), (8, 20, [20, 20, 13])])
def test_stream_batches_equal_cached_batches_with_the_same_window(tmp_path, window, batch, sizes):
    a = synthetic(tmp_path / "a.zarr", n=(45, 8, 8), rows_per_shard=8, layers=2)
    b = synthetic(tmp_path / "b.zarr", n=(45, 8, 8), rows_per_shard=8, seed=9, alias="b")
    aligned = align_tasks(open_stores([str(a), str(b)]), "task")
    source = SplitSource(aligned, aligned.rows("train800val200"))  # 53 rows in 7 shards (the last has 5)
    streamed = stream_batches(source, batch_size=batch, seed=1, window_rows=window)
    cached = cached_batches(source, batch_size=batch, seed=1, window_rows=window)
    seen = []
    for _ in range(3 * len(sizes) + 2):  # three and a bit epochs
        (xs, ys), (xc, yc) = next(streamed), next(cached)
        seen.append(int(ys.shape[0]))
        assert torch.equal(ys, yc) and all(torch.equal(s, c) for s, c in zip(xs, xc))
    assert seen[: 2 * len(sizes)] == sizes * 2  # the last batch of each epoch is smaller, as in cached mode
    streamed.close()


def test_plan_cache_picks_ram_stream_and_windows_from_the_budget(store_root):
    aligned = align_tasks(open_stores([store(store_root)]), TASK)
    source = sources_for(aligned, aligned.rows("train800val200"), "combo")
    row = source.row_bytes()
    assert row == 12 * 4 * 192 * 2
    fits = plan_cache(source, mode="auto", budget_bytes=96 * row, device=CPU, batch_size=32)
    assert (fits.mode, fits.window_rows, fits.split_bytes) == ("ram", None, 96 * row)
    streams = plan_cache(source, mode="auto", budget_bytes=95 * row, device=CPU, batch_size=32)
    assert streams.mode == "stream" and streams.window_rows == 8  # (95 - 2 * 32) // 6 = 5, raised to one shard
    assert "exceeds the budget" in streams.note
    streams = plan_cache(source, mode="auto", budget_bytes=80 * row, device=CPU, batch_size=16)
    assert (streams.mode, streams.window_rows, streams.note) == ("stream", 8, "")  # (80 - 2 * 16) // 6 windows
    device = plan_cache(source, mode="device", budget_bytes=10 * row, device=CPU, batch_size=32)
    assert device.mode == "ram" and "no CUDA" in device.note
    windowed = plan_cache(source, mode="ram", budget_bytes=row, device=CPU, batch_size=32, shuffle_window=48)
    assert (windowed.mode, windowed.window_rows) == ("ram", 48)
    with pytest.raises(CachePlanError, match="--cache 'disk'"):
        plan_cache(source, mode="disk", budget_bytes=row, device=CPU, batch_size=32)
    with pytest.raises(CachePlanError, match="at least one row"):
        plan_cache(source, mode="ram", budget_bytes=row, device=CPU, batch_size=32, shuffle_window=0)


@pytest.mark.parametrize("text, value", [("8GiB", 8 * 2**30), ("8G", 8 * 2**30), ("512MB", 512 * 10**6),
                                         ("1.5 kib", 1536), ("1e9", 10**9), ("300", 300)])
def test_budget_from_text(text, value):
    assert budget_from_text(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "GiB", "nanMB"])
def test_budget_from_text_refuses_nonsense(text):
    with pytest.raises(ValueError, match="--cache-budget"):
        budget_from_text(text)


def test_stream_mode_trains_exactly_like_cached_mode_with_the_same_window(store_root, tmp_path, monkeypatch):
    """A store larger than the budget streams (window < n, reads bounded by the window) and gives the same
    weights and predictions as a cached run with the same shuffle window."""
    path = store(store_root)
    aligned = align_tasks(open_stores([path]), TASK)
    source = sources_for(aligned, aligned.rows("train800val200"), "combo")
    budget = 80 * source.row_bytes()  # the split has 96 rows; 6 windows of 8 rows + 2 batches of 16 fit
    reads: list[tuple[str, int]] = []
    original = SplitSource.read

    def spy(self, positions, **kwargs):
        reads.append((threading.current_thread().name, len(positions)))
        return original(self, positions, **kwargs)

    monkeypatch.setattr(SplitSource, "read", spy)
    streamed = run_probe(config([path], tmp_path / "stream", cache="auto", cache_budget=budget, batch_size=16))
    monkeypatch.setattr(SplitSource, "read", original)
    m = streamed.metrics[0]
    assert m["cache"] == "stream" and m["shuffle_window"] == 8 < source.n
    train_reads = [n for name, n in reads if name == "combo-stream"]
    assert train_reads and max(train_reads) <= 8  # never more than one window at a time
    assert sum(train_reads) >= 120 * 16 - 96  # every epoch is read again from the store: it really streams
    assert not [n for name, n in reads if name not in ("combo-stream", "combo-eval")]  # nothing cached
    cached = run_probe(config([path], tmp_path / "cached", cache="ram", shuffle_window=8, batch_size=16))
    assert cached.metrics[0]["cache"] == "ram" and cached.metrics[0]["shuffle_window"] == 8
    a, b = streamed.fits[0].model.state_dict(), cached.fits[0].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(streamed.fits[0].predictions, cached.fits[0].predictions)
    assert streamed.fits[0].history["loss"] == cached.fits[0].history["loss"]
    full = run_probe(config([path], tmp_path / "full", cache="ram", batch_size=16))
    gap = m["accuracy"] - full.metrics[0]["accuracy"]
    print(f"\nstream (shuffle window 8 of 96 rows) accuracy {m['accuracy']:.3f} vs cached full shuffle "
          f"{full.metrics[0]['accuracy']:.3f} (gap {gap:+.3f})")
    assert abs(gap) <= 0.15 and full.metrics[0]["accuracy"] >= 0.85


def test_streaming_from_a_web_server_equals_streaming_from_disk(store_root, tmp_path):
    budget = 80 * 12 * 4 * 192 * 2
    local = run_probe(config([store(store_root)], tmp_path / "local", cache="stream", cache_budget=budget,
                             batch_size=16, steps=30))
    with static_http_server(store_root) as server:
        url = f"{server.url}/{MODELS[0]}/vtab.zarr"
        remote = run_probe(config([url], tmp_path / "remote", cache="stream", cache_budget=budget, batch_size=16,
                                  steps=30))
        assert any("/tokens/" in r for r in server.requests)
    assert remote.metrics[0]["cache"] == "stream" and remote.metrics[0]["shuffle_window"] == 8
    a, b = local.fits[0].model.state_dict(), remote.fits[0].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    doc = json.loads((remote.run_dir / "config.json").read_text())
    assert doc["stores"][0]["url"] == url and doc["store_refs"] == [url]


def test_prefetcher_hands_errors_to_the_consumer_and_stops_on_close():
    def broken():
        yield 1
        raise OSError("shard 3 is unreadable")

    items = iter(Prefetcher(broken()))
    assert next(items) == 1
    with pytest.raises(OSError, match="shard 3"):
        next(items)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    prefetch = Prefetcher(endless(), depth=1)
    assert next(iter(prefetch)) == 0
    prefetch.close()
    prefetch._thread.join(timeout=2)
    assert not prefetch._thread.is_alive() and len(produced) <= 4


# ------------------------------------------------------------------------------------------------ results


def test_vtab_table_uses_the_mean_of_group_means():
    rows = [
        {"task": "cifar", "split": "test", "accuracy": 0.9, "n": 10, "group": "natural"},
        {"task": "dtd", "split": "test", "accuracy": 0.5, "n": 10, "group": "natural"},
        {"task": "eurosat", "split": "test", "accuracy": 0.8, "n": 10, "group": "specialised"},
        {"task": "clevr_count", "split": "test", "accuracy": 0.3, "n": 10, "group": "structured"},
        {"task": "dsprites_loc", "split": "test", "accuracy": 0.1, "n": 10, "group": None},  # group from the name
        {"task": "kitti", "split": "test", "accuracy": 0.2, "n": 10, "group": "structured"},
    ]
    means, overall = group_means(rows)
    assert means == pytest.approx({"natural": 0.7, "specialised": 0.8, "structured": 0.2})
    assert overall == pytest.approx((0.7 + 0.8 + 0.2) / 3)  # 56.7, not the mean over tasks (46.7)
    text = markdown_table(rows, title="t", vtab=True)
    assert "| 70.0 | 80.0 | 20.0 | 56.7 |" in text
    lines = [line for line in text.splitlines() if line.startswith("| ") and "test" in line]
    assert [line.split("|")[1].strip() for line in lines] == ["cifar", "dtd", "eurosat", "clevr_count", "dsprites_loc", "kitti"]
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(results_table(rows, title="t", vtab=True))
    rendered = console.export_text()
    assert "56.7" in rendered and "Overall" in rendered and "Structured" in rendered
    assert group_means([{"task": "digits", "accuracy": 0.5, "group": None}]) == ({}, None)
    only_two = markdown_table(rows[:3], title="t", vtab=True)
    assert "| 70.0 | 80.0 | - | 75.0 |" in only_two


def test_config_has_no_storage_options_or_url_credentials(store_root, tmp_path):
    cfg = config([store(store_root)], tmp_path, storage_options={"endpoint_url": "http://sneaky.example:9000",
                                                                  "key": "AKIASECRET"})
    run = run_probe(cfg)
    text = (run.run_dir / "config.json").read_text()
    assert "sneaky" not in text and "AKIASECRET" not in text and "storage_options" not in text
    assert sanitise_url("s3://user:pw@bucket/x.zarr?X-Amz-Signature=abc") == "s3://bucket/x.zarr"
    assert sanitise_url("/local/path?.zarr") == "/local/path?.zarr"


def test_probe_config_refuses_bad_values():
    for kwargs, match in [
        ({"protocol": "best"}, "--protocol"), ({"method": "mlp"}, "--method"), ({"stores": ()}, "--stores"),
        ({"steps": 0}, "--steps"), ({"batch_size": 0}, "--batch-size"), ({"lr": 0.0}, "--lr"),
        ({"cache": "disk"}, "--cache"), ({"grid": (0, 14)}, "--grid"), ({"width": 30, "num_heads": 4}, "width"),
        ({"shuffle_window": 0}, "--shuffle-window"),
    ]:
        with pytest.raises(ValueError, match=match):
            ProbeConfig(**{"stores": ("a",), **kwargs})
    cfg = ProbeConfig(stores=["a", "b"], grid=7, tasks="dtd")
    assert cfg.stores == ("a", "b") and cfg.grid == (7, 7) and cfg.tasks == ("dtd",)
    assert ProbeConfig(stores=("a",), protocol="dev").total_steps == 1300
    assert ProbeConfig(stores=("a",)).total_steps == 1600


# ---------------------------------------------------------------------------------------------------- CLI


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def probe_args(store_root, out, *extra):
    return ["probe", "--stores", ",".join(MODELS), "--store-root", store_root, "--dataset", "vtab", "--task", TASK,
            "--steps", "60", "--batch-size", "32", "--grid", "2", "--width", "32", "--depth", "1", "--out", out,
            *extra]


def test_cli_probe_prints_the_table_and_the_run_folder(store_root, tmp_path):
    result = cli(*probe_args(store_root, tmp_path / "runs", "--storage-option", "endpoint_url=http://sneaky.example"))
    assert result.exit_code == 0, result.output
    assert "Overall" in result.output and TASK in result.output and "Structured" in result.output
    line = [x for x in result.output.splitlines() if x.startswith("run folder: ")][-1]
    folder = Path(line[len("run folder: "):].strip())
    assert folder.is_dir() and folder.parent == tmp_path / "runs"
    assert (folder / "metrics.csv").is_file() and "sneaky" not in (folder / "config.json").read_text()
    result = cli(*probe_args(store_root, tmp_path / "runs", "--method", "linear", "--cache", "stream",
                             "--cache-budget", "1MiB"))
    assert result.exit_code == 0, result.output
    assert "cache stream" in result.output


def test_cli_probe_select_retrains_on_the_chosen_backbones(store_root, tmp_path):
    result = cli(*probe_args(store_root, tmp_path, "--select", "top-1", "--lambda", "0.05"))
    assert result.exit_code == 0, result.output
    assert "selected backbones" in result.output and "run folder: " in result.output


@pytest.mark.parametrize("extra, message", [
    (["--protocol", "best"], "--protocol 'best'"),
    (["--grid", "3x3x3"], "--grid"),
    (["--cache", "disk"], "--cache 'disk'"),
    (["--cache-budget", "lots"], "--cache-budget"),
    (["--select", "top-3"], "only 2"),
    (["--select", "most"], "--select 'most'"),
    (["--storage-option", "secret=hunter2"], "credentials"),
    (["--task", "dtd"], "has no task dtd"),
])
def test_cli_probe_bad_options_exit_2_without_a_traceback(store_root, tmp_path, extra, message):
    result = cli(*probe_args(store_root, tmp_path, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert "hunter2" not in result.output


def test_cli_probe_usage_errors(store_root, tmp_path):
    result = cli(*probe_args(store_root, tmp_path, "--steps", "many"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = cli("probe", "--store-root", store_root)
    assert result.exit_code == 2 and "--stores" in result.output
    result = cli("probe", "--stores", "nothere", "--store-root", store_root)
    assert result.exit_code == 2 and "nothere" in result.output and "Traceback" not in result.output
