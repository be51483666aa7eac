"""The probe over hierarchical (multi-grid) stores (issue 22): one backbone read as several parts.

A multi-grid store (format 2.3) holds one token array per (grid, width) group; the probe reads each group as
a *part* with its own Lambda slice, while everything that speaks of backbones (s_k, held-out drops,
selection, io, the linear probe, the atlas) treats the store as one backbone. The stores here are written
straight through store_schema with random tokens (grids 8x8x16 / 4x4x32 / 2x2x64) and a label-dependent
offset in every group, so a few steps learn the task.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from probe.adapter import AdapterConfigError, ComboAdapter, ComboConfig
from probe.atlas import run_atlas
from probe.data import SplitSource
from probe.heldout import ShuffledSource
from probe.heldsplit import hold_rows, subset_task
from probe.relevance import run_relevance
from probe.report import read_csv
from probe.run import ProbeConfig, build_model, run_probe, sources_for
from probe.stores import align_tasks, open_stores
from store_schema import (BackboneInfo, FeatureInfo, GridSpec, Preprocessing, StoreInfo, StoreLayout, StoreWriter,
                          build_sample_table, open_store)
from store_schema.compact import CompactSpec, PcaFit
from storefactory import vtab_like_splits, write_store

TASK = "task"
N = (24, 12, 12)  # train800, val200, test
GROUPS = (((8, 8), 16, (0,)), ((4, 4), 32, (1, 2)), ((2, 2), 64, (3,)))  # grid, width, model layer indices
LABELS = np.arange(sum(N)) % 3


def _tokens(n: int, layers: int, grid: tuple[int, int], dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, layers, grid[0] * grid[1], dim)).astype(np.float32)
    block = dim // 4
    for c in range(3):  # a class-specific block of channels, in every token: learnable in every group
        x[LABELS[:n] == c, :, :, c * block:(c + 1) * block] += 2.0
    return x


def write_grid_store(path: Path, *, alias: str = "hiera", compact: CompactSpec | None = None,
                     groups=GROUPS) -> Path:
    """A multi-grid store of one task: one array per group, labels cycling over 3 classes."""
    specs = tuple(GridSpec(f"g{k}", grid, dim, layers) for k, (grid, dim, layers) in enumerate(groups))
    last = specs[-1]
    layers = tuple(l for g in specs for l in g.layers)
    info = StoreInfo(
        backbone=BackboneInfo(alias=alias, timm_name="synthetic", pretrained_tag=None, weights_source="random-init",
                              weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        features=FeatureInfo(token_grid=last.token_grid, num_prefix_tokens=0, layers=layers,
                             feature_dim=last.feature_dim, grids=specs),
        dataset="synthetic",
    )
    n = sum(N)
    tokens = [_tokens(n, g.num_layers, g.token_grid, g.feature_dim, seed=k) for k, g in enumerate(specs)]
    splits = vtab_like_splits(*N)
    bases = fit = None
    if compact is not None and compact.pca is not None:
        train = [i for i, s in enumerate(splits) if "train800" in s]
        bases = []
        for g, x in zip(specs, tokens):
            pcafit = PcaFit(g.num_layers, g.feature_dim)
            pcafit.add(x[train])
            basis, fit = pcafit.fitted(compact.pca, "train800")
            bases.append(basis)
    table = build_sample_table(sample_ids=[f"{TASK}/img{i:05d}.png" for i in range(n)], labels=list(LABELS),
                               splits=splits, split_names=("train800", "val200", "train800val200", "test"))
    layout = StoreLayout(rows_per_shard=8, rows_per_chunk=4, dtype="float32")
    with StoreWriter(path, info, layout, compact=compact) as writer:
        tw = writer.task(TASK, samples=table, num_layers=last.num_layers, num_tokens=last.num_tokens,
                         feature_dim=last.feature_dim, num_prefix_tokens=0,
                         protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")},
                         classes=["0", "1", "2"], pca=bases, compact_fit=fit)
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, [x[rows.start:rows.stop] for x in tokens], None)
        tw.finalize()
    return path


def write_vit_store(path: Path, *, grid=(2, 2), dim=8, layers=2, alias="vit") -> Path:
    n = sum(N)
    return write_store(path, tokens=_tokens(n, layers, grid, dim, seed=9), labels=list(LABELS),
                       splits=vtab_like_splits(*N), grid=grid, task=TASK, alias=alias,
                       layout=StoreLayout(rows_per_shard=8, rows_per_chunk=4, dtype="float32"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hier")
    return {"grid": write_grid_store(root / "hiera.zarr"), "vit": write_vit_store(root / "vit.zarr"),
            "int8": write_grid_store(root / "hiera-int8.zarr", compact=CompactSpec.parse("int8"), alias="hiera8"),
            "pca": write_grid_store(root / "hiera-pca.zarr", compact=CompactSpec.parse("pca:8"), alias="hierapca")}


def config(stores, out, **kw) -> ProbeConfig:
    args = dict(dataset="synthetic", steps=30, batch_size=8, lr=3e-3, grid=None, width=16, depth=1, num_heads=2,
                device="cpu", out=str(out))
    return ProbeConfig(stores=tuple(str(s) for s in stores), **{**args, **kw})


# ---------------------------------------------------------------------------------------------------- adapter


def _grouped_cfg(**kw) -> ComboConfig:
    args = dict(num_layers=5, feature_dim=8, num_tokens=4, num_classes=3, width=16, depth=1, num_heads=2,
                layers_per_backbone=(1, 2, 2), feature_dims=(8, 12, 8), backbone_of_part=(0, 0, 1))
    return ComboConfig(**{**args, **kw})


def test_grouped_parts_keep_the_lambda_init_and_group_s_k_per_backbone():
    torch.manual_seed(0)
    grouped = ComboAdapter(_grouped_cfg())
    torch.manual_seed(0)
    plain = ComboAdapter(_grouped_cfg(backbone_of_part=()))
    for (name, a), (_, b) in zip(grouped.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name  # the same draws: grouping changes no value
    bound = 1 / math.sqrt(1 * 8 + 2 * 12 + 2 * 8)
    assert grouped.lambda_weight.abs().max() <= bound
    x = [torch.randn(2, 1, 4, 8), torch.randn(2, 2, 4, 12), torch.randn(2, 2, 4, 8)]
    assert torch.equal(grouped(x), plain(x))
    w = grouped.lambda_slices()
    s0 = torch.sqrt(w[0].pow(2).sum() + w[1].pow(2).sum())
    torch.testing.assert_close(grouped.backbone_norms(), torch.stack([s0, w[2].norm()]).detach())
    assert plain.backbone_norms().shape == (3,)  # one part per backbone: today's s_k
    slices = grouped.layer_slices()
    assert [tuple(s.shape) for s in slices] == [(16, 8), (16, 12), (16, 12), (16, 8), (16, 8)]
    torch.testing.assert_close(torch.stack([s.norm() for s in slices]), grouped.layer_norms())
    cfg = grouped.cfg
    assert cfg.backbone_slices == [slice(0, 3), slice(3, 5)] and cfg.part_slices[1] == slice(1, 3)
    assert cfg.backbone_layer_counts == (3, 2) and cfg.backbone_parts(0) == [0, 1]


def test_equal_widths_grouped_parts_are_the_papers_lambda():
    torch.manual_seed(1)
    grouped = ComboAdapter(_grouped_cfg(feature_dims=(), backbone_of_part=(0, 0, 1)))
    torch.manual_seed(1)
    paper = ComboAdapter(_grouped_cfg(feature_dims=(), layers_per_backbone=(), backbone_of_part=()))
    assert torch.equal(grouped.lambda_weight, paper.lambda_weight)
    x = torch.randn(2, 5, 4, 8)
    assert torch.equal(grouped(x), paper(x))
    lam = grouped.lambda_map
    torch.testing.assert_close(grouped.backbone_norms(), torch.stack([lam[:, :3].norm(), lam[:, 3:].norm()]).detach())


@pytest.mark.parametrize("owners", [(0, 1), (1, 1, 0), (0, 2, 2), (0, 1, 0)])
def test_bad_backbone_of_part_is_refused(owners):
    with pytest.raises(AdapterConfigError, match="backbone_of_part"):
        _grouped_cfg(backbone_of_part=owners)


def test_config_records_and_reloads_backbone_of_part():
    cfg = _grouped_cfg()
    doc = json.loads(json.dumps({**cfg.__dict__, "grid": [2, 2]}))
    assert ComboConfig.from_record(doc) == cfg
    old = {k: v for k, v in doc.items() if k != "backbone_of_part"}  # a run folder from before issue 22
    assert ComboConfig.from_record(old).backbone_of_part == () and ComboConfig.from_record(old).num_backbones == 3
    assert isinstance(build_model("combo", doc), ComboAdapter)


# ------------------------------------------------------------------------------------------------ alignment


def test_a_multi_grid_store_is_one_backbone_of_several_parts(stores):
    opened = open_stores([str(stores["grid"]), str(stores["vit"])])
    aligned = align_tasks(opened, TASK)
    assert aligned.backbone_of_part == [0, 0, 0, 1] and aligned.num_backbones == 2 and aligned.grouped
    assert aligned.grids == [(8, 8), (4, 4), (2, 2), (2, 2)]
    assert aligned.layers_per_backbone == (1, 2, 1, 2) and aligned.feature_dims == (16, 32, 64, 8)
    assert [s.url for s in aligned.stores] == [s.url for s in opened]
    assert aligned.backbone_parts(0) == [0, 1, 2] and aligned.backbone_layer_ids(0) == [0, 1, 2, 3]
    assert all(m is aligned.row_maps[0] or np.array_equal(m, aligned.row_maps[0]) for m in aligned.row_maps)
    vit_only = subset_task(aligned, [1])
    assert vit_only.backbone_of_part == [0] and vit_only.parts[0] is aligned.parts[3]
    hiera_only = subset_task(hold_rows(aligned, aligned.rows("train800")), [0])
    assert hiera_only.backbone_of_part == [0, 0, 0] and hiera_only.num_backbones == 1
    assert hiera_only.stores[0].url == opened[0].url


def test_shuffling_a_backbone_moves_all_its_parts_together(stores):
    aligned = align_tasks(open_stores([str(stores["grid"]), str(stores["vit"])]), TASK)
    rows = aligned.rows("val200")
    plain = SplitSource(aligned, rows)
    perm = np.random.default_rng(0).permutation(rows.size)
    positions = np.arange(rows.size)
    moved = ShuffledSource(aligned, rows, shuffled=0, permutation=perm).read(positions)
    base = plain.read(positions)
    for j in range(3):  # every part of the hierarchical backbone, with one permutation
        np.testing.assert_array_equal(moved[j], base[j][perm])
    np.testing.assert_array_equal(moved[3], base[3])  # the other backbone stays
    # one layer of the backbone (position 2 = model layer 2, the second layer of group g1)
    layer = ShuffledSource(aligned, rows, shuffled=0, permutation=perm, layer=2).read(positions)
    np.testing.assert_array_equal(layer[0], base[0])
    np.testing.assert_array_equal(layer[1][:, 0], base[1][:, 0])
    np.testing.assert_array_equal(layer[1][:, 1], base[1][perm, 1])
    np.testing.assert_array_equal(layer[2], base[2])


# ------------------------------------------------------------------------------------------------------ fits


def test_combo_fits_over_a_multi_grid_and_a_single_grid_store(stores, tmp_path):
    run = run_probe(config([stores["grid"], stores["vit"]], tmp_path))
    doc = json.loads((run.run_dir / "config.json").read_text())
    model = doc["tasks"][TASK]["model"]
    assert model["layers_per_backbone"] == [1, 2, 1, 2] and model["backbone_of_part"] == [0, 0, 0, 1]
    assert model["feature_dims"] == [16, 32, 64, 8] and model["grid"] == [2, 2]  # the smallest grid
    assert doc["grid"] == [2, 2] and doc["tasks"][TASK]["grids"] == [[8, 8], [4, 4], [2, 2], [2, 2]]
    assert run.backbones == ["hiera", "vit"]
    assert run.metrics[0]["accuracy"] > 0.6  # chance 1/3
    fit = run.fits[0]
    assert fit.model.backbone_norms().shape == (2,)
    from probe.report import render_report

    render_report(run.run_dir)  # the setup table lists each group's width and grid
    text = (run.run_dir / "report.md").read_text()
    assert f"| hiera | synthetic (random init) | 4 | 16 / 32 / 64 | 8x8 / 4x4 / 2x2 | {16 * (16 + 2 * 32 + 64):,} |" in text


def test_relevance_and_heldout_drops_treat_the_multi_grid_store_as_one_backbone(stores, tmp_path):
    rel = run_relevance(config([stores["grid"], stores["vit"]], tmp_path), heldout_repeats=2, layer_heldout=True)
    rows = read_csv(rel.run_dir / "relevance.csv")
    assert [r["backbone"] for r in rows] == ["hiera", "vit"]
    assert all(r["heldout_drop"] is not None for r in rows)
    layers = read_csv(rel.run_dir / "layer_relevance.csv")
    assert [(r["backbone"], r["layer"], r["layer_position"]) for r in layers] == [
        ("hiera", 0, 0), ("hiera", 1, 1), ("hiera", 2, 2), ("hiera", 3, 3), ("vit", 0, 0), ("vit", 1, 1)]
    assert all(r["heldout_drop"] is not None for r in layers)
    s_hiera = math.sqrt(sum(r["importance"] ** 2 for r in layers if r["backbone"] == "hiera"))
    assert rows[0]["importance"] == pytest.approx(s_hiera, rel=1e-5)


def test_the_linear_probe_reads_the_last_parts_last_layer(stores, tmp_path):
    aligned = align_tasks(open_stores([str(stores["grid"]), str(stores["vit"])]), TASK)
    source = sources_for(aligned, aligned.rows("train800"), "linear")
    assert [p.grid.name for p in source.task.parts] == ["g2", ""]
    assert source.layers == [[0], [1]]  # g2 holds one layer (model layer 3); the ViT's last of two
    np.testing.assert_array_equal(source.read(np.arange(2))[0], aligned.parts[2].read(source.rows[:2], layers=[0]))
    run = run_probe(config([stores["grid"], stores["vit"]], tmp_path, method="linear", lr=1e-2, steps=60))
    model = json.loads((run.run_dir / "config.json").read_text())["tasks"][TASK]["model"]
    assert model["feature_dim"] == 64 + 8
    assert run.metrics[0]["accuracy"] > 0.6


def test_atlas_probes_every_layer_of_a_multi_grid_store(stores, tmp_path):
    atlas = run_atlas([str(stores["grid"])], dataset="synthetic", poolings="mean", protocol="dev", steps=20,
                      device="cpu", out=str(tmp_path), figures=False)
    got = [(r["backbone"], r["layer"], r["layer_position"], r["grid"], r["feature_dim"]) for r in atlas.rows]
    assert got == [("hiera", 0, 0, "8x8", 16), ("hiera", 1, 1, "4x4", 32), ("hiera", 2, 2, "4x4", 32),
                   ("hiera", 3, 3, "2x2", 64)]
    assert atlas.best[0]["last_layer"] == 3


@pytest.mark.parametrize("kind", ["int8", "pca"])
def test_a_compact_multi_grid_store_is_probed(stores, tmp_path, kind):
    run = run_probe(config([stores[kind], stores["vit"]], tmp_path))
    assert run.metrics[0]["accuracy"] > 0.6
    saved = list(tmp_path.glob(f"*/encoding-{TASK}.safetensors"))
    if kind == "pca":  # one PCA basis per group, keyed by the store and the group
        keys = sorted(k for k in load_file(str(saved[0])) if k.endswith("|pca_components"))
        assert [k.split("|")[0].rsplit("#", 1)[1] for k in keys] == ["g0", "g1", "g2"]
    else:
        assert not saved


def test_a_study_names_backbones_and_counts_each_stores_bytes_over_its_parts(stores, tmp_path):
    from probe.study import StudyConfig
    from probe.studyrun import run_study

    run = run_study(StudyConfig(probe=config([stores["grid"], stores["vit"]], tmp_path, steps=10), select="top-1",
                                heads=("combo", "select", "linear"), heldout_repeats=1))
    heads = {r["head"]: r["accuracy"] for r in run.rows}
    assert "combo[hiera+vit]" in heads and "linear[hiera]" in heads and "linear[vit]" in heads
    assert [r["backbone"] for r in run.importances] == ["hiera", "vit"]
    test_io = {r["store"]: r for r in run.io if r["split"] == "test"}
    # the test split read once for every head: every layer of every group of the hierarchical store
    per_row = sum(g[0][0] * g[0][1] * g[1] * len(g[2]) for g in GROUPS) * 4  # float32
    assert test_io["hiera"]["bytes_stored"] == N[2] * per_row
    assert test_io["hiera"]["bytes_read"] == test_io["hiera"]["bytes_stored"]


def test_store_info_lists_the_grid_groups(stores):
    from combo.cli_store import _info_lines
    from store_schema.catalog import store_info

    text = "\n".join(str(line) for line in _info_lines(store_info(str(stores["grid"])), 200, {}))
    assert "grid groups" in text
    assert "g0: grid 8x8 = 64 tokens, dim 16, layers [0]" in text and "g1: grid 4x4 = 16 tokens, dim 32, layers [1, 2]" in text
    plain = "\n".join(str(line) for line in _info_lines(store_info(str(stores["vit"])), 200, {}))
    assert "grid groups" not in plain and "last stage" not in plain
    assert "last stage: grid [2, 2]" in text  # the top-level grid is the deepest group's, and says so


# ---------------------------------------------------------------------------------------------------- predict


def test_predict_reproduces_a_hierarchical_runs_test_predictions(tmp_path):
    """A random-init ConvNeXt (four stages, four grids) extracted over a count task, probed with ComBo beside a
    ViT; `combo predict` rebuilds both from the run folder and gives the run's test predictions image by image."""
    import pyarrow.parquet as pq

    from combo.predict import predict_images
    from countdata import count_tree
    from extract.pipeline import ExtractConfig, extract

    count_tree(tmp_path / "vtab", "clevr_count", n_train=16, n_val=8, n_test=12, size=64)
    made = {}
    for seed, (model, kwargs) in enumerate({"convnext_atto": {},
                                            "vit_tiny_patch16_224": dict(depth=2, embed_dim=32, num_heads=2)}.items()):
        made[model] = extract(ExtractConfig(model=model, dataset="vtab", root=str(tmp_path / "vtab"),
                                            out=str(tmp_path / "stores"), image_size=64, random_init=True, seed=seed,
                                            num_workers=0, batch_size=8, model_kwargs=kwargs)).store
    opened = open_stores([str(made["convnext_atto"])])[0]
    assert opened.multi_grid
    cfg = ProbeConfig(stores=(str(made["convnext_atto"]), str(made["vit_tiny_patch16_224"])), dataset="vtab",
                      steps=10, batch_size=8, width=16, depth=1, device="cpu", out=str(tmp_path / "runs"))
    run = run_probe(cfg)
    assert run.fits[0].model_config["backbone_of_part"][:len(opened.grids)] == [0] * len(opened.grids)
    result = predict_images(run.run_dir, tmp_path / "vtab" / "clevr_count" / "images" / "test", device="cpu",
                            batch_size=5)
    got = {Path(r["path"]).relative_to(tmp_path / "vtab").as_posix(): r["prediction"] for r in result.rows}
    table = pq.read_table(run.run_dir / "predictions-clevr_count.parquet").to_pydict()
    assert len(got) == 12 and got == dict(zip(table["sample_id"], table["prediction"]))
    # and the same probabilities as the trained model gives the stored features (not only the same argmax)
    from probe.data import eval_batches

    fit = run.fits[0]
    with torch.no_grad():
        probs = torch.cat([torch.softmax(fit.model(fit.prepare(x)), dim=-1) for x, _ in
                           eval_batches(fit.source, batch_size=64)])
    confidence = dict(zip(table["sample_id"], probs.max(dim=-1).values.tolist()))
    for r in result.rows:
        assert r["confidence"] == pytest.approx(confidence[Path(r["path"]).relative_to(tmp_path / "vtab").as_posix()],
                                                abs=2e-3)
    # the linear probe on the ConvNeXt alone reads its last stage's last layer, in the run and in predict
    linear = run_probe(ProbeConfig(**{**cfg.__dict__, "stores": (str(made["convnext_atto"]),), "method": "linear",
                                      "out": str(tmp_path / "runs-linear")}))
    assert linear.fits[0].model_config["feature_dim"] == opened.grids[-1].feature_dim
    again = predict_images(linear.run_dir, tmp_path / "vtab" / "clevr_count" / "images" / "test", device="cpu")
    table = pq.read_table(linear.run_dir / "predictions-clevr_count.parquet").to_pydict()
    assert {Path(r["path"]).relative_to(tmp_path / "vtab").as_posix(): r["prediction"] for r in again.rows} == dict(
        zip(table["sample_id"], table["prediction"]))


