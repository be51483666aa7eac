"""One writer per store, across machines (store_schema/writer/lock.py), on a moto S3 server.

Two "machines" are two processes with staging folders of their own ($COMBO_STAGING), as two clients of one
bucket would be: only the lock object in the store can keep them apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from combo.cli import app
from extractcase import MODEL, ROWS, SIZE, data_objects, manifest_objects, reference, vtab  # noqa: F401 - fixtures
from servers import s3  # noqa: F401 - fixture
from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, StoreLayout, StoreLockedError, StoreWriter
from store_schema import open_store, validate_store
from store_schema.errors import StoreError
from store_schema.staging import STAGING_ENV
from store_schema.writer import LOCK_NAME
from store_schema.writer.lock import HEARTBEAT_ENV, STALE_ENV, LockPolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESTS = Path(__file__).resolve().parent

# A client that extracts into the store and stops after its first journaled shard until told to go on (or is
# killed there): a writer caught in the middle of a run.
PAUSED_WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # the reference store is written with one thread (bit-identical floats)
from extractcase import config
from extract.pipeline import extract
from store_schema.writer import TaskWriter
root, url, endpoint, flags = sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
record = TaskWriter.record
def paused(self, entry):
    record(self, entry)
    if not (flags / "paused").exists():
        (flags / "paused").write_text("1")
        while not (flags / "go").exists():
            time.sleep(0.05)
TaskWriter.record = paused
extract(config(root, url, storage_options={"endpoint_url": endpoint}))
"""


@pytest.fixture
def bucket(s3, request) -> str:  # noqa: F811 - the s3 fixture
    name = "lock-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3.boto().create_bucket(Bucket=name)
    return name


def start_paused_writer(vtab, url: str, s3, staging: Path, flags: Path, **env: str) -> subprocess.Popen:  # noqa: F811
    """Another machine's `combo extract`, paused once it holds the lock and has journaled a shard."""
    flags.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, str(TESTS), str(vtab), url, s3.endpoint, str(flags)],
                            env={**os.environ, STAGING_ENV: str(staging), **env}, cwd=flags,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (flags / "paused").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the first writer did not get going: {proc.communicate()[0][-3000:]}")
        time.sleep(0.1)
    return proc


def lock_doc(s3, bucket: str, prefix: str) -> tuple[dict, str]:  # noqa: F811
    obj = s3.boto().get_object(Bucket=bucket, Key=prefix + LOCK_NAME)
    return json.loads(obj["Body"].read()), obj["ETag"]


def has_lock(s3, bucket: str, prefix: str) -> bool:  # noqa: F811
    listed = s3.boto().list_objects_v2(Bucket=bucket, Prefix=prefix + LOCK_NAME).get("Contents", [])
    return bool(listed)


def extract_cli(vtab, out: str, s3, *extra: str):  # noqa: F811
    return CliRunner().invoke(app, ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(vtab),
                                    "--out", out, "--image-size", str(SIZE), "--batch-size", "8", "--rows-per-shard",
                                    str(ROWS), "--num-workers", "0", *s3.cli_options(), *extra])


