"""Sharing stores: ls / info / validate / push / pull / pack against a real S3 server (moto on loopback,
s3fs client) and a plain read-only web server (http.server on loopback)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import store_schema.transfer as transfer
from combo import clikit
from combo.cli import app
from servers import clear_s3fs_cache, http_root, read_only_user, s3  # noqa: F401 - fixtures
from store_schema import (
    SCHEMA_VERSION,
    SchemaVersionError,
    StoreError,
    StoreIncompleteError,
    StoreLayout,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriter,
    copy_store,
    list_stores,
    open_store,
    pack_store,
    store_info,
    store_objects,
    validate_store,
)
from store_schema.location import Location, redact, resolve
from storefactory import vtab_like_splits, write_store

N, L, GRID, D = 20, 3, (2, 3), 8
# 3 shards x (tokens, prefix) + 2 array zarr.json + 8 coordinates (zarr.json + 1 chunk) + samples, zarr.json
OBJECTS_PER_TASK = 3 * 2 + 2 + 8 * 2 + 2
ALL = 2 * OBJECTS_PER_TASK + 2  # two tasks + root zarr.json + manifest.json
SECRET_ENV = "sEcReT-EnV-4f9a1c77"
SECRET_OPT = "sEcReT-OpT-b02d6e31"
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich's `width` is a property whose setter pins `_width`: patch `_width` itself, so that undoing the
    # patch gives back an unpinned console (patching `width` would pin it at the old width for later tests)
    monkeypatch.setattr(clikit.console, "_width", 250)
    monkeypatch.setattr(clikit.err_console, "_width", 250)


def make_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(N, L, GRID[0] * GRID[1], D)).astype(np.float32)
    prefix = rng.normal(size=(N, L, 1, D)).astype(np.float32)
    labels = rng.integers(0, 4, N)
    return tokens, prefix, labels


def make_store(path: Path, *, tasks=("dtd", "flowers"), alias="clip", dataset="vtab", seed=0) -> Path:
    tokens, prefix, labels = make_arrays(seed)
    for task in tasks:
        write_store(path, tokens=tokens, prefix=prefix, labels=labels, splits=vtab_like_splits(8, 4, 8), grid=GRID,
                    task=task, alias=alias, dataset=dataset, num_classes=4)
    return path


@pytest.fixture
def store(tmp_path) -> Path:
    return make_store(tmp_path / "stores" / "clip" / "vtab.zarr")


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder (a new lock file or temp file would show) with content hash and mtime."""
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


def same_values(a, b) -> None:
    for task in a.tasks:
        np.testing.assert_array_equal(a.task(task).read(slice(None)), b.task(task).read(slice(None)))
        np.testing.assert_array_equal(a.task(task).read(slice(None), prefix=True), b.task(task).read(slice(None), prefix=True))
        np.testing.assert_array_equal(a.task(task).labels, b.task(task).labels)


