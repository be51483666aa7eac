"""Training recipe (schedule, AdamW groups, penalty), learning on synthetic features, determinism, sample order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probe.adapter import ComboAdapter, ComboConfig
from probe.align import make_prepare, normalise_maps
from probe.linear import LinearProbe, MultiLayerLinearProbe, per_layer_loss, pool_tokens
from probe.optim import make_optimizer, param_groups
from probe.schedule import lr_at, make_scheduler, warmup_steps
from probe.train import (
    DeviceUnavailableError,
    TrainConfig,
    TrainingDataError,
    TrainingDivergedError,
    batch_indices,
    compute_loss,
    epoch_permutation,
    evaluate,
    evaluate_layers,
    group_penalty,
    ordered_batches,
    pick_device,
    seeded_batches,
    set_seed,
    train_steps,
)

CPU = torch.device("cpu")


def _tiny_cfg(**kw) -> ComboConfig:
    base = dict(num_layers=2, feature_dim=8, num_tokens=16, num_classes=4, width=32, depth=1, num_heads=2)
    base.update(kw)
    return ComboConfig(**base)


def _position_task(n: int, seed: int, *, signal_layer: int = 1, num_layers: int = 2):
    """Labels visible only at token 5 of one layer: the adapter must find that token through attention."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, num_layers, 16, 8, generator=g)
    x[:, signal_layer, 5, :] += 3.0 * torch.eye(4, 8)[y]
    return x, y


# ---------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("total", [1600, 1300, 37])
def test_lr_at_key_points(total):
    lr = 1e-3
    w = warmup_steps(total)
    assert w == int(0.1 * total)
    assert lr_at(0, total_steps=total, base_lr=lr) == pytest.approx(lr / 100)
    assert lr_at(w, total_steps=total, base_lr=lr) == pytest.approx(lr)
    assert lr_at(total - 1, total_steps=total, base_lr=lr) == pytest.approx(lr / 1000)
    lrs = [lr_at(s, total_steps=total, base_lr=lr) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:w], lrs[1 : w + 1]))  # linear rise
    assert all(a > b for a, b in zip(lrs[w:-1], lrs[w + 1 :]))  # cosine fall
    if w > 1:  # linear: equal increments
        assert lrs[1] - lrs[0] == pytest.approx(lrs[w] - lrs[w - 1])
    # Held at the floor past the end (LambdaLR asks once more after the last step).
    assert lr_at(total + 5, total_steps=total, base_lr=lr) == pytest.approx(lr / 1000)


def test_lr_at_cosine_midpoint_and_errors():
    total, lr = 1001, 1.0
    w = warmup_steps(total)  # 100; cosine spans steps 100..1000
    assert lr_at(w + 450, total_steps=total, base_lr=lr) == pytest.approx(0.001 + 0.999 * 0.5)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, total_steps=total, base_lr=lr)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, total_steps=0, base_lr=lr)


def test_scheduler_applied_to_optimizer_matches_lr_at():
    model = ComboAdapter(_tiny_cfg())
    opt = make_optimizer(model, lr=1e-3)
    total = 50
    sched = make_scheduler(opt, total_steps=total)
    for step in range(total):
        expected = lr_at(step, total_steps=total, base_lr=1e-3)
        assert len(opt.param_groups) == 2
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(expected, rel=1e-12)
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------------ param groups


