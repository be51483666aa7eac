"""Stage 1 end to end: `combo extract` on generated data with tiny random-init timm models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from combo.cli import app
from extract.backbones import ALIASES, BackboneSpec, load_backbone
from extract.datasets import plan_dataset
from extract.images import preprocess
from extract.order import row_order
from extract.pipeline import ExtractConfig, extract
from fakedata import ODD_MODES, make_vtab_tree, odd_mode_image
from store_schema import StoreWriter, open_store, validate_store

MODEL = "vit_tiny_patch16_224"
SIZE = 32
runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def extract_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(root),
            "--out", str(out), "--image-size", str(SIZE), "--batch-size", "8", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_vtab_tree(root, {"dtd": 3, "eurosat": 4}, n_train=10, n_val=5, n_test=12, image_size=24, n_unmatched=1)
    return root


@pytest.fixture(scope="module")
def extracted(vtab, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores")
    result = run_cli(*extract_args(vtab, out))
    assert result.exit_code == 0, result.output
    return out / MODEL / "vtab.zarr"


def test_store_shapes_metadata_and_dedup(extracted):
    store = open_store(extracted)
    assert store.tasks == ["dtd", "eurosat"]
    assert store.backbone["alias"] == MODEL and store.backbone["weights_source"] == "random-init"
    assert store.backbone["seed"] == 0 and store.backbone["weights_sha256"] is None
    assert store.attrs["preprocessing"]["image_size"] == SIZE
    assert store.token_grid == (2, 2) and store.num_prefix_tokens == 1 and store.num_layers == 12
    task = store.task("dtd")
    # 10 train + 5 val + 1 unmatched train800val200 copy + 12 test: duplicates stored once
    assert task.num_samples == 28
    assert task.tokens.shape == (28, 12, 4, 192) and task.tokens.dtype == np.float16
    assert task.prefix.shape == (28, 12, 1, 192)
    assert task.attrs["splits"] == {"train800": 10, "val200": 5, "train800val200": 15, "test": 12}
    assert task.attrs["group"] == "natural" and store.task("eurosat").attrs["group"] == "specialised"
    first = int(np.argmin(task.samples.column("source_index").to_numpy()))  # training rows are stored shuffled
    assert task.samples.column("sample_id")[first].as_py() == "dtd/images/train800/000000.png"
    aliases = task.samples.column("aliases").to_pylist()
    assert aliases[first] == ["dtd/images/train800val200/000000.png"]
    assert validate_store(extracted).ok
    for key in ("torch", "timm", "zarr"):
        assert key in store.attrs["library_versions"]


def test_stored_values_equal_a_direct_timm_forward(extracted, vtab):
    task = open_store(extracted).task("eurosat")
    backbone = load_backbone(MODEL, image_size=SIZE, random_init=True, seed=0)
    model = backbone.model
    rows = [0, 7, 27]
    images = []
    for r in rows:
        sample_id = task.sample_ids[r]
        with Image.open(vtab / sample_id) as im:
            images.append(preprocess(im.convert("RGB"), image_size=SIZE, mean=backbone.mean, std=backbone.std))
    x = torch.stack(images)
    with torch.inference_mode():
        h = model._pos_embed(model.patch_embed(x))
        outs = []
        for block in model.blocks:
            h = block(h)
            outs.append(h)
    direct = torch.stack(outs, 1)  # [B, L, 1 + T, D]
    stored = task.read(rows).astype(np.float32)
    stored_prefix = task.read(rows, prefix=True).astype(np.float32)
    np.testing.assert_allclose(stored, direct[:, :, 1:].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_prefix, direct[:, :, :1].numpy(), rtol=2e-3, atol=2e-3)


def test_sample_order_is_deterministic(vtab, extracted):
    plan_a = plan_dataset("vtab", root=vtab)
    plan_b = plan_dataset("vtab", root=vtab, num_workers=1)
    assert [s.sample_id for s in plan_a[0].samples] == [s.sample_id for s in plan_b[0].samples]
    stored = open_store(extracted).task("dtd")  # rows in the seeded order of extract/order.py
    assert stored.sample_ids == [s.sample_id for s in row_order(plan_a[0]).plan.samples]
    natural = np.argsort(stored.samples.column("source_index").to_numpy())
    assert [stored.sample_ids[r] for r in natural] == [s.sample_id for s in plan_a[0].samples]


def test_finished_store_is_not_recomputed_without_overwrite(vtab, tmp_path):
    args = extract_args(vtab, tmp_path, "--task", "dtd")
    assert run_cli(*args).exit_code == 0
    chunk = tmp_path / MODEL / "vtab.zarr" / "dtd" / "tokens" / "c" / "0" / "0" / "0" / "0"
    before = chunk.stat().st_mtime_ns
    again = run_cli(*args)
    assert again.exit_code == 0 and "already complete" in again.output
    assert chunk.stat().st_mtime_ns == before
    forced = run_cli(*args, "--overwrite")
    assert forced.exit_code == 0 and "extracted" in forced.output
    assert chunk.stat().st_mtime_ns != before
    # adding a task to the same store keeps the first
    assert run_cli(*extract_args(vtab, tmp_path, "--task", "eurosat")).exit_code == 0
    assert open_store(tmp_path / MODEL / "vtab.zarr").tasks == ["dtd", "eurosat"]


def test_store_of_another_checkpoint_is_not_extended(vtab, tmp_path, monkeypatch):
    """An alias re-pointed at other weights (in21k: augreg_in21k -> orig_in21k) must not add tasks to its old store.

    Tiny stand-ins for the two vit_base checkpoints; random-init stores record the tag too.
    """
    def extract_in21k(tag: str, task: str):
        monkeypatch.setitem(ALIASES, "in21k", BackboneSpec("in21k", MODEL, tag))
        args = extract_args(vtab, tmp_path, "--task", task)
        args[args.index(MODEL)] = "in21k"
        return runner.invoke(app, args)

    assert extract_in21k("augreg_in21k", "dtd").exit_code == 0
    result = extract_in21k("augreg_in21k_ft_in1k", "eurosat")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"was made with checkpoint {MODEL}.augreg_in21k, while this run uses {MODEL}.augreg_in21k_ft_in1k"
            in result.output)
    assert "--overwrite" in result.output and "--out" in result.output
    assert open_store(tmp_path / "in21k" / "vtab.zarr").tasks == ["dtd"]
    assert extract_in21k("augreg_in21k", "eurosat").exit_code == 0  # its own checkpoint still extends it


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from extract.pipeline import ExtractConfig, extract
    seen = [0]
    def progress(task, total):
        def advance(n):
            seen[0] += n
            if seen[0] >= int(sys.argv[3]):
                # kill once the first shard is on disk, while later ones are in flight
                journal = os.path.join(sys.argv[2], sys.argv[4], "vtab.zarr", "eurosat", ".journal.jsonl")
                for _ in range(1000):
                    if os.path.exists(journal) and open(journal).read().strip():
                        break
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
        return advance
    cfg = ExtractConfig(model=sys.argv[4], dataset="vtab", root=sys.argv[1], out=sys.argv[2], image_size=int(sys.argv[5]),
                        random_init=True, batch_size=8, num_workers=0, tasks=("eurosat",), rows_per_shard=32)
    extract(cfg, progress=progress)
""")


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    root = tmp_path / "vtab"
    make_vtab_tree(root, {"eurosat": 4}, n_train=10, n_val=5, n_test=80, image_size=16)  # 95 rows: 3 shards
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(out), "48", MODEL, str(SIZE)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr
    store_path = out / MODEL / "vtab.zarr"
    task = open_store(store_path).task("eurosat")
    assert not task.complete  # killed: not marked complete, and validate says so
    assert validate_store(store_path).tasks["eurosat"] == "incomplete"
    journal = (store_path / "eurosat" / ".journal.jsonl").read_text().splitlines()
    assert 1 <= len(journal) < 3  # some shards were finished before the kill, not all
    result = run_cli(*extract_args(root, out, "--rows-per-shard", "32"))
    assert result.exit_code == 0 and "resumed" in result.output
    assert run_cli(*extract_args(root, tmp_path / "clean")).exit_code == 0
    resumed = open_store(store_path).task("eurosat")
    reference = open_store(tmp_path / "clean" / MODEL / "vtab.zarr").task("eurosat")
    assert resumed.complete and validate_store(store_path).ok
    np.testing.assert_array_equal(resumed.read(slice(None)), reference.read(slice(None)))
    np.testing.assert_array_equal(resumed.read(slice(None), prefix=True), reference.read(slice(None), prefix=True))
    assert resumed.sample_ids == reference.sample_ids


