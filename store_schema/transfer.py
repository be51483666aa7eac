"""Copying a store between locations (push / pull): object by object, verified, resumable.

The keys come from the store's own metadata (format 2: manifest.json lists every object with
its size and sha256; format 1: each task's checksums.json lists the shards), so a plain web
server that lists nothing can be a source. An object already at the destination is skipped
without downloading it: same size in the listing, and the same sha256 in the destination's
manifest, in the object's S3 metadata, or (local disk) hashed in place. That is what makes a
rerun of an interrupted copy resume, and a push of an identical store transfer no object body.
The order protects readers of a half-copied store: shards and array metadata first, then each
task's zarr.json (it carries the `complete` flag), the root zarr.json, and the manifest last;
a destination manifest that differs from the source's goes first, so the destination never
passes for a store before everything it lists is there. Nothing is ever written to the source.
The default check afterwards reads back only what this copy wrote.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import StoreError, StoreIncompleteError, StoreMismatchError, StoreNotFoundError, StoreValidationError
from .location import Location, can_list, is_hidden, is_url, list_sizes, redact, resolve, store_path
from .manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_bytes
from .metadata import TASK_ATTR, format_major, identity_diff
from .reader import _load_json, check_root_attrs, task_document
from .validate import ValidationReport, validate_store
from .writer import CHECKSUMS_NAME, PREFIX, SAMPLES_NAME, TOKENS
from .writer.keys import is_row_array
from .writer.lock import WriteLock

SHARD, META, EXTRA = "shard", "meta", "extra"
VERIFY_MODES = ("written", "all", "sample", "none")
ROOT_KEY = "zarr.json"
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class StoreObject:
    """One object (file) of a store."""

    key: str
    kind: str  # "shard" | "meta" | "extra" (a file the metadata does not name; only seen by listing)
    stage: int  # copy order: 0 data and array metadata, 1 task zarr.json, 2 root zarr.json, 3 manifest.json
    sha256: str | None = None  # the recorded checksum (shards)
    size: int | None = None  # from a listing, when the location can be listed


@dataclass(frozen=True)
class StoreContents:
    """What a store consists of, read from its metadata (and its listing where there is one)."""

    location: Location
    attrs: dict[str, Any]
    objects: tuple[StoreObject, ...]

    @property
    def total_bytes(self) -> int | None:
        sizes = [o.size for o in self.objects]
        return None if any(s is None for s in sizes) else int(sum(sizes))  # type: ignore[arg-type]


class TransferProgress:
    """Callbacks for a progress display; the default shows nothing. Called from the calling thread."""

    def start(self, total_objects: int, total_bytes: int | None) -> None:
        pass

    def advance(self, key: str, nbytes: int, *, copied: bool) -> None:
        pass


@dataclass
class TransferResult:
    source: str
    destination: str
    objects: int = 0
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0  # copying only, without the final validation
    verify: str = "written"
    verify_seconds: float = 0.0
    verified: int = 0  # objects read back and hashed by the final check
    report: ValidationReport | None = field(default=None, repr=False)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_copied / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "objects": self.objects,
            "copied": self.copied,
            "skipped": self.skipped,
            "bytes_copied": self.bytes_copied,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.mb_per_s, 2),
            "verify": self.verify,
            "verified": self.verified,
            "valid": bool(self.report.ok) if self.report is not None else None,
        }


# -- listing ------------------------------------------------------------------------------------


def refresh(location: Location) -> Location:
    """Drop cached listings (s3fs caches them per process) so what we see is what is there now."""
    try:
        location.fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - a filesystem without a cache
        pass
    return location


def read_root_attrs(location: Location) -> dict[str, Any]:
    """The checked `combo` root attribute; refuses non-stores and newer schema versions."""
    return check_root_attrs(location, _load_root_doc(location))


def _block_order(local_key: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in local_key.split("/"))


def store_objects(location: Location) -> StoreContents:
    """Every object of a complete store, in copy order (manifest last, after the root zarr.json).

    Refuses an incomplete task: a half-extracted store is not something to hand over.
    """
    doc = _load_root_doc(location)
    attrs = check_root_attrs(location, doc)
    if format_major(attrs) >= 2:
        return _store_objects_v2(location, doc, attrs)
    return _store_objects_v1(location, attrs)


def _load_root_doc(location: Location) -> dict[str, Any]:
    try:
        return _load_json(location, ROOT_KEY)
    except StoreNotFoundError:
        raise StoreNotFoundError(f"no feature store at {redact(location.url)} (no zarr.json)") from None


def _refuse_incomplete(location: Location, task: str, task_attrs: Any) -> None:
    url = redact(location.url)
    if not isinstance(task_attrs, dict):
        raise StoreError(f"{url}/{task}: task group has no '{TASK_ATTR}' attribute")
    if not task_attrs.get("complete"):
        raise StoreIncompleteError(
            f"task {task} of {url} is incomplete (extraction interrupted or still running); "
            "finish it with the same `combo extract` command before copying the store"
        )


def _store_objects_v2(location: Location, doc: dict[str, Any], attrs: dict[str, Any]) -> StoreContents:
    """Format 2: the manifest names every object with its size and sha256; no listing needed."""
    url = redact(location.url)
    tasks = [str(t) for t in attrs.get("tasks") or []]
    for task in tasks:
        task_doc = task_document(location, doc, task)
        _refuse_incomplete(location, task, (task_doc.get("attributes") or {}).get(TASK_ATTR))
    manifest = load_manifest(location, format_major=2)
    unlisted = [t for t in tasks if not manifest.for_task(t)]
    if unlisted:
        raise StoreIncompleteError(
            f"task {unlisted[0]} of {url} is not in its {MANIFEST_NAME} (its writer was killed while finishing it); "
            "rerun the same `combo extract` command to complete it before copying the store"
        )
    objects: list[StoreObject] = []
    for key, entry in sorted(manifest.objects.items(), key=lambda kv: _block_order(kv[0])):
        parts = key.split("/")
        stage = 2 if key == ROOT_KEY else 1 if len(parts) == 2 and parts[1] == ROOT_KEY else 0
        kind = SHARD if "/c/" in key and is_row_array(parts[1]) else META  # every grid group's arrays too
        objects.append(StoreObject(key, kind, stage, entry.sha256, entry.size))
    raw = location.read_bytes(MANIFEST_NAME)
    objects.append(StoreObject(MANIFEST_NAME, META, 3, sha256_bytes(raw), len(raw)))
    return _checked_contents(location, attrs, objects, list_sizes(location), "its manifest lists")


def _store_objects_v1(location: Location, attrs: dict[str, Any]) -> StoreContents:
    """Format 1: shards from each task's checksums.json, the rest by name (and listing)."""
    sizes = list_sizes(location)
    url = redact(location.url)
    arrays = [TOKENS] + ([PREFIX] if int((attrs.get("features") or {}).get("num_prefix_tokens") or 0) else [])
    objects: list[StoreObject] = []

    def add(key: str, kind: str, stage: int, sha256: str | None = None) -> None:
        objects.append(StoreObject(key, kind, stage, sha256, None if sizes is None else sizes.get(key)))

    for task in attrs.get("tasks") or []:
        task_doc = _load_json(location, f"{task}/zarr.json")
        _refuse_incomplete(location, task, (task_doc.get("attributes") or {}).get(TASK_ATTR))
        manifest = _load_json(location, f"{task}/{CHECKSUMS_NAME}").get("arrays")
        if not isinstance(manifest, dict):
            raise StoreError(f"{url}/{task}/{CHECKSUMS_NAME} has no 'arrays' section")
        for array in sorted(set(arrays) | set(manifest)):
            for local_key, digest in sorted((manifest.get(array) or {}).items(), key=lambda kv: _block_order(kv[0])):
                add(f"{task}/{array}/{local_key}", SHARD, 0, str(digest))
            add(f"{task}/{array}/zarr.json", META, 0)
        add(f"{task}/{SAMPLES_NAME}", META, 0)
        add(f"{task}/{CHECKSUMS_NAME}", META, 0)
        add(f"{task}/zarr.json", META, 1)
    if sizes is not None:
        named = {o.key for o in objects} | {ROOT_KEY}
        for key in sorted(sizes):
            if key not in named and not is_hidden(key):
                add(key, EXTRA, 0)
    add(ROOT_KEY, META, 2)
    return _checked_contents(location, attrs, objects, sizes, "its metadata lists")


