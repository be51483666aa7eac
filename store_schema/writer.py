"""Creating and filling a store: one writer process per store, whole shards per write.

Completeness is recorded, never inferred: zarr returns the fill value for a chunk never
written, so every finished shard is appended (with its checksum) to a per-task journal,
fsync'ed. A killed run resumes from the journal; `finalize` turns it into the checksum
manifest and flips the task's `complete` flag last.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from . import samples as sample_table
from .errors import SchemaVersionError, StoreError, StoreLockedError, StoreMismatchError
from .layout import StoreLayout
from .location import Location, resolve
from .metadata import ROOT_ATTR, SCHEMA_VERSION, TASK_ATTR, StoreInfo, identity_diff, utc_now

LOCK_NAME = ".combo-write.lock"
JOURNAL_NAME = ".journal.jsonl"
CHECKSUMS_NAME = "checksums.json"
SAMPLES_NAME = "samples.parquet"
TOKENS = "tokens"
PREFIX = "prefix"


def shard_key(task: str, array: str, block: int) -> str:
    """Store key of shard `block` of an array (zarr v3 default chunk-key encoding)."""
    return f"{task}/{array}/c/{block}/0/0/0"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _checkpoint(backbone: Any) -> str | None:
    """timm's "arch.tag" name of a recorded backbone section (None when it records none)."""
    name = backbone.get("timm_name") if isinstance(backbone, dict) else None
    if not name:
        return None
    tag = backbone.get("pretrained_tag")
    return f"{name}.{tag}" if tag else f"{name} (timm's default tag)"


def _mismatch_message(path: Path, old: dict[str, Any], new: dict[str, Any], diff: list[str]) -> str:
    """Why an existing store cannot be resumed or extended: a sentence first, then every differing field."""
    fix = "Use --overwrite to replace it, or --out for another store root"
    was, now = _checkpoint(old.get("backbone")), _checkpoint(new.get("backbone"))
    if was and now and was != now:
        # other weights: tokens from both could never be read as one backbone's
        head = (f"store {path} was made with checkpoint {was}, while this run uses {now}, so it cannot be "
                f"resumed or extended with this run's features. {fix}")
    else:
        head = f"store {path} was made with other settings than this run's. {fix}"
    return head + ".\nDiffering settings:\n  " + "\n  ".join(diff)


@dataclass(frozen=True)
class Skipped:
    row: int
    sample_id: str
    error: str