def test_second_writer_is_refused(vtab, tmp_path, extracted):
    info_store = open_store(extracted)
    target = tmp_path / MODEL / "vtab.zarr"
    from store_schema.layout import StoreLayout
    from store_schema.metadata import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo

    a = info_store.attrs
    info = StoreInfo(
        backbone=BackboneInfo(**a["backbone"]),
        preprocessing=Preprocessing(image_size=SIZE, mean=tuple(a["preprocessing"]["mean"]), std=tuple(a["preprocessing"]["std"])),
        features=FeatureInfo(token_grid=(2, 2), num_prefix_tokens=1, layers=tuple(range(12)), feature_dim=192),
        dataset="vtab",
    )
    with StoreWriter(target, info, StoreLayout()):
        result = run_cli(*extract_args(vtab, tmp_path, "--task", "dtd"))
    assert result.exit_code == 2
    assert "being written by pid" in result.output


def test_odd_image_modes_become_rgb(tmp_path):
    root = tmp_path / "folder"
    written = 0
    for i, mode in enumerate(ODD_MODES):
        cls = root / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        img = odd_mode_image(mode, size=12)
        for ext in ("png", "tif", "webp", "jpg"):  # the first format that can hold this mode
            try:
                img.save(cls / f"img{i}.{ext}")
            except (OSError, ValueError, KeyError):
                (cls / f"img{i}.{ext}").unlink(missing_ok=True)
                continue
            with Image.open(cls / f"img{i}.{ext}") as check:
                assert check.mode in (img.mode, "RGBA", "RGB", "L", "P", "I;16", "I", "F", "CMYK", "1", "LA", "YCbCr")
            written += 1
            break
    assert written >= len(ODD_MODES) - 1
    result = run_cli("extract", "--model", MODEL, "--random-init", "--dataset", "folder", "--root", str(root),
                     "--out", str(tmp_path / "s"), "--image-size", str(SIZE), "--num-workers", "0")
    assert result.exit_code == 0, result.output
    task = open_store(tmp_path / "s" / MODEL / "folder.zarr").task(open_store(tmp_path / "s" / MODEL / "folder.zarr").tasks[0])
    assert task.num_samples == written
    assert task.samples.column("valid").to_pylist() == [True] * written
    assert np.isfinite(task.read(slice(None)).astype(np.float32)).all()


