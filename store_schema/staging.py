"""Writing a remote store (s3://, any writable fsspec URL) through a staging folder on the writer's machine.

The writer's machinery (the lock, the journal, fsync, the manifest) works on a local folder. For a remote
store that folder is a *staging* copy on the client that holds everything except the shards:

- each shard is uploaded as one object as soon as it is written and hashed (an object put is atomic, and on
  S3 the object carries its sha256 as `x-amz-meta-sha256`), then deleted locally, so the client's disk holds
  only the shards in flight (two at most per writer); a worker of a cluster does the same from a temporary
  folder of its own, knowing only the store's URL;
- the small objects (zarr.json documents, coordinates, samples.parquet, the manifest) are *mirrored* after
  each step in the order readers rely on: a task's objects, its zarr.json (the `complete` flag), the root
  zarr.json, manifest.json last. What was uploaded is recorded in the staging folder (`.mirrored.json`),
  so a mirror uploads only what changed;
- the journal stays on the client. A client killed mid-run resumes from its journal when the same command
  runs again on the same machine; journaled shards are re-checked against the store (size from one listing,
  sha256 from the object's metadata where S3 keeps it, else by reading it back);
- the lock is an object in the store itself (`.combo-write.lock`, store_schema/writer/lock.py), so a second
  machine is refused while a writer runs; the staging folder is flocked too.

The remote store is the truth and the staging folder a cache of its metadata: a staging folder whose root
zarr.json is not the remote's (the store was rewritten or extended from elsewhere) is refreshed from the
remote, keeping only the journals. Staging folders live under $COMBO_STAGING, default ~/.cache/combo/staging.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .location import Location, is_hidden, list_sizes, write_file_atomic
from .manifest import MANIFEST_NAME, sha256_bytes

STAGING_ENV = "COMBO_STAGING"
MIRROR_RECORD = ".mirrored.json"  # hidden: never part of the store


def staging_root() -> Path:
    return Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "combo" / "staging").expanduser()


def staging_dir(remote: Location) -> Path:
    """The staging folder of a remote store: named after the store, keyed by its URL and endpoint."""
    where = json.dumps([remote.url, str(remote.storage_options.get("endpoint_url") or "")])
    name = posixpath.basename(remote.root.rstrip("/")) or "store"
    return staging_root() / f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:16]}"


def _mirror_stage(key: str) -> int:
    """Upload order: everything else, then each task's zarr.json, the root zarr.json, the manifest last."""
    if key == MANIFEST_NAME:
        return 3
    if key == "zarr.json":
        return 2
    if key.count("/") == 1 and key.endswith("/zarr.json"):
        return 1
    return 0


def _read_record(staging: Path) -> dict[str, str]:
    try:
        record = json.loads((staging / MIRROR_RECORD).read_text())
        return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(staging: Path, record: dict[str, str]) -> None:
    write_file_atomic(staging / MIRROR_RECORD, json.dumps(record, sort_keys=True).encode())


def local_keys(staging: Path, *, skip: Callable[[str], bool]) -> dict[str, Path]:
    """Store key -> file of every visible object in the staging folder that `skip` does not exclude."""
    out: dict[str, Path] = {}
    if not staging.is_dir():
        return out
    for path in staging.rglob("*"):
        if path.is_file():
            key = path.relative_to(staging).as_posix()
            if not is_hidden(key) and not skip(key):
                out[key] = path
    return out


def mirror(staging: Path, remote: Location, *, skip: Callable[[str], bool]) -> int:
    """Upload the staging folder's objects that changed since the last mirror, in reader order (`skip`:
    the shards, which their writers upload); returns how many were uploaded."""
    record = _read_record(staging)
    files = local_keys(staging, skip=skip)
    uploaded = 0
    try:
        for key in sorted(files, key=lambda k: (_mirror_stage(k), k)):
            data = files[key].read_bytes()
            digest = sha256_bytes(data)
            if record.get(key) == digest:
                continue
            remote.write_bytes(key, data, sha256=digest)
            record[key] = digest
            uploaded += 1
    finally:
        _write_record(staging, record)
    return uploaded