def cli(*args: str, code: int = 0):
    result = runner.invoke(app, ["store", *args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def shard(store: Path, task: str, array: str, block: int) -> Path:
    return store / task / array / "c" / str(block) / "0" / "0" / "0"


# -- S3 (moto on loopback, s3fs) ----------------------------------------------------------------


def test_push_to_s3_then_ls_info_validate_and_read_from_s3(s3, store, tmp_path):
    bucket = s3.make_bucket("team-a")
    before = snapshot(store)
    out = cli("push", str(store), f"{bucket}/stores", *s3.cli_options())
    assert f"copied {ALL} object(s)" in out.output and "0 already there" in out.output and "valid" in out.output
    assert snapshot(store) == before, "pushing wrote into the source"
    url = f"{bucket}/stores/clip/vtab.zarr"  # a store root as destination: <root>/<alias>/<dataset>.zarr
    assert "stores/clip/vtab.zarr/dtd/tokens/c/2/0/0/0" in s3.objects("team-a")

    listed = json.loads(cli("ls", f"{bucket}/stores", "--json", *s3.cli_options()).stdout)
    assert [(s["name"], s["status"], s["backbone"], s["dataset"], s["tasks"], s["samples"], s["dtype"], s["schema_version"])
            for s in listed] == [("clip/vtab.zarr", "ok", "clip", "vtab", ["dtd", "flowers"], 2 * N, "float16", SCHEMA_VERSION)]
    assert listed[0]["splits"] == ["train800", "val200", "train800val200", "test"]
    assert listed[0]["size_bytes"] == sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and not p.name.startswith("."))
    from_env = runner.invoke(app, ["store", "ls", "--json", *s3.cli_options()], env={"COMBO_STORE_ROOT": f"{bucket}/stores"})
    assert from_env.exit_code == 0 and json.loads(from_env.stdout) == listed  # the store root may be a URL
    table = cli("ls", f"{bucket}/stores", *s3.cli_options()).output
    assert "clip/vtab.zarr" in table and "ok" in table and "float16" in table

    info = json.loads(cli("info", url, "--json", *s3.cli_options()).stdout)
    assert info["backbone"]["alias"] == "clip" and info["backbone"]["weights_source"] == "random-init"
    assert info["features"]["token_grid"] == list(GRID) and info["storage"]["dtype"] == "float16"
    assert info["task_details"]["dtd"]["splits"] == {"train800": 8, "val200": 4, "train800val200": 12, "test": 8}
    assert info["task_details"]["dtd"]["num_classes"] == 4 and info["task_details"]["dtd"]["complete"]
    assert "zarr" in info["library_versions"]
    text = cli("info", url, *s3.cli_options()).output
    assert "random-init" in text and "seed 0" in text and "dtd" in text and "complete" in text

    assert "valid" in cli("validate", url, *s3.cli_options()).output
    same_values(open_store(store), open_store(url, storage_options=s3.options))

    # resumable: a second push finds everything in place and copies nothing
    again = json.loads(cli("push", str(store), url, "--json", *s3.cli_options()).stdout)
    assert again["copied"] == 0 and again["skipped"] == ALL and again["valid"]


def test_interrupted_push_resumes_and_ends_valid(s3, store, monkeypatch):
    bucket = s3.make_bucket("team-b")
    url = f"{bucket}/stores/clip/vtab.zarr"
    real_copy = transfer.copy_object
    done = []

    def flaky(source, destination, obj):
        if len(done) >= 7:
            raise ConnectionError("network dropped (simulated)")
        nbytes = real_copy(source, destination, obj)
        done.append(obj.key)
        return nbytes

    monkeypatch.setattr(transfer, "copy_object", flaky)
    with pytest.raises(ConnectionError):
        copy_store(str(store), url, storage_options=s3.options, workers=2)
    monkeypatch.setattr(transfer, "copy_object", real_copy)
    assert 7 <= len(done) < ALL
    keys = {k.split("vtab.zarr/", 1)[1] for k in s3.objects("team-b")}
    assert keys == set(done)
    assert "zarr.json" not in keys and not {"dtd/zarr.json", "flowers/zarr.json"} & keys  # never looks complete
    with pytest.raises(StoreNotFoundError):
        open_store(url, storage_options=s3.options)
    [summary] = list_stores(f"{bucket}/stores", storage_options=s3.options)
    assert summary.status == "incomplete" and "no zarr.json" in summary.reason

    dest_reads: list[str] = []
    real_read = Location.read_bytes

    def spy(self, key):
        if self.kind == "remote":
            dest_reads.append(key)
        return real_read(self, key)

    monkeypatch.setattr(Location, "read_bytes", spy)
    result = copy_store(str(store), url, storage_options=s3.options, workers=2)
    assert result.copied == ALL - len(done) and result.skipped == len(done)
    # what the first attempt wrote was recognised by size + its x-amz-meta-sha256, never downloaded to hash it
    assert [k for k in done if "/prefix/c/" in k or "/tokens/c/" in k]  # shards were among them
    assert not [k for k in dest_reads if ("/prefix/c/" in k or "/tokens/c/" in k) and k in done], dest_reads
    monkeypatch.undo()
    assert result.report is not None and result.report.ok
    same_values(open_store(store), open_store(url, storage_options=s3.options))


def test_read_only_bucket_pull_validate_info_ls_write_nothing(s3, store, tmp_path, monkeypatch):
    bucket = s3.make_bucket("team-ro")
    url = f"{bucket}/stores/clip/vtab.zarr"
    copy_store(str(store), url, storage_options=s3.options)
    before = s3.objects("team-ro")
    with read_only_user(s3, "team-ro") as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        clear_s3fs_cache()
        try:
            out = cli("pull", url, str(tmp_path / "local"), *s3.cli_options())
            assert f"copied {ALL} object(s)" in out.output
            assert validate_store(url, storage_options=s3.options).ok
            assert store_info(url, storage_options=s3.options)["backbone"]["alias"] == "clip"
            assert [s.status for s in list_stores(f"{bucket}/stores", storage_options=s3.options)] == ["ok"]
            remote = open_store(url, storage_options=s3.options)
            remote.task("dtd").read([3, 1, 17])
            # the policy is real: this user cannot write
            denied = cli("push", str(store), f"{bucket}/other/x.zarr", *s3.cli_options(), code=2)
            assert "Access Denied" in denied.output and "error" in denied.output
        finally:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            clear_s3fs_cache()
    assert s3.objects("team-ro") == before, "reading the store wrote to the bucket"
    pulled = tmp_path / "local" / "clip" / "vtab.zarr"
    assert validate_store(pulled).ok
    same_values(open_store(store), open_store(pulled))


def test_no_credential_lands_in_store_output_or_logs(s3, store, tmp_path, monkeypatch, caplog):
    bucket = s3.make_bucket("team-secret")
    url = f"{bucket}/stores/clip/vtab.zarr"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ENV)
    clear_s3fs_cache()
    caplog.set_level(logging.DEBUG)
    try:
        pushed = cli("push", str(store), url, *s3.cli_options())
        listed = cli("ls", f"{bucket}/stores", "--json", *s3.cli_options())
        info = cli("info", url, *s3.cli_options())
        # through the library, credentials given as options (moto accepts any key) are used, never recorded
        options = {**s3.options, "key": "AKIA-distinct-id", "secret": SECRET_OPT}
        copy_store(url, str(tmp_path / "pulled"), storage_options=options)
        refused = cli("push", str(store), url, *s3.cli_options(), f"--storage-option=secret={SECRET_OPT}", code=2)
        in_url = cli("info", f"https://someone:{SECRET_OPT}@127.0.0.1:9/x.zarr", code=2)
    finally:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        clear_s3fs_cache()
    assert "credentials are not taken on the command line" in refused.output
    assert "someone:***@" in in_url.output
    texts = [pushed.output, listed.output, info.output, refused.output, in_url.output]
    boto = s3.boto()
    texts += [boto.get_object(Bucket="team-secret", Key=k)["Body"].read().decode("latin-1") for k in s3.objects("team-secret")]
    texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "pulled").rglob("*") if p.is_file()]
    assert not any("AKIA-distinct-id" in t for t in texts)
    texts.append(caplog.text)
    for secret in (SECRET_ENV, SECRET_OPT):
        assert not any(secret in t for t in texts), f"{secret} leaked"
    # (the access key id is no secret: botocore's own debug log shows it in every signed request header,
    # which is why it is checked above in what we write, not in the client library's debug log)
    assert caplog.records, "expected debug logs from the S3 client to check"