def _checked_contents(location: Location, attrs: dict[str, Any], objects: list[StoreObject],
                      sizes: dict[str, int] | None, named_by: str) -> StoreContents:
    """The contents, refused when a listing shows an object they name is not there."""
    if sizes is not None:
        missing = [o.key for o in objects if o.key not in sizes]
        if missing:
            url = redact(location.url)
            raise StoreError(
                f"store {url} lacks {len(missing)} object(s) {named_by} (first: {missing[0]}); "
                f"run `combo store validate {url}`"
            )
    return StoreContents(location=location, attrs=attrs, objects=tuple(objects))


# -- copying --------------------------------------------------------------------------------------


def read_verified(source: Location, obj: StoreObject) -> bytes:
    """The object's bytes, refused if they do not match the recorded checksum."""
    try:
        data = source.read_bytes(obj.key)
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 - network / permission errors name the object
        raise StoreError(f"cannot read {obj.key} from {redact(source.url)}: {redact(str(err))}") from err
    if obj.sha256 is not None and sha256_bytes(data) != obj.sha256:
        raise StoreError(
            f"{redact(source.url)}: {obj.key} does not match its recorded checksum (corrupt source); "
            f"not copied. Run `combo store validate {redact(source.url)}`"
        )
    return data


def copy_object(source: Location, destination: Location, obj: StoreObject) -> int:
    """Copy one object, verified against its recorded checksum; returns the bytes written."""
    data = read_verified(source, obj)
    try:
        destination.write_bytes(obj.key, data, sha256=obj.sha256 or sha256_bytes(data))
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 - permission denied, no such bucket, network
        raise StoreError(f"cannot write {obj.key} to {redact(destination.url)}: {redact(str(err))}") from err
    return len(data)


