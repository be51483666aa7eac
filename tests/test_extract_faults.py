"""`combo extract` when things go wrong: deleted shards, file-system faults, bad options, odd input.

Tiny random-init `vit_tiny_patch16_224` at 32 px on a generated image folder (3 classes x 4 images,
4 rows per shard: 3 shards), so each test takes a few seconds.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import extract.forward as forward
import extract.pipeline as pipeline
from combo.cli import app
from extract.config import default_num_workers
from extract.pipeline import ExtractConfig, extract
from fakedata import make_image_folder, make_vtab_tree, signal_image, write_corrupt
from store_schema import open_store, validate_store
from store_schema.writer import JOURNAL_NAME, TaskWriter, shard_key

MODEL = "vit_tiny_patch16_224"
SIZE = 32
runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", MODEL, "--random-init", "--dataset", "folder", "--root", str(root), "--out", str(out),
            "--image-size", str(SIZE), "--batch-size", "4", "--num-workers", "0", "--rows-per-shard", "4", *extra]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    make_image_folder(root, ("cat", "dog", "fox"), n_per_class=4, image_size=16)
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the backbone is built or the dataset planned: checks must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before a cheap check")
    monkeypatch.setattr(pipeline, "load_backbone", forbidden)
    monkeypatch.setattr(pipeline, "plan_dataset", forbidden)


def deny_writes(monkeypatch, folder: Path) -> None:
    """Make `folder` unwritable: chmod when not root; as root (who may write anywhere) os.access says no for it."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).absolute() == folder.absolute() and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def full_disk_after(monkeypatch, shards: int) -> None:
    """The shard writer hits ENOSPC after `shards` shards."""
    real = TaskWriter.write_block
    calls = [0]

    def write_block(self, block, *args, **kwargs):
        calls[0] += 1
        if calls[0] > shards:
            path = self.store.path / shard_key(self.name, "tokens", block)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, block, *args, **kwargs)

    monkeypatch.setattr(TaskWriter, "write_block", write_block)


# ------------------------------------------------------------------------------------------ repair


def test_deleted_shard_is_repaired_and_values_equal_the_original(images, tmp_path):
    out = tmp_path / "s"
    assert run_cli(*folder_args(images, out)).exit_code == 0
    store = out / MODEL / "folder.zarr"
    original = open_store(store).task("default").read(slice(None))
    original_prefix = open_store(store).task("default").read(slice(None), prefix=True)
    intact = store / shard_key("default", "tokens", 0)
    before = intact.stat().st_mtime_ns
    (store / shard_key("default", "tokens", 1)).unlink()
    (store / shard_key("default", "prefix", 2)).write_bytes(b"cut short")  # resized
    result = run_cli(*folder_args(images, out))
    assert result.exit_code == 0, result.output
    assert "repaired" in result.output and "already complete" not in result.output
    assert "default/prefix/c/2/0/0/0" in result.output  # names what was repaired
    assert "8 images in" in result.output and intact.stat().st_mtime_ns == before  # only the damaged blocks ran
    assert validate_store(store).ok
    assert run_cli("store", "validate", str(store)).exit_code == 0
    task = open_store(store).task("default")
    np.testing.assert_array_equal(task.read(slice(None)), original)
    np.testing.assert_array_equal(task.read(slice(None), prefix=True), original_prefix)
    assert "already complete" in run_cli(*folder_args(images, out)).output  # repaired for good


def test_deleted_sample_table_re_extracts_the_whole_task(images, tmp_path):
    out = tmp_path / "s"
    assert run_cli(*folder_args(images, out)).exit_code == 0
    store = out / MODEL / "folder.zarr"
    original = open_store(store).task("default").read(slice(None))
    (store / "default" / "samples.parquet").unlink()
    result = run_cli(*folder_args(images, out))
    assert result.exit_code == 0, result.output
    assert "repaired" in result.output and "whole task" in result.output
    assert validate_store(store).ok
    np.testing.assert_array_equal(open_store(store).task("default").read(slice(None)), original)


# ------------------------------------------------------------------------------------------ file-system faults


