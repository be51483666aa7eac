"""Tests for extract.backbones: tiny random-init timm ViTs at small image sizes, CPU only."""
from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from hookref import hooked_block_outputs

import extract.architecture as extract_architecture
from extract.backbones import (
    ALIASES,
    Backbone,
    DeviceUnavailableError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
    alias_help,
    alias_table,
    architecture,
    block_tokens,
    inference_context,
    load_backbone,
    parse_layers,
    pick_device,
    resolve_model,
)

TINY = dict(depth=3, embed_dim=32, num_heads=2)
TINY_SAM = dict(depth=3, embed_dim=32, num_heads=2, window_size=2, global_attn_indexes=(1,))
CPU = torch.device("cpu")


@pytest.fixture
def no_network_env(monkeypatch, tmp_path):
    """An empty HF cache; proxies removed so the connectivity probe is meaningful."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _tokens(bb: Backbone, x: torch.Tensor):
    with inference_context(CPU):
        return block_tokens(bb, x)


def _spatial_ref(maps: list[torch.Tensor]) -> torch.Tensor:
    """NCHW per-layer maps -> [B, L, H*W, C] row-major."""
    return torch.stack([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


# ---------------------------------------------------------------------------- names

PAPER = {"sam": "samvit_base_patch16.sa1b", "clip": "vit_base_patch16_clip_224.openai",
         "dfn-clip": "vit_base_patch16_clip_224.dfn2b", "siglip": "vit_base_patch16_siglip_224.webli",
         "dinov2": "vit_base_patch14_reg4_dinov2.lvd142m", "in21k": "vit_base_patch16_224.orig_in21k",
         "in21k-augreg": "vit_base_patch16_224.augreg_in21k", "mae": "vit_base_patch16_224.mae"}
MODERN = {"dinov3": "vit_base_patch16_dinov3.lvd1689m", "siglip2": "vit_base_patch16_siglip_224.v2_webli",
          "pe": "vit_pe_core_base_patch16_224.fb", "pe-spatial": "vit_pe_spatial_base_patch16_512.fb",
          "aimv2": "aimv2_large_patch14_224.apple_pt", "radio": "naflexvit_base_patch16_radio_v3.c_radio",
          "tipsv2": "vit_base_patch14_reg1_tipsv2.webli", "eva02": "eva02_base_patch14_224.mim_in22k",
          "sam2": "sam2_hiera_base_plus.fb_r896", "dinov3-convnext": "convnext_base.dinov3_lvd1689m"}


def test_aliases_resolve_to_registered_pretrained_checkpoints():
    # the paper's aliases keep their meaning; today's are pinned to one checkpoint each
    assert {a: s.model_name for a, s in ALIASES.items()} == {**PAPER, **MODERN}
    # the paper's IN-21k rows are the original weights; augreg_in21k is another checkpoint
    assert resolve_model("SAM").timm_name == "samvit_base_patch16"
    for alias, spec in ALIASES.items():
        assert resolve_model(alias) == spec
        assert timm.models.is_model_pretrained(spec.model_name), spec.model_name


def test_timm_names_resolve_with_and_without_tag():
    spec = resolve_model("vit_small_patch16_224.augreg_in21k")
    assert (spec.alias, spec.timm_name, spec.pretrained_tag) == (
        "vit_small_patch16_224.augreg_in21k", "vit_small_patch16_224", "augreg_in21k")
    spec = resolve_model("eva02_tiny_patch14_224")
    assert spec.pretrained_tag is None and spec.model_name == "eva02_tiny_patch14_224"
    # NaFlexViT (RADIO, SigLIP2-NaFlex) is a token ViT with per-block outputs like any other
    assert resolve_model("naflexvit_base_patch16_siglip.v2_webli").timm_name == "naflexvit_base_patch16_siglip"


@pytest.mark.parametrize("name", ["not-a-model", "vit_base_patch16_224.no_such_tag", ""])
def test_unknown_names_raise_with_alias_list(name):
    with pytest.raises(UnknownModelError) as info:
        resolve_model(name)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and msg.startswith("Unknown backbone")
    assert "sam" in msg and "dinov2" in msg and "in21k" in msg and "timm" in msg and "radio" in msg
    assert "in21k (vit_base_patch16_224.orig_in21k)" in msg and "in21k-augreg (vit_base_patch16_224.augreg_in21k)" in msg
    with pytest.raises(UnknownModelError):
        load_backbone(name, random_init=True)


@pytest.mark.parametrize("name,stages", [
    ("convnext_tiny", "56x56x96, 28x28x192, 14x14x384, 7x7x768"),
    ("convnext_tiny.dinov3_lvd1689m", "56x56x96, 28x28x192, 14x14x384, 7x7x768"),
    ("swin_tiny_patch4_window7_224", "56x56x96, 28x28x192, 14x14x384, 7x7x768"),
    ("hiera_tiny_224", "56x56x96, 28x28x192, 14x14x384, 7x7x768"),
    ("sam2_hiera_base_plus", "56x56x112, 28x28x224, 14x14x448, 7x7x896"),
    ("resnet50", "112x112x64, 56x56x256, 28x28x512, 14x14x1024, 7x7x2048"),
])
def test_hierarchical_models_resolve_with_every_stage_on_its_own_grid(name, stages):
    """timm's stage outputs at 224 (from the meta twin's forward); stored by default without ResNet's stem."""
    assert resolve_model(name).timm_name == timm.models.split_model_name_tag(name)[0]
    arch = architecture(timm.models.split_model_name_tag(name)[0])
    assert arch.hierarchical and arch.num_prefix_tokens == 0
    assert [f"{g[0]}x{g[1]}x{w}" for g, w in zip(arch.grids(224), arch.widths)] == stages.split(", ")
    assert arch.default_layers == tuple(range(1 if name == "resnet50" else 0, arch.num_layers))