def already_there(source: Location, destination: Location, obj: StoreObject, dest_sizes: dict[str, int] | None,
                  dest_manifest: Manifest | None = None) -> bool:
    """True when the destination holds this object with the right content, found without
    downloading it wherever possible: the listing's size, then the destination manifest's sha256
    (a complete earlier copy), the object's S3 metadata, or a local hash."""
    if dest_sizes is not None:
        if obj.key not in dest_sizes or (obj.size is not None and dest_sizes[obj.key] != obj.size):
            return False
    if obj.sha256 is not None:
        if dest_sizes is not None and dest_manifest is not None:
            recorded = dest_manifest.objects.get(obj.key)
            if recorded is not None and recorded.sha256 == obj.sha256 and recorded.size == dest_sizes[obj.key]:
                return True
        stored = destination.recorded_sha256(obj.key)
        if stored is not None:
            return stored == obj.sha256
    try:
        have = destination.read_bytes(obj.key)
    except (StoreNotFoundError, FileNotFoundError):
        return False
    if obj.sha256 is not None:
        return sha256_bytes(have) == obj.sha256
    return have == read_verified(source, obj)


def destination_for(destination: str, attrs: dict[str, Any], *, storage_options: dict[str, Any] | None = None) -> str:
    """A destination named `*.zarr` (or holding a store) is the store itself; anything else is a store
    root, and the store goes under it as `<root>/<backbone alias>/<dataset>.zarr`."""
    text = str(destination)
    stripped = text.rstrip("/") if not text.endswith("://") else text
    if stripped.endswith(".zarr"):
        return stripped
    if resolve(stripped, storage_options=storage_options).exists(ROOT_KEY):
        return stripped
    alias = str((attrs.get("backbone") or {}).get("alias") or "store")
    dataset = str((attrs.get("dataset") or {}).get("name") or "dataset")
    return store_path(stripped, alias, dataset)


def _same_place(a: Location, b: Location) -> bool:
    return a.kind == b.kind and a.fs.protocol == b.fs.protocol and a.root.rstrip("/") == b.root.rstrip("/")