def test_errors_are_scrubbed_of_secrets(monkeypatch, store):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ENV)

    def leaky(*args, **kwargs):
        raise PermissionError(f"signature for {SECRET_ENV} rejected")

    monkeypatch.setattr("combo.cli_store.store_info", leaky)
    out = cli("info", str(store), code=2)
    assert SECRET_ENV not in out.output and "***" in out.output
    assert redact(f"https://u:{SECRET_OPT}@h/x {SECRET_OPT}", {"client_kwargs": {"password": SECRET_OPT}}) == "https://u:***@h/x ***"


# -- plain web server -------------------------------------------------------------------------------


def test_pull_from_read_only_http_server_and_open_the_copy(http_root, tmp_path):
    served = make_store(http_root.folder / "stores" / "clip" / "vtab.zarr")
    before = snapshot(served)
    url = f"{http_root.url}/stores/clip/vtab.zarr"
    out = cli("pull", url, str(tmp_path / "mine"))  # a folder: the store goes under it with its own name
    assert f"copied {ALL} object(s)" in out.output
    pulled = tmp_path / "mine" / "clip" / "vtab.zarr"
    same_values(open_store(served), open_store(pulled))
    same_values(open_store(served), open_store(url))  # zarr reads it over HTTP directly too
    assert validate_store(url).ok
    assert http_root.methods() <= {"GET", "HEAD"}
    assert snapshot(served) == before
    # a web server cannot be listed: a clear error, not a traceback
    assert "no listing" in cli("ls", http_root.url, code=2).output
    # a full destination path is used as is; the rerun copies nothing
    again = copy_store(url, str(tmp_path / "exact.zarr"))
    assert again.copied == ALL and (tmp_path / "exact.zarr" / "zarr.json").exists()
    assert copy_store(url, str(tmp_path / "exact.zarr")).copied == 0