def test_alias_of_a_model_an_older_timm_lacks_says_to_upgrade(monkeypatch):
    real = timm.models.is_model
    monkeypatch.setattr(timm.models, "is_model", lambda name: name != "naflexvit_base_patch16_radio_v3" and real(name))
    with pytest.raises(UnsupportedModelError, match=r"alias 'radio' is naflexvit_base_patch16_radio_v3.c_radio.*pip install -U timm"):
        resolve_model("radio")


def test_model_without_intermediates_is_refused_naming_what_is_missing(monkeypatch):
    import timm.models.vision_transformer as vit
    monkeypatch.delattr(vit.VisionTransformer, "forward_intermediates")
    extract_architecture._architecture.cache_clear()
    try:
        with pytest.raises(UnsupportedModelError, match="no forward_intermediates"):
            resolve_model("vit_tiny_patch16_224")
    finally:
        extract_architecture._architecture.cache_clear()


def test_layers_selection():
    assert parse_layers(None, 12) == tuple(range(12)) and parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers(None, 5, default=(1, 2, 3, 4)) == (1, 2, 3, 4) and parse_layers("all", 5, default=(1,)) == tuple(range(5))
    assert parse_layers("last:3", 12) == (9, 10, 11) and parse_layers("11,0,-2", 12) == (0, 10, 11)
    for bad, why in (("12", "out of range"), ("last:0", "1..12"), ("1,1", "twice"), ("a,b", "indices"), (",", "no layer")):
        with pytest.raises(ValueError, match=why):
            parse_layers(bad, 12)
    full = load_backbone("vit_tiny_patch16_224", image_size=64, random_init=True, model_kwargs=TINY)
    some = load_backbone("vit_tiny_patch16_224", image_size=64, random_init=True, model_kwargs=TINY, layers="0,-1")
    assert (some.layers, some.num_layers, some.num_blocks, full.layers) == ((0, 2), 2, 3, (0, 1, 2))
    x = _images(2, 64)
    (pf, qf), (ps, qs) = _tokens(full, x), _tokens(some, x)
    assert torch.equal(ps, pf[:, [0, 2]]) and torch.equal(qs, qf[:, [0, 2]])
    first = load_backbone("vit_tiny_patch16_224", image_size=64, random_init=True, model_kwargs=TINY, layers="0")
    assert torch.equal(_tokens(first, x)[0], pf[:, :1])  # stops after block 0, same values