def test_a_second_machine_is_refused_while_the_first_writes(vtab, reference, s3, bucket, tmp_path,  # noqa: F811
                                                           monkeypatch):
    out = f"s3://{bucket}/team"
    prefix = f"team/{MODEL}/vtab.zarr/"
    first = start_paused_writer(vtab, out, s3, tmp_path / "staging-a", tmp_path / "flags")
    try:
        holder, _ = lock_doc(s3, bucket, prefix)
        assert holder["pid"] == first.pid and holder["host"] == os.uname().nodename and len(holder["token"]) == 32
        before = {k: v for k, v in s3.objects(bucket).items() if not k.endswith(LOCK_NAME)}
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging-b"))  # the second machine's own staging folder
        import extract.pipeline

        def no_model(*a, **k):
            raise AssertionError("the refused run loaded its model first")

        monkeypatch.setattr(extract.pipeline, "load_backbone", no_model)  # refused before the slow part
        second = extract_cli(vtab, out, s3)
        assert second.exit_code == 2, second.output
        message = " ".join(second.output.split())
        assert f"is being written by pid {first.pid} on host {os.uname().nodename}" in message
        assert "heartbeat is " in message and " s old" in message and "--break-lock" in message
        assert "Traceback" not in second.output
        # the refused writer touched nothing of the first's
        assert {k: v for k, v in s3.objects(bucket).items() if not k.endswith(LOCK_NAME)} == before
        assert lock_doc(s3, bucket, prefix)[0]["token"] == holder["token"]
    finally:
        (tmp_path / "flags" / "go").write_text("1")
        output = first.communicate(timeout=180)[0]
    assert first.returncode == 0, output[-3000:]
    manifest = json.loads(s3.boto().get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert manifest_objects(manifest) == data_objects(reference)  # the first writer's store, whole
    assert validate_store(f"s3://{bucket}/{prefix}", storage_options=s3.options, checksums="all").ok
    assert not has_lock(s3, bucket, prefix)  # removed at the end of the run


def test_a_killed_writers_lock_is_broken_with_break_lock(vtab, reference, s3, bucket, tmp_path, monkeypatch):  # noqa: F811
    out = f"s3://{bucket}/team"
    prefix = f"team/{MODEL}/vtab.zarr/"
    staging = tmp_path / "staging"
    first = start_paused_writer(vtab, out, s3, staging, tmp_path / "flags")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -9
    assert lock_doc(s3, bucket, prefix)[0]["pid"] == first.pid  # SIGKILL: nothing could remove it
    monkeypatch.setenv(STAGING_ENV, str(staging))  # the same machine runs the same command again
    monkeypatch.setenv(STALE_ENV, "3600")  # far from stale: only --break-lock can take it
    again = extract_cli(vtab, out, s3)
    assert again.exit_code == 2 and f"is being written by pid {first.pid}" in " ".join(again.output.split())
    broken = extract_cli(vtab, out, s3, "--break-lock")
    assert broken.exit_code == 0, broken.output
    text = " ".join(broken.output.split())
    assert "took over the write lock" in text and f"from pid {first.pid}" in text and "--break-lock)" in text
    assert "resumed" in text
    manifest = json.loads(s3.boto().get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert manifest_objects(manifest) == data_objects(reference)
    assert not has_lock(s3, bucket, prefix)


def test_a_killed_writers_lock_is_taken_over_once_stale(vtab, reference, s3, bucket, tmp_path, monkeypatch):  # noqa: F811
    out = f"s3://{bucket}/team"
    prefix = f"team/{MODEL}/vtab.zarr/"
    store = f"{out}/{MODEL}/vtab.zarr"
    first = start_paused_writer(vtab, out, s3, tmp_path / "staging-a", tmp_path / "flags",
                                **{HEARTBEAT_ENV: "0.3", STALE_ENV: "1"})
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    killed_at = time.monotonic()
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging-b"))  # another machine
    monkeypatch.setenv(HEARTBEAT_ENV, "0.3")
    monkeypatch.setenv(STALE_ENV, "2")
    with pytest.raises(StoreLockedError, match=f"being written by pid {first.pid} .*--break-lock"):
        StoreWriter(store, tiny_info(), StoreLayout(), storage_options=s3.options)  # not stale yet: refused
    assert time.monotonic() - killed_at < 2  # (so that refusal was of a fresh lock)
    time.sleep(max(0.0, killed_at + 3.2 - time.monotonic()))  # the heartbeat is now more than 2 s old
    taken = extract_cli(vtab, out, s3)
    assert taken.exit_code == 0, taken.output
    text = " ".join(taken.output.split())
    assert "took over the write lock" in text and f"from pid {first.pid}" in text and "stale: older than 2 s" in text
    manifest = json.loads(s3.boto().get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert manifest_objects(manifest) == data_objects(reference)  # another machine: the task started over
    assert not has_lock(s3, bucket, prefix)


# -- in-process: the lock object's life --------------------------------------------------------------------


def tiny_info(dim: int = 8) -> StoreInfo:
    return StoreInfo(backbone=BackboneInfo("m", "vit_x", None, "random-init", None, 0),
                     preprocessing=Preprocessing(32, (0.5,) * 3, (0.5,) * 3),
                     features=FeatureInfo((2, 3), 0, (0, 1), dim), dataset="d")


def test_the_heartbeat_advances_and_the_lock_goes_at_the_end(s3, bucket, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    url = f"s3://{bucket}/one.zarr"
    policy = LockPolicy(heartbeat_s=0.2, stale_after_s=1.0)
    with StoreWriter(url, tiny_info(), StoreLayout(), storage_options=s3.options, lock_policy=policy):
        first, etag = lock_doc(s3, bucket, "one.zarr/")
        assert {"host", "pid", "user", "token", "started", "heartbeat", "heartbeat_s"} <= set(first)
        assert first["pid"] == os.getpid() and first["heartbeat_s"] == 0.2
        deadline = time.monotonic() + 5
        while (now := lock_doc(s3, bucket, "one.zarr/"))[0]["heartbeat"] == first["heartbeat"]:
            assert time.monotonic() < deadline, "the heartbeat was never refreshed"
            time.sleep(0.05)
        assert now[0]["heartbeat"] > first["heartbeat"] and now[1] != etag
        assert (now[0]["token"], now[0]["started"]) == (first["token"], first["started"])  # the same owner
        assert validate_store(url, storage_options=s3.options).ok  # readers never see the lock as part of the store
    assert not has_lock(s3, bucket, "one.zarr/")


def test_a_writer_whose_lock_was_broken_stops_and_leaves_the_new_lock(s3, bucket, tmp_path, monkeypatch):  # noqa: F811
    url = f"s3://{bucket}/two.zarr"
    policy = LockPolicy(heartbeat_s=0.2, stale_after_s=1.0)
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "a"))
    old = StoreWriter(url, tiny_info(), StoreLayout(), storage_options=s3.options, lock_policy=policy)
    try:
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / "b"))
        with pytest.raises(StoreLockedError, match="is being written by pid"):
            StoreWriter(url, tiny_info(), StoreLayout(), storage_options=s3.options, lock_policy=policy)
        # --break-lock on a store with other settings: the whole store is rewritten, the new lock kept
        new = StoreWriter(url, tiny_info(dim=16), StoreLayout(), storage_options=s3.options, lock_policy=policy,
                          overwrite=True, break_lock=True)
        token = lock_doc(s3, bucket, "two.zarr/")[0]["token"]
        assert [n for n in new.lock_notes() if f"from pid {os.getpid()}" in n and n.endswith("--break-lock)")]
        with pytest.raises(StoreLockedError, match="lock was taken over by pid"):
            old.sync()  # the old writer publishes nothing more
        old.close()
        assert lock_doc(s3, bucket, "two.zarr/")[0]["token"] == token  # not removed by the writer it no longer is
        new.publish()
        new.close()
    finally:
        old.close()
    assert not has_lock(s3, bucket, "two.zarr/")
    assert open_store(url, storage_options=s3.options).attrs["features"]["feature_dim"] == 16


