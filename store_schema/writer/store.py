"""`StoreWriter`: opens (or creates) a store for writing, holds its lock, creates tasks, publishes the manifest.

The one process that owns a store while it is written: it checks an existing store matches this
run, repairs what a killed writer left, and writes the consolidated metadata and manifest.json last.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from .. import samples as sample_table
from .. import staging as stage
from ..compact import CODES, PCA_COMPONENTS, PCA_MEAN, CompactSpec, PcaBasis, fill_value
from ..errors import SchemaVersionError, StoreError, StoreMismatchError
from ..grids import GridSpec, grid_array
from ..layout import StoreLayout
from ..location import Location, is_url, list_sizes, redact, resolve
from ..manifest import MANIFEST_NAME, Entry, Manifest, absent_or_resized
from ..metadata import (
    FILL_MARKERS_SINCE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    FORMAT_VERSION,
    ID_BYTES_SINCE,
    MULTI_GRID_SINCE,
    ROOT_ATTR,
    TASK_ATTR,
    StoreInfo,
    format_version,
    identity_diff,
)
from .disk import _read_doc
from .journal import _entry, _journal_entries, task_entries
from .keys import (
    ARRAY_DESCRIPTIONS,
    COMPACT_ROW_ARRAYS,
    COORDINATES,
    JOURNAL_NAME,
    LOCK_NAME,
    PREFIX,
    PREFIX_DIMS,
    SAMPLE_ID,
    SAMPLE_ID_BYTE,
    SAMPLES_NAME,
    TOKEN_DIMS,
    TOKENS,
    grid_dims,
    is_reserved,
    is_row_shard,
)
from .lock import LockPolicy, WriteLock
from .task import TaskWriter


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


def _staging_private(key: str) -> bool:
    """What a staging folder keeps when it is refreshed from its remote store: the lock and the journals."""
    return key == LOCK_NAME or key.endswith("/" + JOURNAL_NAME)


class StoreWriter:
    """Opens (creating if needed) a store for writing and holds its lock until closed.

    A remote store (s3://, any writable fsspec URL) is written through a staging folder on this machine
    (store_schema/staging.py): `path` / `location` are then the staging folder and `remote` the store. Its lock
    is an object in the store (lock.py): `break_lock` takes over one held by a writer that died."""

    def __init__(self, path: str | os.PathLike, info: StoreInfo, layout: StoreLayout, *, overwrite: bool = False,
                 compact: CompactSpec | None = None, storage_options: dict[str, Any] | None = None,
                 break_lock: bool = False, lock_policy: LockPolicy | None = None):
        self.location: Location = resolve(path, storage_options=storage_options if is_url(path) else None)
        self.remote: Location | None = None
        if self.location.kind == "zip":
            raise StoreError(f"{path}: zip stores are read-only; write a folder, then `combo store pack` it")
        if self.location.kind == "remote":
            self.remote = self.location
            self.location = resolve(stage.staging_dir(self.remote))
        self.path = Path(self.location.root)
        self.grids: list[GridSpec] | None = list(info.features.grids) if info.features.grids else None
        row_bytes = _row_bytes(info, layout, compact)
        self.compact = compact
        self.layout = layout.for_rows(row_bytes)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock(break_lock=break_lock, lock_policy=lock_policy)
        try:
            storage = self.layout.to_attrs()
            if compact is not None:
                storage["compact"] = compact.to_attrs()
            attrs = _json_normal(info.to_attrs(storage=storage, tasks=[]))
            if self.remote is not None:
                self._refresh_staging()
            self.group = self._open_or_create(attrs, info, overwrite=overwrite)
            # the store's own format: an older 2.x store resumed or extended keeps its layout (see `task`)
            self.format_version: tuple[int, int] = format_version(self.attrs) or (FORMAT_MAJOR, FORMAT_MINOR)
            self._repair()
            self.sync()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------------------
    def _refresh_staging(self) -> None:
        """Make the staging folder hold the remote store's metadata (the remote is the truth): emptied when
        the remote has no store, refreshed (journals kept) when its root zarr.json is not the one last mirrored."""
        assert self.remote is not None
        remote_root = stage.remote_root_digest(self.remote)
        if remote_root is None:
            stage.reset(self.path, keep=lambda key: key == LOCK_NAME)
        elif remote_root != stage.recorded_root_digest(self.path):
            stage.reset(self.path, keep=_staging_private)
            stage.pull(self.remote, self.path, skip=is_row_shard)

    def sync(self) -> None:
        """A remote store: upload what changed in the staging folder, manifest last (local store: nothing);
        refused when the store's lock is no longer this writer's."""
        if self.remote is not None:
            self._lock.check()
            stage.mirror(self.path, self.remote, skip=is_row_shard)

    def _remove_remote(self, prefix: str = "") -> None:
        """A remote store: delete a task folder ("task/") or, with no prefix, the whole store there."""
        if self.remote is not None:
            self._lock.check()
            stage.delete_remote(self.remote, prefix, keep=lambda key: key == LOCK_NAME)  # the lock stays
            stage.forget(self.path, prefix)

    def _acquire_lock(self, *, break_lock: bool, lock_policy: LockPolicy | None) -> WriteLock:
        """The flock on `path` and, for a remote store, the lock object in the store (store_schema/writer/lock.py)."""
        where = redact(self.remote.url) if self.remote is not None else str(self.path)
        return WriteLock(self.path, self.remote, where=where, break_lock=break_lock, policy=lock_policy)

    def lock_notes(self) -> list[str]:
        """Sentences for the user about the lock: one taken over from a dead writer, one that is best effort."""
        lock = getattr(self, "_lock", None)
        return lock.notes() if lock is not None else []

    def close(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()  # a remote store's lock object goes too, if it is still this writer's

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _zarr_store(self) -> zarr.storage.LocalStore:
        return zarr.storage.LocalStore(self.path)

    def _open_or_create(self, attrs: dict[str, Any], info: StoreInfo, *, overwrite: bool) -> zarr.Group:
        store = self._zarr_store()
        if (self.path / "zarr.json").exists():
            doc = _read_doc(self.path / "zarr.json")
            old = ((doc or {}).get("attributes") or {}).get(ROOT_ATTR)
            if doc is None and not overwrite:
                raise StoreError(f"{self.path}/zarr.json is unreadable; use --overwrite to start again")
            version = format_version(old) if isinstance(old, dict) else None
            same_major = version is not None and version[0] == FORMAT_MAJOR and version[1] <= FORMAT_MINOR
            if not overwrite and not same_major and isinstance(old, dict):
                shown = f"{version[0]}.{version[1]}" if version else repr(old.get("format_version") or old.get("schema_version"))
                raise SchemaVersionError(
                    f"store {self.path} is in store format {shown}; this combo writes format {FORMAT_VERSION} "
                    "and does not mix the two in one store (it still reads it). Use --overwrite to rebuild it, "
                    "or --out to write the new format elsewhere"
                )
            if not overwrite and same_major and self.grids and version < MULTI_GRID_SINCE:
                raise SchemaVersionError(
                    f"store {self.path} is in store format {version[0]}.{version[1]}, which cannot describe this "
                    f"model's layers: they have {len(self.grids)} token grids / widths (a hierarchical model), "
                    f"stored from format {'.'.join(map(str, MULTI_GRID_SINCE))} on. Use --overwrite to rebuild it "
                    "in that format, or --out to write it elsewhere"
                )
            diff = identity_diff(old, attrs) if isinstance(old, dict) else ["no combo metadata"]
            if diff and not overwrite:
                raise StoreMismatchError(_mismatch_message(self.path, old, attrs, diff))
            if not diff and same_major:  # an older 2.x store resumed or extended stays as it is: a minor only adds
                return zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
            self._wipe()  # overwrite with other settings or another format: the whole store goes
        attrs["created"] = info.created
        # create_group keeps the lock file (open_group(mode="w") would delete it)
        group = zarr.create_group(store=store, zarr_format=3, attributes={ROOT_ATTR: attrs}, overwrite=False)
        self.consolidate()
        return group

    def _wipe(self) -> None:
        self._remove_remote()
        for child in self.path.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    # -- metadata: consolidated + manifest ----------------------------------------------------
    def consolidate(self) -> None:
        """Rewrite the consolidated metadata in the root zarr.json, so a reader that cannot list
        (a plain web server) sees the whole tree in one request."""
        with warnings.catch_warnings():
            # zarr notes that consolidated metadata is not in the v3 spec yet, and that our
            # samples.parquet / manifest.json are not zarr nodes: both expected, neither news
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
            zarr.consolidate_metadata(self._zarr_store())

    def manifest(self) -> Manifest:
        data = (self.path / MANIFEST_NAME).read_bytes() if (self.path / MANIFEST_NAME).exists() else None
        if data is None:
            return Manifest()
        try:
            return Manifest.from_bytes(data, where=str(self.path / MANIFEST_NAME))
        except StoreError:
            return Manifest()  # rebuilt from the tasks' journals (or their files) by _repair

    def publish(self, fresh: dict[str, dict[str, Entry]] | None = None) -> None:
        """Consolidate, then write manifest.json: the old entries of tasks still complete, `fresh`
        entries for newly completed ones, and the root zarr.json just written. Last thing written."""
        self.consolidate()
        old = self.manifest()
        complete = {t for t in self.attrs["tasks"] if _task_complete(self.path / t)}
        objects: dict[str, Entry] = {}
        for task in sorted(complete):
            entries = (fresh or {}).get(task)
            if entries is None:
                entries = {k: e for k, e in old.for_task(task).items() if k != f"{task}/zarr.json"}
            objects.update(entries)
            objects[f"{task}/zarr.json"] = _entry(self.path / task / "zarr.json")
        objects["zarr.json"] = _entry(self.path / "zarr.json")
        self.location.write_bytes(MANIFEST_NAME, Manifest(objects).to_bytes())
        self.sync()

    def _repair(self) -> None:
        """Complete what a killed writer left: complete tasks missing from the manifest get their
        entries (shards from the journal's recorded sha256), stale journals of finished tasks go."""
        have = self.manifest().tasks()  # none when manifest.json is missing or unreadable
        complete = [t for t in self.attrs["tasks"] if _task_complete(self.path / t)]
        fresh = {t: task_entries(self.path, t, _journal_entries(self.path / t / JOURNAL_NAME), staged=self.remote is not None)
                 for t in complete if t not in have}
        if fresh or not (self.path / MANIFEST_NAME).exists():
            self.publish(fresh)
        for task in complete:
            (self.path / task / JOURNAL_NAME).unlink(missing_ok=True)

    def damaged(self, task: str) -> list[str]:
        """Objects of a complete task that the manifest records but the disk lacks or holds at another
        size (a deleted or truncated shard): one listing of the task's folder, nothing read. Empty when
        the task is intact, incomplete or not in the manifest (then the journal, not the manifest, rules)."""
        if not _task_complete(self.path / task):
            return []
        entries = self.manifest().for_task(task)
        if not entries:
            return []
        listed = list_sizes(self.remote or self.location, prefix=f"{task}/") or {}
        missing, resized = absent_or_resized(entries, listed)
        return sorted({*missing, *resized})

    def drop_task(self, name: str) -> None:
        """Remove a task this writer created and wrote no shard of (a run that failed before its first
        shard leaves nothing half-made behind); the manifest is rewritten for the root zarr.json."""
        task_dir = self.path / name
        if _task_complete(task_dir) or (task_dir / JOURNAL_NAME).exists():
            raise StoreError(f"task {name!r} in {self.path} has written shards; not removing it")
        if task_dir.exists():
            shutil.rmtree(task_dir)
        self._remove_remote(f"{name}/")
        root_attrs = self.attrs
        if name in root_attrs["tasks"]:
            root_attrs["tasks"] = [t for t in root_attrs["tasks"] if t != name]
            self.group.attrs[ROOT_ATTR] = root_attrs
        if (self.path / MANIFEST_NAME).exists():
            self.publish()
        else:
            self.consolidate()
            self.sync()

    # -- tasks ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs[ROOT_ATTR])

    @property
    def format_text(self) -> str:
        """The store's format version as its documents record it ("2.2"; "2.1" for a 2.1 store extended)."""
        return "{}.{}".format(*self.format_version)

    def has_task(self, name: str) -> bool:
        """Whether the task was created (its attribute written), finished or not."""
        return TASK_ATTR in ((_read_doc(self.path / name / "zarr.json") or {}).get("attributes") or {})

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
        pca: PcaBasis | Sequence[PcaBasis] | None = None,
        compact_fit: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
    ) -> "TaskWriter":
        """Create the task group, or reopen it to resume; refuses a different sample plan.

        ``row_order`` (how rows were permuted from the dataset's natural order, see README "Row order") is
        recorded in the task document; a resumed task missing it (killed right after creation) gets it.
        A compact store's task takes its PCA basis (``pca``, when the encoding has PCA), stored with the
        task, and ``compact_fit`` (which split it was fitted on, how many rows): a resumed task keeps
        the basis it was created with. ``source`` (optional) records where the task's images came from
        (e.g. a Hugging Face repo id and commit; never a local path) as the task attribute ``source``.

        A multi-grid store (``info.features.grids``, format 2.3) ignores ``num_layers`` / ``num_tokens`` /
        ``feature_dim`` / ``num_prefix_tokens`` for its groups' own (pass the last group's), and takes ``pca``
        as a list of bases, one per group in order.
        """
        grid_names = [g.name for g in self.grids] if self.grids else [""]
        if self.compact is not None and self.compact.pca is not None and pca is None \
                and not (self.path / name / grid_array(PCA_COMPONENTS, grid_names[0]) / "zarr.json").exists():
            raise StoreError(f"task {name!r}: a {self.compact.name} store needs the task's fitted PCA basis"
                             + (f" (a list of one per grid group: {', '.join(grid_names)})" if self.grids else ""))
        bases = self._bases(name, pca)
        if self.grids and self.format_version < MULTI_GRID_SINCE:
            raise SchemaVersionError(f"task {name!r}: store {self.path} is in store format {self.format_text}, which "
                                     "cannot hold a multi-grid task; rebuild it with --overwrite")
        if "/" in name or name.startswith("."):
            raise StoreError(f"task name {name!r} must be a plain folder name")
        task_dir = self.path / name
        if task_dir.exists() and overwrite:
            shutil.rmtree(task_dir)
            self._remove_remote(f"{name}/")
        if task_dir.exists() and TASK_ATTR not in ((_read_doc(task_dir / "zarr.json") or {}).get("attributes") or {}):
            mains = [task_dir / grid_array(CODES if self.compact else TOKENS, g) / "c" for g in grid_names]
            if (task_dir / JOURNAL_NAME).exists() or any(c.exists() and any(c.iterdir()) for c in mains):
                raise StoreError(
                    f"task {name!r} in {self.path} has written shards but its zarr.json is unreadable; "
                    "nothing was deleted. Use --overwrite to extract the task again"
                )
            shutil.rmtree(task_dir)  # creation was interrupted before any shard: start the task afresh
            self._remove_remote(f"{name}/")
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
                self.consolidate()
                self.sync()
            return writer
        split_names = sample_table.split_names(samples)
        clash = sorted(s for s in split_names if is_reserved(s))
        if clash:
            raise StoreError(f"task {name!r}: split name(s) {clash} clash with the store's array names")
        ids = samples.column(SAMPLE_ID).to_pylist()
        if self.format_version >= ID_BYTES_SINCE:
            try:
                id_values, id_dims = sample_table.ids_to_bytes(ids), ("sample", SAMPLE_ID_BYTE)
            except ValueError as err:
                raise StoreError(f"task {name!r}: {err}") from None
            id_text = "image path relative to the dataset root: UTF-8 bytes, zero-padded to the longest id"
        else:  # a 2.0 / 2.1 store: zarr-python's variable-length strings, as its other tasks have
            id_values, id_dims = np.asarray(ids, dtype=str), ("sample",)
            id_text = "image path relative to the dataset root"
        n = samples.num_rows
        task_group = self.group.create_group(name, overwrite=True)
        coords = " ".join([*COORDINATES, *split_names])
        if self.grids:
            self._grid_arrays(task_group, n=n, coords=coords, bases=bases)
        else:
            self._plain_arrays(task_group, n=n, num_layers=num_layers, num_tokens=num_tokens, feature_dim=feature_dim,
                               num_prefix_tokens=num_prefix_tokens, coords=coords, pca=bases[0])
        self._coordinate(task_group, SAMPLE_ID, id_values, id_dims, id_text)
        self._coordinate(task_group, "label", samples.column("label").to_numpy().astype(np.int64), "sample",
                         "class index into the task's classes")
        self._coordinate(task_group, "valid", samples.column("valid").to_numpy(zero_copy_only=False).astype(bool),
                         "sample", "false for images skipped with --skip-bad (their rows read as NaN)")
        for split in split_names:
            member = samples.column(sample_table.SPLIT_PREFIX + split).to_numpy(zero_copy_only=False).astype(bool)
            self._coordinate(task_group, split, member, "sample", f"row belongs to split {split}")
        self.location.write_bytes(f"{name}/{SAMPLES_NAME}", sample_table.to_bytes(samples, classes=classes, task=name,
                                                                                  format_version=self.format_text))
        splits = {s: int(samples.column("in_" + s).to_numpy().sum()) for s in split_names}
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
            **({"source": _json_normal(source)} if source is not None else {}),
            **({"compact": _json_normal({**(compact_fit or {}), **self.compact.to_attrs()})} if self.compact else {}),
        }
        root_attrs = self.attrs
        if name not in root_attrs["tasks"]:
            root_attrs["tasks"] = sorted([*root_attrs["tasks"], name])
            self.group.attrs[ROOT_ATTR] = root_attrs
        self.consolidate()
        self.sync()  # a remote store: the task's metadata is there before any worker writes a shard
        return TaskWriter(self, name)

    def _bases(self, name: str, pca: PcaBasis | Sequence[PcaBasis] | None) -> list[PcaBasis | None]:
        """The PCA basis of each group (one None per group when there is none): a single-grid task takes one
        basis, a multi-grid one a list of one per group, each [L_k, D_k, R]."""
        groups = self.grids or []
        if pca is None:
            return [None] * max(1, len(groups))
        if not groups:
            if not isinstance(pca, PcaBasis):
                raise StoreError(f"task {name!r}: a single-grid store takes one PCA basis, not {type(pca).__name__}")
            return [pca]
        if isinstance(pca, PcaBasis) or len(pca) != len(groups):
            raise StoreError(f"task {name!r}: a multi-grid store takes a list of PCA bases, one per grid group "
                             f"({', '.join(g.name for g in groups)})")
        for grid, basis in zip(groups, pca):
            if tuple(basis.components.shape[:2]) != (grid.num_layers, grid.feature_dim):
                raise StoreError(f"task {name!r}: the PCA basis of grid group {grid.name} has components of shape "
                                 f"{tuple(basis.components.shape)}, expected [{grid.num_layers}, {grid.feature_dim}, R]")
        return list(pca)

    def _plain_arrays(self, group: zarr.Group, *, n: int, num_layers: int, num_tokens: int, feature_dim: int,
                      num_prefix_tokens: int, coords: str, pca: PcaBasis | None) -> None:
        """A single-grid task's row arrays and `layer` coordinate: 2.2's layout, name for name."""
        if self.compact is None:
            tokens = group.create_array(
                name=TOKENS, **self.layout.array_kwargs((n, num_layers, num_tokens, feature_dim), dimension_names=TOKEN_DIMS)
            )
            tokens.attrs.update({
                "long_name": "patch tokens of every block output (residual stream), row-major token grid",
                "coordinates": coords,
            })
        else:
            self._compact_arrays(group, n=n, num_layers=num_layers, num_tokens=num_tokens,
                                 feature_dim=feature_dim, coords=coords, pca=pca)
        if num_prefix_tokens:
            prefix = group.create_array(
                name=PREFIX,
                **self.layout.array_kwargs((n, num_layers, num_prefix_tokens, feature_dim), dimension_names=PREFIX_DIMS),
            )
            prefix.attrs.update({"long_name": "prefix (cls / register) tokens of every block output", "coordinates": coords})
        layers = [int(x) for x in self.attrs["features"]["layers"]]
        self._coordinate(group, "layer", np.asarray(layers, dtype=np.int64), "layer", "block index (0 = first block)")

    def _grid_arrays(self, group: zarr.Group, *, n: int, coords: str, bases: list[PcaBasis | None]) -> None:
        """A multi-grid task's arrays (format 2.3): each group's tokens (or compact arrays) and `layer_<g>`
        coordinate, named and dimensioned with the group's suffix; no `tokens`, `layer` or prefix."""
        for grid, basis in zip(self.grids or [], bases):
            g = grid.name
            shape = (n, grid.num_layers, grid.num_tokens, grid.feature_dim)
            if self.compact is None:
                tokens = group.create_array(name=grid_array(TOKENS, g),
                                            **self.layout.array_kwargs(shape, dimension_names=grid_dims(TOKEN_DIMS, g)))
                tokens.attrs.update({
                    "long_name": f"patch tokens of grid group {g} ({grid.token_grid[0]}x{grid.token_grid[1]} tokens, "
                                 f"width {grid.feature_dim}), row-major token grid",
                    "coordinates": coords,
                })
            else:
                self._compact_arrays(group, n=n, num_layers=grid.num_layers, num_tokens=grid.num_tokens,
                                     feature_dim=grid.feature_dim, coords=coords, pca=basis, grid=g)
            self._coordinate(group, grid_array("layer", g), np.asarray(grid.layers, dtype=np.int64), grid_array("layer", g),
                             f"model layer index of each layer of grid group {g}")

    def _compact_arrays(self, group: zarr.Group, *, n: int, num_layers: int, num_tokens: int, feature_dim: int,
                        coords: str, pca: PcaBasis | None, grid: str = "") -> None:
        """The arrays of a compact task (store_schema/compact.py): sharded by rows like tokens, filled with
        a value that says "never written": NaN, and from format 2.2 -128 codes and -1 outlier indexes. A group
        of a multi-grid task (`grid`) gets them with its suffix, its own encoding and basis."""
        spec = self.compact
        assert spec is not None
        for name, (shape, dtype) in spec.array_specs(n, num_layers, num_tokens, feature_dim).items():
            dims = grid_dims(COMPACT_ROW_ARRAYS[name], grid)
            if name == CODES:
                kwargs = self.layout.array_kwargs(shape, dimension_names=dims)
            else:  # small: one chunk per shard of rows
                kwargs = {"shape": shape, "chunks": (self.layout.rows_per_shard, *shape[1:]),
                          "compressors": self.layout.compressors(), "dimension_names": dims}
            kwargs["dtype"] = dtype
            kwargs["fill_value"] = fill_value(name, dtype, markers=self.format_version >= FILL_MARKERS_SINCE)
            array = group.create_array(name=grid_array(name, grid), **kwargs)
            array.attrs.update({"long_name": ARRAY_DESCRIPTIONS[name], "coordinates": coords})
        if pca is not None:
            for name, values, dims, text in (
                (PCA_COMPONENTS, pca.components, ("layer", "channel", "code"),
                 "principal directions of the standardised patch tokens of each layer (columns)"),
                (PCA_MEAN, pca.mean, ("layer", "channel"), "mean of the standardised patch tokens of each layer"),
            ):
                array = group.create_array(name=grid_array(name, grid), shape=values.shape, dtype="float32",
                                           chunks=values.shape, compressors=self.layout.compressors(),
                                           dimension_names=grid_dims(dims, grid), attributes={"description": text})
                array[...] = values.astype(np.float32)

    def _coordinate(self, group: zarr.Group, name: str, values: np.ndarray, dims: str | tuple[str, ...],
                    description: str) -> None:
        """A small array in one chunk: `layer`, or one along the rows (sample_id, label, valid, a split)."""
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        array = group.create_array(
            name=name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
            chunks=tuple(max(1, n) for n in values.shape), dimension_names=dims,
            compressors=self.layout.compressors(),  # the tokens' codec and crc32c: one checksum mechanism
            attributes={"description": description},
        )
        array[:] = values


def _row_bytes(info: StoreInfo, layout: StoreLayout, compact: CompactSpec | None) -> int:
    """Raw bytes of one image's stored arrays, summed over every grid group (what shards are sized by, so every
    group's arrays share the row shards); refuses a PCA wider than any group's channels."""
    feats = info.features
    groups = [(g.num_layers, g.num_tokens, g.feature_dim, g.name) for g in feats.grids] if feats.grids \
        else [(len(feats.layers), feats.num_tokens, feats.feature_dim, "")]
    prefix = len(feats.layers) * feats.num_prefix_tokens * feats.feature_dim * layout.itemsize
    if compact is None:
        return sum(lay * t * d for lay, t, d, _ in groups) * layout.itemsize + prefix
    for _, _, d, g in groups:
        compact.check_dim(d, where=f"grid group {g}: " if g else "")
    return sum(compact.row_bytes(lay, t, d) for lay, t, d, _ in groups) + prefix


def _task_complete(task_dir: Path) -> bool:
    attrs = ((_read_doc(task_dir / "zarr.json") or {}).get("attributes") or {}).get(TASK_ATTR) or {}
    return bool(attrs.get("complete"))