# ---------------------------------------------------------------------------- shapes and values

def test_vit_with_cls_matches_manual_timm_forward():
    bb = load_backbone("vit_tiny_patch16_224", image_size=64, random_init=True, model_kwargs=TINY)
    assert (bb.token_grid, bb.num_prefix_tokens, bb.num_layers, bb.embed_dim) == ((4, 4), 1, 3, 32)
    assert bb.interpolation == "bilinear" and bb.image_size == 64
    assert bb.weights_source == "random-init" and bb.weights_sha256 is None and bb.seed == 0
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())

    x = _images(2, 64)
    patch, prefix = _tokens(bb, x)
    assert patch.shape == (2, 3, 16, 32) and prefix.shape == (2, 3, 1, 32)
    assert patch.dtype == torch.float32

    m = bb.model  # the residual stream after each block, computed by hand
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        ref = []
        for blk in m.blocks:
            h = blk(h)
            ref.append(h)
        ref = torch.stack(ref, dim=1)
        normed_last = m.norm(h)
    torch.testing.assert_close(patch, ref[:, :, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(prefix, ref[:, :, :1], rtol=0, atol=1e-6)
    # the last layer is the raw block output, not the final-normed one
    assert not torch.allclose(patch[:, -1], normed_last[:, 1:], atol=1e-3)


def test_dinov2_alias_with_registers_matches_forward_intermediates():
    bb = load_backbone("dinov2", image_size=56, random_init=True, seed=3, model_kwargs=TINY)
    assert bb.spec.alias == "dinov2" and bb.spec.timm_name == "vit_base_patch14_reg4_dinov2"
    # our size wins over the cfg's native 518, pos-embed resized to the /14 grid at 56
    assert bb.token_grid == (4, 4) and bb.num_prefix_tokens == 5
    assert bb.model.pos_embed.shape[1] == 16
    assert bb.mean == pytest.approx((0.485, 0.456, 0.406)) and bb.std == pytest.approx((0.229, 0.224, 0.225))

    x = _images(2, 56, seed=1)
    patch, prefix = _tokens(bb, x)
    assert patch.shape == (2, 3, 16, 32) and prefix.shape == (2, 3, 5, 32)
    with torch.no_grad():
        out = bb.model.forward_intermediates(x, return_prefix_tokens=True, norm=False, intermediates_only=True)
    torch.testing.assert_close(patch, _spatial_ref([s for s, _ in out]), rtol=0, atol=1e-6)
    torch.testing.assert_close(prefix, torch.stack([p for _, p in out], dim=1), rtol=0, atol=1e-6)


def test_sam_alias_nhwc_blocks_no_prefix_no_neck():
    bb = load_backbone("sam", image_size=64, random_init=True, model_kwargs=TINY_SAM)
    assert bb.token_grid == (4, 4) and bb.num_prefix_tokens == 0 and bb.embed_dim == 32
    x = _images(2, 64, seed=2)
    patch, prefix = _tokens(bb, x)
    assert patch.shape == (2, 3, 16, 32) and prefix.shape == (2, 3, 0, 32)
    with torch.no_grad():
        raw = bb.model.forward_intermediates(x, norm=False, intermediates_only=True)
        neck = bb.model.forward_intermediates(x, norm=True, intermediates_only=True)
    torch.testing.assert_close(patch, _spatial_ref(raw), rtol=0, atol=1e-6)
    assert neck[-1].shape[1] != 32  # the neck changes the width: proves we did not take it


TINY_SAM_KW = dict(TINY_SAM)
ARCHITECTURES = [  # (name, image size, model kwargs, prefix tokens): every family combo extracts, tiny
    pytest.param("vit_base_patch16_224", 64, TINY, 1, id="vit"),
    pytest.param("deit_tiny_distilled_patch16_224", 48, TINY, 2, id="deit-distilled"),
    pytest.param("eva02_tiny_patch14_224", 42, TINY, 1, id="eva02"),
    pytest.param("samvit_base_patch16", 64, TINY_SAM_KW, 0, id="sam-vit"),
    pytest.param("vit_base_patch16_clip_224", 64, TINY, 1, id="clip"),
    pytest.param("vit_base_patch16_siglip_224", 48, TINY, 0, id="siglip"),
    pytest.param("vit_base_patch14_reg4_dinov2", 56, TINY, 5, id="dinov2"),
    pytest.param("vit_base_patch16_dinov3", 64, TINY, 5, id="dinov3-eva-rope"),
    pytest.param("vit_pe_core_base_patch16_224", 64, TINY, 1, id="pe"),
    pytest.param("aimv2_large_patch14_224", 56, TINY, 0, id="aimv2"),
    pytest.param("vit_base_patch14_reg1_tipsv2", 56, TINY, 2, id="tipsv2"),
    pytest.param("naflexvit_base_patch16_radio_v3", 64, TINY, 8, id="naflex-radio"),
    pytest.param("naflexvit_base_patch16_siglip", 64, TINY, 0, id="naflex-siglip2"),
]


@pytest.mark.parametrize("name,size,kwargs,prefix", ARCHITECTURES)
def test_layer_tokens_match_timm_geometry_and_the_hooked_blocks(name, size, kwargs, prefix):
    """Grids, widths and prefix counts are what timm itself reports; the tokens are bit-identical to the hooked
    block outputs of the old path (so stores of the paper's aliases keep their bytes)."""
    bb = load_backbone(name, image_size=size, random_init=True, model_kwargs=kwargs)
    info = bb.model.feature_info
    assert bb.num_layers == bb.num_blocks == len(info) == 3 and bb.embed_dim == info[-1]["num_chs"] == 32
    assert bb.num_prefix_tokens == prefix == getattr(bb.model, "num_prefix_tokens", 0)
    patch_px = size // info[-1]["reduction"]
    assert bb.token_grid == (patch_px, patch_px)
    x = _images(2, size)
    patch, pre = _tokens(bb, x)
    assert patch.shape == (2, 3, patch_px * patch_px, 32) and pre.shape == (2, 3, prefix, 32)
    ref_patch, ref_pre = hooked_block_outputs(bb, x)
    assert torch.equal(patch, ref_patch) and torch.equal(pre, ref_pre)
    with torch.no_grad():  # and what forward_intermediates itself gives, as maps
        out = bb.model.forward_intermediates(x, norm=False, intermediates_only=True,
                                             **({"return_prefix_tokens": True} if prefix else {}))
    torch.testing.assert_close(patch, _spatial_ref([o[0] if prefix else o for o in out]), rtol=0, atol=0)


def test_paper_geometry_full_size_random_init():
    """ViT-B/14 DINOv2 at 224 -> 16x16 + 5 prefix; SAM ViT-B at 224 -> 14x14, no prefix."""
    dino = load_backbone("dinov2", random_init=True)
    assert (dino.token_grid, dino.num_prefix_tokens, dino.num_layers, dino.embed_dim) == ((16, 16), 5, 12, 768)
    sam = load_backbone("sam", random_init=True)
    assert (sam.token_grid, sam.num_prefix_tokens, sam.num_layers, sam.embed_dim) == ((14, 14), 0, 12, 768)
    patch, prefix = _tokens(sam, _images(1, 224))
    assert patch.shape == (1, 12, 196, 768) and prefix.shape == (1, 12, 0, 768)
    assert torch.isfinite(patch).all()


def test_model_kwargs_are_kept_on_the_backbone():
    """What the store records so `combo predict` can build the same model again."""
    assert load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True, model_kwargs=TINY).model_kwargs == TINY
    assert load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True).model_kwargs == {}