def test_corrupt_image_stops_with_its_path_and_keeps_written_shards(vtab, tmp_path):
    root = tmp_path / "vtab"
    make_vtab_tree(root, {"dtd": 3}, n_train=10, n_val=5, n_test=40, image_size=16, corrupt=[("test", 30)])
    out = tmp_path / "s"
    result = run_cli(*extract_args(root, out, "--rows-per-shard", "8"))
    assert result.exit_code == 2
    assert "dtd/images/test/000030.png" in result.output and "--skip-bad" in result.output
    store_path = out / MODEL / "vtab.zarr"
    journal = (store_path / "dtd" / ".journal.jsonl").read_text().splitlines()
    assert len(journal) >= 1  # shards finished before the bad image are kept for the next run
    skipped = run_cli(*extract_args(root, out, "--skip-bad", "--rows-per-shard", "8"))
    assert skipped.exit_code == 0, skipped.output
    assert "resumed" in skipped.output and "skipped" in skipped.output
    task = open_store(store_path).task("dtd")
    bad = [s for s in task.attrs["skipped"]]
    assert len(bad) == 1 and bad[0]["sample_id"] == "dtd/images/test/000030.png" and "decode" in bad[0]["error"]
    valid = task.samples.column("valid").to_pylist()
    assert valid.count(False) == 1 and not valid[bad[0]["row"]]
    assert bad[0]["row"] not in task.rows("test")
    assert np.isnan(task.read([bad[0]["row"]])).all()  # never written: NaN, not zeros that pass for features
    assert validate_store(store_path).ok