def test_without_conditional_writes_the_lock_is_best_effort_but_refuses(tmp_path, monkeypatch):
    """A protocol with no atomic create (here fsspec's memory://): the same record, refusal and removal."""
    import fsspec

    url = f"memory://lock-{tmp_path.name}/s.zarr"
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "a"))
    with StoreWriter(url, tiny_info(), StoreLayout()) as writer:
        holder = json.loads(fsspec.filesystem("memory").cat_file(f"/lock-{tmp_path.name}/s.zarr/{LOCK_NAME}"))
        assert holder["pid"] == os.getpid()
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / "b"))
        with pytest.raises(StoreLockedError, match=r"is being written by pid \d+ on host .*heartbeat is \d+ s old"):
            StoreWriter(url, tiny_info(), StoreLayout())
        assert writer.lock_notes() and "best effort" in writer.lock_notes()[0]
    assert not fsspec.filesystem("memory").exists(f"/lock-{tmp_path.name}/s.zarr/{LOCK_NAME}")
    with StoreWriter(url, tiny_info(), StoreLayout()):
        pass


def test_local_lock_names_its_holder_and_bad_lock_settings_are_refused(tmp_path, monkeypatch):
    with StoreWriter(tmp_path / "s.zarr", tiny_info(), StoreLayout()):
        holder = json.loads((tmp_path / "s.zarr" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == os.uname().nodename
        with pytest.raises(StoreLockedError, match=f"being written by pid {os.getpid()} on host {os.uname().nodename}"):
            StoreWriter(tmp_path / "s.zarr", tiny_info(), StoreLayout(), break_lock=True)  # a live flock stays
    assert not (tmp_path / "s.zarr" / LOCK_NAME).exists()
    with pytest.raises(StoreError, match="at least 3 heartbeats"):
        LockPolicy(heartbeat_s=30, stale_after_s=60)
    monkeypatch.setenv(STALE_ENV, "ten minutes")
    with pytest.raises(StoreError, match=STALE_ENV):
        LockPolicy.from_env()


def test_an_s3_server_without_conditional_writes_gets_the_best_effort_lock(s3, bucket, tmp_path, monkeypatch):  # noqa: F811
    from store_schema.writer import lock

    def refuses(self, data):
        raise lock.ConditionalWritesUnsupported("NotImplemented: If-None-Match")  # as an older MinIO answers

    monkeypatch.setattr(lock.S3LockObjects, "create", refuses)
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "a"))
    url = f"s3://{bucket}/old-server.zarr"
    with StoreWriter(url, tiny_info(), StoreLayout(), storage_options=s3.options) as writer:
        assert any("best effort" in n for n in writer.lock_notes())
        assert lock_doc(s3, bucket, "old-server.zarr/")[0]["pid"] == os.getpid()
        monkeypatch.setenv(STAGING_ENV, str(tmp_path / "b"))
        with pytest.raises(StoreLockedError, match="is being written by pid"):
            StoreWriter(url, tiny_info(), StoreLayout(), storage_options=s3.options)
    assert not has_lock(s3, bucket, "old-server.zarr/")