def test_scattered_rows_are_read_as_whole_shards(http_root):
    """A shuffled batch touches a few rows of each shard: one request per shard, not one per inner chunk."""
    tokens, prefix, _ = make_arrays()
    served = make_store(http_root.folder / "clip" / "vtab.zarr", tasks=("dtd",))
    remote = open_store(f"{http_root.url}/clip/vtab.zarr").task("dtd")
    http_root.requests.clear()
    rows = [6, 1, 19, 3, 5, 1]  # shard 0 mostly, shard 2 once; any order, duplicates allowed
    got = remote.read(rows)
    np.testing.assert_array_equal(got, open_store(served).task("dtd").read(slice(None))[rows])
    np.testing.assert_allclose(got, tokens[rows], atol=2e-3, rtol=1e-3)
    assert sum("/tokens/c/0/0/0/0" in r for r in http_root.requests) == 1, http_root.requests
    assert not any("/tokens/c/1/" in r for r in http_root.requests)  # untouched shards are not read
    np.testing.assert_allclose(remote.read([4, 0], layers=[2], prefix=True), prefix[[4, 0]][:, [2]], atol=2e-3, rtol=1e-3)
    with pytest.raises(IndexError, match="rows outside 0..19"):
        remote.read([3, 20])


def test_read_spans():
    from store_schema.reader import read_spans

    spans = read_spans(np.array([1, 3, 5, 6, 9, 30, 31, 32, 33, 34, 35, 36, 37]), rows_per_shard=8, num_rows=38)
    # shard 0 mostly needed: whole; shard 1 one row: just it; shard 3 (30, 31) sparse; shard 4 (32..37, 6 rows
    # of a 6-row last shard) whole; neighbours merge
    assert spans == [(0, 8), (9, 10), (30, 38)]


# -- integrity, locally -------------------------------------------------------------------------------


def test_validate_cli_names_corrupt_and_missing_chunks(store):
    assert "valid" in cli("validate", str(store)).output
    flip_byte(shard(store, "dtd", "tokens", 1))
    shard(store, "flowers", "prefix", 2).unlink()
    out = cli("validate", str(store), code=1)
    assert "task dtd: array tokens chunk (1, 0, 0, 0)" in out.output and "corrupt" in out.output
    assert "task flowers: array prefix chunk (2, 0, 0, 0)" in out.output and "missing" in out.output
    quick = cli("validate", str(store), "--quick", "--json", code=1)
    assert any("missing" in p for p in json.loads(quick.stdout)["problems"])  # presence is always checked
    # bad data is never passed on: a missing object stops the copy before it starts, a corrupt one when read
    with pytest.raises(StoreError, match=r"lacks 1 object\(s\) its manifest lists \(first: flowers/prefix/c/2/0/0/0\)"):
        copy_store(str(store), str(store.parent / "copy.zarr"))
    corrupt = make_store(store.parent / "corrupt.zarr", tasks=("dtd",))
    flip_byte(shard(corrupt, "dtd", "tokens", 1))
    with pytest.raises(StoreError, match=r"dtd/tokens/c/1/0/0/0 does not match its recorded checksum"):
        copy_store(str(corrupt), str(store.parent / "copy.zarr"))
    assert not (store.parent / "copy.zarr" / "zarr.json").exists()


