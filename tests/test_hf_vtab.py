"""VTAB-1k from the Hugging Face copies the paper's authors publish, read from a hub cache offline; and
`--dataset parquet` storing an image that several splits hold once.

The hub cache is fake but has the real layout (tests/fakedata.py `make_hf_vtab_repo`):
datasets--ORG--REPO/refs/main -> snapshots/<commit>/{README.md, data/<split>-00000-of-00001.parquet}
(symlinks into blobs/), ClassLabel names in the parquet `huggingface` schema metadata and/or the README.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from combo.cli import app
from extract.backbones import load_backbone
from extract.datasets import DatasetError, plan_dataset, plan_parquet, vtab_group
from extract.images import preprocess
from extract.pipeline import ExtractConfig, check_config, extract
from fakedata import make_hf_vtab_repo, make_parquet, make_save_to_disk, make_vtab_tree
from store_schema import open_store, validate_store
from store_schema.samples import table_metadata

MODEL = "vit_tiny_patch16_224"
SIZE = 32
runner = CliRunner()
CIFAR_NAMES = ["apple", "bear", "cat", "dog"]


def run_cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def extract_args(root: str, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", root, "--out", str(out),
            "--image-size", str(SIZE), "--batch-size", "8", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache: the two public repos the glob finds, and broken or extra ones under other orgs."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repos = {
        # class names only in the parquet metadata, no README: splits found by the file names
        "cifar": make_hf_vtab_repo(cache, "bramtoula/vtab_cifar100", class_names=CIFAR_NAMES, readme=False),
        # class names only in the README's dataset_info; the copies re-encoded (other bytes, same pixels)
        "camelyon": make_hf_vtab_repo(cache, "bramtoula/vtab_patch_camelyon", class_names=["normal", "tumor"],
                                      metadata=False, copies="resave", n_train=4, n_val=2, n_test=3),
        "nosplit": make_hf_vtab_repo(cache, "broken/vtab_dtd", omit_splits=("val200",)),
        "label": make_hf_vtab_repo(cache, "broken/vtab_eurosat", num_classes=4, bad_labels={("test", 2): 7}),
        "corrupt": make_hf_vtab_repo(cache, "broken/vtab_svhn", corrupt=[("test", 1)]),
        "mine": make_hf_vtab_repo(cache, "me/my_flowers"),
    }
    return cache, repos


@pytest.fixture(scope="module")
def offline(hub):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(hub[0]))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("HF_HOME", raising=False)
        yield mp


@pytest.fixture(scope="module")
def extracted(hub, offline, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores")
    result = run_cli(*extract_args("hf://datasets/bramtoula/vtab_*", out))
    assert result.exit_code == 0, result.output
    return out / MODEL / "vtab.zarr"


def test_glob_over_cached_repos_gives_vtab_tasks_deduplicated(extracted, hub):
    cache, repos = hub
    store = open_store(extracted)
    assert store.dataset == "vtab" and store.tasks == ["cifar", "patch_camelyon"]
    cifar, camelyon = store.task("cifar"), store.task("patch_camelyon")
    # 6 + 3 + 9 + 4 rows, the 9 train800val200 copies folded onto train800 / val200: 13 distinct images
    assert cifar.num_samples == 13 and camelyon.num_samples == 4 + 2 + 3
    assert cifar.attrs["splits"] == {"train800": 6, "val200": 3, "train800val200": 9, "test": 4}
    assert camelyon.attrs["splits"] == {"train800": 4, "val200": 2, "train800val200": 6, "test": 3}
    aliases = dict(zip(cifar.sample_ids, cifar.samples.column("aliases").to_pylist()))
    expected = {f"cifar/train800/{i}": [f"cifar/train800val200/{i}"] for i in range(6)}
    expected |= {f"cifar/val200/{i}": [f"cifar/train800val200/{6 + i}"] for i in range(3)}
    assert {k: v for k, v in aliases.items() if v} == expected
    # classes from the ClassLabel: parquet metadata (cifar), README dataset_info (camelyon)
    assert cifar.classes == CIFAR_NAMES and camelyon.classes == ["normal", "tumor"]
    assert table_metadata(cifar.samples)["classes"] == CIFAR_NAMES
    # the VTAB groups, so group means apply
    assert cifar.attrs["group"] == "natural" == vtab_group("cifar")
    assert camelyon.attrs["group"] == "specialised"
    for task, repo, key in ((cifar, "bramtoula/vtab_cifar100", "cifar"), (camelyon, "bramtoula/vtab_patch_camelyon", "camelyon")):
        source = task.attrs["source"]
        assert source["kind"] == "huggingface" and source["repo"] == repo
        assert source["revision"] == repos[key]["commit"] and len(source["revision"]) == 40
        assert source["data_files"]["test"] == ["data/test-00000-of-00001.parquet"]
    assert validate_store(extracted).ok
    # no local path anywhere in the metadata: not the cache, not a snapshot folder
    for f in extracted.rglob("*"):
        if f.is_file() and (f.suffix in (".json", ".parquet") or f.name == "zarr.json"):
            data = f.read_bytes()
            assert str(cache).encode() not in data and b"snapshots" not in data, f


def test_store_info_names_each_tasks_repo_and_commit(extracted, hub):
    _, repos = hub
    text = " ".join(run_cli("store", "info", str(extracted)).output.split())
    assert f"cifar: bramtoula/vtab_cifar100@{repos['cifar']['commit'][:12]}" in text
    assert f"patch_camelyon: bramtoula/vtab_patch_camelyon@{repos['camelyon']['commit'][:12]}" in text
    doc = json.loads(run_cli("store", "info", str(extracted), "--json").stdout)
    assert doc["task_details"]["cifar"]["source"]["repo"] == "bramtoula/vtab_cifar100"


def test_stored_rows_are_the_repo_rows_their_ids_name(extracted, hub):
    _, repos = hub
    task = open_store(extracted).task("cifar")
    ids = task.sample_ids
    rows = [ids.index("cifar/test/3"), ids.index("cifar/val200/1")]
    backbone = load_backbone(MODEL, image_size=SIZE, random_init=True, seed=0)
    images = []
    for r in rows:
        _, split, row = ids[r].split("/")
        data, label = repos["cifar"]["rows"][split][int(row)]
        assert task.labels[r] == label
        images.append(preprocess(Image.open(io.BytesIO(data)).convert("RGB"), image_size=SIZE,
                                 mean=backbone.mean, std=backbone.std))
    with torch.inference_mode():
        model = backbone.model
        h = model._pos_embed(model.patch_embed(torch.stack(images)))
        direct = []
        for block in model.blocks:
            h = block(h)
            direct.append(h)
    np.testing.assert_allclose(task.read(rows).astype(np.float32), torch.stack(direct, 1)[:, :, 1:].numpy(),
                               rtol=2e-3, atol=2e-3)


def test_save_to_disk_folder(tmp_path):
    folder = tmp_path / "vtab_pets"
    rows = make_save_to_disk(folder, class_names=["abyssinian", "beagle", "boxer"], n_train=5, n_val=2, n_test=3)
    (plan,) = plan_dataset("vtab", root=folder)
    assert plan.task == "oxford_iiit_pet" and plan.classes == ("abyssinian", "beagle", "boxer")
    assert len(plan) == 5 + 2 + 3  # the re-encoded train800val200 copies matched by their pixels
    assert plan.splits == {"train800": 5, "val200": 2, "train800val200": 7, "test": 3}
    assert [s.aliases for s in plan.samples if s.aliases] == [(f"oxford_iiit_pet/train800val200/{i}",) for i in range(7)]
    for k, s in enumerate(plan.samples):
        _, split, row = s.sample_id.split("/")
        data, label = rows[split][int(row)]
        assert s.label == label
        np.testing.assert_array_equal(np.asarray(plan.load_image(k)), np.asarray(Image.open(io.BytesIO(data))))
    assert plan.describe(len(plan) - 1) == "vtab_pets, split test, row 2"
    assert plan.source["kind"] == "datasets-save_to_disk" and plan.source["fingerprints"]["test"] == "fp-test"
    assert str(tmp_path) not in json.dumps(plan.source)
    (renamed,) = plan_dataset("vtab", root=folder, task_name="pets_copy")
    assert renamed.task == "pets_copy" and renamed.samples[0].sample_id == "pets_copy/train800/0"


def test_task_names_map_and_task_name_option(hub, offline):
    (mine,) = plan_dataset("vtab", root="hf://datasets/me/my_flowers")
    assert mine.task == "my_flowers" and vtab_group(mine.task) == "other"
    (named,) = plan_dataset("vtab", root="hf://datasets/me/my_flowers", task_name="oxford_flowers102")
    assert named.task == "oxford_flowers102" and named.samples[0].sample_id == "oxford_flowers102/train800/0"
    both = plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_patch_camelyon, hf://datasets/me/my_flowers")
    assert [p.task for p in both] == ["patch_camelyon", "my_flowers"]
    with pytest.raises(DatasetError, match=r"--task-name 'x' names one repo's task, but --root names 2"):
        plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_patch_camelyon,hf://datasets/me/my_flowers", task_name="x")
    (only,) = plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_*", tasks=["patch_camelyon"])
    assert only.task == "patch_camelyon"


def test_task_name_is_refused_for_a_vtab_folder_before_any_model_loads(tmp_path):
    make_vtab_tree(tmp_path / "vtab", ["dtd"], n_train=2, n_val=1, n_test=1)
    with pytest.raises(DatasetError, match=r"--task-name: .*/vtab is a VTAB folder, whose tasks are named by their folders"):
        check_config(ExtractConfig(model=MODEL, dataset="vtab", root=str(tmp_path / "vtab"), task_name="x"))
    with pytest.raises(DatasetError, match=r"--task-name: .*/vtab is a VTAB folder"):
        plan_dataset("vtab", root=tmp_path / "vtab", task_name="x")


def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.count(". ") == 0, message


def test_repo_not_in_cache_is_one_sentence_on_how_to_fill_it(hub, offline, tmp_path):
    cache, _ = hub
    with pytest.raises(DatasetError) as err:
        plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_caltech101")
    message = str(err.value)
    _one_sentence(message)
    assert f"bramtoula/vtab_caltech101 is not in the Hugging Face hub cache {cache}" in message
    assert "`hf download --repo-type dataset bramtoula/vtab_caltech101`" in message and "HF_HUB_OFFLINE=1" in message
    with pytest.raises(DatasetError, match=r"matches no dataset repo in the Hugging Face hub cache .* holds bramtoula/vtab_cifar100"):
        plan_dataset("vtab", root="hf://datasets/nobody/vtab_*")
    # the CLI refuses before any model is built and leaves nothing behind
    result = run_cli(*extract_args("hf://datasets/bramtoula/vtab_caltech101", tmp_path / "out"))
    assert result.exit_code == 2 and "hf download --repo-type dataset bramtoula/vtab_caltech101" in result.output
    assert not (tmp_path / "out").exists()
    # --download, offline: refused; online: fetched with huggingface_hub into the same cache
    with pytest.raises(DatasetError, match=r"HF_HUB_OFFLINE is set, so --download cannot fetch it"):
        plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_caltech101", download=True)


def test_download_is_opt_in_and_goes_through_huggingface_hub(hub, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, *, repo_type=None, revision=None, cache_dir=None, **kw):
        calls.append((repo_id, repo_type, cache_dir))
        return str(make_hf_vtab_repo(cache_dir, repo_id, n_train=2, n_val=1, n_test=1)["snapshot"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(DatasetError, match="not in the Hugging Face hub cache"):
        plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_caltech101")
    assert calls == []  # not without --download
    (plan,) = plan_dataset("vtab", root="hf://datasets/bramtoula/vtab_caltech101", download=True)
    assert calls == [("bramtoula/vtab_caltech101", "dataset", str(cache))]
    assert plan.task == "caltech101" and len(plan) == 4 and plan.source["repo"] == "bramtoula/vtab_caltech101"


def test_missing_split_and_label_out_of_range_name_repo_split_and_row(hub, offline):
    with pytest.raises(DatasetError) as err:
        plan_dataset("vtab", root="hf://datasets/broken/vtab_dtd")
    _one_sentence(str(err.value))
    assert str(err.value).startswith("broken/vtab_dtd: no split 'val200' (its README.md's configs name train800,")
    with pytest.raises(DatasetError) as err:
        plan_dataset("vtab", root="hf://datasets/broken/vtab_eurosat")
    _one_sentence(str(err.value))
    assert str(err.value) == ("broken/vtab_eurosat, split test, row 2: label 7 is outside the ClassLabel's 4 classes"
                              " (0..3)")


def test_undecodable_image_names_repo_split_and_row_and_skip_bad_records_it(hub, offline, tmp_path):
    root = "hf://datasets/broken/vtab_svhn"
    result = run_cli(*extract_args(root, tmp_path))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "cannot decode broken/vtab_svhn, split test, row 1:" in text and "--skip-bad" in text
    result = run_cli(*extract_args(root, tmp_path, "--skip-bad"))
    assert result.exit_code == 0, result.output
    task = open_store(tmp_path / MODEL / "vtab.zarr").task("svhn")
    assert [s["sample_id"] for s in task.attrs["skipped"]] == ["svhn/test/1"]
    assert "broken/vtab_svhn, split test, row 1" in task.attrs["skipped"][0]["error"]


def _append_rows(path: Path, rows: pa.Table) -> None:
    pq.write_table(pa.concat_tables([pq.read_table(path), rows]).replace_schema_metadata(None), path)


def test_parquet_deduplicates_identical_images_across_splits(tmp_path, hub):
    data = tmp_path / "d"
    make_parquet(data / "train-00000-of-00001.parquet", n=12, with_paths=False)
    make_parquet(data / "test-00000-of-00001.parquet", n=6, with_paths=False)
    train = pq.read_table(data / "train-00000-of-00001.parquet")
    resaved = io.BytesIO()
    Image.open(io.BytesIO(train.column("image")[5].as_py()["bytes"])).save(resaved, "PNG", compress_level=1)
    copies = pa.table({
        "image": pa.array([train.column("image")[0].as_py(), train.column("image")[3].as_py(),
                           {"bytes": resaved.getvalue(), "path": None}], type=train.schema.field("image").type),
        "label": pa.array([train.column("label")[k].as_py() for k in (0, 3, 5)], type=pa.int64()),
    })
    _append_rows(data / "test-00000-of-00001.parquet", copies)  # 2 byte copies, 1 re-encoded copy of train images
    (plan,) = plan_parquet(data)
    assert len(plan) == 12 + 9 - 3 and plan.splits["test"] == 9 and plan.splits["trainval"] == 12
    merged = {s.sample_id: s for s in plan.samples if s.aliases}
    assert {k: (s.aliases, "test" in s.splits) for k, s in merged.items()} == {
        f"train-00000-of-00001.parquet#{k}": ((f"test-00000-of-00001.parquet#{6 + j}",), True) for j, k in enumerate((0, 3, 5))
    }
    assert len(plan.notes) == 1 and "merged 3 duplicate rows (3 of test)" in plan.notes[0]
    (kept,) = plan_parquet(data, dedup=False)
    assert len(kept) == 21 and kept.notes == ()
    # the issue's case: the snapshot's data/ folder of an authors' repo, 22 rows for 13 images
    (vtab,) = plan_parquet(hub[1]["cifar"]["snapshot"] / "data")
    assert len(vtab) == 13 and vtab.splits["train800val200"] == 9 and "9 of train800val200" in vtab.notes[0]
    # and the pipeline says so through its warn callback
    messages: list[str] = []
    result = extract(ExtractConfig(model=MODEL, dataset="parquet", root=str(data), out=str(tmp_path / "out"),
                                   image_size=SIZE, random_init=True, num_workers=0, batch_size=8), warn=messages.append)
    assert result.tasks[0].images == 18 and open_store(result.store).task("default").num_samples == 18
    assert [m for m in messages if "merged 3 duplicate rows" in m] == [f"task default: {plan.notes[0]}"]


def test_unmatched_train800val200_rows_are_kept_and_said(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    make_hf_vtab_repo(tmp_path, "me/vtab_dmlab", corrupt=[("train800val200", 4)])
    (plan,) = plan_dataset("vtab", root="hf://datasets/me/vtab_dmlab")
    assert plan.task == "dmlab" and len(plan) == 6 + 3 + 1 + 4
    assert [s.sample_id for s in plan.samples if s.splits == ("train800val200",)] == ["dmlab/train800val200/4"]
    assert plan.notes == ("me/vtab_dmlab: 1 of 9 train800val200 rows match no train800 / val200 image (decoded pixels"
                          " and label) and are stored as rows of their own",)
    (undeduplicated,) = plan_dataset("vtab", root="hf://datasets/me/vtab_dmlab", dedup=False)
    assert len(undeduplicated) == 22 and undeduplicated.notes == ()


def test_a_repo_folder_as_root(hub, tmp_path):
    import shutil

    _, repos = hub
    snapshot = repos["camelyon"]["snapshot"]
    (inside,) = plan_dataset("vtab", root=snapshot)  # a snapshot folder of a hub cache: repo and commit known
    assert inside.task == "patch_camelyon" and len(inside) == 9
    assert (inside.source["repo"], inside.source["revision"]) == ("bramtoula/vtab_patch_camelyon", repos["camelyon"]["commit"])
    copy = tmp_path / "vtab_patch_camelyon"
    shutil.copytree(snapshot, copy)  # `hf download --local-dir`: the files, no cache layout
    (outside,) = plan_dataset("vtab", root=copy)
    assert outside.task == "patch_camelyon" and outside.samples == inside.samples and outside.source is None
    assert outside.classes == ("normal", "tumor")
