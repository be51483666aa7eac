"""`combo store ls` / `info` stay legible at 80 columns, narrower, and when piped; `--json` is plain JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from combo.cli import app
from store_schema import StoreLayout, StoreWriter
from store_schema.catalog import StoreSummary, list_stores
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 20, 2, (2, 2), 4
runner = CliRunner()
SUMMARY_KEYS = {f.name for f in fields(StoreSummary)}


def make_store(path: Path, *, alias: str, dataset: str = "vtab", tasks=("dtd", "flowers")) -> Path:
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(N, L, GRID[0] * GRID[1], D)).astype(np.float32)
    labels = rng.integers(0, 4, N)
    for task in tasks:
        write_store(path, tokens=tokens, labels=labels, splits=vtab_like_splits(8, 4, 8), grid=GRID, task=task,
                    alias=alias, dataset=dataset, num_classes=4)
    return path


def write_partial(path: Path) -> Path:
    """A store whose extraction stopped after one of three shards."""
    from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, build_sample_table

    info = StoreInfo(
        backbone=BackboneInfo("vit", "vit_base_patch16_224.augreg_in21k", None, "random-init", None, 0),
        preprocessing=Preprocessing(8, (0.5,) * 3, (0.5,) * 3),
        features=FeatureInfo(GRID, 0, tuple(range(L)), D),
        dataset="vtab",
    )
    table = build_sample_table(sample_ids=[f"s{i}" for i in range(N)], labels=[i % 4 for i in range(N)],
                               splits=vtab_like_splits(8, 4, 8), split_names=["train800", "val200", "train800val200", "test"])
    with StoreWriter(path, info, StoreLayout(rows_per_shard=8, rows_per_chunk=4)) as writer:
        tw = writer.task("dtd", samples=table, num_layers=L, num_tokens=GRID[0] * GRID[1], feature_dim=D,
                         num_prefix_tokens=0, protocols={"dev": ("train800", "val200")}, classes=["a", "b", "c", "d"])
        tw.write_block(0, np.random.default_rng(1).normal(size=(8, L, GRID[0] * GRID[1], D)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """ok, invalid (a chunk missing), incomplete (extraction stopped; no zarr.json) and bracketed names."""
    root = tmp_path_factory.mktemp("cli-output") / "stores"
    make_store(root / "clip" / "vtab.zarr", alias="clip", tasks=("caltech101", "cifar100", "dtd", "flowers", "pets"))
    _drop_chunk(make_store(root / "sam" / "vtab.zarr", alias="sam"))
    write_partial(root / "vit" / "vtab.zarr")
    (root / "half" / "vtab.zarr" / "dtd").mkdir(parents=True)
    make_store(root / "[b]t[/b]" / "dinov2" / "vtab.zarr", alias="dinov2[reg]", dataset="vtab[1k]")
    return root


def _drop_chunk(store: Path) -> None:
    shard = store / "dtd" / "tokens" / "c" / "1" / "0" / "0" / "0"
    assert shard.exists(), shard
    shard.unlink()


def invoke(*args: str, columns: int | None) -> str:
    env = {"COLUMNS": None if columns is None else str(columns)}
    result = runner.invoke(app, ["store", *args], env=env)
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture
def piped(monkeypatch):
    """No terminal anywhere (stdout piped): rich falls back to 80 columns."""
    def no_terminal(*args, **kwargs):
        raise OSError("not a terminal")

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", no_terminal)


def assert_fits(output: str, width: int, *, paths: tuple[str, ...] = ()) -> list[str]:
    """Every line fits, except a path (in `paths`) longer than the width: it has a line of its own and is
    never broken (a broken path cannot be copied)."""
    lines = output.splitlines()
    too_long = [line for line in lines if len(line) > width and line.strip() not in paths]
    assert not too_long, f"lines over {width} columns:\n" + "\n".join(too_long)
    return lines


def assert_stores_legible(output: str, root: Path) -> None:
    lines = output.splitlines()
    summaries = list_stores(root)
    assert len(summaries) == 5
    for s in summaries:
        starts = [i for i, line in enumerate(lines) if line.startswith(s.name + " ") or line == s.name]
        assert starts, f"{s.name!r} not shown whole at the start of a line:\n{output}"
        i = starts[0]
        row = " ".join(lines[i:i + 3])
        assert re.search(rf"(^|\s){s.status}(\s|$)", row), (s.name, s.status, row)
        if s.backbone:
            assert re.search(rf"(^|\s){re.escape(s.backbone)}(\s|,|$)", row), (s.name, s.backbone, row)
        if s.dataset:
            assert s.dataset in row
    # every reason readable: whole words on lines of their own, not squeezed into a column
    text = " ".join(line.strip() for line in lines)
    reasons = {s.name: s.reason for s in summaries if s.status != "ok"}
    assert set(reasons) == {"sam/vtab.zarr", "vit/vtab.zarr", "half/vtab.zarr"}
    for reason in reasons.values():
        assert " ".join(reason.split()) in text, (reason, output)
    assert re.search(r"dtd\b.*\bmissing", reasons["sam/vtab.zarr"])
    assert "1 of 3 shards written" in reasons["vit/vtab.zarr"]
    assert "no zarr.json" in reasons["half/vtab.zarr"]


TABLE_HEADERS = ("store", "status", "backbone", "dataset", "samples", "size")


def test_ls_fits_an_80_column_terminal(root):
    output = invoke("ls", str(root), columns=80)
    lines = assert_fits(output, 80)
    header = next(line.split() for line in lines if line.split()[:1] == ["store"])
    assert set(TABLE_HEADERS) <= set(header)  # a table, no header squeezed
    assert_stores_legible(output, root)


def test_ls_piped_is_80_columns_and_legible(root, piped):
    output = invoke("ls", str(root), columns=None)
    assert_fits(output, 80)
    assert_stores_legible(output, root)
    assert "\x1b[" not in output  # no colour codes into a pipe


def test_ls_narrow_terminal_switches_to_one_block_per_store(root):
    output = invoke("ls", str(root), columns=50)
    assert_fits(output, 50, paths=(str(root),))
    assert str(root) in output.splitlines()
    assert_stores_legible(output, root)
    assert "samples" in output and "tasks dtd, flowers" in output


def test_ls_wide_terminal_shows_more_columns(root):
    output = invoke("ls", str(root), columns=200)
    header = next(line.split() for line in output.splitlines() if line.split()[:1] == ["store"])
    assert set(TABLE_HEADERS) | {"tasks", "dtype", "created", "timm", "splits", "ver"} <= set(header)
    assert "vit_base_patch16_224.augreg_in21k" in output and "float16" in output
    assert_stores_legible(output, root)


def test_ls_keeps_square_brackets_in_user_data(root):
    output = invoke("ls", str(root), columns=80)
    assert "[b]t[/b]/dinov2/vtab.zarr" in output
    assert "dinov2[reg]" in output and "vtab[1k]" in output


@pytest.mark.parametrize("columns", [80, None])
def test_info_lines_fit_80_columns(root, columns, request):
    if columns is None:
        request.getfixturevalue("piped")
    store = root / "[b]t[/b]" / "dinov2" / "vtab.zarr"
    output = invoke("info", str(store), columns=columns)
    lines = assert_fits(output, 80)
    text = "".join(line.strip() for line in lines)
    assert str(store).replace(" ", "") in text  # the location, broken at '/' where it is long
    for key in ("backbone", "weights", "preprocessing", "libraries", "tasks"):
        assert any(line.startswith(key) for line in lines), key
    assert "dinov2[reg]" in output and "vtab[1k]" in output
    assert re.search(r"^dtd\s+20\s.*complete", output, re.M) and "train800val200 12" in output
    assert re.search(r"torch \d", output)  # a library and its version on one line


def test_info_narrow_terminal(root):
    output = invoke("info", str(root / "vit" / "vtab.zarr"), columns=40)
    assert_fits(output, 40, paths=(str(root / "vit" / "vtab.zarr"),))
    assert str(root / "vit" / "vtab.zarr") in output.splitlines()  # whole, never broken
    assert "vit_base_patch16_224.augreg_in21k" in output
    assert re.search(r"^dtd\s+20\s.*incomplete", output, re.M)


@pytest.mark.parametrize("columns", [30, 80, None])
def test_ls_json_is_one_plain_document(root, columns):
    output = invoke("ls", str(root), "--json", columns=columns)
    doc = json.loads(output)  # one document, nothing around it, no wrapping
    assert isinstance(doc, list) and len(doc) == 5
    for row in doc:
        assert set(row) == SUMMARY_KEYS
    by_name = {row["name"]: row for row in doc}
    assert by_name["sam/vtab.zarr"]["status"] == "invalid"
    assert re.search(r"dtd\b.*\bmissing", by_name["sam/vtab.zarr"]["reason"])
    assert by_name["[b]t[/b]/dinov2/vtab.zarr"]["backbone"] == "dinov2[reg]"
    assert by_name["clip/vtab.zarr"]["tasks"] == ["caltech101", "cifar100", "dtd", "flowers", "pets"]
    assert "\x1b[" not in output


def test_info_json_is_one_plain_document(root):
    store = root / "[b]t[/b]" / "dinov2" / "vtab.zarr"
    output = invoke("info", str(store), "--json", columns=30)
    doc = json.loads(output)
    assert {"location", "backbone", "dataset", "preprocessing", "features", "storage", "size_bytes",
            "schema_version", "created", "library_versions", "task_details"} <= set(doc)
    assert doc["backbone"]["alias"] == "dinov2[reg]" and doc["location"] == str(store)
    assert doc["task_details"]["dtd"]["num_samples"] == N


def test_real_pipe(root):
    """A real `combo store ls | cat` (no terminal on any stream): 80 columns, no colour codes."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    result = subprocess.run([sys.executable, "-m", "combo", "store", "ls", str(root)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    assert_fits(result.stdout, 80)
    assert_stores_legible(result.stdout, root)