def test_unknown_model_is_a_clean_error(tmp_path):
    result = run_cli("extract", "--model", "resnet_does_not_exist", "--dataset", "digits", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "error" in result.output and "resnet_does_not_exist" in result.output
    assert "in21k (vit_base_patch16_224.orig_in21k), in21k-augreg (vit_base_patch16_224.augreg_in21k)" in result.output
    assert "Traceback" not in result.output


def test_missing_weights_offline_fails_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run_cli("extract", "--model", "vit_tiny_patch16_224", "--dataset", "digits", "--out", str(tmp_path / "s"),
                     "--image-size", str(SIZE))
    assert result.exit_code == 2
    assert "--weights" in result.output and "--random-init" in result.output
    assert not (tmp_path / "s" / "vit_tiny_patch16_224").exists() or not any((tmp_path / "s").rglob("tokens"))


def test_digits_demo_store_readable_with_plain_zarr(tmp_path):
    result = run_cli("extract", "--model", MODEL, "--random-init", "--dataset", "digits", "--out", str(tmp_path),
                     "--image-size", "16", "--num-workers", "0", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / MODEL / "digits.zarr"), mode="r")
    assert group.attrs["combo"]["dataset"]["name"] == "digits"
    tokens = group["digits/tokens"]
    assert tokens.shape[0] == 1797 and tokens.shape[1:] == (12, 1, 192)
    info = run_cli("store", "info", str(tmp_path / MODEL / "digits.zarr"))
    assert info.exit_code == 0 and "random-init" in info.output


# ------------------------------------------------------------------ every backbone through forward_intermediates

TINY = {"depth": 3, "embed_dim": 32, "num_heads": 2}
PAPER_ARCHITECTURES = {  # one alias per distinct architecture of the paper's seven
    "sam": {**TINY, "window_size": 2, "global_attn_indexes": (1,)}, "clip": TINY, "siglip": TINY,
    "dinov2": TINY, "in21k": TINY}
FEATURE_KEYS = {"token_grid", "num_tokens", "num_prefix_tokens", "layers", "num_layers", "feature_dim", "kind"}


