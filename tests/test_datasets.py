"""Dataset planning (extract.datasets) and image decoding (extract.images)."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from extract.datasets import (
    DATASET_KINDS,
    DatasetError,
    VTAB_TASKS,
    plan_dataset,
    plan_digits,
    plan_folder,
    plan_parquet,
    plan_vtab,
    read_split_file,
    vtab_group,
)
from extract.images import PlanImages, collate_plan_images, load_rgb, preprocess, to_rgb, ImageDecodeError
from fakedata import (
    ODD_MODES,
    make_image_folder,
    make_parquet,
    make_vtab_tree,
    odd_mode_image,
    signal_image,
    write_corrupt,
)

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.5)


def _norm(v: float, c: int) -> float:
    return (v / 255.0 - MEAN[c]) / STD[c]


# ------------------------------------------------------------------------------------------------
# Split files


def test_split_file_tolerates_crlf_bom_blanks_and_tabs(tmp_path):
    f = tmp_path / "train800.txt"
    f.write_bytes(
        b"\xef\xbb\xbfimages/train800/000000.jpg 19\r\n"
        b"images/train800/000001.jpg\t3   \r\n"
        b"\r\n"
        b"  ./images/train800/000002.jpg  0\r\n"
        b"images\\train800\\000003.jpg 7\n\n\n"
    )
    assert read_split_file(f) == [
        ("images/train800/000000.jpg", 19, 1),
        ("images/train800/000001.jpg", 3, 2),
        ("images/train800/000002.jpg", 0, 4),
        ("images/train800/000003.jpg", 7, 5),
    ]


@pytest.mark.parametrize(
    "bad",
    ["images/a.jpg", "images/a.jpg x", "images/a.jpg -1", "images/a.jpg 1.0", "/abs/a.jpg 1", "../a.jpg 1"],
)
def test_split_file_bad_line_names_file_and_line(tmp_path, bad):
    f = tmp_path / "val200.txt"
    f.write_text(f"images/ok.jpg 1\n\n{bad}\n")
    with pytest.raises(DatasetError, match=r"val200\.txt:3\b"):
        read_split_file(f)


def test_split_file_empty_is_an_error(tmp_path):
    f = tmp_path / "test.txt"
    f.write_text("\n  \n")
    with pytest.raises(DatasetError, match="test.txt: split file lists no images"):
        read_split_file(f)


# ------------------------------------------------------------------------------------------------
# VTAB planning


def test_vtab_plan_rows_splits_and_protocols(tmp_path):
    listing = make_vtab_tree(tmp_path, {"dtd": 3}, n_train=6, n_val=3, n_test=4)
    (plan,) = plan_vtab(tmp_path, ["dtd"], num_workers=2)
    assert plan.dataset == "vtab" and plan.task == "dtd" and plan.root == str(tmp_path)
    assert plan.protocols == {"dev": ("train800", "val200"), "final": ("train800val200", "test")}
    assert plan.splits == {"train800": 6, "val200": 3, "train800val200": 9, "test": 4}
    assert len(plan.samples) == 6 + 3 + 4  # the 9 copies hold no rows of their own
    assert plan.classes == tuple(str(k) for k in range(47))  # dtd has 47 classes, floor kept
    expected = [("train800", r, l) for r, l in listing["dtd"]["train800"]]
    expected += [("val200", r, l) for r, l in listing["dtd"]["val200"]]
    expected += [("test", r, l) for r, l in listing["dtd"]["test"]]
    for s, (split, rel, label) in zip(plan.samples, expected):
        assert s.sample_id == f"dtd/{rel}"
        assert s.label == label
        assert s.source == os.path.join(str(tmp_path), "dtd", rel)
        assert split in s.splits
    # train800val200 = train800 followed by val200, with the copies as aliases in order
    tv = plan.split_rows("train800val200")
    assert tv == plan.split_rows("train800") + plan.split_rows("val200") == tuple(range(9))
    aliases = [a for i in tv for a in plan.samples[i].aliases]
    assert aliases == [f"dtd/{rel}" for rel, _ in listing["dtd"]["train800val200"]]
    assert plan.split_rows("test") == (9, 10, 11, 12)
    with pytest.raises(DatasetError, match="no split 'train'"):
        plan.split_rows("train")


@pytest.mark.parametrize("copies", ["resave", "bytes"])
def test_vtab_dedup_by_pixels_and_by_bytes(tmp_path, copies):
    make_vtab_tree(tmp_path, ["eurosat"], n_train=5, n_val=3, copies=copies)
    if copies == "resave":  # the copies really are different files with the same pixels
        a = tmp_path / "eurosat/images/train800/000000.png"
        b = tmp_path / "eurosat/images/train800val200/000000.png"
        assert a.read_bytes() != b.read_bytes()
    (plan,) = plan_vtab(tmp_path, num_workers=3)
    assert sum(len(s.aliases) for s in plan.samples) == 8
    assert len(plan.samples) == 5 + 3 + 4


def test_vtab_unmatched_copy_gets_own_row_before_test(tmp_path):
    make_vtab_tree(tmp_path, {"kitti": 4}, n_train=4, n_val=2, n_test=3, n_unmatched=2)
    (plan,) = plan_vtab(tmp_path)
    ids = [s.sample_id for s in plan.samples]
    assert ids[6:8] == ["kitti/images/train800val200/000004.png", "kitti/images/train800val200/000005.png"]
    assert all(plan.samples[i].splits == ("train800val200",) for i in (6, 7))
    assert ids[8].startswith("kitti/images/test/")
    assert plan.split_rows("train800val200") == (0, 1, 2, 3, 6, 7)
    assert plan.splits["train800val200"] == 6
    # rows 4, 5 (val200) lost their copies, so they are val200 only
    assert plan.samples[4].splits == ("val200",) and plan.samples[5].splits == ("val200",)


def test_vtab_dedup_off_keeps_every_copy(tmp_path):
    make_vtab_tree(tmp_path, ["dtd"], n_train=4, n_val=2, n_test=2)
    (plan,) = plan_vtab(tmp_path, dedup=False)
    assert len(plan.samples) == 4 + 2 + 6 + 2
    assert all(not s.aliases for s in plan.samples)
    assert plan.splits["train800val200"] == 6


def test_vtab_dedup_requires_same_label(tmp_path):
    make_vtab_tree(tmp_path, {"dtd": 3}, n_train=3, n_val=1, n_test=1)
    f = tmp_path / "dtd/train800val200.txt"
    lines = f.read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 2"  # same pixels as train800/000001 (label 1)
    f.write_text("\n".join(lines) + "\n")
    (plan,) = plan_vtab(tmp_path)
    row1 = plan.samples[1]
    assert row1.splits == ("train800",) and row1.aliases == ()
    own = [s for s in plan.samples if s.sample_id == "dtd/images/train800val200/000001.png"]
    assert len(own) == 1 and own[0].label == 2


def test_vtab_identical_images_pair_one_to_one(tmp_path):
    make_vtab_tree(tmp_path, {"dsprites_loc": 3}, n_train=6, n_val=2, n_test=1)
    t = tmp_path / "dsprites_loc/images"
    # train800 rows 0 and 3 (both label 0) become the same picture, and so do their copies
    shutil.copyfile(t / "train800/000000.png", t / "train800/000003.png")
    shutil.copyfile(t / "train800val200/000000.png", t / "train800val200/000003.png")
    (plan,) = plan_vtab(tmp_path)
    assert len(plan.samples[0].aliases) == 1 and len(plan.samples[3].aliases) == 1
    assert len(plan.samples) == 6 + 2 + 1


def test_vtab_undecodable_image_is_unmatched_and_reported_later(tmp_path):
    make_vtab_tree(tmp_path, ["dtd"], n_train=3, n_val=2, n_test=1, corrupt=[("val200", 1)])
    (plan,) = plan_vtab(tmp_path)
    bad_row = [s.sample_id for s in plan.samples].index("dtd/images/val200/000001.png")
    assert plan.samples[bad_row].splits == ("val200",)
    copy = [s for s in plan.samples if s.sample_id == "dtd/images/train800val200/000004.png"]
    assert copy and copy[0].splits == ("train800val200",)  # the healthy copy is a row of its own
    ds = PlanImages(plan, image_size=8, mean=MEAN, std=STD)
    x, row, err = ds[bad_row]
    assert row == bad_row and x.shape == (3, 8, 8) and torch.count_nonzero(x) == 0
    assert err.startswith(f"cannot decode {plan.samples[bad_row].source}: ")
    x, row, err = ds[0]
    assert err is None and torch.count_nonzero(x) > 0


def test_vtab_same_path_in_two_splits_is_one_row(tmp_path):
    make_vtab_tree(tmp_path, ["dtd"], n_train=3, n_val=1, n_test=1)
    task = tmp_path / "dtd"
    (task / "train800val200.txt").write_text(
        (task / "train800.txt").read_text() + (task / "val200.txt").read_text()
    )
    (plan,) = plan_vtab(tmp_path)
    assert len(plan.samples) == 5 and plan.splits["train800val200"] == 4
    assert all(not s.aliases for s in plan.samples)
    # a line repeated inside one split file is an error naming both lines
    (task / "test.txt").write_text("images/test/000000.png 0\nimages/test/000000.png 0\n")
    with pytest.raises(DatasetError, match=r"test\.txt:2: .* already listed on line 1"):
        plan_vtab(tmp_path)


def test_vtab_crlf_tree_plans_like_lf_tree(tmp_path):
    make_vtab_tree(tmp_path / "a", ["dtd"], n_train=3, n_val=2, n_test=2)
    make_vtab_tree(tmp_path / "b", ["dtd"], n_train=3, n_val=2, n_test=2, crlf=True)
    assert b"\r\n" in (tmp_path / "b/dtd/test.txt").read_bytes()
    (pa,) = plan_vtab(tmp_path / "a")
    (pb,) = plan_vtab(tmp_path / "b")
    assert [(s.sample_id, s.label, s.splits, s.aliases) for s in pa.samples] == [
        (s.sample_id, s.label, s.splits, s.aliases) for s in pb.samples
    ]


def test_vtab_missing_image_names_file_line_and_path(tmp_path):
    make_vtab_tree(tmp_path, ["dtd"], n_train=3, n_val=1, n_test=4)
    (tmp_path / "dtd/images/test/000002.png").unlink()
    (tmp_path / "dtd/images/test/000003.png").unlink()
    with pytest.raises(DatasetError, match=r"test\.txt:3: image images/test/000002\.png not found .*1 more"):
        plan_vtab(tmp_path)


def test_vtab_plan_is_deterministic(tmp_path):
    make_vtab_tree(tmp_path, {"svhn": 4, "clevr_count": 3}, n_train=5, n_val=3, n_unmatched=1)
    a = plan_vtab(tmp_path, num_workers=1)
    b = plan_vtab(tmp_path, num_workers=4)
    assert a == b
    assert [p.fingerprint() for p in a] == [p.fingerprint() for p in b]
    assert [p.task for p in a] == ["clevr_count", "svhn"]  # sorted discovery


def test_vtab_task_discovery_and_errors(tmp_path):
    make_vtab_tree(tmp_path, ["dtd", "my_new_task"], n_train=3, n_val=1, n_test=1)
    (tmp_path / "notes").mkdir()  # a folder without split files is not a task
    plans = plan_vtab(tmp_path)
    assert [p.task for p in plans] == ["dtd", "my_new_task"]
    assert vtab_group("dtd") == "natural" and vtab_group("my_new_task") == "other"
    assert plans[1].classes == ("0", "1", "2")  # unknown task: classes from labels seen
    assert [p.task for p in plan_vtab(tmp_path, ["my_new_task"])] == ["my_new_task"]
    with pytest.raises(DatasetError, match=r"no VTAB task folder 'cifar'.*tasks there: dtd, my_new_task") as e:
        plan_vtab(tmp_path, ["dtd", "cifar"])
    assert str(tmp_path) in str(e.value)
    (tmp_path / "dtd/val200.txt").unlink()
    with pytest.raises(DatasetError, match=r"dtd: VTAB task folder lacks val200\.txt"):
        plan_vtab(tmp_path)


def test_vtab_root_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        plan_vtab(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no VTAB task folders"):
        plan_vtab(tmp_path)
    make_vtab_tree(tmp_path, ["dtd"], n_train=2, n_val=1, n_test=1)
    with pytest.raises(DatasetError, match="looks like a task folder"):
        plan_vtab(tmp_path / "dtd")


def test_vtab_tasks_table():
    groups = {}
    for task, group in VTAB_TASKS.items():
        groups.setdefault(group, []).append(task)
    assert {g: len(t) for g, t in groups.items()} == {"natural": 7, "specialised": 4, "structured": 8}


# ------------------------------------------------------------------------------------------------
# Digits


def test_digits_split_sizes_and_determinism():
    from sklearn.datasets import load_digits

    (plan,) = plan_digits()
    assert plan.task == "digits" and plan.root is None and len(plan.samples) == 1797
    assert plan.splits == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
    tr, va, te = (set(plan.split_rows(s)) for s in ("train800", "val200", "test"))
    assert not (tr & va or tr & te or va & te)
    assert set(plan.split_rows("train800val200")) == tr | va
    assert plan.protocols["final"] == ("train800val200", "test")
    ids = [s.sample_id for s in plan.samples]
    assert len(set(ids)) == 1797 and ids[0].startswith("digits/")
    labels_tr = np.array([plan.samples[i].label for i in sorted(tr)])
    assert np.bincount(labels_tr, minlength=10).min() >= 50  # a fair spread of classes
    assert plan_digits()[0] == plan
    # pixels: grey 0..16 scaled to 0..255, labels as sklearn's
    d = load_digits()
    k = int(plan.samples[5].source)
    img = plan.load_image(5)
    assert img.mode == "L" and img.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(img), np.rint(d.images[k] * 255 / 16).astype(np.uint8))
    assert plan.samples[5].label == d.target[k]
    assert np.asarray(img).max() == 255


# ------------------------------------------------------------------------------------------------
# Image folder


def test_folder_without_split_dirs(tmp_path):
    make_image_folder(tmp_path, ("dog", "cat", "fox"), n_per_class=10)
    (tmp_path / "cat/readme.txt").write_text("not an image")
    (tmp_path / "cat/.hidden.png").write_bytes(b"")
    (plan,) = plan_folder(tmp_path)
    assert plan.dataset == "folder" and plan.task == "default"
    assert plan.classes == ("cat", "dog", "fox")
    assert plan.splits == {"train": 21, "val": 3, "trainval": 24, "test": 6}
    assert plan.protocols == {"dev": ("train", "val"), "final": ("trainval", "test")}
    for split, per_class in (("train", 7), ("val", 1), ("test", 2)):
        labels = [plan.samples[i].label for i in plan.split_rows(split)]
        assert np.bincount(labels).tolist() == [per_class] * 3
    assert set(plan.split_rows("trainval")) == set(plan.split_rows("train")) | set(plan.split_rows("val"))
    # rows: train, then val, then test; within a split sorted by path
    order = [plan.samples[i].splits[0] for i in range(len(plan.samples))]
    assert order == ["train"] * 21 + ["val"] * 3 + ["test"] * 6
    train_ids = [plan.samples[i].sample_id for i in plan.split_rows("train")]
    assert train_ids == sorted(train_ids) and train_ids[0].startswith("cat/")
    assert all(plan.samples[i].label == 1 for i in range(len(plan.samples)) if plan.samples[i].sample_id.startswith("dog/"))
    assert plan_folder(tmp_path) == [plan]


def test_folder_with_split_dirs(tmp_path):
    make_image_folder(tmp_path, ("a", "b"), with_splits=True, split_counts={"train": 4, "val": 2, "test": 3})
    (plan,) = plan_folder(tmp_path)
    assert plan.classes == ("a", "b")
    assert plan.splits == {"train": 8, "val": 4, "trainval": 12, "test": 6}
    assert plan.samples[0].sample_id == "train/a/000.png" and plan.samples[0].splits == ("train", "trainval")
    assert plan.samples[8].sample_id == "val/a/000.png"
    assert plan.samples[-1].sample_id == "test/b/002.png" and plan.samples[-1].label == 1


def test_folder_split_dirs_without_val_carves_it_from_train(tmp_path):
    make_image_folder(tmp_path, ("a", "b"), with_splits=True, split_counts={"train": 8, "test": 2})
    (plan,) = plan_folder(tmp_path)
    assert plan.splits == {"train": 14, "val": 2, "trainval": 16, "test": 4}
    assert all(plan.samples[i].sample_id.startswith("train/") for i in plan.split_rows("val"))


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        plan_folder(tmp_path)
    signal_image(0, num_classes=2).save(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="each class needs its own sub-folder"):
        plan_folder(tmp_path)
    make_image_folder(tmp_path / "s", ("a",), with_splits=True, split_counts={"train": 2})
    with pytest.raises(DatasetError, match="no test/ folder"):
        plan_folder(tmp_path / "s")


def test_folder_extensions_case_insensitive(tmp_path):
    for k, ext in enumerate(["JPG", "jpeg", "Png", "bmp", "gif", "TIFF", "webp", "tif"]):
        img = signal_image(0, num_classes=1, size=12, seed=k)
        fmt = {"JPG": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}.get(ext, ext.upper())
        (tmp_path / "c").mkdir(exist_ok=True)
        img.save(tmp_path / "c" / f"{k}.{ext}", format=fmt)
    (plan,) = plan_folder(tmp_path)
    assert len(plan.samples) == 8
    ds = PlanImages(plan, image_size=12, mean=MEAN, std=STD)
    assert all(ds[i][2] is None for i in range(len(ds)))


# ------------------------------------------------------------------------------------------------
# Parquet


def test_parquet_hf_struct(tmp_path):
    f = tmp_path / "train.parquet"
    rows = make_parquet(f, n=20, num_classes=4, class_names=["w", "x", "y", "z"], row_group_size=3)
    (plan,) = plan_parquet(f)
    assert plan.dataset == "parquet" and plan.classes == ("w", "x", "y", "z")
    # only a "train" split: stratified 70/10/20 cut, 5 per class -> 3/1/1 (at least one each)
    assert plan.splits == {"train": 12, "val": 4, "trainval": 16, "test": 4}
    for split in ("train", "val", "test"):
        assert sorted({plan.samples[i].label for i in plan.split_rows(split)}) == [0, 1, 2, 3]
    by_id = {s.sample_id: (k, s) for k, s in enumerate(plan.samples)}
    assert set(by_id) == {f"img_{i:04d}.png" for i in range(20)}
    k, s = by_id["img_0013.png"]
    assert s.label == rows[13][0] == 1 and s.source == 13
    # the reader crosses row groups and decodes the right bytes
    np.testing.assert_array_equal(
        np.asarray(plan.load_image(k)), np.asarray(signal_image(1, num_classes=4, seed=_pq_seed(13)))
    )
    assert plan.describe(k) == f"{f}#13"


def _pq_seed(i, name="train.parquet"):
    import zlib

    return zlib.crc32(f"pq/{name}/{i}".encode())


def test_parquet_plain_bytes_with_split_column(tmp_path):
    f = tmp_path / "data.parquet"
    make_parquet(f, n=12, layout="bytes", image_column="png", label_column="target", splits=["train", "validation", "test"])
    (plan,) = plan_parquet(f)
    assert plan.splits == {"train": 4, "val": 4, "trainval": 8, "test": 4}
    assert plan.samples[0].sample_id == "data.parquet#0" and plan.samples[4].sample_id == "data.parquet#1"
    assert plan.classes == ("0", "1", "2")
    x, row, err = PlanImages(plan, image_size=10, mean=MEAN, std=STD)[3]
    assert err is None and x.shape == (3, 10, 10)


def test_parquet_vtab_split_names_and_shard_dir(tmp_path):
    make_parquet(tmp_path / "d/train-00000-of-00002.parquet", n=6, with_paths=False)
    make_parquet(tmp_path / "d/train-00001-of-00002.parquet", n=4, with_paths=False)
    make_parquet(tmp_path / "d/test-00000-of-00001.parquet", n=3, with_paths=False)
    (plan,) = plan_parquet(tmp_path / "d")
    assert plan.splits["test"] == 3 and plan.splits["trainval"] == 10
    assert {s.sample_id for s in plan.samples if "test" in s.splits} == {f"test-00000-of-00001.parquet#{i}" for i in range(3)}
    assert plan.load_image(len(plan.samples) - 1).size == (20, 20)
    g = tmp_path / "v.parquet"
    make_parquet(g, n=8, splits=["train800", "val200", "train800val200", "test"])
    (vplan,) = plan_parquet(g)
    assert vplan.protocols["dev"] == ("train800", "val200")
    assert [s.splits[0] for s in vplan.samples] == ["train800"] * 2 + ["val200"] * 2 + ["train800val200"] * 2 + ["test"] * 2


def test_parquet_missing_columns_name_file_and_columns(tmp_path):
    f = tmp_path / "x.parquet"
    make_parquet(f, n=3, label_column="cls")
    with pytest.raises(DatasetError, match=r"x\.parquet: no label column .*Columns: image \(struct.*cls \(int64\)"):
        plan_parquet(f)
    (plan,) = plan_parquet(f, label_column="cls")
    assert len(plan.samples) == 3
    with pytest.raises(DatasetError, match=r"x\.parquet: no image column 'pixels'; columns: image"):
        plan_parquet(f, image_column="pixels", label_column="cls")
    with pytest.raises(DatasetError, match="not image bytes"):
        plan_parquet(f, image_column="cls", label_column="cls")
    make_parquet(tmp_path / "s.parquet", n=3, splits=["train", "holdout"])
    with pytest.raises(DatasetError, match="unrecognised split names"):
        plan_parquet(tmp_path / "s.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match=r"empty_dir: no \*\.parquet files"):
        plan_parquet(tmp_path / "empty_dir")


# ------------------------------------------------------------------------------------------------
# Dispatch


def test_plan_dataset_dispatch_and_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown kind 'imagenet'; choose one of vtab, folder, parquet, digits"):
        plan_dataset("imagenet")
    assert DATASET_KINDS == ("vtab", "folder", "parquet", "digits")
    with pytest.raises(DatasetError, match="option root"):
        plan_dataset("vtab")
    with pytest.raises(DatasetError, match="option root"):
        plan_dataset("folder")
    with pytest.raises(DatasetError, match="option tasks"):
        plan_dataset("digits", tasks=["dtd"])
    assert plan_dataset("digits")[0].task == "digits"
    make_image_folder(tmp_path / "f", ("a", "b"), n_per_class=3)
    assert plan_dataset("folder", root=tmp_path / "f")[0].dataset == "folder"
    make_vtab_tree(tmp_path / "v", ["dtd"], n_train=2, n_val=1, n_test=1)
    assert plan_dataset("vtab", root=tmp_path / "v", tasks=["dtd"], num_workers=2)[0].task == "dtd"


# ------------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("mode", ODD_MODES)
def test_every_mode_becomes_normalised_rgb(mode):
    img = odd_mode_image(mode, size=8)
    x = preprocess(img, image_size=8, mean=MEAN, std=STD)
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and x.is_contiguous()
    dark, bright = {
        "1": ((0, 0, 0), (255, 255, 255)),
        "P": ((10, 20, 30), (250, 128, 5)),
        "P+transparency": ((10, 20, 30), (250, 128, 5)),
        "PA": ((10, 20, 30), (250, 128, 5)),
        "I;16": ((40,) * 3, (255,) * 3),
        "I": ((40,) * 3, (255,) * 3),
        "F": ((40,) * 3, (255,) * 3),
    }.get(mode, ((40,) * 3, (200,) * 3))
    for c in range(3):
        assert x[c, 3, 0].item() == pytest.approx(_norm(dark[c], c), abs=1e-5)
        assert x[c, 3, 7].item() == pytest.approx(_norm(bright[c], c), abs=1e-5)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_files_scale_not_clip(tmp_path, suffix):
    arr = np.array([[0, 257 * 100, 4095, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "c" / f"deep.{suffix}"
    path.parent.mkdir()
    Image.fromarray(arr).save(path)
    (plan,) = plan_folder(tmp_path)
    img = plan.load_image(0)
    assert img.mode in ("I;16", "I")
    rgb = np.asarray(load_rgb(plan, 0))
    assert rgb[0, :, 0].tolist() == [0, 100, 16, 255]  # 4095 (12-bit white) is dark grey, not 255
    assert (rgb == rgb[..., :1]).all()


def test_float_and_wide_int_images_stretch():
    f = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255, 0]
    i = Image.fromarray(np.array([[-50, 0, 205, 100]], dtype=np.int32))  # not 16-bit: min-max
    assert np.asarray(to_rgb(i))[0, :, 0].tolist() == [0, 50, 255, 150]
    g = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))  # 0..255 floats as is
    assert np.asarray(to_rgb(g))[0, :, 0].tolist() == [0, 100, 255]


def test_preprocess_matches_torchvision_bilinear_resize():
    import torchvision.transforms as T

    img = signal_image(2, num_classes=4, size=37, seed=3)
    ours = preprocess(img, image_size=16, mean=MEAN, std=STD)
    ref = T.Compose([T.Resize((16, 16), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(), T.Normalize(MEAN, STD)])(img)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    up = preprocess(img, image_size=50, mean=MEAN, std=STD)
    assert up.shape == (3, 50, 50)
    with pytest.raises(ValueError, match="3 values"):
        preprocess(img, image_size=8, mean=(0.5, 0.5), std=STD)
    with pytest.raises(ValueError, match="image_size"):
        preprocess(img, image_size=0, mean=MEAN, std=STD)


def test_plan_images_in_dataloader_workers_reports_bad_rows(tmp_path):
    make_parquet(tmp_path / "p.parquet", n=9, row_group_size=2)
    (pplan,) = plan_parquet(tmp_path / "p.parquet")
    make_image_folder(tmp_path / "f", ("a", "b"), n_per_class=4)
    (fplan,) = plan_folder(tmp_path / "f")
    bad = fplan.samples[2].source
    write_corrupt(bad)
    for plan, bad_rows in ((pplan, set()), (fplan, {2})):
        ds = PlanImages(plan, image_size=12, mean=MEAN, std=STD, rows=range(1, len(plan.samples)))
        dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_plan_images)
        seen = []
        for x, rows, errs in dl:
            assert x.shape[1:] == (3, 12, 12) and rows.dtype == torch.int64
            for r, e in zip(rows.tolist(), errs):
                seen.append(r)
                if r in bad_rows:
                    assert e.startswith(f"cannot decode {bad}: ") and torch.count_nonzero(x[rows.tolist().index(r)]) == 0
                else:
                    assert e is None
        assert seen == list(range(1, len(plan.samples)))
    with pytest.raises(ImageDecodeError, match=f"cannot decode {bad}"):
        load_rgb(fplan, 2)
    with pytest.raises(ValueError, match="rows must lie"):
        PlanImages(fplan, image_size=8, mean=MEAN, std=STD, rows=range(0, 99))


def test_plan_images_signal_survives_preprocessing(tmp_path):
    """The fake images' label square is still visible after resize: other tests rely on it."""
    make_image_folder(tmp_path, ("a", "b", "c", "d"), n_per_class=2, image_size=24)
    (plan,) = plan_folder(tmp_path)
    ds = PlanImages(plan, image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    for i in range(len(ds)):
        x, _, _ = ds[i]
        grid = x[0].reshape(2, 8, 2, 8).mean(dim=(1, 3))  # brightness of the 2x2 label cells
        assert int(grid.flatten().argmax()) == plan.samples[i].label


def test_plans_pickle_for_spawned_workers_and_have_unique_ids(tmp_path):
    make_parquet(tmp_path / "p.parquet", n=7, row_group_size=3)
    make_vtab_tree(tmp_path / "v", ["dtd"], n_train=3, n_val=2, n_test=2, n_unmatched=1)
    make_image_folder(tmp_path / "f", ("a", "b"), n_per_class=4)
    plans = plan_parquet(tmp_path / "p.parquet") + plan_vtab(tmp_path / "v") + plan_folder(tmp_path / "f")
    plans += plan_digits()
    for plan in plans:
        ids = [s.sample_id for s in plan.samples] + [a for s in plan.samples for a in s.aliases]
        assert len(ids) == len(set(ids)), plan.dataset
        assert sum(plan.splits.values()) == sum(len(s.splits) for s in plan.samples)
        plan.load_image(len(plan.samples) - 1)  # fills the parquet reader's row-group cache
        clone = pickle.loads(pickle.dumps(plan))
        assert clone == plan
        last = len(plan.samples) - 1
        np.testing.assert_array_equal(np.asarray(clone.load_image(last)), np.asarray(plan.load_image(last)))


def test_datasets_package_keeps_every_public_name():
    import importlib

    import extract.datasets as datasets

    for name in datasets.__all__:
        assert hasattr(datasets, name), name
    for kind in ("vtab", "folder", "parquet", "digits", "common"):
        importlib.import_module(f"extract.datasets.{kind}")
    assert datasets.plan_parquet.__module__ == "extract.datasets.parquet"
    assert datasets.TaskPlan.__module__ == "extract.datasets.common"


def test_parquet_split_column_option(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    make_parquet(f, n=12, layout="bytes", image_column="pixels", label_column="cls")
    table = pq.read_table(f)
    table = table.append_column("part", pa.array(["train", "train", "dev", "test"] * 3))
    pq.write_table(table, f)
    (plan,) = plan_parquet(f, image_column="pixels", label_column="cls", split_column="part")
    assert plan.splits == {"train": 6, "val": 3, "trainval": 9, "test": 3}
    with pytest.raises(DatasetError, match="no split column 'parts'"):
        plan_parquet(f, image_column="pixels", label_column="cls", split_column="parts")
    with pytest.raises(DatasetError, match="--label-column"):
        plan_parquet(f, image_column="pixels")