def _check_destination(destination: Location, attrs: dict[str, Any]) -> None:
    """Refuse to mix two different stores in one place; the same store (resumed or updated) is fine."""
    if destination.kind == "zip":
        raise StoreError(f"{destination.url}: cannot copy into a zip file; use `combo store pack`")
    if not can_list(destination):
        raise StoreError(f"{redact(destination.url)}: cannot write to a plain web server; push to a bucket or a folder")
    try:
        existing = read_root_attrs(destination)
    except StoreNotFoundError:
        return
    except StoreError:
        return  # an unreadable root is replaced at the end anyway
    diff = identity_diff(existing, attrs)
    if diff:
        raise StoreMismatchError(
            f"{redact(destination.url)} already holds another store:\n  " + "\n  ".join(diff[:8])
            + "\nRemove it or copy to another destination"
        )


def _unmark_stale(source: Location, destination: Location, objects: Iterable[StoreObject]) -> Manifest | None:
    """Before anything is replaced, the destination stops passing for a complete store where it
    differs from the source: format 2 loses its manifest (readers refuse a store without one),
    format 1 the zarr.json of each task whose flag or checksums differ. Returns the destination's
    manifest when it is the source's (an identical or resumed copy), for skipping by hash."""
    manifest_obj = next((o for o in objects if o.key == MANIFEST_NAME), None)
    if manifest_obj is not None:
        try:
            have = destination.read_bytes(MANIFEST_NAME)
        except (StoreNotFoundError, FileNotFoundError):
            return None
        try:
            dest_manifest = Manifest.from_bytes(have, where=destination.url)
        except StoreError:
            dest_manifest = None
        if sha256_bytes(have) != manifest_obj.sha256:
            destination.fs.rm_file(destination.key_path(MANIFEST_NAME))
        return dest_manifest
    for obj in objects:
        if obj.stage != 1:
            continue
        try:
            have = destination.read_bytes(obj.key)
        except (StoreNotFoundError, FileNotFoundError):
            continue
        task = obj.key.rsplit("/", 1)[0]
        manifest = StoreObject(f"{task}/{CHECKSUMS_NAME}", META, 0)
        try:
            same_manifest = destination.read_bytes(manifest.key) == read_verified(source, manifest)
        except (StoreNotFoundError, FileNotFoundError):
            same_manifest = False
        if have != read_verified(source, obj) or not same_manifest:
            destination.fs.rm_file(destination.key_path(obj.key))
    return None


def verify_written(destination: Location, written: Iterable[StoreObject]) -> list[str]:
    """Read back what this copy wrote and compare it with the source's sha256: the objects that
    were skipped had already been matched by size and hash."""
    problems = []
    for obj in written:
        if obj.sha256 is None:
            continue
        try:
            data = destination.read_bytes(obj.key)
        except (StoreNotFoundError, FileNotFoundError):
            problems.append(f"{obj.key} was written but is not at the destination")
            continue
        if sha256_bytes(data) != obj.sha256:
            problems.append(f"{obj.key} does not read back as written (checksum mismatch at the destination)")
    return problems