def test_param_groups_split_for_combo_adapter():
    model = ComboAdapter(_tiny_cfg(depth=2))
    decay_group, no_decay_group = param_groups(model, weight_decay=1e-4)
    decay, no_decay = set(decay_group["names"]), set(no_decay_group["names"])
    assert decay_group["weight_decay"] == 1e-4 and no_decay_group["weight_decay"] == 0.0
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(decay | no_decay) == sorted(all_names)  # nothing missing
    assert not decay & no_decay  # nothing duplicated
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == len(all_names)
    for name in ("lambda_weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight",
                 "blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "head.weight"):
        assert name in decay, name
    for name in ("lambda_bias", "cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias",
                 "blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.1.attn.qkv.bias", "blocks.0.mlp.fc1.bias"):
        assert name in no_decay, name
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_param_groups_multi_layer_probe_bias_not_decayed():
    probe = MultiLayerLinearProbe(num_layers=3, feature_dim=4, num_classes=2)
    decay_group, no_decay_group = param_groups(probe, weight_decay=0.1)
    assert decay_group["names"] == ["weight"] and no_decay_group["names"] == ["bias"]  # bias is [L, C], ndim 2
    frozen = LinearProbe(4, 2)
    frozen.fc.weight.requires_grad_(False)
    d, nd = param_groups(frozen, weight_decay=0.1)
    assert d["names"] == [] and nd["names"] == ["fc.bias"]


# ------------------------------------------------------------------------------------------- group penalty


def test_group_penalty_by_hand_and_loss_is_ce_without_it():
    cfg = _tiny_cfg(num_layers=3, layers_per_backbone=(1, 2), width=4, feature_dim=2)
    model = ComboAdapter(cfg)
    w = torch.linspace(-1.0, 2.0, 4 * 3 * 2).reshape(4, 3, 2)
    with torch.no_grad():
        model.lambda_map.copy_(w)
    hand = math.sqrt(float((w[:, :1] ** 2).sum())) + math.sqrt(float((w[:, 1:] ** 2).sum()))
    assert group_penalty(model).item() == pytest.approx(hand, rel=1e-6)

    logits = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    ce = F.cross_entropy(logits, labels)
    loss, ce_out = compute_loss(model, logits, labels, group_lambda=0.0)
    assert torch.equal(loss, ce) and torch.equal(ce_out, ce)
    loss, ce_out = compute_loss(model, logits, labels, group_lambda=0.5)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * hand, rel=1e-6)
    assert torch.equal(ce_out, ce)
    # The penalty reaches Lambda's weight through autograd.
    loss.backward()
    assert model.lambda_weight.grad is not None and model.lambda_weight.grad.abs().sum() > 0

    with pytest.raises(TypeError, match="LinearProbe"):
        group_penalty(LinearProbe(4, 2))


def test_train_history_loss_equals_ce_only_without_penalty():
    x, y = _position_task(64, 0)
    for lam, same in ((0.0, True), (0.05, False)):
        set_seed(0)
        model = ComboAdapter(_tiny_cfg(layers_per_backbone=(1, 1)))
        cfg = TrainConfig(steps=5, batch_size=16, group_lambda=lam)
        hist = train_steps(model, seeded_batches(x, y, batch_size=16, seed=0), cfg, device=CPU)
        assert len(hist["loss"]) == len(hist["ce"]) == len(hist["lr"]) == 5
        assert (hist["loss"] == hist["ce"]) is same
    with pytest.raises(ValueError, match="ComboAdapter"):
        train_steps(LinearProbe(8, 4), iter([]), TrainConfig(steps=1, group_lambda=0.01), device=CPU)


def test_relevance_penalty_ranks_informative_backbone_first():
    # Backbone 0 (layers 0-1) is noise; backbone 1 (layers 2-3) carries the label in every token.
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (256,), generator=g)
    x = torch.randn(256, 4, 16, 8, generator=g)
    x[:, 2:] += torch.eye(4, 8)[y][:, None, None, :]
    set_seed(0)
    model = ComboAdapter(_tiny_cfg(num_layers=4, layers_per_backbone=(2, 2)))
    before = model.backbone_norms().detach().clone()
    assert before[0] == pytest.approx(before[1].item(), rel=0.1)  # no head start from the init
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, group_lambda=0.05)
    train_steps(model, seeded_batches(x, y, batch_size=32, seed=0), cfg, device=CPU, prepare=normalise_maps)
    s = model.backbone_norms().detach()
    assert s[1] > 10 * s[0]  # the group lasso all but switched the useless backbone off
    assert s[0] < 0.1 * before[0]
    assert int(model.layer_norms().argmax()) in (2, 3)


# ---------------------------------------------------------------------------------------------------- learning


