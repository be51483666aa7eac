"""Hierarchical models (issue 22): every stage output on its own grid and width, checked against timm itself,
then extracted into a multi-grid store (format 2.3) and read back. Tiny random-init models at 64 px, CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import extract.architecture as extract_architecture
from combo.cli import app
from extract.backbones import (
    ImageSizeError,
    UnsupportedModelError,
    architecture,
    block_tokens,
    inference_context,
    load_backbone,
    resolve_model,
)
from extract.images import preprocess
from extract.pipeline import ExtractConfig, check_config, extract
from fakedata import make_vtab_tree
from store_schema import open_store, validate_store

CPU = torch.device("cpu")
TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
ARCHITECTURES = [  # (timm name, image size, model kwargs, prefix tokens, groups): ViTs keep one grid
    pytest.param("vit_tiny_patch16_224", 64, TINY_VIT, 1, 1, id="vit"),
    pytest.param("deit_tiny_distilled_patch16_224", 48, TINY_VIT, 2, 1, id="deit"),
    pytest.param("eva02_tiny_patch14_224", 56, TINY_VIT, 1, 1, id="eva02"),
    pytest.param("samvit_base_patch16", 64, dict(TINY_VIT, window_size=2, global_attn_indexes=(1,)), 0, 1, id="sam-vit"),
    pytest.param("naflexvit_base_patch16_radio_v3", 64, TINY_VIT, 8, 1, id="naflexvit"),
    pytest.param("convnext_atto", 64, TINY_CONVNEXT, 0, 4, id="convnext"),
    pytest.param("swin_tiny_patch4_window7_224", 64,
                 dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2), 0, 4, id="swin"),
    pytest.param("hiera_tiny_224", 64, dict(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1)), 0, 4, id="hiera"),
    pytest.param("sam2_hiera_tiny", 64, dict(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                                             window_spec=(2, 2, 2, 2)), 0, 4, id="sam2-hieradet"),
    pytest.param("maxvit_rmlp_pico_rw_256", 64, dict(depths=(1, 1, 1, 1)), 0, 4, id="maxvit"),
]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tokens(bb, x):
    with inference_context(CPU):
        return block_tokens(bb, x)


def _timm_outputs(bb, x, prefix: int):
    """timm's own forward_intermediates over every taken layer: [(map [B, C, h, w], prefix [B, P, C] or None)]."""
    with torch.no_grad():
        out = bb.model.forward_intermediates(x, indices=list(bb.layers), norm=False, output_fmt="NCHW",
                                             intermediates_only=True, **({"return_prefix_tokens": True} if prefix else {}))
    return [o if prefix else (o, None) for o in out]


@pytest.mark.parametrize("name,size,kwargs,prefix,groups", ARCHITECTURES)
def test_grids_widths_and_prefix_are_what_timm_reports(name, size, kwargs, prefix, groups):
    bb = load_backbone(name, image_size=size, random_init=True, model_kwargs=kwargs)
    x = _images(2, size)
    ref = _timm_outputs(bb, x, prefix)
    maps = [m for m, _ in ref]
    assert bb.num_prefix_tokens == prefix == (ref[0][1].shape[1] if prefix else 0)
    assert bb.layer_shapes == {l: (m.shape[2], m.shape[3], m.shape[1]) for l, m in zip(bb.layers, maps)}
    assert (bb.token_grid, bb.embed_dim) == (tuple(maps[-1].shape[2:]), maps[-1].shape[1])  # the last layer's
    info = bb.model.feature_info
    assert [info[l]["num_chs"] for l in bb.layers] == [m.shape[1] for m in maps]
    flat = [m.flatten(2).transpose(1, 2) for m in maps]  # [B, h*w, C], row-major
    patch, pre = _tokens(bb, x)
    if groups == 1:
        assert bb.grids is None and torch.equal(patch, torch.stack(flat, 1))
        assert pre.shape == (2, len(bb.layers), prefix, bb.embed_dim)
        if prefix:
            assert torch.equal(pre, torch.stack([p for _, p in ref], 1))
        return
    assert len(bb.grids) == groups and [g.name for g in bb.grids] == [f"g{k}" for k in range(groups)]
    assert isinstance(patch, list) and len(patch) == groups and pre.shape == (2, len(bb.layers), 0, bb.embed_dim)
    by_layer = dict(zip(bb.layers, flat))
    for g, got in zip(bb.grids, patch):
        assert got.shape == (2, g.num_layers, g.num_tokens, g.feature_dim)
        assert torch.equal(got, torch.stack([by_layer[l] for l in g.layers], 1))
    # the meta twin's grids (what check_config and alias_table use) are the built model's
    arch = architecture(name, kwargs)
    assert [arch.layer_shapes(size)[l] for l in bb.layers] == [bb.layer_shapes[l] for l in bb.layers]


