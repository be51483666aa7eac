"""Damaged, truncated or unreachable stores: one sentence naming the store and the object at fault, never a
traceback; exit 2 (validate: exit 1, the problem listed)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from combo.cli import app
from probe.data import SplitSource, plan_cache
from probe.stores import align_tasks, open_stores
from store_schema import StoreError, open_store
from store_schema.pack import pack_store
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 20, 2, (2, 2), 4
runner = CliRunner()


def make_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(N, L, GRID[0] * GRID[1], D)).astype(np.float32)
    return write_store(path, tokens=tokens, labels=rng.integers(0, 4, N), splits=vtab_like_splits(8, 4, 8), grid=GRID,
                       task="dtd", alias="clip", dataset="vtab", num_classes=4)


def cli(*args: str, code: int):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


def probe(store: str | Path, tmp_path: Path, code: int = 2) -> str:
    return cli("probe", "--stores", str(store), "--task", "dtd", "--protocol", "dev", "--steps", "2", "--batch-size", "4",
               "--width", "8", "--depth", "1", "--out", str(tmp_path / "runs"), "--threads", "1", code=code)


def one_error(output: str) -> str:
    """The single `error: ...` sentence of a failed command (joined, in case the terminal wrapped it)."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return " ".join(output[output.index("error:"):].split())


