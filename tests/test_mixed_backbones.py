"""One ComBo over a plain ViT, a hierarchical model and a NaFlexViT (issue 22), composed across both stages.

Three tiny random-init timm models are extracted over a generated count task (countdata.py): a ViT (one grid,
a cls token), a ConvNeXt (four stages of four grids and widths, stored as a multi-grid store) and a NaFlexViT
(RADIO's, 8 summary tokens as prefix). ComBo fits over all three; s_k has one entry per backbone (not per grid)
and per-layer importance one per stored layer; held-out drops name backbones; a linear probe reads the
ConvNeXt's last stage; `combo predict` rebuilds the hierarchical run from its folder and reproduces its test
predictions sample by sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from combo.predict import predict_images
from countdata import count_tree
from extract.pipeline import ExtractConfig, extract
from probe.relevance import run_relevance
from probe.report import read_csv
from probe.run import ProbeConfig, run_probe
from store_schema import open_store

TASK = "clevr_count"
SIZE = 64
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)
MODELS = {  # name -> model kwargs
    "vit_tiny_patch16_224": TINY_VIT,
    "convnext_atto": {},
    "naflexvit_base_patch16_radio_v3": dict(depth=2, embed_dim=32, num_heads=2),
}


def probe_config(stores, out, **kw) -> ProbeConfig:
    args = dict(dataset="vtab", steps=80, batch_size=32, grid=(2, 2), width=32, depth=1, device="cpu", out=str(out))
    return ProbeConfig(stores=tuple(str(s) for s in stores), **{**args, **kw})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    count_tree(root / "vtab", TASK, n_train=32, n_val=16, n_test=24, size=SIZE)
    stores = {}
    for seed, (model, kwargs) in enumerate(MODELS.items()):
        result = extract(ExtractConfig(model=model, dataset="vtab", root=str(root / "vtab"), out=str(root / "stores"),
                                       image_size=SIZE, random_init=True, seed=seed, num_workers=0, batch_size=16,
                                       model_kwargs=kwargs))
        stores[model] = result.store
    return {"root": root, "vtab": root / "vtab", "stores": stores}


def test_the_hierarchical_store_keeps_every_stage_on_its_own_grid(mixed):
    store = open_store(mixed["stores"]["convnext_atto"])
    assert store.multi_grid
    assert [(g.token_grid, g.feature_dim, g.layers) for g in store.grids] == [
        ((16, 16), 40, (0,)), ((8, 8), 80, (1,)), ((4, 4), 160, (2,)), ((2, 2), 320, (3,))]
    assert (store.token_grid, store.feature_dim, store.num_layers) == ((2, 2), 320, 4)  # the last stage
    vit = open_store(mixed["stores"]["vit_tiny_patch16_224"])
    assert not vit.multi_grid and [g.name for g in vit.grids] == [""]


def test_combo_fits_over_a_vit_a_hierarchical_and_a_naflex_store(mixed):
    names = ["vit_tiny_patch16_224", "convnext_atto", "naflexvit_base_patch16_radio_v3"]
    run = run_probe(probe_config([mixed["stores"][n] for n in names], mixed["root"] / "runs"))
    assert run.metrics[0]["accuracy"] > 0.5  # chance 0.25: the stages carry the count
    model = json.loads((run.run_dir / "config.json").read_text())["tasks"][TASK]["model"]
    # the adapter reads 1 + 4 + 1 parts (the ConvNeXt's four grids), 2 + 4 + 2 layers
    assert model["layers_per_backbone"] == [2, 1, 1, 1, 1, 2] and model["backbone_of_part"] == [0, 1, 1, 1, 1, 2]
    assert model["feature_dims"] == [32, 40, 80, 160, 320, 32]

    rel = run_relevance(probe_config([mixed["stores"][n] for n in names], mixed["root"] / "runs-relevance"),
                        heldout_repeats=2)
    norms = read_csv(rel.run_dir / "relevance.csv")
    assert [r["backbone"] for r in norms] == names  # one s_k per backbone, not per grid
    layers = read_csv(rel.run_dir / "layer_relevance.csv")
    assert [(r["backbone"], int(r["layer"])) for r in layers] == [
        (names[0], 0), (names[0], 1), *[(names[1], i) for i in range(4)], (names[2], 0), (names[2], 1)]
    # s_k of the ConvNeXt is the Frobenius norm over its four stages' slices
    conv = [float(r["importance"]) for r in layers if r["backbone"] == names[1]]
    assert float(norms[1]["importance"]) == pytest.approx(float(np.sqrt(np.sum(np.square(conv)))), rel=1e-5)
    assert all(r.get("heldout_drop") not in (None, "") for r in norms)  # dropping the ConvNeXt drops its 4 parts


def test_predict_reproduces_a_hierarchical_run(mixed):
    stores = [mixed["stores"]["convnext_atto"], mixed["stores"]["vit_tiny_patch16_224"]]
    run = run_probe(probe_config(stores, mixed["root"] / "runs-predict", grid=None))  # the ConvNeXt's stride-16 stage
    model = json.loads((run.run_dir / "config.json").read_text())["tasks"][TASK]["model"]
    assert model["grid"] == [4, 4]  # 64 px / 16; its 16x16 and 8x8 stages resized down, its 2x2 one up
    result = predict_images(run.run_dir, mixed["vtab"] / TASK / "images" / "test", device="cpu", batch_size=8)
    got = {Path(r["path"]).relative_to(mixed["vtab"]).as_posix(): r["prediction"] for r in result.rows}
    table = pq.read_table(run.run_dir / f"predictions-{TASK}.parquet").to_pydict()
    assert len(got) == 24 and got == dict(zip(table["sample_id"], table["prediction"]))


def test_a_linear_probe_reads_the_last_stage_of_a_hierarchical_store(mixed):
    run = run_probe(probe_config([mixed["stores"]["convnext_atto"]], mixed["root"] / "runs-linear", method="linear",
                                 lr=1e-2))
    doc = json.loads((run.run_dir / "config.json").read_text())
    assert doc["tasks"][TASK]["model"]["feature_dim"] == 320  # the last stage's width, mean-pooled over its 2x2 tokens
    assert run.metrics[0]["accuracy"] > 0.3


@pytest.mark.parametrize("compact", ["int8", "pca:8"])
def test_predict_reproduces_a_run_on_a_compact_hierarchical_store(mixed, compact):
    """Straight to a compact multi-grid store (each stage encoded on its own, PCA fitted per stage on train800),
    probed, and rebuilt by predict, which encodes the recomputed stages as the store did."""
    out = mixed["root"] / f"stores-{compact.replace(':', '')}"
    store = extract(ExtractConfig(model="convnext_atto", dataset="vtab", root=str(mixed["vtab"]), out=str(out),
                                  image_size=SIZE, random_init=True, seed=1, num_workers=0, batch_size=16,
                                  compact=compact)).store
    opened = open_store(store)
    assert opened.multi_grid and opened.compact is not None
    run = run_probe(probe_config([store], mixed["root"] / f"runs-{compact.replace(':', '')}"))
    result = predict_images(run.run_dir, mixed["vtab"] / TASK / "images" / "test", device="cpu", batch_size=8)
    got = {Path(r["path"]).relative_to(mixed["vtab"]).as_posix(): r["prediction"] for r in result.rows}
    table = pq.read_table(run.run_dir / f"predictions-{TASK}.parquet").to_pydict()
    assert len(got) == 24 and got == dict(zip(table["sample_id"], table["prediction"]))
