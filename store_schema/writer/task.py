"""`TaskWriter`: one task of an open store, its shards journaled as they are written, then finalized.

The journal is what makes a killed run resumable: a block counts as done only once its shards are
fsynced and its line is in the journal (see the package docstring for the whole order).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr

from .. import samples as sample_table
from .. import staging as stage
from ..compact import CompactSpec
from ..errors import StoreError
from ..grids import multi_grids
from ..layout import StoreLayout
from ..location import Location, fsync_dir
from ..manifest import Entry, Manifest, sha256_bytes
from ..metadata import TASK_ATTR, utc_now
from .disk import _fsync_file
from .journal import task_entries
from .keys import JOURNAL_NAME, SAMPLES_NAME, shard_block
from .shard import ShardWriter
from .skipped import Skipped



class OpenStore(Protocol):
    """What a task writer needs of the store writer that opened it (`store.StoreWriter`, which imports this
    module: the dependency goes one way)."""

    path: Path
    layout: StoreLayout
    compact: CompactSpec | None
    attrs: dict[str, Any]
    remote: Location | None
    location: Location

    @property
    def format_text(self) -> str: ...

    def manifest(self) -> Manifest: ...

    def publish(self, fresh: dict[str, dict[str, Entry]] | None = None) -> None: ...


class TaskWriter:
    """Writes one task's shards; safe to call `write_block` from one background thread."""

    def __init__(self, store: OpenStore, name: str):
        self.store = store
        self.name = name
        features = store.attrs["features"]
        self.shards = ShardWriter(store.path, name, layout=store.layout, compact=store.compact,
                                  feature_dim=int(features["feature_dim"]), remote=store.remote,
                                  grids=multi_grids(features))
        self.group = self.shards.group
        self.compact = store.compact
        self.tokens = self.shards.tokens  # None for a multi-grid task: `mains` has each group's
        self.mains = self.shards.mains
        self.prefix = self.shards.prefix
        self.pca = self.shards.pca
        self.num_rows = self.shards.num_rows
        self.blocks: list[range] = self.shards.blocks
        self._journal_path = store.path / name / JOURNAL_NAME
        self._journal_lock = threading.Lock()
        self.done: dict[int, dict[str, str]] = {}
        self.sizes: dict[str, int] = {}
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
        return self.shards.arrays()

    def store_dim(self, array_name: str) -> int:
        """Channels of the values `write_block` takes for an array (a compact task takes full-size tokens)."""
        return self.shards.store_dim(array_name)

    def _key(self, array_name: str, array: zarr.Array, block: int) -> str:
        return self.shards.key(array_name, array, block)

    def _load_journal(self) -> None:
        """Journaled shards count as done only if their files still hash to the recorded sha256:
        a shard cut short (or lost) by a crash is redone, never trusted."""
        if not self._journal_path.exists():
            return
        lines = []
        for line in self._journal_path.read_text().splitlines():
            try:
                entry = json.loads(line)
                lines.append((entry, dict(entry["checksums"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill: that shard is simply redone
        uploaded: set[str] = set()
        if self.store.remote is not None:  # a remote store's shards are there, not in the staging folder
            wanted = {k: (d, (e.get("sizes") or {}).get(k)) for e, keys in lines for k, d in keys.items()}
            uploaded = stage.shards_intact(self.store.remote, wanted, prefix=f"{self.name}/")

        def holds(key: str, digest: str) -> bool:
            if self.store.remote is not None:
                return key in uploaded
            path = self.store.path / key
            return path.exists() and sha256_bytes(path.read_bytes()) == digest

        for entry, keys in lines:
            if all(holds(key, digest) for key, digest in keys.items()):
                self.done[int(entry["block"])] = keys
                self.sizes.update({k: int(v) for k, v in (entry.get("sizes") or {}).items()})
                for s in entry.get("skipped", []):
                    self.skipped[int(s["row"])] = Skipped(**s)
            else:
                self.done.pop(int(entry["block"]), None)

    def reopen_for_repair(self, damaged: Iterable[str]) -> list[int] | None:
        """Reopen a complete task whose listing lacks (or resized) the shards `damaged` so that only
        their blocks are extracted again; returns those blocks, or None when `damaged` holds anything
        but shards (then the task has to be extracted again as a whole).

        Crash-safe in this order: the intact blocks are journaled from the manifest's entries (size
        checked by the listing that found the damage), the damaged shards are deleted, the task loses
        its `complete` flag, and the manifest is republished without it. A kill anywhere leaves either
        the old complete task (still damaged, found again) or an incomplete one that resumes from the journal.
        """
        damaged = sorted(set(damaged))
        blocks = sorted({shard_block(self.name, k) for k in damaged})
        if not damaged or None in blocks:
            return None
        manifest = self.store.manifest().for_task(self.name)
        skipped = [Skipped(**s) for s in self.attrs.get("skipped") or []]
        redo = set(blocks)
        lines = []
        done: dict[int, dict[str, str]] = {}
        sizes: dict[str, int] = {}
        for block, rows in enumerate(self.blocks):
            if block in redo:
                continue
            keys = [self._key(a, arr, block) for a, arr in self._arrays()]
            if any(k not in manifest for k in keys):
                return None  # a shard the manifest does not know: no way to trust the rest either
            done[block] = {k: manifest[k].sha256 for k in keys}
            sizes.update({k: int(manifest[k].size or 0) for k in keys})
            lines.append({"block": block, "checksums": done[block], "sizes": {k: sizes[k] for k in keys},
                          "skipped": [s.__dict__ for s in skipped if s.row in rows]})
        with self._journal_lock:
            with open(self._journal_path, "w") as handle:
                handle.write("".join(json.dumps(line) + "\n" for line in lines))
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(self.store.path / self.name)
            for block in blocks:
                for array_name, array in self._arrays():
                    (self.store.path / self._key(array_name, array, block)).unlink(missing_ok=True)
            if self.store.remote is not None:
                stage.delete_keys(self.store.remote, damaged)
            attrs = self.attrs
            attrs.update(complete=False, skipped=[])
            attrs.pop("completed", None)
            self.group.attrs[TASK_ATTR] = attrs
            _fsync_file(self.store.path / self.name / "zarr.json")
            self.store.publish()  # the manifest no longer claims the task
            self.done, self.sizes = done, sizes
            self.skipped = {s.row: s for s in skipped if any(s.row in self.blocks[b] for b in done)}
        return blocks

    def write_block(
        self,
        block: int,
        tokens: np.ndarray | Sequence[np.ndarray],
        prefix: np.ndarray | None = None,
        *,
        skipped: Iterable[Skipped] = (),
    ) -> None:
        """Write and journal a block (`ShardWriter.write`: a multi-grid task takes a list, one array per group)."""
        self.record(self.shards.write(block, tokens, prefix, skipped=skipped))

    def record(self, entry: dict[str, Any]) -> None:
        """Journal a block whose shards are written (`ShardWriter.write`'s entry): fsynced, then counted as done."""
        block, checksums = int(entry["block"]), dict(entry["checksums"])
        if not 0 <= block < len(self.blocks):
            raise StoreError(f"task {self.name}: no block {block} (the task has {len(self.blocks)})")
        with self._journal_lock:
            with open(self._journal_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.done[block] = checksums
            self.sizes.update({k: int(v) for k, v in (entry.get("sizes") or {}).items()})
            for s in entry.get("skipped") or []:
                self.skipped[int(s["row"])] = Skipped(**s)

    def finalize(self) -> None:
        """Mark the task complete, then publish the consolidated metadata and manifest.

        Order (each step atomic on disk): sample table and `valid` coordinate for skipped rows,
        the task's `complete` flag, then `publish`, then the journal goes. A kill before `publish`
        leaves the journal for the next writer's `_repair`."""
        missing = self.pending()
        if missing:
            raise StoreError(f"task {self.name}: {len(missing)} shard(s) not written yet (first: {missing[0]})")
        location = self.store.location
        skipped = [self.skipped[r] for r in sorted(self.skipped)]
        if skipped:
            table = sample_table.from_bytes(location.read_bytes(f"{self.name}/{SAMPLES_NAME}"))
            table = sample_table.with_invalid(table, [s.row for s in skipped])
            attrs = self.attrs
            location.write_bytes(f"{self.name}/{SAMPLES_NAME}",
                                 sample_table.to_bytes(table, classes=attrs.get("classes") or [], task=self.name,
                                                       format_version=self.store.format_text))
            self.group["valid"][:] = table.column("valid").to_numpy(zero_copy_only=False).astype(bool)
        attrs = self.attrs
        attrs.update(complete=True, skipped=[s.__dict__ for s in skipped], completed=utc_now())
        self.group.attrs[TASK_ATTR] = attrs
        _fsync_file(self.store.path / self.name / "zarr.json")
        journal = {k: Entry(sha256=v, size=self.sizes.get(k)) for d in self.done.values() for k, v in d.items()}
        self.store.publish({self.name: task_entries(self.store.path, self.name, journal,
                                                    staged=self.store.remote is not None)})
        self._journal_path.unlink(missing_ok=True)