def test_truncated_zarr_json_is_a_clear_error_everywhere(store):
    meta = store / "zarr.json"
    meta.write_text(meta.read_text()[:50])
    out = cli("validate", str(store), code=1)
    assert "zarr.json" in out.output and "not valid JSON" in out.output
    assert "not valid JSON" in cli("info", str(store), code=2).output
    assert "not valid JSON" in cli("push", str(store), str(store.parent / "x.zarr"), code=2).output
    [summary] = list_stores(store.parent.parent)
    assert summary.status == "invalid" and "truncated" in summary.reason


def test_ls_marks_bad_stores_and_keeps_listing(tmp_path):
    root = tmp_path / "stores"
    make_store(root / "clip" / "vtab.zarr")
    flip_byte(shard(make_store(root / "mae" / "vtab.zarr", alias="mae"), "dtd", "tokens", 0))  # checksums: validate's job
    shard(make_store(root / "sam" / "vtab.zarr", alias="sam"), "dtd", "tokens", 1).unlink()
    newer = make_store(root / "dino" / "vtab.zarr", alias="dino")
    doc = json.loads((newer / "zarr.json").read_text())
    doc["attributes"]["combo"].update(schema_version=SCHEMA_VERSION + 1, format_version=f"{SCHEMA_VERSION + 1}.0")
    (newer / "zarr.json").write_text(json.dumps(doc))
    (root / "half" / "vtab.zarr" / "dtd").mkdir(parents=True)
    tokens, _, labels = make_arrays()
    partial = write_partial(root / "vit" / "vtab.zarr", tokens, labels)
    pack_store(root / "clip" / "vtab.zarr", root / "clip-vtab.zarr.zip")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a store")

    rows = {s.name: s for s in list_stores(root)}
    assert set(rows) == {"clip/vtab.zarr", "mae/vtab.zarr", "sam/vtab.zarr", "dino/vtab.zarr", "half/vtab.zarr",
                         "vit/vtab.zarr", "clip-vtab.zarr.zip"}
    assert rows["clip/vtab.zarr"].status == rows["mae/vtab.zarr"].status == rows["clip-vtab.zarr.zip"].status == "ok"
    assert rows["sam/vtab.zarr"].status == "invalid" and "1 object(s) missing (first: dtd/tokens/c/1/0/0/0)" in rows["sam/vtab.zarr"].reason
    assert rows["dino/vtab.zarr"].status == "invalid"
    assert f"format {SCHEMA_VERSION + 1}.0 needs a newer combo" in rows["dino/vtab.zarr"].reason
    assert rows["half/vtab.zarr"].status == "incomplete"
    assert rows["vit/vtab.zarr"].status == "incomplete" and "1 of 3 shards written" in rows["vit/vtab.zarr"].reason
    assert partial.exists()
    table = cli("ls", str(root)).output
    assert table.count("invalid") == 2 and table.count("incomplete") == 2


def write_partial(path: Path, tokens, labels) -> Path:
    """A store whose extraction stopped after one shard."""
    from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, build_sample_table

    info = StoreInfo(
        backbone=BackboneInfo("vit", "vit_x", None, "random-init", None, 0),
        preprocessing=Preprocessing(8, (0.5,) * 3, (0.5,) * 3),
        features=FeatureInfo(GRID, 0, tuple(range(L)), D),
        dataset="vtab",
    )
    table = build_sample_table(sample_ids=[f"s{i}" for i in range(N)], labels=list(labels),
                               splits=vtab_like_splits(8, 4, 8), split_names=["train800", "val200", "train800val200", "test"])
    with StoreWriter(path, info, StoreLayout(rows_per_shard=8, rows_per_chunk=4)) as writer:
        tw = writer.task("dtd", samples=table, num_layers=L, num_tokens=6, feature_dim=D, num_prefix_tokens=0,
                         protocols={"dev": ("train800", "val200")}, classes=["a", "b", "c", "d"])
        tw.write_block(0, tokens[:8])
    return path