def rewrite_manifest(store: Path, *keys: str) -> None:
    """Record the current bytes of `keys` in the manifest, as if the store had been written so (only the
    data itself is then wrong)."""
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    for key in keys:
        data = (store / key).read_bytes()
        doc["objects"][key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------------------------------- truncated zip


@pytest.fixture
def half_zip(tmp_path) -> Path:
    packed = tmp_path / "clip-vtab.zarr.zip"
    pack_store(make_store(tmp_path / "clip" / "vtab.zarr"), packed)
    data = packed.read_bytes()
    cut = tmp_path / "roots" / "cut.zarr.zip"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_truncated_zip_validate_lists_it(half_zip):
    output = cli("store", "validate", str(half_zip), code=1)
    assert "invalid" in output and "not a readable zip file" in output and str(half_zip) in output


def test_truncated_zip_info_and_probe_name_it(half_zip, tmp_path):
    for output in (cli("store", "info", str(half_zip), code=2), probe(half_zip, tmp_path)):
        message = one_error(output)
        assert str(half_zip) in message and "not a readable zip file" in message and "truncated" in message


def test_truncated_zip_is_listed_as_invalid(half_zip):
    output = cli("store", "ls", str(half_zip.parent), "--json", code=0)
    (row,) = json.loads(output)
    assert row["status"] == "invalid" and "not a readable zip file" in row["reason"]


def test_zip_entry_failing_its_crc_is_named(tmp_path):
    """A flipped byte inside a packed shard: zipfile's "Bad CRC-32" becomes a listed problem (validate) and one
    sentence naming the shard (probe), not a traceback."""
    import zipfile

    packed = tmp_path / "clip-vtab.zarr.zip"
    pack_store(make_store(tmp_path / "clip" / "vtab.zarr"), packed)
    key = "dtd/tokens/c/1/0/0/0"
    with zipfile.ZipFile(packed) as archive:
        info = archive.getinfo(key)
    data = bytearray(packed.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    output = cli("store", "validate", str(packed), code=1)
    assert f"[{key}] cannot be read" in output and "CRC" in output
    message = one_error(probe(packed, tmp_path))
    assert str(packed) in message and key in message and "combo store validate" in message


# ------------------------------------------------------------------------------------- damaged small objects


def test_junk_samples_parquet_is_named(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    (store / "dtd" / "samples.parquet").write_bytes(b"not a parquet file at all" * 8)
    output = cli("store", "validate", str(store), code=1)
    assert "samples.parquet" in output
    info = cli("store", "info", str(store), code=0)  # not "complete": the listing shows the table was replaced
    assert re.search(r"^dtd\s.*\bdamaged\b", info, re.M) and "dtd/samples.parquet" in info, info
    detail = json.loads(cli("store", "info", str(store), "--json", code=0))["task_details"]["dtd"]
    assert any("dtd/samples.parquet" in p for p in detail["problems"])
    message = one_error(probe(store, tmp_path))
    assert str(store) in message and "dtd/samples.parquet" in message and "combo store validate" in message


def test_junk_samples_parquet_recorded_in_the_manifest_is_named(tmp_path):
    """Junk that passes the size and checksum checks (a manifest rewritten with it) still names the table."""
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    (store / "dtd" / "samples.parquet").write_bytes(b"\x00junk" * 100)
    rewrite_manifest(store, "dtd/samples.parquet")
    with pytest.raises(StoreError, match=r"dtd/samples\.parquet is not a readable Parquet table .*combo store validate"):
        open_store(store).task("dtd").samples


def test_truncated_array_zarr_json_names_its_path(tmp_path):
    """Without consolidated metadata zarr reads the array's zarr.json itself; its JSON error alone ("Unterminated
    string ... line 47") named nothing."""
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    root = json.loads((store / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    (store / "zarr.json").write_text(json.dumps(root))
    meta = store / "dtd" / "tokens" / "zarr.json"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])
    rewrite_manifest(store, "zarr.json", "dtd/tokens/zarr.json")
    message = one_error(probe(store, tmp_path))
    assert f"{store}: dtd/tokens/zarr.json is not valid JSON (" in message, message
    assert f"run `combo store validate {store}`" in message
    assert "dtd/tokens/zarr.json" in cli("store", "validate", str(store), code=1)


def test_truncated_root_zarr_json_names_store_and_object(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    text = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(text[: len(text) // 2])
    message = one_error(cli("store", "info", str(store), code=2))
    assert message.startswith(f"error: {store}: zarr.json is not valid JSON (")
    assert f"run `combo store validate {store}`" in message


# ------------------------------------------------------------------------------------------ non-finite data


def poison(store: Path, row: int) -> str:
    """Put an inf inside `row` (not in its first value, which the reader's never-written check looks at), with a
    manifest that agrees: what a damaged format 1 store or a value that slipped past the writer reads as."""
    tokens = zarr.open_array(store / "dtd" / "tokens", mode="r+")
    block = tokens[row:row + 1]
    block[0, -1, -1, -1] = np.inf
    tokens[row:row + 1] = block
    shard = f"dtd/tokens/c/{row // 8}/0/0/0"
    rewrite_manifest(store, shard)
    return shard


def test_non_finite_rows_name_store_array_rows_and_shard(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    shard = poison(store, 9)
    aligned = align_tasks(open_stores([str(store)]), "dtd")
    source = SplitSource(aligned, aligned.rows("train800val200"))
    with pytest.raises(StoreError) as caught:
        source.read(np.arange(source.n))
    message = str(caught.value)
    assert str(store) in message and "dtd/tokens" in message and shard in message and "row 9," in message
    assert "non-finite" in message and "combo store validate" in message
    source.read(np.arange(8))  # rows of other shards read fine


def test_probe_on_non_finite_rows_says_where_not_loss_nan(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    shard = poison(store, 3)
    message = one_error(probe(store, tmp_path))
    assert "nan" not in message.lower().split("(")[0] and "loss" not in message
    assert str(store) in message and shard in message and "combo store validate" in message


# ---------------------------------------------------------------------------------------- unreachable URL


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [["store", "info"], ["store", "ls"], ["store", "pull"]])
def test_unreachable_url_is_a_connection_error_not_a_missing_store(command, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/x.zarr"
    extra = [str(tmp_path / "pulled")] if command[-1] == "pull" else []
    message = one_error(cli(*command, url, *extra, code=2))
    assert f"cannot reach {url}: connection refused" in message
    assert "no zarr.json" not in message and "no listing" not in message


def test_unreachable_url_probe_and_validate(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/x.zarr"
    assert f"cannot reach {url}: connection refused" in one_error(probe(url, tmp_path))
    assert f"cannot reach {url}: connection refused" in cli("store", "validate", url, code=1)


# ------------------------------------------------------------------------------------ cache ram + budget


def test_cache_ram_over_the_budget_says_it_does_not_honour_it(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    aligned = align_tasks(open_stores([str(store)]), "dtd")
    source = SplitSource(aligned, aligned.rows("train800val200"))
    import torch

    over = plan_cache(source, mode="ram", budget_bytes=2 * source.row_bytes(), device=torch.device("cpu"), batch_size=4)
    assert over.mode == "ram"
    assert "--cache ram" in over.note and "budget" in over.note and "--cache stream" in over.note
    assert "--cache ram" in over.describe()
    within = plan_cache(source, mode="ram", budget_bytes=source.n * source.row_bytes(), device=torch.device("cpu"),
                        batch_size=4)
    assert "budget" not in within.note


# ------------------------------------------------------------------------------------------ option names


def test_store_storage_option_has_no_short_o(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    assert runner.invoke(app, ["store", "info", str(store), "-o", "anon=true"]).exit_code == 2  # no such option
    cli("store", "info", str(store), "--storage-option", "anon=true", code=0)
    for command in ("ls", "info", "validate", "push", "pull", "pack"):
        help_text = runner.invoke(app, ["store", command, "--help"], env={"COLUMNS": "200"}).output
        line = next(line for line in help_text.splitlines() if "--storage-option" in line)
        assert not re.search(r"(^|[\s,])-o([\s,]|$)", line.strip(" │")), (command, line)
        if command == "pack":  # -o is --out, as in extract / probe
            assert re.search(r"--out\b.*-o\b|-o\b.*--out\b", help_text), help_text


def test_pack_takes_its_zip_as_out(tmp_path):
    store = make_store(tmp_path / "clip" / "vtab.zarr")
    target = tmp_path / "clip.zarr.zip"
    cli("store", "pack", str(store), "-o", str(target), code=0)
    assert target.is_file()
    assert "give the zip file" in one_error(cli("store", "pack", str(store), code=2))


def test_atlas_and_relevance_options_have_help():
    for command in ("atlas", "relevance"):
        help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output
        for option in ("--device", "--store-root", "--dataset"):
            line = next(line for line in help_text.splitlines() if option in line)
            assert len(line.strip(" │").split()) > 3, (command, line)  # more than the option name and its type
        assert "x>=1" in help_text  # --steps / --batch-size ranges