def test_streaming_a_multi_grid_store_trains_as_caching_it(stores, tmp_path):
    kw = dict(steps=12, shuffle_window=8)
    ram = run_probe(config([stores["grid"], stores["vit"]], tmp_path / "ram", cache="ram", **kw))
    stream = run_probe(config([stores["grid"], stores["vit"]], tmp_path / "stream", cache="stream",
                              cache_budget=2**20, **kw))
    assert stream.fits[0].metrics["cache"] == "stream" and ram.fits[0].metrics["cache"] == "ram"
    for (name, a), (_, b) in zip(ram.fits[0].model.state_dict().items(), stream.fits[0].model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("grids,size,expected", [
    ([(56, 56), (28, 28), (14, 14), (7, 7)], 224, (14, 14)),  # ConvNeXt / Swin / Hiera at 224: the stride-16 stage
    ([(16, 16), (8, 8), (4, 4), (2, 2)], 64, (4, 4)),
    ([(27, 27), (14, 14), (7, 7)], 224, (14, 14)),  # PiT: 27x27 first
    ([(56, 56), (28, 28)], 224, (28, 28)),  # only strides 4 and 8 stored (--layers): the nearest to 16
    ([(28, 28), (7, 7)], 224, (7, 7)),  # strides 8 and 32, equally far from 16: the coarser
])
def test_a_hierarchical_backbone_brings_its_stride_16_stage_to_the_common_grid(grids, size, expected):
    from probe.align import default_grid, hierarchical_grid

    assert hierarchical_grid(grids, size) == expected
    # with a ViT-B/16 (14x14) or a DINOv2-B/14 (16x16) beside it, the authors' rule then keeps the ViT's grid
    if expected == (14, 14):
        assert default_grid([hierarchical_grid(grids, size), (16, 16)]) == (14, 14)


def test_the_default_grid_of_a_run_with_a_multi_grid_store_is_its_stride_16_stage(stores, tmp_path):
    """write_grid_store's groups at 32 px are 8x8, 4x4, 2x2 (strides 4, 8, 16): 2x2, not the smallest of all."""
    from probe.stores import backbone_grid

    assert backbone_grid(open_store(stores["grid"])) == (2, 2)
    run = run_probe(config([stores["grid"]], tmp_path, steps=2))
    model = json.loads((run.run_dir / "config.json").read_text())["tasks"][TASK]["model"]
    assert model["grid"] == [2, 2]