def _completed(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """Run `fn` over items on a few threads; on the first failure cancel what has not started."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))), thread_name_prefix="combo-copy") as pool:
        futures: dict[Future[R], T] = {pool.submit(fn, item): item for item in items}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()


def prefetched(fn: Callable[[T], R], items: Iterable[T], *, depth: int) -> Iterator[tuple[T, R]]:
    """`fn` over items in order, with up to `depth` calls running ahead (reads overlap the writer)."""
    with ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="combo-read") as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= depth:
                    item0, future = pending.popleft()
                    yield item0, future.result()
            while pending:
                item0, future = pending.popleft()
                yield item0, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def copy_store(
    source: str,
    destination: str,
    *,
    storage_options: dict[str, Any] | None = None,
    source_options: dict[str, Any] | None = None,
    destination_options: dict[str, Any] | None = None,
    verify: str = "written",
    workers: int = 8,
    progress: TransferProgress | None = None,
) -> TransferResult:
    """Copy a complete store (push or pull: any location to any writable one) and validate the copy.

    `destination` is the store path when it ends in `.zarr`, else a store root (see `destination_for`).
    `storage_options` apply to both sides unless `source_options` / `destination_options` are given.
    `verify` is the final check of the copy: "written" (default: structure, presence and sizes of
    everything, and the objects this copy wrote read back and hashed), "all" checksums, a "sample",
    or "none" (structure and presence only). Raises StoreValidationError if the copy does not validate.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    progress = progress or TransferProgress()
    src_opts = storage_options if source_options is None else source_options
    dst_opts = storage_options if destination_options is None else destination_options
    src = refresh(resolve(source, storage_options=src_opts if is_url(source) else None))
    contents = store_objects(src)
    target = destination_for(destination, contents.attrs, storage_options=dst_opts if is_url(destination) else None)
    dst = refresh(resolve(target, storage_options=dst_opts if is_url(target) else None))
    if _same_place(src, dst):
        raise ValueError(f"source and destination are the same store: {redact(src.url)}")
    _check_destination(dst, contents.attrs)
    with destination_lock(dst):  # one writer per store: a teammate's extraction or push into it is refused
        return _copy(src, dst, contents, target, dst_opts=dst_opts, verify=verify, workers=workers, progress=progress)


@contextlib.contextmanager
def destination_lock(dst: Location) -> Iterator[None]:
    """The store's write lock (store_schema/writer/lock.py) while a copy writes into it: the flock on a local
    store's folder, the lock object in a remote one; refused in one sentence while a live writer holds it."""
    where = redact(dst.url)
    local = dst.local_path()
    # a remote store: the lock object in it keeps machines apart; the flock half goes in a private folder
    folder = local if local is not None else Path(tempfile.mkdtemp(prefix="combo-copy-lock-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = WriteLock(folder, None if local is not None else dst, where=where)
        try:
            yield
        finally:
            lock.release()
    finally:
        if local is None:
            shutil.rmtree(folder, ignore_errors=True)


def _copy(src: Location, dst: Location, contents: "StoreContents", target: str, *, dst_opts: dict[str, Any] | None,
          verify: str, workers: int, progress: TransferProgress) -> TransferResult:
    result = TransferResult(source=redact(src.url), destination=redact(dst.url), objects=len(contents.objects), verify=verify)
    dest_sizes = list_sizes(dst)
    progress.start(len(contents.objects), contents.total_bytes)
    started = time.perf_counter()
    dest_manifest = _unmark_stale(src, dst, contents.objects)
    written: list[StoreObject] = []

    def transfer(obj: StoreObject) -> int | None:
        if already_there(src, dst, obj, dest_sizes, dest_manifest):
            return None
        return copy_object(src, dst, obj)  # looked up at call time: tests interrupt copies here

    for stage in (0, 1, 2, 3):
        batch = [o for o in contents.objects if o.stage == stage]
        for obj, nbytes in _completed(transfer, batch, workers):
            if nbytes is None:
                result.skipped += 1
                progress.advance(obj.key, obj.size or 0, copied=False)
            else:
                result.copied += 1
                result.bytes_copied += nbytes
                written.append(obj)
                progress.advance(obj.key, nbytes, copied=True)
    result.seconds = time.perf_counter() - started
    started = time.perf_counter()
    checks = "none" if verify == "written" else verify
    result.report = validate_store(target, storage_options=dst_opts if is_url(target) else None, checksums=checks)
    if verify == "written":
        result.report.problems += verify_written(refresh(dst), written)
        result.verified = len(written)
    else:
        result.verified = result.report.chunks_checked
    result.verify_seconds = time.perf_counter() - started
    if not result.report.ok:
        raise StoreValidationError(redact(dst.url), result.report.problems)
    return result




def push_store(source: str, destination: str, **kwargs: Any) -> TransferResult:
    """`copy_store` under the name the CLI uses for local -> shared."""
    return copy_store(source, destination, **kwargs)


def pull_store(source: str, destination: str, **kwargs: Any) -> TransferResult:
    """`copy_store` under the name the CLI uses for shared -> local."""
    return copy_store(source, destination, **kwargs)

