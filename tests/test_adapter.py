"""ComBo adapter architecture and feature alignment, checked against PAPER.md by hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probe.adapter import AdapterConfigError, ComboAdapter, ComboConfig, expected_num_params
from probe.align import FeatureShapeError, align_grid, default_grid, make_prepare, normalise_maps, prepare_features



def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _tiny(**kw) -> ComboConfig:
    base = dict(num_layers=3, feature_dim=8, num_tokens=16, num_classes=5, width=16, depth=2, num_heads=2)
    base.update(kw)
    return ComboConfig(**base)


# ------------------------------------------------------------------------------------------ parameter count


@pytest.mark.parametrize(
    "cfg",
    [
        _tiny(),
        _tiny(depth=0),
        _tiny(mlp_ratio=2.5, width=20, num_heads=4),
        _tiny(num_layers=5, layers_per_backbone=(2, 3), num_classes=1),
        ComboConfig(num_layers=24, feature_dim=32, num_tokens=196, num_classes=100, layers_per_backbone=(12, 12)),
    ],
)
def test_param_count_matches_formula(cfg):
    assert _count(ComboAdapter(cfg)) == expected_num_params(cfg)


def test_param_count_vit_b_matches_paper():
    cfg = ComboConfig(num_layers=12, feature_dim=768, num_tokens=196, num_classes=10)
    model = ComboAdapter(cfg)
    lambda_params = model.lambda_weight.numel() + model.lambda_bias.numel()
    assert lambda_params == 128 * 12 * 768 + 128 == 1_179_776
    head_params = _count(model.head)
    assert head_params == 128 * 10 + 10
    encoder_params = _count(model) - lambda_params - head_params
    # Written out independently of the implementation: 6 blocks + cls + pos [197, 128] + final norm.
    block = 2 * 128 + (128 * 384 + 384) + (128 * 128 + 128) + 2 * 128 + (128 * 512 + 512) + (512 * 128 + 128)
    assert encoder_params == 6 * block + 128 + 197 * 128 + 2 * 128 == 1_215_232
    # The paper: "about 1.2M for Lambda per ViT-B backbone plus about 1.2M for F".
    assert 1.1e6 < lambda_params < 1.3e6 and 1.1e6 < encoder_params < 1.3e6
    assert expected_num_params(cfg) == 1_179_776 + 1_215_232 + 1_290
    # Each extra ViT-B backbone adds exactly one more Lambda slice.
    two = ComboConfig(num_layers=24, feature_dim=768, num_tokens=196, num_classes=10, layers_per_backbone=(12, 12))
    assert expected_num_params(two) - expected_num_params(cfg) == 128 * 12 * 768


# --------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(width=15, num_heads=2), "num_heads"),
        (dict(layers_per_backbone=(1, 1)), "layers_per_backbone"),
        (dict(layers_per_backbone=(3, 0)), "layers_per_backbone"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_config_rejected(kw, words):
    with pytest.raises(AdapterConfigError, match=words):
        _tiny(**kw)


# --------------------------------------------------------------------------------------------------- forward


def test_forward_shape_and_bad_input():
    torch.manual_seed(0)
    cfg = _tiny()
    model = ComboAdapter(cfg)
    out = model(torch.randn(4, 3, 16, 8))
    assert out.shape == (4, 5)
    assert torch.isfinite(out).all()
    with pytest.raises(FeatureShapeError, match=r"\(4, 3, 15, 8\)"):
        model(torch.randn(4, 3, 15, 8))
    with pytest.raises(FeatureShapeError):
        model(torch.randn(3, 16, 8))


def test_lambda_is_einsum_and_conv2d():
    torch.manual_seed(0)
    cfg = _tiny()
    model = ComboAdapter(cfg)
    x = torch.randn(2, 3, 16, 8)
    got = model.project(x)
    assert got.shape == (2, 16, 16)
    w, b = model.lambda_map.detach(), model.lambda_bias.detach()
    # Hand loop: token t of image i -> W . concat_l x[i, l, t, :] + b.
    hand = torch.stack(
        [torch.stack([w.reshape(16, -1) @ x[i, :, t, :].reshape(-1) + b for t in range(16)]) for i in range(2)]
    )
    torch.testing.assert_close(got, hand, rtol=1e-5, atol=1e-5)
    # The authors' form: Conv2d with L input channels and kernel (1, D) over the [L, T, D] "image".
    conv = nn.Conv2d(3, 16, kernel_size=(1, 8))
    with torch.no_grad():
        conv.weight.copy_(w.unsqueeze(2))
        conv.bias.copy_(b)
    via_conv = conv(x).squeeze(-1).permute(0, 2, 1)  # [B, width, T, 1] -> [B, T, width]
    torch.testing.assert_close(got, via_conv, rtol=1e-5, atol=1e-5)


def test_forward_is_prenorm_vit_over_cls_and_tokens():
    torch.manual_seed(1)
    model = ComboAdapter(_tiny(depth=2)).eval()
    x = torch.randn(3, 3, 16, 8)
    tokens = torch.einsum("bltd,cld->btc", x, model.lambda_map) + model.lambda_bias
    h = torch.cat([model.cls_token.expand(3, -1, -1), tokens], 1) + model.pos_embed
    for blk in model.blocks:
        h = h + blk.attn(blk.norm1(h))  # pre-norm residual, no LayerScale
        h = h + blk.mlp(blk.norm2(h))
    expected = model.head(model.norm(h)[:, 0])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_encoder_blocks_match_spec():
    cfg = ComboConfig(num_layers=12, feature_dim=16, num_tokens=196, num_classes=7)
    model = ComboAdapter(cfg)
    assert len(model.blocks) == 6
    assert model.cls_token.shape == (1, 1, 128)
    assert model.pos_embed.shape == (1, 197, 128)
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-5
    assert model.head.in_features == 128 and model.head.out_features == 7
    for blk in model.blocks:
        assert isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)
        assert blk.norm1.eps == blk.norm2.eps == 1e-5
        assert blk.attn.num_heads == 2 and blk.attn.head_dim == 64
        assert blk.attn.qkv.in_features == 128 and blk.attn.qkv.out_features == 384
        assert blk.attn.qkv.bias is not None
        assert isinstance(blk.attn.q_norm, nn.Identity) and isinstance(blk.attn.k_norm, nn.Identity)
        assert blk.mlp.fc1.out_features == 512 and blk.mlp.fc2.in_features == 512
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            assert isinstance(getattr(blk, name), nn.Identity), name  # no LayerScale, no drop-path
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert all(m.p == 0.0 for m in dropouts)


def test_init_follows_documented_scheme():
    torch.manual_seed(0)
    cfg = ComboConfig(num_layers=12, feature_dim=64, num_tokens=196, num_classes=10)
    model = ComboAdapter(cfg)
    bound = 1 / math.sqrt(12 * 64)
    assert model.lambda_weight.abs().max() <= bound
    assert model.lambda_weight.abs().max() > 0.9 * bound  # uniform, not tiny
    assert abs(model.pos_embed.std().item() - 0.02) < 0.003
    assert model.cls_token.abs().max() < 1e-4
    assert torch.all(model.head.bias == 0)


# ------------------------------------------------------------------------------------------------- relevance


def test_backbone_and_layer_norms_by_hand():
    cfg = _tiny(num_layers=3, layers_per_backbone=(2, 1), width=4, num_heads=2, feature_dim=2)
    model = ComboAdapter(cfg)
    w = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)
    with torch.no_grad():
        model.lambda_map.copy_(w)
    per_layer = [math.sqrt(sum(float(w[c, l, d]) ** 2 for c in range(4) for d in range(2))) for l in range(3)]
    torch.testing.assert_close(model.layer_norms(), torch.tensor(per_layer))
    s0 = math.sqrt(per_layer[0] ** 2 + per_layer[1] ** 2)
    torch.testing.assert_close(model.backbone_norms(), torch.tensor([s0, per_layer[2]]))
    # Without layers_per_backbone the whole Lambda is one backbone.
    single = ComboAdapter(_tiny(num_layers=3, width=4, num_heads=2, feature_dim=2))
    with torch.no_grad():
        single.lambda_map.copy_(w)
    torch.testing.assert_close(single.backbone_norms(), torch.tensor([w.norm().item()]))


# ------------------------------------------------------------------------------------------------- alignment


def test_align_grid_identity():
    x = torch.randn(2, 3, 196, 4)
    assert align_grid(x, (14, 14), (14, 14)) is x
    half = x.half()
    out = align_grid(half, (14, 14), (14, 14))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, half.float())


def test_align_grid_16_to_14_matches_interpolate():
    torch.manual_seed(0)
    b, l, d = 2, 3, 5
    x = torch.randn(b, l, 256, d)
    out = align_grid(x, (16, 16), (14, 14))
    assert out.shape == (b, l, 196, d) and out.dtype == torch.float32
    for i in range(b):
        for j in range(l):
            img = x[i, j].reshape(16, 16, d).permute(2, 0, 1)[None]  # row-major grid -> [1, D, 16, 16]
            ref = F.interpolate(img, size=(14, 14), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(out[i, j], ref.permute(1, 2, 0).reshape(196, d))


def test_align_grid_constant_map_stays_constant_and_bf16_input():
    x = torch.full((1, 2, 256, 3), 2.5, dtype=torch.bfloat16)
    out = align_grid(x, (16, 16), (14, 14))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2, 196, 3), 2.5))
    # Non-square grids too (row-major h x w).
    y = torch.full((1, 1, 6 * 4, 2), -1.0)
    torch.testing.assert_close(align_grid(y, (6, 4), (3, 5)), torch.full((1, 1, 15, 2), -1.0))


def test_align_grid_rejects_wrong_token_count():
    with pytest.raises(FeatureShapeError, match="255 tokens"):
        align_grid(torch.randn(1, 1, 255, 4), (16, 16), (14, 14))
    with pytest.raises(FeatureShapeError):
        align_grid(torch.randn(255, 4), (16, 16), (14, 14))


def test_normalise_maps_per_image_layer():
    torch.manual_seed(0)
    # Scales well above sqrt(eps) so var/(var + 1e-5) is ~1; each layer has its own offset and scale.
    scales = torch.tensor([1.0, 50.0, 0.3]).reshape(1, 3, 1, 1)
    x = torch.randn(4, 3, 20, 6) * scales + torch.tensor([7.0, -3.0, 0.5]).reshape(1, 3, 1, 1)
    out = normalise_maps(x)
    mean = out.mean(dim=(2, 3))
    var = out.var(dim=(2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(4, 3), atol=2e-3, rtol=0)
    # The statistics are over tokens AND channels together: the per-channel means are not zeroed.
    x2 = torch.randn(2, 1, 20, 6) + torch.arange(6.0)
    assert normalise_maps(x2).mean(dim=2).abs().max() > 0.5
    # Exactly the formula (x - mean) / sqrt(var + 1e-5).
    m = x2.mean(dim=(2, 3), keepdim=True)
    v = ((x2 - m) ** 2).mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(normalise_maps(x2), (x2 - m) / torch.sqrt(v + 1e-5))


def test_normalise_maps_scale_invariant_and_half_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(normalise_maps(x * 100), normalise_maps(x), atol=1e-4, rtol=1e-4)
    out = normalise_maps(x.half())
    assert out.dtype == torch.float32


def test_prepare_features_concatenates_aligned_normalised_layers():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 256, 4) * 30  # a DINOv2-like 16x16 map with a large residual stream
    b = torch.randn(2, 2, 196, 4)
    out = prepare_features([(a, (16, 16)), (b, (14, 14))])
    assert out.shape == (2, 5, 196, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :3], normalise_maps(align_grid(a, (16, 16), (14, 14))))
    torch.testing.assert_close(out[:, 3:], normalise_maps(b))
    # make_prepare: the same thing as a callable over a list of tensors.
    prep = make_prepare([(16, 16), (14, 14)])
    torch.testing.assert_close(prep([a, b]), out)
    with pytest.raises(FeatureShapeError, match="2 backbone grids"):
        prep([a])


def test_prepare_features_keeps_mixed_widths_apart_and_rejects_mixed_batches():
    torch.manual_seed(0)
    a, b = torch.randn(2, 2, 256, 12) * 5, torch.randn(2, 3, 196, 8)
    out = prepare_features([(a, (16, 16)), (b, (14, 14))])
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [(2, 2, 196, 12), (2, 3, 196, 8)]
    torch.testing.assert_close(out[0], normalise_maps(align_grid(a, (16, 16), (14, 14))))
    torch.testing.assert_close(out[1], normalise_maps(b))
    with pytest.raises(FeatureShapeError, match="batch"):
        prepare_features([(torch.randn(2, 1, 196, 4), (14, 14)), (torch.randn(3, 1, 196, 4), (14, 14))])
    with pytest.raises(FeatureShapeError):
        prepare_features([])


# ---------------------------------------------------------------------------------------- paper's defaults


@pytest.mark.parametrize(
    "grids, expected",
    [
        ([(16, 16)], (16, 16)),  # DINOv2-B/14 alone keeps its native grid (the paper's 77.9 row)
        ([(14, 14)], (14, 14)),
        ([(4, 4), (4, 4)], (4, 4)),  # 64-pixel stores are not upsampled to 196 tokens
        ([(14, 14), (16, 16), (14, 14), (16, 16)], (14, 14)),  # SAM + DFN-CLIP + SigLIP + DINOv2
        ([(16, 16), (14, 14)], (14, 14)),
        ([(8, 8), (4, 6)], (4, 6)),  # the smallest (fewest tokens), even when not square
    ],
)
def test_default_grid_is_the_authors(grids, expected):
    assert default_grid(grids) == expected


def test_layer_norm_eps_is_torch_default():
    model = ComboAdapter(_tiny())
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == nn.LayerNorm(4).eps == 1e-5 for m in norms)


def test_mixed_widths_equal_the_paper_lambda_on_equal_widths():
    """Per-backbone slices with equal widths are the paper's Lambda: same init, same outputs, same norms."""
    torch.manual_seed(3)
    paper = ComboAdapter(_tiny(num_layers=5, layers_per_backbone=(2, 3), feature_dim=8))
    torch.manual_seed(3)
    sliced = ComboAdapter(_tiny(num_layers=5, layers_per_backbone=(2, 3), feature_dim=8, feature_dims=(8, 8)))
    for (name, p), (_, q) in zip(paper.named_parameters(), sliced.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    x = torch.randn(2, 5, 16, 8)
    # The paper's Lambda written out: one [width, L, D] weight over the stacked layers.
    w = paper.lambda_weight.detach().reshape(16, 5, 8)
    hand = torch.einsum("bltd,cld->btc", x, w) + paper.lambda_bias
    torch.testing.assert_close(sliced.project([x[:, :2], x[:, 2:]]), hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced(list(x.split([2, 3], dim=1))), paper(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced.backbone_norms(), torch.stack([w[:, :2].norm(), w[:, 2:].norm()]))


def test_mixed_widths_lambda_sums_per_backbone_slices():
    torch.manual_seed(0)
    cfg = _tiny(num_layers=5, layers_per_backbone=(2, 3), feature_dim=12, feature_dims=(12, 8))
    model = ComboAdapter(cfg)
    assert _count(model) == expected_num_params(cfg)
    assert model.lambda_weight.shape == (16, 2 * 12 + 3 * 8)
    w0, w1 = model.lambda_slices()
    assert w0.shape == (16, 2, 12) and w1.shape == (16, 3, 8)
    bound = 1 / math.sqrt(2 * 12 + 3 * 8)  # one fan-in for all slices, as the paper's Conv2d over L*D
    assert model.lambda_weight.abs().max() <= bound
    a, b = torch.randn(2, 2, 16, 12), torch.randn(2, 3, 16, 8)
    hand = torch.einsum("bltd,cld->btc", a, w0) + torch.einsum("bltd,cld->btc", b, w1) + model.lambda_bias
    torch.testing.assert_close(model.project([a, b]), hand.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.backbone_norms(), torch.stack([w0.norm(), w1.norm()]).detach())
    torch.testing.assert_close(model.layer_norms(), torch.cat([w0.norm(dim=(0, 2)), w1.norm(dim=(0, 2))]).detach())
    with pytest.raises(FeatureShapeError, match="one .* tensor per backbone"):
        model(torch.randn(2, 5, 16, 8))
    with pytest.raises(FeatureShapeError, match="backbone 1"):
        model([a, torch.randn(2, 3, 16, 12)])
    with pytest.raises(AdapterConfigError, match="lambda_slices"):
        model.lambda_map
    with pytest.raises(AdapterConfigError, match="feature_dims"):
        _tiny(num_layers=5, layers_per_backbone=(2, 3), feature_dims=(12,))


def test_old_lambda_layout_loads():
    """Run folders written before per-backbone widths hold Lambda as [width, L, D]."""
    model = ComboAdapter(_tiny())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lambda_weight"] = state["lambda_weight"].reshape(16, 3, 8) * 2
    fresh = ComboAdapter(_tiny())
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh.lambda_map, model.lambda_map * 2)


def test_init_options():
    torch.manual_seed(0)
    timm_init = ComboAdapter(_tiny(width=64, num_heads=2))
    torch.manual_seed(0)
    torch_init = ComboAdapter(_tiny(width=64, num_heads=2, init="torch"))
    fc = timm_init.blocks[0].mlp.fc1
    assert abs(fc.weight.std().item() - 0.02) < 0.004 and torch.all(fc.bias == 0)  # the authors' trunc-normal
    fc = torch_init.blocks[0].mlp.fc1
    bound = 1 / math.sqrt(64)  # nn.Linear's default: U(+-1/sqrt(fan_in)) for weight and bias
    assert fc.weight.abs().max() <= bound and fc.weight.std().item() > 0.5 * bound / math.sqrt(3)
    assert fc.bias.abs().max() > 0
    # Lambda, cls and pos are the same under both inits.
    torch.testing.assert_close(timm_init.lambda_weight, torch_init.lambda_weight)
    with pytest.raises(AdapterConfigError, match="init"):
        _tiny(init="xavier")


# ----------------------------------------------------------------- no fresh batch-sized pages per step (issue 24)


def test_lambda_reads_token_major_maps_in_place_and_equals_the_einsum():
    from probe.adapter import _contract_layers

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6)
    w = torch.randn(7, 4, 6)
    expected = torch.einsum("bltd,cld->btc", x, w)
    token_major = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # the layout probe.align writes
    assert token_major.stride() != x.stride() and torch.equal(token_major, x)
    for layout in (x, token_major):
        torch.testing.assert_close(_contract_layers(layout, w), expected, rtol=1e-5, atol=1e-5)
    rows = token_major.permute(0, 2, 1, 3).reshape(3 * 5, 4 * 6)
    assert rows.data_ptr() == token_major.data_ptr()  # a view: no permuted copy of the batch


def test_prepare_reuses_its_output_buffer_on_the_cpu():
    from probe.align import make_prepare, normalise_maps

    fresh = make_prepare([(2, 2), (2, 2)], target=(2, 2))
    reused = make_prepare([(2, 2), (2, 2)], target=(2, 2), reuse=True)
    a, b = torch.randn(4, 3, 4, 8), torch.randn(4, 2, 4, 8)
    first = reused([a, b])
    torch.testing.assert_close(first, fresh([a, b]), rtol=0, atol=0)
    torch.testing.assert_close(first, torch.cat([normalise_maps(a), normalise_maps(b)], dim=1))
    pointer = first.data_ptr()
    second = reused([b[:, :1].repeat(1, 3, 1, 1), a[:, :2]])
    assert second.data_ptr() == pointer  # the same pages, overwritten
    torch.testing.assert_close(second, fresh([b[:, :1].repeat(1, 3, 1, 1), a[:, :2]]), rtol=0, atol=0)
    smaller = reused([a[:2], b[:2]])  # another batch size: a buffer of its own
    assert smaller.shape == (2, 5, 4, 8)
    torch.testing.assert_close(smaller, fresh([a[:2], b[:2]]), rtol=0, atol=0)