def test_incomplete_store_is_not_pushed(tmp_path):
    tokens, _, labels = make_arrays()
    partial = write_partial(tmp_path / "vit" / "vtab.zarr", tokens, labels)
    with pytest.raises(StoreIncompleteError, match="task dtd .* is incomplete"):
        copy_store(str(partial), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_newer_schema_version_refused_with_needed_version(store, tmp_path):
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["combo"]["format_version"] = f"{SCHEMA_VERSION + 1}.0"
    (store / "zarr.json").write_text(json.dumps(doc))
    needed = f"format {SCHEMA_VERSION + 1}.0"
    assert needed in cli("info", str(store), code=2).output
    assert needed in cli("validate", str(store), code=1).output
    assert needed in cli("pull", str(store), str(tmp_path / "x"), code=2).output
    with pytest.raises(SchemaVersionError, match=f"reads formats 1.x and {SCHEMA_VERSION}.x"):
        copy_store(str(store), str(tmp_path / "y"))


def test_destination_holding_another_store_is_refused(store, tmp_path):
    other = make_store(tmp_path / "other" / "vtab.zarr", alias="mae", tasks=("dtd",))
    with pytest.raises(StoreMismatchError, match="already holds another store"):
        copy_store(str(store), str(other))
    with pytest.raises(ValueError, match="same store"):
        copy_store(str(store), str(store))


def test_updated_source_task_is_recopied_and_never_looks_complete_midway(store, tmp_path, monkeypatch):
    dest = tmp_path / "copy.zarr"
    copy_store(str(store), str(dest))
    tokens, prefix, labels = make_arrays(seed=1)  # re-extracted with other numbers, same settings
    with StoreWriter(store, open_info(store), StoreLayout(rows_per_shard=8, rows_per_chunk=4)) as writer:
        tw = writer.task("dtd", samples=open_store(store).task("dtd").samples, num_layers=L, num_tokens=6, feature_dim=D,
                         num_prefix_tokens=1, protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")},
                         classes=[str(c) for c in range(4)], overwrite=True)
        for b in tw.pending():
            rows = tw.blocks[b]
            tw.write_block(b, tokens[rows.start:rows.stop], prefix[rows.start:rows.stop])
        tw.finalize()
    real_copy = transfer.copy_object

    def stop_at_first_shard(source, destination, obj):
        raise ConnectionError("dropped")

    monkeypatch.setattr(transfer, "copy_object", stop_at_first_shard)
    with pytest.raises(ConnectionError):
        copy_store(str(store), str(dest), workers=1)
    assert not (dest / "manifest.json").exists()  # the stale copy no longer passes for a complete store
    assert not validate_store(dest).ok
    with pytest.raises(StoreError, match="manifest"):
        open_store(dest).task("dtd").read([0])
    monkeypatch.setattr(transfer, "copy_object", real_copy)
    result = copy_store(str(store), str(dest))
    assert 0 < result.copied < ALL
    same_values(open_store(store), open_store(dest))


def open_info(path: Path):
    from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo

    attrs = open_store(path).attrs
    b, p, f = attrs["backbone"], attrs["preprocessing"], attrs["features"]
    return StoreInfo(
        backbone=BackboneInfo(b["alias"], b["timm_name"], b["pretrained_tag"], b["weights_source"], b["weights_sha256"], b["seed"]),
        preprocessing=Preprocessing(p["image_size"], tuple(p["mean"]), tuple(p["std"]), p["interpolation"], p["resize"]),
        features=FeatureInfo(tuple(f["token_grid"]), f["num_prefix_tokens"], tuple(f["layers"]), f["feature_dim"], f["kind"]),
        dataset=attrs["dataset"]["name"],
    )


# -- pack ------------------------------------------------------------------------------------------------


def test_pack_is_one_stored_zip_readable_by_combo_and_plain_zarr(store, tmp_path):
    target = tmp_path / "clip-vtab.zarr.zip"
    before = snapshot(store)
    cli("ls", str(store.parent.parent))
    cli("info", str(store))
    cli("validate", str(store))
    cli("pack", str(store), str(target))
    assert snapshot(store) == before  # listing, reading, validating and packing wrote nothing
    with zipfile.ZipFile(target) as archive:
        infos = archive.infolist()
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert "zarr.json" in [i.filename for i in infos] and not any(i.filename.startswith(".") or "/." in i.filename for i in infos)
    packed = open_store(target)
    same_values(open_store(store), packed)
    plain = zarr.open_group(zarr.storage.ZipStore(target, mode="r"), mode="r")
    np.testing.assert_array_equal(plain["flowers/tokens"][:], open_store(store).task("flowers").read(slice(None)))
    assert validate_store(target).ok
    assert "already exists" in cli("pack", str(store), str(target), code=2).output
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    cli("pack", str(store), str(target), "--overwrite")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest  # same store, same bytes
    assert "must be a local file name ending in .zip" in cli("pack", str(store), str(tmp_path / "x.tar"), code=2).output
    # the zip can be a source for a copy as well
    assert copy_store(str(target), str(tmp_path / "unpacked")).copied == ALL


def test_flags_are_written_after_the_data_they_vouch_for(store, tmp_path, monkeypatch):
    contents = store_objects(resolve(store))
    keys = [o.key for o in contents.objects]
    assert len(keys) == ALL and keys[-2:] == ["zarr.json", "manifest.json"]
    assert not any(k.split("/")[-1].startswith(".") for k in keys)  # no lock file, no journal
    real_copy = transfer.copy_object
    finished: list[str] = []

    def slow_data(source, destination, obj):
        if obj.kind == "shard":
            time.sleep(0.05)  # with 8 workers, anything not held back by the copy order would overtake
        nbytes = real_copy(source, destination, obj)
        finished.append(obj.key)
        return nbytes

    monkeypatch.setattr(transfer, "copy_object", slow_data)
    copy_store(str(store), str(tmp_path / "copy.zarr"), workers=8)
    assert sorted(finished) == sorted(keys) and finished[-2:] == ["zarr.json", "manifest.json"]
    for task in ("dtd", "flowers"):
        flag = finished.index(f"{task}/zarr.json")
        assert all(finished.index(k) < flag for k in keys if k.startswith(f"{task}/") and k != f"{task}/zarr.json")


# -- probing straight from remote stores ---------------------------------------------------------------


def learnable_store(path: Path) -> Path:
    """Three classes whose tokens sit around different centres, so a few steps learn something."""
    rng = np.random.default_rng(3)
    n, classes = 48, 3
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, D)).astype(np.float32)
    tokens = centres[labels][:, None, None, :] + 0.8 * rng.normal(size=(n, L, GRID[0] * GRID[1], D))
    return write_store(path, tokens=tokens.astype(np.float32), labels=labels, splits=vtab_like_splits(24, 8, 16),
                       grid=GRID, task="dtd", alias="clip", dataset="vtab", num_classes=classes)