def test_grids_come_from_the_model_not_from_its_reduction():
    """Swin pads an odd grid up (100 px: 25, 13, 7, 4, not 100 // reduction = 25, 12, 6, 3); PiT's first stage is
    27x27 at 224 (a 16 px patch at stride 8)."""
    arch = architecture("swin_tiny_patch4_window7_224")
    assert [(h, w) for h, w, _ in arch.layer_shapes(100)] == [(25, 25), (13, 13), (7, 7), (4, 4)]
    assert arch.grids(100) != [(100 // r, 100 // r) for r in arch.reductions]
    assert architecture("pit_ti_224").grids(224) == [(27, 27), (14, 14), (7, 7)]


def test_stem_is_left_out_by_default_and_all_takes_it():
    """MaxViT's feature_info starts with its stem (reduction 2); the default stores its four stages."""
    kwargs = dict(depths=(1, 1, 1, 1))
    arch = architecture("maxvit_rmlp_pico_rw_256", kwargs)
    assert arch.modules[0] == "stem" and arch.stem == (0,) and arch.default_layers == (1, 2, 3, 4)
    assert architecture("convnext_atto").stem == () and architecture("resnet18").default_layers == (1, 2, 3, 4)
    every = load_backbone("maxvit_rmlp_pico_rw_256", image_size=64, random_init=True, model_kwargs=kwargs, layers="all")
    assert every.layers == (0, 1, 2, 3, 4) and every.grids[0].token_grid == (32, 32)


def test_layers_pick_among_the_stages():
    full = load_backbone("convnext_atto", image_size=64, random_init=True, model_kwargs=TINY_CONVNEXT)
    two = load_backbone("convnext_atto", image_size=64, random_init=True, model_kwargs=TINY_CONVNEXT, layers="last:2")
    one = load_backbone("convnext_atto", image_size=64, random_init=True, model_kwargs=TINY_CONVNEXT, layers="1")
    assert two.layers == (2, 3) and [g.layers for g in two.grids] == [(2,), (3,)]
    assert one.grids is None and (one.token_grid, one.embed_dim, one.num_prefix_tokens) == ((8, 8), 16, 0)
    x = _images(2, 64)
    pf, (p2, _), (p1, q1) = _tokens(full, x)[0], _tokens(two, x), _tokens(one, x)
    assert torch.equal(p2[0], pf[2]) and torch.equal(p2[1], pf[3])
    assert torch.equal(p1, pf[1]) and q1.shape == (2, 1, 0, 16)  # one stage: a plain single-grid store


# ---------------------------------------------------------------------------- refusals

def test_multi_grid_model_with_prefix_tokens_is_refused_in_one_sentence():
    with pytest.raises(UnsupportedModelError) as info:  # MViTv2 with a cls token: four grids and a prefix token
        resolve_model("mvitv2_small_cls")
    msg = str(info.value)
    assert "'mvitv2_small_cls' (MultiScaleVit)" in msg and "prefix token" in msg and msg.count(". ") == 0


def test_model_without_intermediates_is_refused_naming_what_is_missing(monkeypatch):
    import timm.models.convnext as convnext
    monkeypatch.delattr(convnext.ConvNeXt, "forward_intermediates")
    extract_architecture._architecture.cache_clear()
    try:
        with pytest.raises(UnsupportedModelError, match=r"'convnext_atto' \(ConvNeXt\).*no forward_intermediates"):
            load_backbone("convnext_atto", image_size=64, random_init=True)
    finally:
        extract_architecture._architecture.cache_clear()


@pytest.mark.parametrize("name,size,why,works", [
    ("swin_tiny_patch4_window7_224", 102, "not a multiple of its first layer's stride 4", "100, 104"),
    ("hiera_tiny_224", 112, "RuntimeError", "96, 128"),  # its mask units need the 1/4 grid divisible by 8
])
def test_an_image_size_the_model_cannot_take_is_refused_naming_sizes_that_work(name, size, why, works):
    with pytest.raises(ImageSizeError) as info:
        architecture(name).layer_shapes(size, name=name)
    msg = str(info.value)
    assert msg.startswith(f"--image-size {size}: {name!r}") and why in msg and works in msg
    with pytest.raises(ImageSizeError, match=f"--image-size {size}"):  # before any weights are looked for
        check_config(ExtractConfig(model=name, dataset="digits", image_size=size))


# ---------------------------------------------------------------------------- into a store

@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_vtab_tree(root, {"dtd": 3}, n_train=6, n_val=3, n_test=5, image_size=24)
    return root


def _config(root, out, **kw) -> ExtractConfig:
    args = dict(model="convnext_atto", dataset="vtab", root=str(root), out=str(out), image_size=64, random_init=True,
                num_workers=0, batch_size=4, rows_per_shard=4, model_kwargs=TINY_CONVNEXT)
    return ExtractConfig(**{**args, **kw})


def _direct(store, root, **kw):
    """block_tokens over every stored row's image, as float16, per group."""
    task = store.task("dtd")
    bb = load_backbone("convnext_atto", image_size=64, random_init=True, model_kwargs=TINY_CONVNEXT, **kw)
    images = []
    for sample_id in task.sample_ids:
        with Image.open(root / sample_id) as im:
            images.append(preprocess(im.convert("RGB"), image_size=64, mean=bb.mean, std=bb.std))
    patch, _ = _tokens(bb, torch.stack(images))
    return task, [t.to(torch.float16).numpy() for t in (patch if isinstance(patch, list) else [patch])]


def test_hierarchical_store_holds_every_stage_as_block_tokens_gives_it(vtab, tmp_path):
    result = extract(_config(vtab, tmp_path))
    store = open_store(result.store)
    assert store.multi_grid and store.format_version == (2, 3)
    assert [(g.name, g.token_grid, g.feature_dim, g.layers) for g in store.grids] == [
        ("g0", (16, 16), 8, (0,)), ("g1", (8, 8), 16, (1,)), ("g2", (4, 4), 24, (2,)), ("g3", (2, 2), 32, (3,))]
    assert (store.token_grid, store.feature_dim, store.num_prefix_tokens) == ((2, 2), 32, 0)
    task, direct = _direct(store, vtab)
    rows = list(range(task.num_samples))
    parts = task.grid_tasks()
    assert [p.grid for p in parts] == store.grids
    for part, want in zip(parts, direct):
        assert np.array_equal(part.read(rows), want)  # bit for bit: the same forward, cast once
    assert validate_store(result.store).ok


def test_layers_subset_store(vtab, tmp_path):
    store = open_store(extract(_config(vtab, tmp_path, layers="2,3")).store)
    assert [(g.name, g.layers) for g in store.grids] == [("g0", (2,)), ("g1", (3,))]
    assert store.features["model_layers"] == 4
    task, direct = _direct(store, vtab, layers="2,3")
    for part, want in zip(task.grid_tasks(), direct):
        assert np.array_equal(part.read(list(range(task.num_samples))), want)
    single = open_store(extract(_config(vtab, tmp_path / "one", layers="last:1")).store)
    assert not single.multi_grid and single.token_grid == (2, 2) and single.task("dtd").tokens.shape[1:] == (1, 4, 32)


def test_compact_pca_store_fits_one_basis_per_group(vtab, tmp_path):
    """--compact pca:R: R at most the narrowest stage (8 channels here); each group is encoded on its own."""
    result = extract(_config(vtab, tmp_path, compact="pca:4,int8"))
    store = open_store(result.store)
    task = store.task("dtd")
    assert store.multi_grid and len(task.attrs["compact"]["explained_variance"]) == 4
    parts = task.grid_tasks()
    assert [p.pca.components.shape for p in parts] == [(1, 8, 4), (1, 16, 4), (1, 24, 4), (1, 32, 4)]
    assert validate_store(result.store).ok
    with pytest.raises(Exception, match="more than the features' 8 channels"):
        extract(_config(vtab, tmp_path / "wide", compact="pca:16"))


def test_cli_extracts_a_hierarchical_model(tmp_path):
    result = CliRunner().invoke(app, ["extract", "--model", "convnext_atto", "--random-init", "--dataset", "digits",
                                      "--out", str(tmp_path), "--image-size", "32", "--num-workers", "0",
                                      "--batch-size", "256"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "convnext_atto" / "digits.zarr")
    assert [(g.token_grid, g.feature_dim) for g in store.grids] == [((8, 8), 40), ((4, 4), 80), ((2, 2), 160),
                                                                    ((1, 1), 320)]
    bad = CliRunner().invoke(app, ["extract", "--model", "convnext_atto", "--random-init", "--dataset", "digits",
                                   "--out", str(tmp_path / "bad"), "--image-size", "30"], catch_exceptions=False)
    assert bad.exit_code == 2 and "--image-size 30" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()