LONG_NAME = "team-[b]vision[/b]-" + "n" * 41  # 60 characters, markup-like brackets included


@pytest.fixture(scope="module")
def long_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("long-name") / "stores"
    make_store(root / LONG_NAME / "vtab.zarr", alias="dinov2[reg]")
    return root


@pytest.mark.parametrize("columns", [80, None])
def test_ls_and_info_with_a_60_character_store_name(long_root, columns, request):
    """Every line within 80 columns, the name never broken; info prints the store's location whole on a line of
    its own when it does not fit beside its key (a path broken over two lines cannot be copied)."""
    assert len(LONG_NAME) == 60
    if columns is None:
        request.getfixturevalue("piped")
    output = invoke("ls", str(long_root), columns=columns)
    lines = assert_fits(output, 80, paths=(str(long_root),))
    assert any(line.startswith(f"{LONG_NAME}/vtab.zarr") for line in lines), output
    assert any(line.split()[:3] == ["store", "status", "backbone"] for line in lines), output  # still a table
    row = lines[next(i for i, line in enumerate(lines) if line.startswith(LONG_NAME)) + 1]  # the row under the name
    assert row.split()[:3] == ["ok", "dinov2[reg]", "vtab"], output
    assert "dinov2[reg]" in output
    store = long_root / LONG_NAME / "vtab.zarr"
    output = invoke("info", str(store), columns=columns)
    lines = assert_fits(output, 80, paths=(str(store),))
    assert str(store) in [line.strip() for line in lines], output
    assert "dinov2[reg]" in output


def test_validate_and_pack_print_bracketed_paths_verbatim(tmp_path):
    store = make_store(tmp_path / "[red]team[/red]" / "vtab.zarr", alias="clip", tasks=("dtd",))
    result = runner.invoke(app, ["store", "validate", str(store)], env={"COLUMNS": "300"})
    assert result.exit_code == 0 and f"valid: {store} (" in result.output, result.output
    target = tmp_path / "clip[final].zarr.zip"
    result = runner.invoke(app, ["store", "pack", str(store), str(target)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"packed {store} -> {target}:" in result.output, result.output
    (store / "dtd" / "samples.parquet").write_bytes(b"junk")
    result = runner.invoke(app, ["store", "validate", str(store)], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and f"invalid: {store} (" in result.output, result.output