def test_a_push_is_refused_while_another_machine_writes_the_destination(reference, s3, bucket, tmp_path):  # noqa: F811
    """`combo store push` (and pull) is a writer too: it takes the destination's lock, so it cannot copy into a
    store a teammate is writing, and leaves no lock behind."""
    from store_schema.location import resolve
    from store_schema.transfer import copy_store
    from store_schema.writer.lock import Owner, RemoteLock

    url = f"s3://{bucket}/team/eurosat.zarr"
    other = RemoteLock(resolve(url, storage_options=s3.options), Owner(LockPolicy(heartbeat_s=60)),
                       LockPolicy(heartbeat_s=60), where=url).acquire()  # another machine's writer
    try:
        with pytest.raises(StoreLockedError, match=r"is being written by pid \d+ on host .*--break-lock"):
            copy_store(str(reference), url, storage_options=s3.options)
        assert set(s3.objects(bucket)) == {"team/eurosat.zarr/" + LOCK_NAME}  # nothing copied
        result = CliRunner().invoke(app, ["store", "push", str(reference), url, *s3.cli_options()])
        assert result.exit_code == 2 and "is being written by" in " ".join(result.output.split())
    finally:
        other.release()
    assert copy_store(str(reference), url, storage_options=s3.options).report.ok
    assert not has_lock(s3, bucket, "team/eurosat.zarr/")  # released at the end
    local = tmp_path / "copy.zarr"
    writer = StoreWriter(local, StoreInfo.from_attrs(open_store(reference).attrs), StoreLayout(rows_per_shard=ROWS))
    try:
        with pytest.raises(StoreLockedError, match="is being written by"):
            copy_store(url, str(local), storage_options=s3.options)
    finally:
        writer.close()