def test_block_tokens_rejects_wrong_input():
    bb = load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True, model_kwargs=TINY)
    with pytest.raises(ValueError, match="image_size"):
        _tokens(bb, _images(1, 48))
    with pytest.raises(ValueError, match="B, 3, S, S"):
        _tokens(bb, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        _tokens(bb, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------------------- random init

def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True, seed=7, model_kwargs=TINY)
    assert torch.equal(torch.rand(3), expected_next)
    b = load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True, seed=7, model_kwargs=TINY)
    c = load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True, seed=8, model_kwargs=TINY)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a.seed, c.seed) == (7, 8)


def test_argument_conflicts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="mutually exclusive"):
        load_backbone("sam", random_init=True, weights=tmp_path / "x.pth")
    with pytest.raises(ValueError, match="img_size"):
        load_backbone("sam", random_init=True, model_kwargs=dict(img_size=64))
    with pytest.raises(ValueError, match="expected_sha256"):
        load_backbone("sam", random_init=True, expected_sha256="00")


# ---------------------------------------------------------------------------- missing pretrained weights

def test_offline_missing_weights_fail_fast_with_instructions(no_network_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def _no_network(*args, **kwargs):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setattr(socket, "create_connection", _no_network)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("dinov2")
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    for needle in ("vit_base_patch14_reg4_dinov2.lvd142m", "--weights", "--random-init", "HF_HUB_OFFLINE is set",
                   "timm/vit_base_patch14_reg4_dinov2.lvd142m"):
        assert needle in msg, needle


def test_unreachable_hub_fails_fast_without_offline_flag(no_network_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("sam")
    assert time.perf_counter() - t0 < 10
    assert "samvit_base_patch16.sa1b" in str(info.value) and "--weights" in str(info.value)


def _fake_hf_cache(cache: Path, repo_id: str, filename: str, tensors: dict) -> Path:
    """The huggingface_hub cache layout: refs/main -> snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(tensors, str(snap / filename))
    return snap / filename


def test_pretrained_weights_found_in_hf_cache_offline(no_network_env, monkeypatch):
    """augreg_in21k is registered with custom_load (JAX npz); the HF cache copy is a safetensors."""
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, **TINY).eval()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    cache = no_network_env / "hub_cache"
    path = _fake_hf_cache(cache, "timm/vit_tiny_patch16_224.augreg_in21k", "model.safetensors", sd)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    bb = load_backbone("vit_tiny_patch16_224.augreg_in21k", image_size=32, model_kwargs=TINY)
    assert bb.weights_source == "timm-pretrained:timm/vit_tiny_patch16_224.augreg_in21k"
    assert bb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and bb.seed is None
    assert bb.mean == (0.5, 0.5, 0.5)
    loaded = bb.model.state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert bb.model.head.weight.shape[0] == sd["head.weight"].shape[0]

    # untagged name: timm's default tag is looked up and recorded
    other = load_backbone("vit_tiny_patch16_224", image_size=32, random_init=True, model_kwargs=TINY)
    assert other.spec.pretrained_tag is None  # random-init does not pretend to know a tag
    with pytest.raises(WeightsUnavailableError, match="augreg_in21k_ft_in1k"):
        load_backbone("vit_tiny_patch16_224", image_size=32, model_kwargs=TINY)


# ---------------------------------------------------------------------------- local weight files

def _reference_model(name: str, size: int, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, img_size=size, **kwargs).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_nested", "headless"])
def test_weights_file_round_trip(tmp_path, fmt):
    name = "vit_small_patch14_reg4_dinov2"
    src = _reference_model(name, 28, seed=5, **TINY)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    elif fmt == "pth_nested":
        path = tmp_path / "w.pt"
        torch.save({"model": sd, "epoch": 3}, path)
    else:  # saved from a num_classes=0 model of an architecture whose default has a head
        name = "vit_tiny_patch16_224"
        src = _reference_model(name, 32, seed=5, num_classes=0, **TINY)
        sd = src.state_dict()
        path = tmp_path / "headless.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    size = 32 if name == "vit_tiny_patch16_224" else 28

    bb = load_backbone(name, image_size=size, weights=path, model_kwargs=TINY)
    assert bb.weights_source == f"file:{path.resolve()}"
    assert bb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.seed is None
    x = _images(2, size)
    patch, _ = _tokens(bb, x)
    with torch.no_grad():
        ref = src.forward_intermediates(x, norm=False, intermediates_only=True)
    torch.testing.assert_close(patch, _spatial_ref(ref), rtol=0, atol=1e-6)

    again = load_backbone(name, image_size=size, weights=path, model_kwargs=TINY,
                          expected_sha256=bb.weights_sha256.upper())
    assert again.weights_sha256 == bb.weights_sha256


@pytest.mark.parametrize("name", ["naflexvit_base_patch16_radio_v3", "vit_base_patch16_dinov3"])
def test_weights_file_of_todays_models_loads_strictly(tmp_path, name):
    """A local checkpoint of a NaFlexViT (RADIO) or an EVA-family model (DINOv3) loads through timm, strictly;
    the prefix tokens come back with the weights' values."""
    src = _reference_model(name, 64, seed=6, **TINY)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = load_backbone(name, image_size=64, weights=path, model_kwargs=TINY)
    x = _images(2, 64)
    patch, prefix = _tokens(bb, x)
    with torch.no_grad():
        ref = src.forward_intermediates(x, norm=False, intermediates_only=True, return_prefix_tokens=True)
    assert torch.equal(patch, _spatial_ref([s for s, _ in ref]))
    assert torch.equal(prefix, torch.stack([p for _, p in ref], dim=1))
    truncated = tmp_path / "short.safetensors"
    save_file({k: v.contiguous() for k, v in list(src.state_dict().items())[:-3]}, str(truncated))
    with pytest.raises(WeightsUnavailableError, match="Missing key"):
        load_backbone(name, image_size=64, weights=truncated, model_kwargs=TINY)


def test_weights_file_at_other_resolution_resizes_pos_embed(tmp_path):
    """A checkpoint saved at 56 (4x4 grid) loads at 28 (2x2) like timm's own pretrained path."""
    name = "vit_small_patch14_reg4_dinov2"
    src = _reference_model(name, 56, seed=2, **TINY)
    path = tmp_path / "w56.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = load_backbone(name, image_size=28, weights=path, model_kwargs=TINY)
    assert bb.token_grid == (2, 2) and bb.model.pos_embed.shape[1] == 4
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            img_size=28, **TINY).eval()
    x = _images(1, 28)
    with torch.no_grad():
        want = ref.forward_intermediates(x, norm=False, intermediates_only=True)
    torch.testing.assert_close(_tokens(bb, x)[0], _spatial_ref(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("original_format", [False, True])
def test_sam_weights_at_native_size_equal_feeding_the_native_model(tmp_path, original_format):
    """SAM checkpoints are 1024 (64x64); timm's SAM filter does not resize, so we do it exactly as
    timm's SAM forward does on the fly: our small-size model == the native model fed small images."""
    native = _reference_model("samvit_base_patch16", 128, seed=4, **TINY_SAM)  # 8x8 grid
    sd = native.state_dict()
    if original_format:  # segment-anything's own key layout
        sd = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in sd.items()}
        path = tmp_path / "sam_vit_tiny.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "sam.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    bb = load_backbone("sam", image_size=64, weights=path, model_kwargs=TINY_SAM)
    assert bb.token_grid == (4, 4) and tuple(bb.model.pos_embed.shape) == (1, 4, 4, 32)
    assert bb.spec.pretrained_tag == "sa1b" and bb.weights_source.startswith("file:")
    x = _images(2, 64, seed=9)
    with torch.no_grad():
        want = native.forward_intermediates(x, norm=False, intermediates_only=True)
    torch.testing.assert_close(_tokens(bb, x)[0], _spatial_ref(want), rtol=0, atol=1e-5)


def test_bad_weights_files_raise_clear_errors(tmp_path):
    name = "vit_tiny_patch16_224"
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsUnavailableError, match="nope.safetensors"):
        load_backbone(name, image_size=32, weights=missing, model_kwargs=TINY)

    wide = _reference_model(name, 32, seed=0, depth=3, embed_dim=48, num_heads=2)
    wrong_shape = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(wrong_shape))
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone(name, image_size=32, weights=wrong_shape, model_kwargs=TINY)
    assert "wide.safetensors" in str(info.value) and "size mismatch" in str(info.value)

    wrong_keys = tmp_path / "keys.pth"
    torch.save({"foo.weight": torch.zeros(3)}, wrong_keys)
    with pytest.raises(WeightsUnavailableError, match="(?s)keys.pth.*Missing key"):
        load_backbone(name, image_size=32, weights=wrong_keys, model_kwargs=TINY)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="garbage.pth"):
        load_backbone(name, image_size=32, weights=garbage, model_kwargs=TINY)

    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in _reference_model(name, 32, 0, **TINY).state_dict().items()},
              str(good))
    with pytest.raises(WeightsUnavailableError, match="sha256 mismatch"):
        load_backbone(name, image_size=32, weights=good, model_kwargs=TINY, expected_sha256="0" * 64)