def test_disk_full_is_one_sentence_and_a_rerun_resumes(images, tmp_path, monkeypatch):
    out = tmp_path / "s"
    store = out / MODEL / "folder.zarr"
    full_disk_after(monkeypatch, 1)
    result = runner.invoke(app, folder_args(images, out))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = error_lines(result.output)
    assert "no space left on the device" in line and str(store / "default" / "tokens") in line
    assert "1 shard of task default" in line and "rerun the same command to resume" in line
    assert len((store / "default" / JOURNAL_NAME).read_text().splitlines()) == 1  # the finished shard is kept
    monkeypatch.undo()
    again = run_cli(*folder_args(images, out))
    assert again.exit_code == 0, again.output
    assert "resumed" in again.output
    assert validate_store(store).ok


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, monkeypatch, images, no_model):
    out = tmp_path / "ro"
    out.mkdir()
    deny_writes(monkeypatch, out)
    result = runner.invoke(app, folder_args(images, out))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert line == f"error: {out}: permission denied"
    assert list(out.iterdir()) == []


def test_store_made_unwritable_keeps_its_shards_and_resumes(images, tmp_path, monkeypatch):
    out = tmp_path / "s"
    store = out / MODEL / "folder.zarr"
    full_disk_after(monkeypatch, 1)
    assert runner.invoke(app, folder_args(images, out)).exit_code == 2
    monkeypatch.undo()
    deny_writes(monkeypatch, store)
    result = runner.invoke(app, folder_args(images, out))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert str(store) in line and "permission denied" in line
    if os.geteuid() != 0:
        store.chmod(0o755)
    monkeypatch.undo()
    assert len((store / "default" / JOURNAL_NAME).read_text().splitlines()) == 1
    again = run_cli(*folder_args(images, out))
    assert again.exit_code == 0 and "resumed" in again.output, again.output
    assert validate_store(store).ok


def test_out_that_is_a_file_is_one_sentence(tmp_path, images, no_model):
    out = tmp_path / "notes.txt"
    out.write_text("not a folder")
    result = runner.invoke(app, folder_args(images, out))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert str(out) in line and "is a file, not a folder" in line
    assert out.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------ cheap checks first


CHEAP_CHECKS = [
    (("--root", "{tmp}/missing"), "does not exist"),
    (("--root", "{tmp}/file.txt"), "is not a folder"),
    (("--batch-size", "0"), "--batch-size"),
    (("--num-workers", "-1"), "--num-workers"),
    (("--image-size", "8"), "smaller than the patch size 16"),
    (("--image-size", "40"), "use 32 or 48"),
    (("--rows-per-shard", "0"), "--rows-per-shard"),
    (("--dtype", "bfloat16"), "bfloat16"),
    (("--seed", "-1"), "--seed"),
    (("--label-column", "cls"), "only --dataset parquet"),
]


def test_cheap_arguments_are_checked_before_the_model_or_the_dataset(tmp_path, images, no_model):
    (tmp_path / "file.txt").write_text("x")
    for (option, value), expected in CHEAP_CHECKS:
        args = folder_args(images, tmp_path / "s")
        value = value.format(tmp=tmp_path)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (option, value, result.output)
        assert expected in result.output, (option, value, result.output)
        assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kwargs, expected", [
    (dict(batch_size=0), "--batch-size must be an integer >= 1"),
    (dict(num_workers=-2), "--num-workers must be an integer >= 0"),
    (dict(image_size=36), "use 32 or 48"),
    (dict(image_size=36, model_kwargs={"patch_size": 8}), "use 32 or 40"),
])
def test_api_checks_come_before_the_model(tmp_path, images, no_model, kwargs, expected):
    cfg = ExtractConfig(model=MODEL, dataset="folder", root=str(images), out=str(tmp_path / "s"), random_init=True,
                        **{"image_size": SIZE, "num_workers": 0, **kwargs})
    with pytest.raises(ValueError, match=expected):
        extract(cfg)


def test_patch_size_is_checked_after_building_when_the_name_does_not_say(tmp_path, images, monkeypatch):
    monkeypatch.setattr(pipeline, "known_patch_size", lambda spec, kwargs=None: None)
    monkeypatch.setattr(pipeline, "plan_dataset", lambda *a, **k: pytest.fail("planned before the patch check"))
    result = runner.invoke(app, folder_args(images, tmp_path / "s", "--image-size", "24"))
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "not a multiple of the patch size 16" in line and "use 16 or 32" in line
    assert not (tmp_path / "s").exists()


def test_failure_before_the_first_shard_leaves_no_store(tmp_path):
    root = tmp_path / "vtab"
    make_vtab_tree(root, {"dtd": 3, "eurosat": 3}, n_train=4, n_val=2, n_test=4, image_size=16)
    write_corrupt(root / "eurosat" / "images" / "test" / "000001.png")
    out = tmp_path / "s"
    base = ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(root), "--out", str(out),
            "--image-size", str(SIZE), "--num-workers", "0"]
    failed = runner.invoke(app, [*base, "--task", "eurosat"])
    assert failed.exit_code == 2 and "000001.png" in failed.output
    assert not out.exists()  # the store, and the folders made for it, are gone: no incomplete store behind
    assert run_cli(*base, "--task", "dtd").exit_code == 0
    store = out / MODEL / "vtab.zarr"
    failed = runner.invoke(app, [*base, "--task", "eurosat"])
    assert failed.exit_code == 2
    assert open_store(store).tasks == ["dtd"] and not (store / "eurosat").exists()  # an earlier run's task stays
    assert validate_store(store).ok


