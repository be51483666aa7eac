"""Extraction straight into object storage (`--out s3://...`, store_schema/staging.py), on a moto S3 server:
the same bytes as a local extraction, resumable from the client's journal, on one process or a cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from combo.cli import app
from extract.pipeline import extract
from extractcase import MODEL, ROWS, SIZE, config, data_objects, manifest_objects, reference, vtab  # noqa: F401 - fixtures
from servers import s3  # noqa: F401 - fixture
from store_schema import open_store, validate_store
from store_schema.staging import STAGING_ENV, staging_dir
from store_schema.location import resolve
from store_schema.writer import TaskWriter, is_row_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "staging"
    monkeypatch.setenv(STAGING_ENV, str(folder))
    return folder


@pytest.fixture
def bucket(s3, request) -> str:  # noqa: F811 - the s3 fixture
    name = "ext-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3.boto().create_bucket(Bucket=name)
    return name


def remote_keys(s3, bucket: str, prefix: str) -> dict[str, int]:  # noqa: F811
    pages = s3.boto().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


def remote_manifest(s3, bucket: str, prefix: str) -> dict:  # noqa: F811
    return json.loads(s3.boto().get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())


def test_cli_extract_to_s3_equals_the_local_store(vtab, reference, s3, bucket, staging):  # noqa: F811
    result = CliRunner().invoke(app, ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(vtab),
                                      "--out", f"s3://{bucket}/stores", "--image-size", str(SIZE), "--batch-size", "8",
                                      "--rows-per-shard", str(ROWS), "--num-workers", "0", *s3.cli_options()])
    assert result.exit_code == 0, result.output
    url = f"s3://{bucket}/stores/{MODEL}/vtab.zarr"
    assert url in result.output.replace("\n", "")
    prefix = f"stores/{MODEL}/vtab.zarr/"
    manifest = remote_manifest(s3, bucket, prefix)
    assert manifest_objects(manifest) == data_objects(reference)  # every shard and the sample table, byte for byte
    # exactly the store's objects went up: no journal, lock or mirror record, nothing half-written
    assert set(remote_keys(s3, bucket, prefix)) == set(manifest["objects"]) | {"manifest.json"}
    report = validate_store(url, storage_options=s3.options, checksums="all")
    assert report.ok, report.problems
    task = open_store(url, storage_options=s3.options).task("eurosat")
    assert task.complete and (task.read(slice(0, 20)) == open_store(reference).task("eurosat").read(slice(0, 20))).all()
    # the client kept the metadata only: no shard, no journal (the task is complete)
    folder = staging_dir(resolve(url, storage_options=s3.options))
    kept = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert kept and not [k for k in kept if is_row_shard(k) or k.endswith(".journal.jsonl")]


def test_interrupted_remote_extraction_resumes_from_the_clients_journal(vtab, reference, s3, bucket, staging,  # noqa: F811
                                                                        monkeypatch):
    cfg = config(vtab, f"s3://{bucket}/out", storage_options=s3.options)
    prefix = f"out/{MODEL}/vtab.zarr/"
    record = TaskWriter.record
    calls = []

    def dies_after_five(self, entry):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the client stops mid-task (Ctrl-C); its journal holds 5 shards
        calls.append(entry["block"])
        record(self, entry)

    monkeypatch.setattr(TaskWriter, "record", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg)
    monkeypatch.setattr(TaskWriter, "record", record)
    listed = remote_keys(s3, bucket, prefix)
    assert "manifest.json" not in listed or "eurosat/zarr.json" not in manifest_objects(remote_manifest(s3, bucket, prefix))
    doc = json.loads(s3.boto().get_object(Bucket=bucket, Key=prefix + "eurosat/zarr.json")["Body"].read())
    assert doc["attributes"]["combo_task"]["complete"] is False  # readers see an unfinished task
    shards = sorted(k for k in listed if k.startswith("eurosat/tokens/c/"))
    assert len(shards) >= 5
    # one journaled shard lost on the way (deleted from the bucket): it is found missing and written again
    s3.boto().delete_object(Bucket=bucket, Key=prefix + shards[0])

    result = extract(cfg)
    assert result.tasks[0].status == "resumed"
    assert result.tasks[0].images == 95 - 4 * ROWS  # 5 journaled, one of them lost: 4 shards kept
    manifest = remote_manifest(s3, bucket, prefix)
    assert manifest_objects(manifest) == data_objects(reference)
    assert validate_store(f"s3://{bucket}/{prefix}", storage_options=s3.options, checksums="all").ok


def test_a_lost_staging_folder_is_rebuilt_from_the_remote_store(vtab, s3, bucket, staging):  # noqa: F811
    cfg = config(vtab, f"s3://{bucket}/out", storage_options=s3.options)
    extract(cfg)
    prefix = f"out/{MODEL}/vtab.zarr/"
    before = remote_keys(s3, bucket, prefix)
    shutil.rmtree(staging)  # another machine, or a cleared cache
    result = extract(cfg)
    assert [t.status for t in result.tasks] == ["already complete"] and result.images == 0
    assert remote_keys(s3, bucket, prefix) == before


def test_overwrite_of_a_remote_task_removes_its_old_objects(vtab, s3, bucket, staging):  # noqa: F811
    cfg = config(vtab, f"s3://{bucket}/out", storage_options=s3.options)
    extract(cfg)
    prefix = f"out/{MODEL}/vtab.zarr/"
    s3.boto().put_object(Bucket=bucket, Key=prefix + "eurosat/tokens/c/99/0/0/0", Body=b"stale")
    result = extract(config(vtab, f"s3://{bucket}/out", storage_options=s3.options, overwrite=True))
    assert result.tasks[0].status == "extracted" and result.tasks[0].images == 95
    keys = remote_keys(s3, bucket, prefix)
    assert "eurosat/tokens/c/99/0/0/0" not in keys
    assert set(keys) == set(remote_manifest(s3, bucket, prefix)["objects"]) | {"manifest.json"}


def test_a_web_server_is_not_a_place_to_extract_to(vtab, staging, tmp_path):
    result = CliRunner().invoke(app, ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(vtab),
                                      "--out", "http://127.0.0.1:9/stores", "--image-size", str(SIZE)])
    assert result.exit_code == 2, result.output
    assert "a plain web server cannot be written to" in result.output and "Traceback" not in result.output


def test_cluster_extraction_to_s3_equals_the_local_store(vtab, reference, s3, bucket, staging):  # noqa: F811
    """Two worker processes upload their own shards (no disk shared with the client)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as local, distributed.Client(local, set_as_default=False) as client:
        result = extract(config(vtab, f"s3://{bucket}/dask", storage_options=s3.options), client=client)
    assert result.tasks[0].status == "extracted" and result.tasks[0].images == 95
    prefix = f"dask/{MODEL}/vtab.zarr/"
    manifest = remote_manifest(s3, bucket, prefix)
    assert manifest_objects(manifest) == data_objects(reference)
    assert set(remote_keys(s3, bucket, prefix)) == set(manifest["objects"]) | {"manifest.json"}
    assert validate_store(result.store, storage_options=s3.options, checksums="all").ok