@pytest.fixture(scope="module")
def small_vtab(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-vtab")
    make_vtab_tree(root, {"dtd": 2}, n_train=4, n_val=2, n_test=4, image_size=24)
    return root


def _stored_vs_hooked(store_path: Path, root: Path, alias: str, size: int, kwargs: dict):
    from hookref import hooked_block_outputs

    task = open_store(store_path).task("dtd")
    backbone = load_backbone(alias, image_size=size, random_init=True, seed=0, model_kwargs=kwargs)
    rows = list(range(task.num_samples))
    images = []
    for sample_id in task.sample_ids:
        with Image.open(root / sample_id) as im:
            images.append(preprocess(im.convert("RGB"), image_size=size, mean=backbone.mean, std=backbone.std))
    patch, prefix = hooked_block_outputs(backbone, torch.stack(images))
    return task, rows, patch.to(torch.float16).numpy(), prefix.to(torch.float16).numpy()


@pytest.mark.parametrize("alias", sorted(PAPER_ARCHITECTURES))
def test_paper_alias_stores_keep_their_bytes(alias, small_vtab, tmp_path):
    """The stored tokens equal, bit for bit, those of the block-hook path the stores were made with before
    extraction went through forward_intermediates, and the features document has the keys it always had."""
    size = 56 if alias == "dinov2" else 64
    kwargs = PAPER_ARCHITECTURES[alias]
    result = extract(ExtractConfig(model=alias, dataset="vtab", root=str(small_vtab), out=str(tmp_path), image_size=size,
                                   random_init=True, num_workers=0, batch_size=4, model_kwargs=kwargs))
    task, rows, patch, prefix = _stored_vs_hooked(result.store, small_vtab, alias, size, kwargs)
    assert np.array_equal(task.read(rows), patch)
    if prefix.shape[2]:
        assert np.array_equal(task.read(rows, prefix=True), prefix)
    assert set(open_store(result.store).features) == FEATURE_KEYS


def test_naflex_radio_store_keeps_summary_tokens_apart(small_vtab, tmp_path):
    """RADIO as timm's NaFlexViT, fed the same fixed square input as every model: 8 prefix tokens (cls +
    registers), the patch tokens on their 4x4 grid."""
    result = extract(ExtractConfig(model="naflexvit_base_patch16_radio_v3", dataset="vtab", root=str(small_vtab),
                                   out=str(tmp_path), image_size=64, random_init=True, num_workers=0, batch_size=4,
                                   model_kwargs=TINY))
    store = open_store(result.store)
    assert (store.token_grid, store.num_prefix_tokens, store.num_layers, store.feature_dim) == ((4, 4), 8, 3, 32)
    task = store.task("dtd")
    assert task.tokens.shape == (task.num_samples, 3, 16, 32) and task.prefix.shape == (task.num_samples, 3, 8, 32)
    assert validate_store(result.store).ok


def test_layers_option_stores_a_subset(extracted, vtab, tmp_path):
    result = run_cli(*extract_args(vtab, tmp_path, "--layers", "last:2", "--task", "dtd"))
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / MODEL / "vtab.zarr")
    assert store.features["layers"] == [10, 11] and store.num_layers == 2 and store.features["model_layers"] == 12
    full, some = open_store(extracted).task("dtd"), store.task("dtd")
    rows = list(range(some.num_samples))
    assert np.array_equal(some.read(rows), full.read(rows, layers=[10, 11]))
    assert np.array_equal(some.read(rows, prefix=True), full.read(rows, prefix=True, layers=[10, 11]))
    assert validate_store(tmp_path / MODEL / "vtab.zarr").ok
    assert "2: [10, 11] of the model's 12" in run_cli("store", "info", str(tmp_path / MODEL / "vtab.zarr")).output
    assert "model_layers" not in open_store(extracted).features  # every layer: the document stores always had


@pytest.mark.parametrize("bad,why", [("12", "out of range"), ("last:0", "1..12"), ("x", "indices")])
def test_bad_layers_option_is_a_clean_error(bad, why, vtab, tmp_path):
    result = run_cli(*extract_args(vtab, tmp_path, "--layers", bad))
    assert result.exit_code == 2 and why in result.output and "--layers" in result.output
    assert "Traceback" not in result.output and not (tmp_path / MODEL).exists()


def test_multi_grid_model_with_prefix_tokens_is_refused_before_anything_is_written(tmp_path):
    result = run_cli("extract", "--model", "mvitv2_small_cls", "--random-init", "--dataset", "digits", "--out", str(tmp_path))
    assert result.exit_code == 2 and "prefix token" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "mvitv2_small_cls").exists()