def test_tiny_combo_learns_position_signal():
    xtr, ytr = _position_task(512, 0)
    xte, yte = _position_task(256, 1)
    set_seed(0)
    model = ComboAdapter(_tiny_cfg())
    cfg = TrainConfig(steps=300, batch_size=32, seed=0)  # the paper's lr/wd/schedule
    hist = train_steps(model, seeded_batches(xtr, ytr, batch_size=32, seed=cfg.seed), cfg, device=CPU,
                       prepare=normalise_maps)
    assert hist["steps"] == 300
    assert hist["lr"][0] == pytest.approx(1e-5) and hist["lr"][30] == pytest.approx(1e-3)
    assert hist["lr"][-1] == pytest.approx(1e-6)
    acc, n, preds = evaluate(model, ordered_batches(xte, yte, batch_size=50), device=CPU, prepare=normalise_maps)
    assert n == 256 and preds.shape == (256,)
    assert acc > 0.75  # chance is 0.25
    # Predictions come back in input order.
    with torch.no_grad():
        direct = model(normalise_maps(xte)).argmax(-1).numpy()
    np.testing.assert_array_equal(preds, direct)
    assert acc == pytest.approx(float((direct == yte.numpy()).mean()))


def test_train_with_two_grids_through_make_prepare():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 1, 25, 8, generator=g)  # 5x5 grid
    b = torch.randn(32, 1, 16, 8, generator=g)  # 4x4 grid
    y = torch.randint(0, 4, (32,), generator=g)

    def batches():
        while True:
            yield (a, b), y

    prepare = make_prepare([(5, 5), (4, 4)], target=(4, 4))
    model = ComboAdapter(_tiny_cfg(layers_per_backbone=(1, 1)))
    hist = train_steps(model, batches(), TrainConfig(steps=3, batch_size=32), device=CPU, prepare=prepare)
    assert len(hist["loss"]) == 3
    acc, n, _ = evaluate(model, [((a, b), y)], device=CPU, prepare=prepare)
    assert n == 32 and 0.0 <= acc <= 1.0


def test_multi_layer_probe_finds_informative_layer():
    g = torch.Generator().manual_seed(0)
    n, num_layers, d = 600, 4, 16
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, num_layers, d, generator=g)
    x[:, 2, :3] += 3.0 * torch.eye(3)[y]  # only layer 2 carries the label
    probe = MultiLayerLinearProbe(num_layers, d, 3)
    cfg = TrainConfig(steps=300, batch_size=32, lr=1e-2)
    train_steps(probe, seeded_batches(x[:400], y[:400], batch_size=32, seed=0), cfg, device=CPU)
    accs, count, preds = evaluate_layers(probe, ordered_batches(x[400:], y[400:], batch_size=64), device=CPU)
    assert count == 200 and preds.shape == (200, num_layers) and accs.shape == (num_layers,)
    assert int(np.argmax(accs)) == 2
    assert accs[2] > 0.8 and max(accs[[0, 1, 3]]) < 0.55  # chance is 1/3
    with pytest.raises(TrainingDataError, match="evaluate_layers"):
        evaluate(probe, ordered_batches(x[400:], y[400:], batch_size=64), device=CPU)