def test_probe_from_s3_and_http_matches_local_copy(s3, http_root, tmp_path, monkeypatch):
    from probe.run import ProbeConfig, run_probe

    local = learnable_store(http_root.folder / "stores" / "clip" / "vtab.zarr")
    bucket = s3.make_bucket("team-probe")
    url = f"{bucket}/stores/clip/vtab.zarr"
    copy_store(str(local), url, storage_options=s3.options)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ENV)
    clear_s3fs_cache()
    sources = {"local": (str(local), None), "s3": (url, s3.options),
               "http": (f"{http_root.url}/stores/clip/vtab.zarr", None)}
    results = {}
    try:
        for cache, budget in (("ram", 2**30), ("stream", 8 * 1024)):  # stream: shuffle windows read while training
            for name, (ref, options) in sources.items():
                cfg = ProbeConfig(stores=(ref,), tasks=("dtd",), protocol="final", steps=12, batch_size=8, grid=GRID,
                                  width=16, depth=1, num_heads=1, device="cpu", out=str(tmp_path / "runs" / name),
                                  storage_options=options, cache=cache, cache_budget=budget, seed=7)
                run = run_probe(cfg)
                assert run.metrics[0]["cache"] == cache
                results[cache, name] = (run.metrics[0]["accuracy"], run.fits[0].predictions.tolist(),
                                        run.fits[0].history["loss"])
    finally:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        clear_s3fs_cache()
    for cache in ("ram", "stream"):
        assert results[cache, "s3"] == results[cache, "local"] == results[cache, "http"], cache
    assert results["ram", "local"][0] > 1 / 3  # it learned something, so equal accuracies mean something
    written = [p.read_bytes().decode("latin-1") for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert written and not any(SECRET_ENV in text for text in written)