def test_interrupt_says_what_is_kept_and_a_rerun_resumes(images, tmp_path, monkeypatch):
    real = forward.block_tokens
    calls = [0]

    def block_tokens(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(forward, "block_tokens", block_tokens)
    out = tmp_path / "s"
    store = out / MODEL / "folder.zarr"
    result = runner.invoke(app, folder_args(images, out))
    assert result.exit_code == 130, result.output
    assert (f"interrupted: 1 shard of task default written to {store} is kept; rerun the same command to resume"
            in result.output)
    monkeypatch.undo()
    again = run_cli(*folder_args(images, out))
    assert again.exit_code == 0 and "resumed" in again.output
    assert validate_store(store).ok


# ------------------------------------------------------------------------------------------ input


def test_parquet_columns_with_other_names(tmp_path):
    rows = 12
    blobs = []
    for i in range(rows):
        buf = io.BytesIO()
        signal_image(i % 2, num_classes=2, size=16, seed=i).save(buf, "PNG")
        blobs.append(buf.getvalue())
    parts = ["train", "train", "validation", "test"]
    table = pa.table({"pixels": pa.array(blobs, type=pa.binary()), "cls": pa.array([i % 2 for i in range(rows)]),
                      "part": pa.array([parts[i % 4] for i in range(rows)])})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    args = ["extract", "--model", MODEL, "--random-init", "--dataset", "parquet", "--root", str(path),
            "--out", str(tmp_path / "s"), "--image-size", str(SIZE), "--num-workers", "0"]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2 and "--label-column" in missing.output
    result = runner.invoke(app, [*args, "--image-column", "pixels", "--label-column", "cls", "--split-column", "part"])
    assert result.exit_code == 0, result.output
    task = open_store(tmp_path / "s" / MODEL / "parquet.zarr").task("default")
    assert task.attrs["splits"] == {"train": 6, "val": 3, "trainval": 9, "test": 3}
    assert sorted(task.samples.column("label").to_pylist()) == sorted(i % 2 for i in range(rows))


def test_single_class_task_warns(tmp_path):
    root = tmp_path / "one"
    make_image_folder(root, ("only",), n_per_class=6, image_size=16)
    result = run_cli(*folder_args(root, tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "warning: task default has a single class (only, 6 images)" in result.output


def test_default_dataset_is_vtab(tmp_path, no_model):
    result = runner.invoke(app, ["extract", "--model", MODEL, "--random-init", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "--dataset vtab needs --root" in line and "--dataset digits" in line


def test_default_num_workers_leaves_a_cpu_to_the_model(monkeypatch):
    for cpus, workers in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert default_num_workers() == workers
    assert ExtractConfig(model=MODEL, dataset="digits").num_workers == default_num_workers()
    help_text = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "200"}).output
    assert "one fewer than the CPUs" in help_text
    for option in ("--batch-size", "--image-size"):
        assert option in help_text
    assert "x>=1" in help_text and "x>=0" in help_text


def test_bracketed_names_are_printed_verbatim(tmp_path):
    root = tmp_path / "[brk]"
    make_image_folder(root, ("[red]", "blue"), n_per_class=4, image_size=16)
    write_corrupt(root / "[red]" / "photo[final].png")
    out = tmp_path / "[out]"
    result = run_cli(*folder_args(root, out, "--skip-bad"))
    assert result.exit_code == 0, result.output
    assert "[red]/photo[final].png" in result.output  # the skipped sample, its class folder
    assert str(root / "[red]" / "photo[final].png") in result.output  # the decoding error names the file
    assert str(out / MODEL / "folder.zarr") in result.output
    missing = runner.invoke(app, folder_args(root / "[gone]", out))
    assert missing.exit_code == 2 and str(root / "[gone]") in missing.output


def test_disk_full_at_the_first_shard_leaves_no_store(images, tmp_path, monkeypatch):
    full_disk_after(monkeypatch, 0)
    out = tmp_path / "s"
    result = runner.invoke(app, folder_args(images, out))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "no space left on the device" in line and line.endswith("; nothing was written")
    assert not out.exists()