def test_multi_layer_probe_heads_are_independent_linear_probes():
    torch.manual_seed(0)
    probe = MultiLayerLinearProbe(3, 5, 4)
    x = torch.randn(7, 3, 5, requires_grad=True)
    y = torch.randint(0, 4, (7,))
    logits = probe(x)
    assert logits.shape == (7, 3, 4)
    total = per_layer_loss(logits, y)
    total.backward()
    for l in range(3):
        single = LinearProbe(5, 4)
        with torch.no_grad():
            single.fc.weight.copy_(probe.weight[l])
            single.fc.bias.copy_(probe.bias[l])
        out = single(x[:, l].detach())
        torch.testing.assert_close(logits[:, l], out)
        F.cross_entropy(out, y).backward()
        # Summed loss: each head gets exactly the gradient it would get if trained alone.
        torch.testing.assert_close(probe.weight.grad[l], single.fc.weight.grad)
        torch.testing.assert_close(probe.bias.grad[l], single.fc.bias.grad)
    assert total.item() == pytest.approx(sum(F.cross_entropy(logits[:, l], y).item() for l in range(3)), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(7, 2, 5\)"):
        probe(torch.randn(7, 2, 5))
    assert pool_tokens(torch.ones(2, 3, 6, 5)).shape == (2, 3, 5)


# ------------------------------------------------------------------------------------------------- determinism


def _train_once(seed: int) -> dict[str, torch.Tensor]:
    x, y = _position_task(96, 0)
    set_seed(seed)
    model = ComboAdapter(_tiny_cfg())
    cfg = TrainConfig(steps=15, batch_size=16, seed=seed)
    train_steps(model, seeded_batches(x, y, batch_size=16, seed=seed), cfg, device=CPU, prepare=normalise_maps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights():
    a, b, c = _train_once(42), _train_once(42), _train_once(7)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seeded_batches_order():
    n, bs = 10, 4
    first = list(zip(range(9), batch_indices(n, batch_size=bs, seed=42)))
    again = list(zip(range(9), batch_indices(n, batch_size=bs, seed=42)))
    for (_, i), (_, j) in zip(first, again):
        np.testing.assert_array_equal(i, j)
    sizes = [len(idx) for _, idx in first]
    assert sizes == [4, 4, 2, 4, 4, 2, 4, 4, 2]  # ceil(n / bs) batches per epoch, the last smaller
    for epoch in range(3):
        chunk = np.concatenate([idx for _, idx in first[3 * epoch : 3 * epoch + 3]])
        np.testing.assert_array_equal(chunk, epoch_permutation(n, epoch, 42))
        assert sorted(chunk.tolist()) == list(range(n))  # every sample once per epoch
    assert not np.array_equal(epoch_permutation(n, 0, 42), epoch_permutation(n, 1, 42))
    assert not np.array_equal(epoch_permutation(n, 0, 42), epoch_permutation(n, 0, 43))
    assert epoch_permutation(n, 0, 42).dtype == np.int64

    # seeded_batches yields the rows of those indices, for tensors and numpy arrays alike.
    feats = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    labels = torch.arange(n) % 3
    it_t = seeded_batches(feats, labels, batch_size=bs, seed=42)
    it_np = seeded_batches(feats.numpy(), labels.numpy(), batch_size=bs, seed=42)
    for (_, idx) in first:
        xt, yt = next(it_t)
        xn, yn = next(it_np)
        torch.testing.assert_close(xt, feats[torch.from_numpy(idx)])
        torch.testing.assert_close(xn, xt)
        assert torch.equal(yt, labels[torch.from_numpy(idx)]) and torch.equal(yn, yt)
        assert yt.dtype == torch.long


def test_paper_step_counts_are_whole_epochs():
    for n, steps in ((800, 1300), (1000, 1600)):
        per_epoch = math.ceil(n / 64)
        assert steps % per_epoch == 0 and steps // per_epoch == 100


# ------------------------------------------------------------------------------------------------ failure paths


def test_finite_iterator_and_bad_data_fail_clearly():
    x, y = _position_task(20, 0)
    model = ComboAdapter(_tiny_cfg())
    with pytest.raises(TrainingDataError, match="step 2 of 5"):
        train_steps(model, iter([(x, y), (x, y)]), TrainConfig(steps=5), device=CPU)
    with pytest.raises(TrainingDataError, match="20 feature rows but 19 labels"):
        next(seeded_batches(x, y[:19], batch_size=4, seed=0))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="step 0"):
        train_steps(model, iter([(bad, y)] * 2), TrainConfig(steps=2), device=CPU)
    with pytest.raises(TrainingDataError, match="no batches"):
        evaluate(model, [], device=CPU)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="group_lambda"):
        TrainConfig(group_lambda=-1.0)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device(None)
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    assert pick_device("auto") == auto
    with pytest.raises(ValueError, match="nonsense"):
        pick_device("nonsense")
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
        with pytest.raises(DeviceUnavailableError):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(DeviceUnavailableError, match="CUDA"):
            pick_device("cuda")