# ---------------------------------------------------------------------------- device

def test_pick_device(monkeypatch):
    assert pick_device("cpu") == CPU
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="banana"):
        pick_device("banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == CPU
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        pick_device("cuda")


def test_inference_context_on_cpu_has_no_autocast():
    with inference_context(CPU):
        assert torch.is_inference_mode_enabled()
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2) * 0.5).dtype == torch.float32
    assert not torch.is_inference_mode_enabled()


def test_extract_help_lists_every_alias_with_its_geometry():
    from combo.cli_extract import ALIAS_HELP
    assert ALIAS_HELP == alias_help()  # the CLI's written-out copy is what the architectures say
    rows = {r["alias"]: r for r in alias_table()}
    assert set(rows) == set(ALIASES)
    assert (rows["sam"]["grid"], rows["sam"]["prefix"], rows["sam"]["raw_bytes"]) == ((14, 14), 0, 12 * 196 * 768 * 2)
    assert (rows["radio"]["grid"], rows["radio"]["prefix"]) == ((14, 14), 8)
    assert (rows["aimv2"]["layers"], rows["aimv2"]["width"], rows["dinov2"]["grid"]) == (24, 1024, (16, 16))
    # hierarchical: every stage on its own grid and width, bytes summed over the stages
    assert rows["sam2"]["checkpoint"] == "sam2_hiera_base_plus.fb_r896" and rows["sam2"]["prefix"] == 0
    assert rows["sam2"]["stages"] == [(56, 56, 112), (28, 28, 224), (14, 14, 448), (7, 7, 896)]
    assert rows["sam2"]["raw_bytes"] == (56 * 56 * 112 + 28 * 28 * 224 + 14 * 14 * 448 + 7 * 7 * 896) * 2 == 1317120
    assert rows["dinov3-convnext"]["checkpoint"] == "convnext_base.dinov3_lvd1689m"
    assert rows["dinov3-convnext"]["stages"] == [(56, 56, 128), (28, 28, 256), (14, 14, 512), (7, 7, 1024)]
    assert rows["dinov3-convnext"]["raw_bytes"] == 1505280 and rows["sam"]["stages"] is None
    assert "4 stages 56x56x128 .. 7x7x1024" in ALIAS_HELP and "4 stages 56x56x112 .. 7x7x896" in ALIAS_HELP
