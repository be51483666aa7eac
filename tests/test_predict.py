"""`combo predict`: the recorded backbones + the trained adapter on image files reproduce the run's evaluation.

Two tiny random-init ViTs are extracted over a generated count task (countdata.py), probed, and then rebuilt
from nothing but the run folder: predicting on the test images must give the predictions the run stored for
those samples, sample by sample (so also the same accuracy).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from combo.cli import app
from combo.predict import PredictError, list_images, load_trained, predict_images
from countdata import count_tree
from extract.pipeline import ExtractConfig, extract
from fakedata import write_corrupt
from probe.relevance import run_select
from probe.report import read_csv
from probe.run import ProbeConfig, run_probe


MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")
TASK = "clevr_count"
runner = CliRunner()


def probe_config(stores, out, **kw) -> ProbeConfig:
    args = dict(dataset="vtab", steps=120, batch_size=32, grid=(2, 2), width=32, depth=1, device="cpu", out=str(out))
    return ProbeConfig(stores=tuple(str(s) for s in stores), **{**args, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    count_tree(root / "vtab", TASK, n_train=48, n_val=16, n_test=40)
    stores = []
    for seed, model in enumerate(MODELS):
        result = extract(ExtractConfig(model=model, dataset="vtab", root=str(root / "vtab"), out=str(root / "stores"),
                                       image_size=32, random_init=True, seed=seed, num_workers=0, batch_size=32))
        stores.append(result.store)
    combo = run_probe(probe_config(stores, root / "runs"))
    linear = run_probe(probe_config(stores, root / "runs", method="linear", lr=1e-2))
    return {"root": root, "vtab": root / "vtab", "test_images": root / "vtab" / TASK / "images" / "test",
            "stores": stores, "combo": combo, "linear": linear}


def stored_predictions(run_dir: Path, prefix: str = "") -> dict[str, int]:
    table = pq.read_table(run_dir / f"{prefix}predictions-{TASK}.parquet").to_pydict()
    return dict(zip(table["sample_id"], table["prediction"]))


def by_sample_id(result, vtab: Path) -> dict[str, int]:
    return {Path(r["path"]).relative_to(vtab).as_posix(): r["prediction"] for r in result.rows}


@pytest.mark.parametrize("method", ["combo", "linear"])
def test_predict_reproduces_the_run_evaluation_sample_by_sample(data, method):
    run = data[method]
    result = predict_images(run.run_dir, data["test_images"], device="cpu", batch_size=16)
    got = by_sample_id(result, data["vtab"])
    expected = stored_predictions(run.run_dir)
    assert len(got) == 40 and got == expected
    labels = {f"{TASK}/images/test/{i:06d}.png": i % 4 for i in range(40)}
    accuracy = sum(got[k] == labels[k] for k in got) / len(got)
    assert accuracy == pytest.approx(run.metrics[0]["accuracy"])
    assert accuracy >= (0.85 if method == "combo" else 0.6)  # chance 0.25: the predictions carry the label
    assert result.backbones == list(MODELS) and result.task == TASK
    assert all(r["class"] == str(r["prediction"]) and 0 < r["confidence"] <= 1 for r in result.rows)


def test_predict_on_a_selected_subset_of_backbones(data, tmp_path):
    cfg = probe_config(data["stores"], tmp_path, steps=60)
    selected = run_select(cfg, select="top-1", group_lambda=0.05)
    kept = selected.chosen[TASK]
    assert len(kept) == 1
    result = predict_images(selected.run_dir, data["test_images"], device="cpu")
    assert result.backbones == kept
    assert by_sample_id(result, data["vtab"]) == stored_predictions(selected.run_dir)


def test_predict_on_every_head_of_a_study(data, tmp_path):
    from probe.study import StudyConfig
    from probe.studyrun import run_study

    study = run_study(StudyConfig(probe=probe_config(data["stores"], tmp_path, steps=40), select="top-1"))
    heads = {r["column"]: r for r in read_csv(study.run_dir / "study.csv")}
    assert len(heads) == 6  # combo on both, the top-1, each alone, linear on each
    for column, row in heads.items():
        result = predict_images(study.run_dir, data["test_images"], device="cpu", head=column)
        assert by_sample_id(result, data["vtab"]) == stored_predictions(study.run_dir / row["folder"]), column
        assert result.backbones == row["stores"].split("+"), column
    alone = predict_images(study.run_dir / heads["linear[deit_tiny_patch16_224]"]["folder"], data["test_images"],
                           device="cpu")  # a head's folder is a run folder of its own
    assert alone.backbones == ["deit_tiny_patch16_224"]
    with pytest.raises(PredictError, match=r"choose one with --head .*combo\[top-1\]"):
        load_trained(study.run_dir)
    with pytest.raises(PredictError, match="no head 'combo\\[nope\\]'"):
        load_trained(study.run_dir, head="combo[nope]")
    with pytest.raises(PredictError, match="not a study"):
        load_trained(data["combo"].run_dir, head="combo[top-1]")


def test_predict_from_a_weights_file_checks_its_hash(tmp_path):
    count_tree(tmp_path / "vtab", TASK, n_train=8, n_val=4, n_test=6)
    ckpt = tmp_path / "ckpt" / "tiny.safetensors"
    ckpt.parent.mkdir()
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    store = extract(ExtractConfig(model="vit_tiny_patch16_224", dataset="vtab", root=str(tmp_path / "vtab"),
                                  out=str(tmp_path / "stores"), image_size=32, weights=str(ckpt), num_workers=0)).store
    run = run_probe(probe_config([store], tmp_path / "runs", steps=5, batch_size=8))
    doc = json.loads((run.run_dir / "config.json").read_text())
    # the store names the file and its sha256, never a local path (stores are shared)
    assert doc["stores"][0]["backbone"]["weights_source"] == "file:tiny.safetensors"
    assert len(doc["stores"][0]["backbone"]["weights_sha256"]) == 64
    images = tmp_path / "vtab" / TASK / "images" / "test"
    with pytest.raises(PredictError, match="tiny.safetensors.*--weights vit_tiny_patch16_224=PATH"):
        predict_images(run.run_dir, images, device="cpu")
    result = predict_images(run.run_dir, images, device="cpu", weights={"vit_tiny_patch16_224": str(ckpt)})
    assert by_sample_id(result, tmp_path / "vtab") == stored_predictions(run.run_dir)
    # the file moved: point at it with --weights; a different file is refused by its sha256
    moved = tmp_path / "moved.safetensors"
    shutil.move(ckpt, moved)
    assert predict_images(run.run_dir, images, device="cpu", weights={"vit_tiny_patch16_224": str(moved)}).rows
    torch.manual_seed(4)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    result = runner.invoke(app, ["predict", "--probe", str(run.run_dir), "--images", str(images), "--device", "cpu",
                                 "--weights", f"vit_tiny_patch16_224={tmp_path / 'other.safetensors'}"])
    assert result.exit_code == 2 and "sha256 mismatch" in result.output and "Traceback" not in result.output


def test_backbones_extracted_with_custom_kwargs_are_rebuilt_from_the_record(tmp_path):
    count_tree(tmp_path / "vtab", TASK, n_train=8, n_val=4, n_test=6)
    store = extract(ExtractConfig(model="vit_tiny_patch16_224", dataset="vtab", root=str(tmp_path / "vtab"),
                                  out=str(tmp_path / "stores"), image_size=32, random_init=True, num_workers=0,
                                  model_kwargs={"depth": 2})).store
    run = run_probe(probe_config([store], tmp_path / "runs", steps=3, batch_size=8))
    doc = json.loads((run.run_dir / "config.json").read_text())
    assert doc["stores"][0]["backbone"]["model_kwargs"] == {"depth": 2}
    images = tmp_path / "vtab" / TASK / "images" / "test"
    result = predict_images(run.run_dir, images, device="cpu")
    assert len(result.rows) == 6 and by_sample_id(result, tmp_path / "vtab") == stored_predictions(run.run_dir)
    # a store written before combo recorded model_kwargs: the rebuilt shapes still differ, and that is refused
    del doc["stores"][0]["backbone"]["model_kwargs"]
    old = tmp_path / "old-run"
    shutil.copytree(run.run_dir, old)
    (old / "config.json").write_text(json.dumps(doc))
    with pytest.raises(PredictError, match=r"no model_kwargs.*blocks: rebuilt 12 vs recorded 2.*model_kwargs"):
        predict_images(old, images, device="cpu")


def test_a_store_of_some_layers_is_rebuilt_with_those_layers(tmp_path):
    """`combo extract --layers`: predict rebuilds the backbone to give the stored layers and checks the model's own
    layer count (recorded as model_layers) against the rebuilt one."""
    count_tree(tmp_path / "vtab", TASK, n_train=8, n_val=4, n_test=6)
    store = extract(ExtractConfig(model="vit_tiny_patch16_224", dataset="vtab", root=str(tmp_path / "vtab"),
                                  out=str(tmp_path / "stores"), image_size=32, random_init=True, num_workers=0,
                                  model_kwargs={"depth": 3}, layers="0,2")).store
    run = run_probe(probe_config([store], tmp_path / "runs", steps=3, batch_size=8))
    doc = json.loads((run.run_dir / "config.json").read_text())
    assert doc["stores"][0]["features"]["layers"] == [0, 2] and doc["stores"][0]["features"]["model_layers"] == 3
    images = tmp_path / "vtab" / TASK / "images" / "test"
    result = predict_images(run.run_dir, images, device="cpu")
    assert len(result.rows) == 6 and by_sample_id(result, tmp_path / "vtab") == stored_predictions(run.run_dir)
    doc["stores"][0]["backbone"]["model_kwargs"] = {"depth": 4}  # another model with the same layer ids
    other = tmp_path / "other-run"
    shutil.copytree(run.run_dir, other)
    (other / "config.json").write_text(json.dumps(doc))
    with pytest.raises(PredictError, match=r"blocks: rebuilt 4 vs recorded 3"):
        predict_images(other, images, device="cpu")


@pytest.mark.parametrize("method", ["combo", "linear"])
def test_todays_families_combine_in_one_fit_and_predict_reproduces_it(tmp_path, method):
    """A plain ViT (cls, width 192, 2x2), RADIO as NaFlexViT (8 summary/register tokens, width 32) and an EVA-02
    (patch 14: 3x3 at 42 px, rope) in one ComBo fit and in one linear probe; predict rebuilds all three."""
    count_tree(tmp_path / "vtab", TASK, n_train=16, n_val=8, n_test=12)
    tiny = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    specs = [("vit_tiny_patch16_224", 32, None), ("naflexvit_base_patch16_radio_v3", 32, tiny),
             ("eva02_tiny_patch14_224", 42, tiny)]
    stores = [extract(ExtractConfig(model=m, dataset="vtab", root=str(tmp_path / "vtab"), out=str(tmp_path / "stores"),
                                    image_size=size, random_init=True, seed=k, num_workers=0, batch_size=16,
                                    model_kwargs=kw)).store
              for k, (m, size, kw) in enumerate(specs)]
    run = run_probe(probe_config(stores, tmp_path / "runs", method=method, steps=4, batch_size=8))
    doc = json.loads((run.run_dir / "config.json").read_text())
    assert [s["features"]["num_prefix_tokens"] for s in doc["stores"]] == [1, 8, 1]
    assert [s["features"]["feature_dim"] for s in doc["stores"]] == [192, 32, 32]
    result = predict_images(run.run_dir, tmp_path / "vtab" / TASK / "images" / "test", device="cpu")
    assert len(result.rows) == 12 and by_sample_id(result, tmp_path / "vtab") == stored_predictions(run.run_dir)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_predict_writes_csv_with_class_names(data, tmp_path):
    out = tmp_path / "preds" / "predictions.csv"
    result = runner.invoke(app, ["predict", "--probe", str(data["combo"].run_dir), "--images", str(data["test_images"]),
                                 "--out", str(out), "--device", "cpu", "--show", "5"])
    assert result.exit_code == 0, result.output
    assert "35 more row(s)" in result.output and f"predictions: {out}" in result.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and set(rows[0]) == {"path", "task", "prediction", "class", "confidence", "error"}
    expected = stored_predictions(data["combo"].run_dir)
    for row in rows:
        sid = Path(row["path"]).relative_to(data["vtab"]).as_posix()
        assert int(row["prediction"]) == expected[sid] and row["class"] == row["prediction"] and row["task"] == TASK
    single = data["test_images"] / "000003.png"
    result = runner.invoke(app, ["predict", "--probe", str(data["combo"].run_dir), "--images", str(single), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1 image(s)" in result.output and "000003.png" in result.output


def test_cli_predict_errors_exit_2_naming_the_problem(data, tmp_path):
    run_dir = str(data["combo"].run_dir)

    def call(*args):
        result = runner.invoke(app, ["predict", *map(str, args)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return result.output

    assert "no such run folder" in call("--probe", tmp_path / "nowhere", "--images", data["test_images"])
    assert "no config.json" in call("--probe", tmp_path, "--images", data["test_images"])
    assert "no task 'dtd'" in call("--probe", run_dir, "--images", data["test_images"], "--task", "dtd")
    (tmp_path / "empty").mkdir()
    assert "no image files" in call("--probe", run_dir, "--images", tmp_path / "empty")
    assert "no such file or folder" in call("--probe", run_dir, "--images", tmp_path / "missing")
    assert "random-init" in call("--probe", run_dir, "--images", data["test_images"],
                                 "--weights", f"{MODELS[0]}={tmp_path / 'x.safetensors'}")
    assert "ALIAS=PATH" in call("--probe", run_dir, "--images", data["test_images"], "--weights", "nonsense")
    bad = tmp_path / "bad"
    shutil.copytree(data["test_images"], bad)
    write_corrupt(bad / "000002.png")
    assert "000002.png" in call("--probe", run_dir, "--images", bad)
    result = runner.invoke(app, ["predict", "--probe", run_dir, "--images", str(bad), "--skip-bad", "--device", "cpu",
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and sum(bool(r["error"]) for r in rows) == 1


def test_run_folder_choice_of_task_and_image_listing(data, tmp_path):
    trained = load_trained(data["combo"].run_dir)
    assert trained.task == TASK and trained.kind == "combo" and trained.grid == (2, 2)
    assert [b.alias for b in trained.backbones] == list(MODELS) and trained.backbones[1].seed == 1
    doc = json.loads((data["combo"].run_dir / "config.json").read_text())
    doc["tasks"]["dtd"] = doc["tasks"][TASK]
    two = tmp_path / "two"
    two.mkdir()
    (two / "config.json").write_text(json.dumps(doc))
    with pytest.raises(PredictError, match="choose one with --task"):
        load_trained(two)
    with pytest.raises(PredictError, match="adapter-dtd.safetensors is missing"):
        load_trained(two, "dtd")
    (tmp_path / "imgs" / "sub" / ".hidden").mkdir(parents=True)
    for name in ("b.png", "sub/a.JPG", "sub/.hidden/c.png", "notes.txt", ".d.png"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    assert [p.relative_to(tmp_path / "imgs").as_posix() for p in list_images(tmp_path / "imgs")] == ["b.png", "sub/a.JPG"]


@pytest.mark.parametrize("method,encoding", [("combo", "pca:16,int8"), ("linear", "pca:16")])
def test_predict_from_a_compact_store_run_reproduces_its_evaluation(data, tmp_path, method, encoding):
    """New images go through the store's encoding (PCA basis saved in the run folder) before the model, so
    predict gives the run's own predictions on the test images, sample by sample."""
    from store_schema.compact import CompactSpec
    from store_schema.compactor import compact_store

    compact = compact_store(data["stores"][0], tmp_path / "small.zarr", CompactSpec.parse(encoding)).store
    kw = {"method": "linear", "lr": 1e-2} if method == "linear" else {}
    run = run_probe(probe_config([compact, data["stores"][1]], tmp_path / "runs", **kw))
    assert (run.run_dir / f"encoding-{TASK}.safetensors").is_file()
    got = by_sample_id(predict_images(run.run_dir, data["test_images"], device="cpu", batch_size=16), data["vtab"])
    expected = stored_predictions(run.run_dir)
    assert len(got) == 40
    agree = sum(got[k] == expected[k] for k in got) / len(got)
    assert agree >= 0.95, agree  # float rounding of two decode paths (torch on the run, numpy here) may flip a tie
    (run.run_dir / f"encoding-{TASK}.safetensors").unlink()
    with pytest.raises(PredictError, match="does not hold its PCA basis"):
        predict_images(run.run_dir, data["test_images"], device="cpu")