def test_killed_while_publishing_a_finished_task_the_next_run_completes_it(vtab, reference, s3, bucket, staging,  # noqa: F811
                                                                          monkeypatch):
    """The client dies after the task's `complete` flag and the root zarr.json went up but before the manifest
    (and before it could note what it uploaded): the next run takes the remote's metadata, rebuilds the manifest
    from the journal it kept, and finishes the store without extracting anything again."""
    import store_schema.staging as staging_module
    from store_schema.location import Location

    cfg = config(vtab, f"s3://{bucket}/out", storage_options=s3.options)
    prefix = f"out/{MODEL}/vtab.zarr/"
    write_bytes = Location.write_bytes
    state = {"complete": False}

    def dies_before_the_manifest(self, key, data, **kw):
        if key == "eurosat/zarr.json" and b'"complete": true' in data:
            state["complete"] = True
        if key == "manifest.json" and state["complete"]:
            raise KeyboardInterrupt
        return write_bytes(self, key, data, **kw)

    monkeypatch.setattr(Location, "write_bytes", dies_before_the_manifest)
    monkeypatch.setattr(staging_module, "_write_record", lambda *a, **k: None)  # as if killed: nothing noted
    with pytest.raises(KeyboardInterrupt):
        extract(cfg)
    monkeypatch.undo()
    monkeypatch.setenv(STAGING_ENV, str(staging))
    assert state["complete"]
    result = extract(cfg)
    assert [t.status for t in result.tasks] == ["already complete"] and result.images == 0
    manifest = remote_manifest(s3, bucket, prefix)
    assert manifest_objects(manifest) == data_objects(reference)
    assert validate_store(f"s3://{bucket}/{prefix}", storage_options=s3.options, checksums="all").ok
