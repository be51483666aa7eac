"""What stores a root holds (`ls`) and where one store came from (`info`).

`list_stores` never fails because of one bad store: a store that cannot be read, is incomplete
or is missing objects is listed with that status and a short reason. Its status comes from the
metadata and one object listing per store (cheap on a bucket); checksums are `validate`'s job.
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SchemaVersionError, StoreError, StoreNotFoundError
from .location import Location, can_list, is_hidden, list_sizes, redact, resolve, unreachable_error
from .manifest import Manifest, absent_or_resized, load_manifest
from .metadata import ROOT_ATTR, SCHEMA_VERSION, TASK_ATTR, format_major
from .reader import FeatureStore, _load_json, check_root_attrs, task_document
from .transfer import ROOT_KEY, refresh
from .writer import CHECKSUMS_NAME, JOURNAL_NAME, PREFIX, TOKENS

DEFAULT_DEPTH = 4  # root / backbone / dataset.zarr is depth 2; leave room for a team prefix or two


@dataclass
class StoreSummary:
    name: str  # path relative to the listed root
    url: str
    status: str = "ok"  # "ok" | "incomplete" | "invalid"
    reason: str = ""
    backbone: str | None = None
    timm_name: str | None = None
    dataset: str | None = None
    tasks: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    samples: int | None = None
    dtype: str | None = None
    size_bytes: int | None = None
    created: str | None = None
    schema_version: int | None = None
    format_version: str | None = None  # "2.0"; format 1 stores only have schema_version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(problems: list[str]) -> str:
    if not problems:
        return ""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def summarize_store(location: Location, *, name: str | None = None) -> StoreSummary:
    """One row of `ls`: metadata plus a status; every failure becomes the status, never an exception."""
    summary = StoreSummary(name=name or posixpath.basename(location.root.rstrip("/")) or location.url, url=redact(location.url))
    try:
        sizes = list_sizes(location)
    except Exception:  # noqa: BLE001 - listing denied: still show what the metadata says
        sizes = None
    if sizes is not None:
        summary.size_bytes = int(sum(size for key, size in sizes.items() if not is_hidden(key)))
    try:
        doc = _load_json(location, ROOT_KEY)
    except StoreNotFoundError:
        summary.status, summary.reason = "incomplete", "no zarr.json (copy or extraction interrupted?)"
        return summary
    except StoreError as err:
        summary.status = "invalid"
        summary.reason = "zarr.json is truncated or corrupt" if "not valid JSON" in str(err) else redact(str(err))
        return summary
    attrs = (doc.get("attributes") or {}).get(ROOT_ATTR)
    if not isinstance(attrs, dict):
        summary.status, summary.reason = "invalid", "a zarr group, but not a combo feature store"
        return summary
    backbone = attrs.get("backbone") or {}
    summary.backbone = backbone.get("alias")
    summary.timm_name = backbone.get("timm_name")
    summary.dataset = (attrs.get("dataset") or {}).get("name")
    summary.tasks = [str(t) for t in attrs.get("tasks") or []]
    storage = attrs.get("storage") or {}
    summary.dtype = (storage.get("compact") or {}).get("name") or storage.get("dtype")  # a compact store: its encoding
    summary.created = attrs.get("created")
    summary.schema_version = attrs.get("schema_version")
    summary.format_version = attrs.get("format_version") or (
        f"{summary.schema_version}.0" if isinstance(summary.schema_version, int) else None)
    try:
        check_root_attrs(location, doc)
    except SchemaVersionError:
        summary.status = "invalid"
        summary.reason = (
            f"format {attrs.get('format_version') or summary.schema_version} needs a newer combo "
            f"(this one reads up to {SCHEMA_VERSION}.x)"
        )
        return summary
    except StoreError as err:
        summary.status, summary.reason = "invalid", redact(str(err))
        return summary
    problems, unfinished = _task_problems(location, doc, attrs, summary, sizes)
    if problems:
        summary.status, summary.reason = "invalid", _short(problems + unfinished)
    elif unfinished:
        summary.status, summary.reason = "incomplete", _short(unfinished)
    return summary


def _task_problems(
    location: Location, doc: dict[str, Any], attrs: dict[str, Any], summary: StoreSummary, sizes: dict[str, int] | None
) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    major = format_major(attrs)
    manifest: Manifest | None = None
    if major >= 2:
        try:
            manifest = load_manifest(location, format_major=major)
        except StoreError as err:
            problems.append(redact(str(err)))
    unfinished: list[str] = []
    rows_per_shard = int((attrs.get("storage") or {}).get("rows_per_shard") or 1)
    # format 1's arrays (its checksums.json, below); format 2 stores, multi-grid ones too, go by their manifest
    arrays = [TOKENS] + ([PREFIX] if int((attrs.get("features") or {}).get("num_prefix_tokens") or 0) else [])
    splits: list[str] = []
    total = 0
    for task in summary.tasks:
        try:
            task_attrs = (task_document(location, doc, task).get("attributes") or {}).get(TASK_ATTR)
        except StoreError as err:
            problems.append(f"task {task}: " + ("zarr.json truncated or corrupt" if "not valid JSON" in str(err) else "zarr.json missing"))
            continue
        if not isinstance(task_attrs, dict) or "num_samples" not in task_attrs:
            problems.append(f"task {task}: no task metadata")
            continue
        n = int(task_attrs["num_samples"])
        total += n
        splits += [s for s in task_attrs.get("splits") or {} if s not in splits]
        blocks = math.ceil(n / rows_per_shard)
        if not task_attrs.get("complete"):
            written = _journal_entries(location, task)
            done = f"{written} of {blocks} shards written" if written is not None else "extraction not finished"
            unfinished.append(f"task {task}: {done}")
            continue
        if major >= 2:
            if manifest is not None:
                entries = manifest.for_task(task)
                if not entries:
                    unfinished.append(f"task {task}: not in manifest.json (writer killed while finishing it)")
                    continue
                if sizes is not None:
                    missing, resized = absent_or_resized(entries, sizes)
                    if missing:
                        problems.append(f"task {task}: {len(missing)} object(s) missing (first: {missing[0]})")
                    if resized:
                        problems.append(f"task {task}: {len(resized)} object(s) of the wrong size (first: {resized[0]})")
            continue
        try:
            v1 = _load_json(location, f"{task}/{CHECKSUMS_NAME}").get("arrays") or {}
        except StoreError:
            problems.append(f"task {task}: {CHECKSUMS_NAME} missing or unreadable")
            continue
        for array in arrays:
            recorded = v1.get(array) or {}
            if len(recorded) != blocks:
                problems.append(f"task {task}: {array} has {len(recorded)} recorded shards, expected {blocks}")
            if sizes is not None:
                missing = [k for k in recorded if f"{task}/{array}/{k}" not in sizes]
                if missing:
                    problems.append(f"task {task}: {len(missing)} {array} chunk(s) missing")
    summary.samples = total
    summary.splits = splits
    return problems, unfinished


def _journal_entries(location: Location, task: str) -> int | None:
    try:
        text = location.read_bytes(f"{task}/{JOURNAL_NAME}").decode(errors="replace")
    except Exception:  # noqa: BLE001 - no journal (never started, or a copy without it)
        return None
    return sum(1 for line in text.splitlines() if line.strip())


def _summarize_zip(path: str, *, name: str) -> StoreSummary:
    try:
        return summarize_store(resolve(path), name=name)
    except StoreError as err:  # cut short or not a zip at all: the error says so
        return StoreSummary(name=name, url=path, status="invalid", reason=str(err))
    except Exception as err:  # noqa: BLE001
        return StoreSummary(name=name, url=path, status="invalid", reason=f"unreadable zip: {err}")


def _child(root: Location, path: str) -> Location:
    if root.kind == "local":
        return Location(url=path, fs=root.fs, root=path, kind="local")
    url = root.fs.unstrip_protocol(path)
    return Location(url=url, fs=root.fs, root=path, kind=root.kind, storage_options=root.storage_options)


def list_stores(
    root: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    max_depth: int = DEFAULT_DEPTH,
) -> list[StoreSummary]:
    """Every store under `root` (a folder, a bucket prefix, or a store / zip itself), sorted by name.

    A folder holding a zarr.json is a store (not descended into); a `*.zarr` folder without one is
    listed as an incomplete store; a local `*.zarr.zip` file is a packed store. Plain web servers cannot be listed: name a store there directly.
    """
    location = refresh(resolve(root, storage_options=storage_options))
    if location.kind == "zip":
        return [summarize_store(location, name=os.path.basename(location.url))]
    if not can_list(location):
        try:
            location.read_bytes(ROOT_KEY)  # not `exists`: that says False for a server that cannot be reached
            return [summarize_store(location)]
        except StoreNotFoundError:
            pass
        raise StoreError(
            f"cannot list {redact(location.url)}: a plain web server has no listing; "
            "give the URL of a store itself (…/<backbone>/<dataset>.zarr)"
        )
    base = location.root.rstrip("/")
    try:
        is_dir = location.fs.isdir(base) if base else True
    except Exception as err:  # noqa: BLE001 - e.g. access denied on the bucket
        unreachable = unreachable_error(location.url, err)
        if unreachable is not None:
            raise unreachable from err
        raise StoreError(f"cannot list {redact(location.url)}: {redact(str(err), storage_options)}") from err
    if not is_dir:
        raise StoreNotFoundError(f"no store root at {redact(location.url)} (nothing there)")
    found: list[StoreSummary] = []

    def walk(path: str, depth: int) -> None:
        try:
            entries = location.fs.ls(path, detail=True)
        except FileNotFoundError:
            return
        names = {posixpath.basename(str(e["name"]).rstrip("/")): e for e in entries}
        rel = posixpath.relpath(path, base) if path != base else "."
        if ROOT_KEY in names and names[ROOT_KEY].get("type") != "directory":
            found.append(summarize_store(_child(location, path), name=rel if rel != "." else posixpath.basename(base)))
            return
        if path != base and path.rstrip("/").endswith(".zarr"):
            found.append(summarize_store(_child(location, path), name=rel))
            return
        for name, entry in sorted(names.items()):
            if name.startswith("."):
                continue
            if entry.get("type") == "directory" and depth < max_depth:
                walk(str(entry["name"]).rstrip("/"), depth + 1)
            elif location.kind == "local" and name.endswith(".zarr.zip"):  # a packed store
                found.append(_summarize_zip(str(entry["name"]), name=posixpath.relpath(str(entry["name"]), base)))

    walk(base, 0)
    return sorted(found, key=lambda s: s.name)


def store_info(location: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of one store as a plain document: what `combo store info` shows.

    Raises for something that is not a readable store (including a newer schema version).
    """
    loc = refresh(resolve(location, storage_options=storage_options))
    store = FeatureStore(loc)
    attrs = dict(store.attrs)
    tasks: dict[str, Any] = {}
    try:
        sizes = list_sizes(loc)
    except Exception:  # noqa: BLE001
        sizes = None
    manifest: Manifest | None = None
    manifest_error = ""
    if store.format_major >= 2:
        try:
            manifest = load_manifest(loc, format_major=store.format_major)
        except StoreError as err:
            manifest_error = redact(str(err))
    for task in store.tasks:
        try:
            task_attrs = (_load_json(loc, f"{task}/zarr.json").get("attributes") or {}).get(TASK_ATTR) or {}
        except StoreError as err:
            tasks[task] = {"error": redact(str(err))}
            continue
        tasks[task] = {
            "group": task_attrs.get("group"),
            "num_samples": task_attrs.get("num_samples"),
            "splits": task_attrs.get("splits") or {},
            "protocols": task_attrs.get("protocols") or {},
            "num_classes": len(task_attrs.get("classes") or []),
            "complete": bool(task_attrs.get("complete")),
            "skipped": len(task_attrs.get("skipped") or []),
            "source": task_attrs.get("source"),  # where the images came from (a Hugging Face repo and commit), if recorded
            "skipped_samples": [s.get("sample_id") for s in task_attrs.get("skipped") or []][:20],
            "completed": task_attrs.get("completed"),
            **({"compact": task_attrs["compact"]} if task_attrs.get("compact") else {}),
            "problems": _object_problems(task, bool(task_attrs.get("complete")), manifest, manifest_error, sizes),
        }
    attrs["location"] = redact(loc.url)
    attrs["size_bytes"] = None if sizes is None else int(sum(v for k, v in sizes.items() if not is_hidden(k)))
    attrs["task_details"] = tasks
    return attrs


def _object_problems(task: str, complete: bool, manifest: Manifest | None, manifest_error: str,
                     sizes: dict[str, int] | None) -> list[str]:
    """What a listing shows wrong with a complete task's objects (missing, or of another size than the manifest
    records), as `ls` checks it: cheap, no checksum (that is `validate`'s job)."""
    if not complete:
        return []
    if manifest_error:
        return [manifest_error]
    if manifest is None or sizes is None:
        return []
    entries = manifest.for_task(task)
    if not entries:
        return ["not in manifest.json (writer killed while finishing it)"]
    missing, resized = absent_or_resized(entries, sizes)
    out = []
    if missing:
        out.append(f"{len(missing)} object(s) missing (first: {missing[0]})")
    if resized:
        out.append(f"{', '.join(resized[:3])}{' ...' if len(resized) > 3 else ''} of another size than manifest.json "
                   "records (truncated or replaced)")
    return out


def human_bytes(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