class StoreWriter:
    """Opens (creating if needed) a local store for writing and holds its lock until closed."""

    def __init__(self, path: str | os.PathLike, info: StoreInfo, layout: StoreLayout, *, overwrite: bool = False):
        self.location: Location = resolve(path)
        if self.location.kind != "local":
            raise StoreError(f"{path}: extraction writes local stores; copy it elsewhere with `combo store push`")
        self.path = Path(self.location.root)
        self.layout = layout
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_handle = self._acquire_lock()
        try:
            attrs = _json_normal(info.to_attrs(storage=layout.to_attrs(), tasks=[]))
            self.group = self._open_or_create(attrs, info, overwrite=overwrite)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------------------
    def _acquire_lock(self):
        handle = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreLockedError(
                f"store {self.path} is being written by {holder}; wait for it to finish "
                "(two extractions into one store would corrupt it)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        return handle

    def close(self) -> None:
        handle, self._lock_handle = getattr(self, "_lock_handle", None), None
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_or_create(self, attrs: dict[str, Any], info: StoreInfo, *, overwrite: bool) -> zarr.Group:
        store = zarr.storage.LocalStore(self.path)
        if (self.path / "zarr.json").exists():
            try:
                group = zarr.open_group(store, mode="r+")
                old = dict(group.attrs.get(ROOT_ATTR) or {})
            except Exception as err:  # noqa: BLE001 - any unreadable root is the same problem
                raise StoreError(f"{self.path}/zarr.json is unreadable ({err}); use --overwrite to start again") from err
            version = old.get("schema_version")
            if version != SCHEMA_VERSION and not overwrite:
                raise SchemaVersionError(
                    f"store {self.path} has schema version {version}; this combo writes version {SCHEMA_VERSION}. "
                    "Use --overwrite to rebuild it or write elsewhere with --out"
                )
            diff = identity_diff(old, attrs) if old else ["no combo metadata"]
            if not diff and not overwrite:
                return group
            if diff and not overwrite:
                raise StoreMismatchError(_mismatch_message(self.path, old, attrs, diff))
            if diff:  # overwrite with other settings: the whole store goes
                self._wipe()
            else:
                return group
        attrs["created"] = info.created
        # create_group keeps the lock file (open_group(mode="w") would delete it)
        return zarr.create_group(store=store, zarr_format=3, attributes={ROOT_ATTR: attrs}, overwrite=False)

    def _wipe(self) -> None:
        for child in self.path.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    # -- tasks ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs[ROOT_ATTR])

    def task(
        self,
        name: str,
        *,
        samples: pa.Table,
        num_layers: int,
        num_tokens: int,
        feature_dim: int,
        num_prefix_tokens: int,
        protocols: dict[str, Sequence[str]],
        classes: Sequence[str],
        group: str | None = None,
        overwrite: bool = False,
        row_order: dict[str, Any] | None = None,
    ) -> "TaskWriter":
        """Create the task group, or reopen it to resume; refuses a different sample plan.

        ``row_order`` (how rows were permuted from the dataset's natural order, see README "Row order") is
        recorded in the task document; a resumed task missing it (killed right after creation) gets it.
        """
        if "/" in name or name.startswith("."):
            raise StoreError(f"task name {name!r} must be a plain folder name")
        task_dir = self.path / name
        if task_dir.exists() and overwrite:
            shutil.rmtree(task_dir)
        if (task_dir / "zarr.json").exists() and TASK_ATTR not in _task_attrs(task_dir):
            shutil.rmtree(task_dir)  # creation was interrupted before its metadata: start the task afresh
        if (task_dir / "zarr.json").exists():
            existing = self.location.read_bytes(f"{name}/{SAMPLES_NAME}") if (task_dir / SAMPLES_NAME).exists() else None
            if existing is None or not sample_table.same_samples(sample_table.from_bytes(existing), samples):
                raise StoreMismatchError(
                    f"task {name!r} in {self.path} holds other samples than the dataset now lists "
                    "(files added, removed or relabelled?); use --overwrite to extract it again"
                )
            writer = TaskWriter(self, name)
            if row_order is not None and "row_order" not in writer.attrs:
                writer.group.attrs[TASK_ATTR] = {**writer.attrs, "row_order": _json_normal(row_order)}
            return writer
        n = samples.num_rows
        shape = (n, num_layers, num_tokens, feature_dim)
        task_group = self.group.create_group(name, overwrite=True)
        task_group.create_array(name=TOKENS, **self.layout.array_kwargs(shape))
        if num_prefix_tokens:
            task_group.create_array(
                name=PREFIX, **self.layout.array_kwargs((n, num_layers, num_prefix_tokens, feature_dim))
            )
        self.location.write_bytes(f"{name}/{SAMPLES_NAME}", sample_table.to_bytes(samples))
        splits = {s: int(samples.column("in_" + s).to_numpy().sum()) for s in sample_table.split_names(samples)}
        task_group.attrs[TASK_ATTR] = {
            "task": name,
            "group": group,
            "num_samples": n,
            "splits": splits,
            "protocols": {k: list(v) for k, v in protocols.items()},
            "classes": list(classes),
            "complete": False,
            "skipped": [],
            **({"row_order": _json_normal(row_order)} if row_order is not None else {}),
        }
        root_attrs = self.attrs
        if name not in root_attrs["tasks"]:
            root_attrs["tasks"] = sorted([*root_attrs["tasks"], name])
            self.group.attrs[ROOT_ATTR] = root_attrs
        return TaskWriter(self, name)


def _task_attrs(task_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((task_dir / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, json.JSONDecodeError):
        return {}


class TaskWriter:
    """Writes one task's shards; safe to call `write_block` from one background thread."""

    def __init__(self, store: StoreWriter, name: str):
        self.store = store
        self.name = name
        self.group = zarr.open_group(zarr.storage.LocalStore(store.path), path=name, mode="r+")
        self.tokens = self.group[TOKENS]
        self.prefix = self.group[PREFIX] if PREFIX in self.group else None
        self.num_rows = int(self.tokens.shape[0])
        step = store.layout.rows_per_shard
        self.blocks: list[range] = [range(s, min(s + step, self.num_rows)) for s in range(0, self.num_rows, step)]
        self._journal_path = store.path / name / JOURNAL_NAME
        self._journal_lock = threading.Lock()
        self.done: dict[int, dict[str, str]] = {}
        self.skipped: dict[int, Skipped] = {}
        self._load_journal()

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs[TASK_ATTR])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def pending(self) -> list[int]:
        return [b for b in range(len(self.blocks)) if b not in self.done]

    def _arrays(self) -> list[tuple[str, zarr.Array]]:
        return [(TOKENS, self.tokens)] + ([(PREFIX, self.prefix)] if self.prefix is not None else [])

    def _load_journal(self) -> None:
        if not self._journal_path.exists():
            return
        for line in self._journal_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that shard is simply redone
            keys = entry["checksums"]
            if all((self.store.path / key).exists() for key in keys):
                self.done[int(entry["block"])] = keys
                for s in entry.get("skipped", []):
                    self.skipped[int(s["row"])] = Skipped(**s)

    def write_block(
        self,
        block: int,
        tokens: np.ndarray,
        prefix: np.ndarray | None = None,
        *,
        skipped: Iterable[Skipped] = (),
    ) -> None:
        rows = self.blocks[block]
        dtype = np.dtype(self.store.layout.dtype)
        parts = [(TOKENS, self.tokens, tokens)]
        if self.prefix is not None:
            if prefix is None:
                raise StoreError(f"task {self.name}: block {block} needs prefix tokens")
            parts.append((PREFIX, self.prefix, prefix))
        for array_name, array, data in parts:
            expected = (len(rows), *array.shape[1:])
            if tuple(data.shape) != expected:
                raise StoreError(f"task {self.name}: block {block} of {array_name} has shape {data.shape}, expected {expected}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = np.ascontiguousarray(data, dtype=dtype)
            if not np.isfinite(cast).all():
                bad = sorted({int(rows[i]) for i in np.nonzero(~np.isfinite(cast).reshape(len(rows), -1).all(axis=1))[0]})
                raise StoreError(
                    f"task {self.name}: rows {bad[:5]} of {array_name} are not finite in {dtype} "
                    "(values overflow float16? re-run with --dtype float32)"
                )
            array[rows.start : rows.stop] = cast
        checksums = {}
        for array_name, _array in self._arrays():
            key = shard_key(self.name, array_name, block)
            checksums[key] = sha256_bytes(self.store.location.read_bytes(key))
        skipped = list(skipped)
        entry = {"block": block, "checksums": checksums, "skipped": [s.__dict__ for s in skipped]}
        with self._journal_lock:
            with open(self._journal_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.done[block] = checksums
            for s in skipped:
                self.skipped[s.row] = s

    def finalize(self) -> None:
        """Write the checksum manifest and mark the task complete (the last thing written)."""
        missing = self.pending()
        if missing:
            raise StoreError(f"task {self.name}: {len(missing)} shard(s) not written yet (first: {missing[0]})")
        manifest: dict[str, dict[str, str]] = {}
        for block in sorted(self.done):
            for key, digest in self.done[block].items():
                array = key.split("/")[1]
                manifest.setdefault(array, {})[key[len(f"{self.name}/{array}/"):]] = digest
        location = self.store.location
        doc = {"algorithm": "sha256", "unit": "stored shard object", "arrays": manifest}
        location.write_bytes(f"{self.name}/{CHECKSUMS_NAME}", json.dumps(doc, indent=0, sort_keys=True).encode())
        skipped = [self.skipped[r] for r in sorted(self.skipped)]
        if skipped:
            table = sample_table.from_bytes(location.read_bytes(f"{self.name}/{SAMPLES_NAME}"))
            table = sample_table.with_invalid(table, [s.row for s in skipped])
            location.write_bytes(f"{self.name}/{SAMPLES_NAME}", sample_table.to_bytes(table))
        attrs = self.attrs
        attrs.update(complete=True, skipped=[s.__dict__ for s in skipped], completed=utc_now())
        self.group.attrs[TASK_ATTR] = attrs
        self._journal_path.unlink(missing_ok=True)