def forget(staging: Path, prefix: str = "") -> None:
    """Drop the mirror record of `prefix` (all when empty): those objects are uploaded again next time."""
    record = _read_record(staging)
    kept = {k: v for k, v in record.items() if prefix and not (k == prefix.rstrip("/") or k.startswith(prefix))}
    if kept != record:
        _write_record(staging, kept)


def delete_remote(remote: Location, prefix: str = "", *, keep: Callable[[str], bool] | None = None) -> None:
    """Remove `prefix` (a task folder "task/", or the whole store when empty) from the remote store, except the
    keys `keep` names (the writer's lock object)."""
    path = remote.key_path(prefix.rstrip("/")) if prefix else remote.root
    try:
        if keep is not None:
            listed = list_sizes(remote, prefix=prefix)
            if listed is not None:
                doomed = [remote.key_path(k) for k in sorted(listed) if not keep(k)]
                if doomed:
                    remote.fs.rm(doomed)
                return
        if remote.fs.exists(path):
            remote.fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def delete_keys(remote: Location, keys: Iterable[str]) -> None:
    for key in keys:
        try:
            remote.fs.rm_file(remote.key_path(key))
        except FileNotFoundError:
            pass


def pull(remote: Location, staging: Path, *, skip: Callable[[str], bool], prefix: str = "") -> int:
    """Copy the remote store's objects (under `prefix`) that `skip` does not exclude into `staging`, and
    record them as mirrored; returns how many. The remote must be listable (S3, GCS, a folder...)."""
    listed = list_sizes(remote, prefix=prefix)
    if listed is None:
        raise OSError(f"{remote.url}: cannot list this location, so it cannot be written through staging")
    keys = sorted(k for k in listed if not is_hidden(k) and not skip(k))
    record = _read_record(staging) if staging.is_dir() else {}
    staging.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        for key, data in zip(keys, pool.map(remote.read_bytes, keys)):
            (staging / key).parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(staging / key, data)
            record[key] = sha256_bytes(data)
    _write_record(staging, record)
    return len(keys)


def reset(staging: Path, *, keep: Callable[[str], bool]) -> None:
    """Empty the staging folder except the hidden files `keep` names (journals, the lock)."""
    if not staging.is_dir():
        return
    for path in sorted(staging.rglob("*"), reverse=True):
        key = path.relative_to(staging).as_posix()
        if path.is_file() and not keep(key):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    (staging / MIRROR_RECORD).unlink(missing_ok=True)


def remote_root_digest(remote: Location) -> str | None:
    """sha256 of the remote's root zarr.json, or None where there is none."""
    try:
        return sha256_bytes(remote.read_bytes("zarr.json"))
    except FileNotFoundError:  # StoreNotFoundError is one
        return None


def recorded_root_digest(staging: Path) -> str | None:
    return _read_record(staging).get("zarr.json")


def shards_intact(remote: Location, entries: dict[str, tuple[str, int | None]], *, prefix: str) -> set[str]:
    """Which journaled shards (key -> (sha256, size)) the remote holds as journaled: one listing of `prefix`
    for presence and size, then the sha256 that S3 keeps with each object (HEADs, in parallel), or the
    object read back and hashed where the store keeps no metadata."""
    listed = list_sizes(remote, prefix=prefix) or {}
    present = [k for k, (_, size) in entries.items() if k in listed and (size is None or listed[k] == size)]

    def same(key: str) -> bool:
        recorded = remote.recorded_sha256(key)
        if recorded is None:
            try:
                recorded = sha256_bytes(remote.read_bytes(key))
            except FileNotFoundError:
                return False
        return recorded == entries[key][0]

    with ThreadPoolExecutor(16) as pool:
        return {k for k, ok in zip(present, pool.map(same, present)) if ok}
