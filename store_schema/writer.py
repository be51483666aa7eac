"""Creating and filling a store: one writer process per store, whole shards per write.

Completeness is recorded, never inferred. Every finished shard is fsync'ed, then appended with
its sha256 to a per-task journal (fsync'ed too); a killed run resumes from the journal after
re-hashing each journaled shard, so a shard cut short by the kill is simply redone. `finalize`
flips the task's `complete` flag, then `publish` rewrites the consolidated metadata and the
root manifest (manifest.json) last, and only then is the journal removed: a kill anywhere in
between leaves a store the next writer completes (`_repair`), never one it deletes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from . import samples as sample_table
from . import staging as stage
from .errors import SchemaVersionError, StoreError, StoreLockedError, StoreMismatchError
from .compact import (
    CHANNEL_SCALE,
    CODES,
    MAP_STATS,
    OUTLIER_INDEX,
    OUTLIER_VALUE,
    PCA_COMPONENTS,
    PCA_MEAN,
    TOKEN_SCALE,
    CompactSpec,
    PcaBasis,
    encode,
)
from .layout import StoreLayout
from .location import Location, fsync_dir, is_hidden, is_url, list_sizes, resolve, write_file_atomic
from .manifest import MANIFEST_NAME, Entry, Manifest, absent_or_resized, sha256_bytes
from .metadata import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    FORMAT_VERSION,
    ROOT_ATTR,
    TASK_ATTR,
    StoreInfo,
    format_version,
    identity_diff,
    utc_now,
)
from .shardwrite import Written, write_shard, write_threads

LOCK_NAME = ".combo-write.lock"
JOURNAL_NAME = ".journal.jsonl"
CHECKSUMS_NAME = "checksums.json"  # format 1 only (see manifest.py)
SAMPLES_NAME = "samples.parquet"
TOKENS = "tokens"
PREFIX = "prefix"
TOKEN_DIMS = ("sample", "layer", "token", "channel")
PREFIX_DIMS = ("sample", "layer", "prefix_token", "channel")
# 1-D coordinate arrays of a task (besides one boolean per split, named after the split)
COORDINATES = ("sample_id", "label", "valid")
# arrays of a compact task (store_schema/compact.py), written a shard of rows at a time like tokens
COMPACT_ROW_ARRAYS = {  # name -> dimension names
    CODES: ("sample", "layer", "token", "code"),
    TOKEN_SCALE: ("sample", "layer", "token"),
    CHANNEL_SCALE: ("sample", "layer", "code"),
    OUTLIER_INDEX: ("sample", "layer", "token", "kept"),
    OUTLIER_VALUE: ("sample", "layer", "token", "kept"),
    MAP_STATS: ("sample", "layer", "stat"),
}
ROW_ARRAYS = frozenset({TOKENS, PREFIX, *COMPACT_ROW_ARRAYS})  # one shard per block of rows
RESERVED_NAMES = frozenset({TOKENS, PREFIX, "layer", *COORDINATES, *TOKEN_DIMS, *PREFIX_DIMS, *COMPACT_ROW_ARRAYS,
                            PCA_COMPONENTS, PCA_MEAN, "code", "kept", "stat"})
ARRAY_DESCRIPTIONS = {
    CODES: "encoded patch tokens (store_schema/compact.py: int8 codes, or PCA coefficients in float16)",
    TOKEN_SCALE: "int8 scale of every token (negative: the token ignores channel_scale)",
    CHANNEL_SCALE: "int8 scale of every channel of every (image, layer) map",
    OUTLIER_INDEX: "channels of each token's largest values, kept beside the int8 codes",
    OUTLIER_VALUE: "each token's largest values, kept at float16",
    MAP_STATS: "mean and std of every (image, layer) map of the original tokens (ComBo's normalisation)",
}


def shard_key(task: str, array: str, block: int, ndim: int = 4) -> str:
    """Store key of shard `block` of an `ndim`-dimensional row array (zarr v3 default chunk-key encoding)."""
    return f"{task}/{array}/c/{block}" + "/0" * (ndim - 1)


def shard_block(task: str, key: str) -> int | None:
    """Block index of a shard key of one of `task`'s row arrays (inverse of `shard_key`); None otherwise."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == task and parts[1] in ROW_ARRAYS and parts[2] == "c" \
            and parts[3].isdigit() and all(p == "0" for p in parts[4:]):
        return int(parts[3])
    return None


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



def is_row_shard(key: str) -> bool:
    """A shard of a task's row arrays ("task/tokens/c/3/0/0/0"): written (and, for a remote store, uploaded)
    by the shard writers, journaled, never mirrored."""
    parts = key.split("/")
    return len(parts) >= 3 and parts[1] in ROW_ARRAYS and parts[2] == "c"


def _staging_private(key: str) -> bool:
    """What a staging folder keeps when it is refreshed from its remote store: the lock and the journals."""
    return key == LOCK_NAME or key.endswith("/" + JOURNAL_NAME)


def _read_doc(path: Path) -> dict[str, Any] | None:
    """A zarr.json as a dict; None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Opens (creating if needed) a store for writing and holds its lock until closed.

    A remote store (s3://, any writable fsspec URL) is written through a staging folder on this machine
    (store_schema/staging.py): `path` / `location` are then the staging folder and `remote` the store."""

    def __init__(self, path: str | os.PathLike, info: StoreInfo, layout: StoreLayout, *, overwrite: bool = False,
                 compact: CompactSpec | None = None, storage_options: dict[str, Any] | None = None):
        self.location: Location = resolve(path, storage_options=storage_options if is_url(path) else None)
        self.remote: Location | None = None
        if self.location.kind == "zip":
            raise StoreError(f"{path}: zip stores are read-only; write a folder, then `combo store pack` it")
        if self.location.kind == "remote":
            self.remote = self.location
            self.location = resolve(stage.staging_dir(self.remote))
        self.path = Path(self.location.root)
        feats = info.features
        if compact is not None:
            compact.check_dim(feats.feature_dim)
            row_bytes = compact.row_bytes(len(feats.layers), feats.num_tokens, feats.feature_dim) \
                + len(feats.layers) * feats.num_prefix_tokens * feats.feature_dim * layout.itemsize
        else:
            row_bytes = len(feats.layers) * (feats.num_tokens + feats.num_prefix_tokens) * feats.feature_dim * layout.itemsize
        self.compact = compact
        self.layout = layout.for_rows(row_bytes)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_handle = self._acquire_lock()
        try:
            storage = self.layout.to_attrs()
            if compact is not None:
                storage["compact"] = compact.to_attrs()
            attrs = _json_normal(info.to_attrs(storage=storage, tasks=[]))
            if self.remote is not None:
                self._refresh_staging()
            self.group = self._open_or_create(attrs, info, overwrite=overwrite)
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
        """A remote store: upload what changed in the staging folder, manifest last (local store: nothing)."""
        if self.remote is not None:
            stage.mirror(self.path, self.remote, skip=is_row_shard)

    def _remove_remote(self, prefix: str = "") -> None:
        """A remote store: delete a task folder ("task/") or, with no prefix, the whole store there."""
        if self.remote is not None:
            stage.delete_remote(self.remote, prefix)
            stage.forget(self.path, prefix)

    def _acquire_lock(self):
        lock_path = self.path / LOCK_NAME
        while True:
            handle = open(lock_path, "a+")
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
            # The lock file is removed on close: if a finishing writer removed it after we opened it,
            # we locked a file nobody else can see, so take the one now on disk instead.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        return handle

    def close(self) -> None:
        handle, self._lock_handle = getattr(self, "_lock_handle", None), None
        if handle is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)  # no lock file left behind
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

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
            diff = identity_diff(old, attrs) if isinstance(old, dict) else ["no combo metadata"]
            if diff and not overwrite:
                raise StoreMismatchError(_mismatch_message(self.path, old, attrs, diff))
            if not diff and same_major:  # a 2.0 store resumed or extended stays as it is: 2.1 only adds
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
        pca: PcaBasis | None = None,
        compact_fit: dict[str, Any] | None = None,
    ) -> "TaskWriter":
        """Create the task group, or reopen it to resume; refuses a different sample plan.

        ``row_order`` (how rows were permuted from the dataset's natural order, see README "Row order") is
        recorded in the task document; a resumed task missing it (killed right after creation) gets it.
        A compact store's task takes its PCA basis (``pca``, when the encoding has PCA), stored with the
        task, and ``compact_fit`` (which split it was fitted on, how many rows): a resumed task keeps
        the basis it was created with.
        """
        if self.compact is not None and self.compact.pca is not None and pca is None \
                and not (self.path / name / PCA_COMPONENTS / "zarr.json").exists():
            raise StoreError(f"task {name!r}: a {self.compact.name} store needs the task's fitted PCA basis")
        if "/" in name or name.startswith("."):
            raise StoreError(f"task name {name!r} must be a plain folder name")
        task_dir = self.path / name
        if task_dir.exists() and overwrite:
            shutil.rmtree(task_dir)
            self._remove_remote(f"{name}/")
        if task_dir.exists() and TASK_ATTR not in ((_read_doc(task_dir / "zarr.json") or {}).get("attributes") or {}):
            shards = task_dir / (CODES if self.compact else TOKENS) / "c"
            if (task_dir / JOURNAL_NAME).exists() or (shards.exists() and any(shards.iterdir())):
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
        clash = sorted(set(split_names) & RESERVED_NAMES)
        if clash:
            raise StoreError(f"task {name!r}: split name(s) {clash} clash with the store's array names")
        n = samples.num_rows
        task_group = self.group.create_group(name, overwrite=True)
        coords = " ".join([*COORDINATES, *split_names])
        if self.compact is None:
            tokens = task_group.create_array(
                name=TOKENS, **self.layout.array_kwargs((n, num_layers, num_tokens, feature_dim), dimension_names=TOKEN_DIMS)
            )
            tokens.attrs.update({
                "long_name": "patch tokens of every block output (residual stream), row-major token grid",
                "coordinates": coords,
            })
        else:
            self._compact_arrays(task_group, n=n, num_layers=num_layers, num_tokens=num_tokens,
                                 feature_dim=feature_dim, coords=coords, pca=pca)
        if num_prefix_tokens:
            prefix = task_group.create_array(
                name=PREFIX,
                **self.layout.array_kwargs((n, num_layers, num_prefix_tokens, feature_dim), dimension_names=PREFIX_DIMS),
            )
            prefix.attrs.update({"long_name": "prefix (cls / register) tokens of every block output", "coordinates": coords})
        layers = [int(x) for x in self.attrs["features"]["layers"]]
        self._coordinate(task_group, "layer", np.asarray(layers, dtype=np.int64), "layer", "block index (0 = first block)")
        self._coordinate(task_group, "sample_id", np.asarray(samples.column("sample_id").to_pylist(), dtype=str),
                         "sample", "image path relative to the dataset root")
        self._coordinate(task_group, "label", samples.column("label").to_numpy().astype(np.int64), "sample",
                         "class index into the task's classes")
        self._coordinate(task_group, "valid", samples.column("valid").to_numpy(zero_copy_only=False).astype(bool),
                         "sample", "false for images skipped with --skip-bad (their rows read as NaN)")
        for split in split_names:
            member = samples.column(sample_table.SPLIT_PREFIX + split).to_numpy(zero_copy_only=False).astype(bool)
            self._coordinate(task_group, split, member, "sample", f"row belongs to split {split}")
        self.location.write_bytes(f"{name}/{SAMPLES_NAME}", sample_table.to_bytes(samples, classes=classes, task=name))
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
            **({"compact": _json_normal({**(compact_fit or {}), **self.compact.to_attrs()})} if self.compact else {}),
        }
        root_attrs = self.attrs
        if name not in root_attrs["tasks"]:
            root_attrs["tasks"] = sorted([*root_attrs["tasks"], name])
            self.group.attrs[ROOT_ATTR] = root_attrs
        self.consolidate()
        self.sync()  # a remote store: the task's metadata is there before any worker writes a shard
        return TaskWriter(self, name)

    def _compact_arrays(self, group: zarr.Group, *, n: int, num_layers: int, num_tokens: int, feature_dim: int,
                        coords: str, pca: PcaBasis | None) -> None:
        """The arrays of a compact task (store_schema/compact.py): sharded by rows like tokens, NaN-filled
        where a float can say "never written"."""
        spec = self.compact
        assert spec is not None
        for name, (shape, dtype) in spec.array_specs(n, num_layers, num_tokens, feature_dim).items():
            if name == CODES:
                kwargs = self.layout.array_kwargs(shape, dimension_names=COMPACT_ROW_ARRAYS[name])
            else:  # small: one chunk per shard of rows
                kwargs = {"shape": shape, "chunks": (self.layout.rows_per_shard, *shape[1:]),
                          "compressors": self.layout.compressors(), "dimension_names": COMPACT_ROW_ARRAYS[name]}
            kwargs["dtype"] = dtype
            kwargs["fill_value"] = float("nan") if np.dtype(dtype).kind == "f" else 0
            array = group.create_array(name=name, **kwargs)
            array.attrs.update({"long_name": ARRAY_DESCRIPTIONS[name], "coordinates": coords})
        if pca is not None:
            for name, values, dims, text in (
                (PCA_COMPONENTS, pca.components, ("layer", "channel", "code"),
                 "principal directions of the standardised patch tokens of each layer (columns)"),
                (PCA_MEAN, pca.mean, ("layer", "channel"), "mean of the standardised patch tokens of each layer"),
            ):
                array = group.create_array(name=name, shape=values.shape, dtype="float32", chunks=values.shape,
                                           compressors=self.layout.compressors(), dimension_names=dims,
                                           attributes={"description": text})
                array[...] = values.astype(np.float32)

    def _coordinate(self, group: zarr.Group, name: str, values: np.ndarray, dim: str, description: str) -> None:
        array = group.create_array(
            name=name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
            chunks=(max(1, values.shape[0]),), dimension_names=(dim,),
            compressors=self.layout.compressors(),  # the tokens' codec and crc32c: one checksum mechanism
            attributes={"description": description},
        )
        array[:] = values


def _task_complete(task_dir: Path) -> bool:
    attrs = ((_read_doc(task_dir / "zarr.json") or {}).get("attributes") or {}).get(TASK_ATTR) or {}
    return bool(attrs.get("complete"))


def _entry(path: Path) -> Entry:
    data = path.read_bytes()
    return Entry(sha256=sha256_bytes(data), size=len(data))


def _journal_entries(path: Path) -> dict[str, Entry]:
    """Shard key -> recorded entry from a journal; lines cut by a kill are skipped."""
    out: dict[str, Entry] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            sizes = entry.get("sizes") or {}
            for key, digest in entry["checksums"].items():
                out[key] = Entry(sha256=str(digest), size=sizes.get(key))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    return out


def task_entries(root: Path, task: str, journal: dict[str, Entry], *, staged: bool = False) -> dict[str, Entry]:
    """Manifest entries of every object of a task except its zarr.json: shards from the journal's
    recorded sha256 where there is one (they were hashed when written), everything else hashed now.
    `staged`: `root` is the staging folder of a remote store, whose shards are only in the journal."""
    out: dict[str, Entry] = {}
    base = root / task
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.name == "zarr.json" and path.parent == base:
            continue
        rel = path.relative_to(root).as_posix()
        if is_hidden(rel):
            continue
        recorded = journal.get(rel)
        out[rel] = Entry(sha256=recorded.sha256, size=path.stat().st_size) if recorded else _entry(path)
    if staged:
        out.update({k: e for k, e in journal.items() if k.startswith(f"{task}/") and k not in out})
    return dict(sorted(out.items()))


class ShardWriter:
    """Writes whole shards of one task and returns their journal entry; it takes no lock and keeps no journal.

    The process holding the store's lock (`StoreWriter`) records each entry (`TaskWriter.record`), so a
    worker process of a distributed extraction (extract/cluster.py) writes shards into the store knowing
    only its path, while one client owns the lock, the journal and `finalize`. A shard's inner chunks are
    encoded on `threads` threads (store_schema/shardwrite.py; default $COMBO_WRITE_THREADS, else every core)."""

    def __init__(self, path: str | os.PathLike, name: str, *, layout: StoreLayout, compact: CompactSpec | None,
                 feature_dim: int, remote: Location | None = None, threads: int | None = None):
        self.path = Path(path)
        self.threads = write_threads(threads)
        self.remote = remote  # a remote store: `path` is a staging folder, each shard is uploaded, then deleted here
        self.name = name
        self.layout = layout
        self.compact = compact
        self.feature_dim = feature_dim
        self.group = zarr.open_group(zarr.storage.LocalStore(self.path), path=name, mode="r+", zarr_format=3,
                                     use_consolidated=False)
        self.tokens = self.group[CODES if compact else TOKENS]
        self.prefix = self.group[PREFIX] if (self.path / name / PREFIX / "zarr.json").exists() else None
        self.pca = (PcaBasis(self.group[PCA_COMPONENTS][...], self.group[PCA_MEAN][...])
                    if compact is not None and compact.pca is not None else None)
        self.num_rows = int(self.tokens.shape[0])
        step = layout.rows_per_shard
        self.blocks: list[range] = [range(s, min(s + step, self.num_rows)) for s in range(0, self.num_rows, step)]

    @classmethod
    def open(cls, path: str | os.PathLike, name: str, *, storage_options: dict[str, Any] | None = None) -> "ShardWriter":
        """The shard writer of task `name` of the store at `path` (a folder or a URL), configured from the
        store's own metadata. For a URL the task's metadata is fetched into a temporary folder of this process."""
        remote, scratch = None, None
        if is_url(path):
            remote = resolve(path, storage_options=storage_options)
            scratch = tempfile.TemporaryDirectory(prefix="combo-shards-")
            path = scratch.name
            write_file_atomic(Path(path) / "zarr.json", remote.read_bytes("zarr.json"))
            stage.pull(remote, Path(path), skip=is_row_shard, prefix=f"{name}/")
        doc = _read_doc(Path(path) / "zarr.json")
        attrs = ((doc or {}).get("attributes") or {}).get(ROOT_ATTR)
        if not isinstance(attrs, dict):
            raise StoreError(f"{path}: no combo store here (no readable zarr.json with {ROOT_ATTR!r})")
        storage = attrs.get("storage") or {}
        writer = cls(path, name, layout=StoreLayout.from_attrs(storage), compact=CompactSpec.from_attrs(storage.get("compact")),
                     feature_dim=int(attrs["features"]["feature_dim"]), remote=remote)
        writer._scratch = scratch  # removed with the writer
        return writer

    def arrays(self) -> list[tuple[str, zarr.Array]]:
        """Every row array, a shard of each per block (tokens, or a compact task's arrays; prefix)."""
        main = [(n, self.group[n]) for n in self.compact.arrays()] if self.compact else [(TOKENS, self.tokens)]
        return main + ([(PREFIX, self.prefix)] if self.prefix is not None else [])

    def store_dim(self, array_name: str) -> int:
        """Channels of the values `write` takes for an array (a compact task takes full-size tokens)."""
        if array_name == PREFIX and self.prefix is not None:
            return int(self.prefix.shape[3])
        return self.feature_dim if self.compact else int(self.tokens.shape[3])

    def key(self, array_name: str, array: zarr.Array, block: int) -> str:
        return shard_key(self.name, array_name, block, array.ndim)

    def write(
        self,
        block: int,
        tokens: np.ndarray,
        prefix: np.ndarray | None = None,
        *,
        skipped: Iterable[Skipped] = (),
    ) -> dict[str, Any]:
        """Write block `block`'s shards (each fsynced) and return the journal entry naming them with their sha256."""
        rows = self.blocks[block]
        skipped = list(skipped)
        unwritten = np.zeros(len(rows), dtype=bool)
        for s in skipped:
            if s.row not in rows:
                raise StoreError(f"task {self.name}: skipped row {s.row} is not in block {block} (rows {rows.start}..{rows.stop - 1})")
            unwritten[s.row - rows.start] = True
        dtype = np.dtype(self.layout.dtype)
        inputs = [(TOKENS, self.tokens if self.compact is None else None, tokens)]
        if self.prefix is not None:
            if prefix is None:
                raise StoreError(f"task {self.name}: block {block} needs prefix tokens")
            inputs.append((PREFIX, self.prefix, prefix))
        parts: list[tuple[str, zarr.Array, np.ndarray]] = []
        for array_name, array, data in inputs:
            shape = self.tokens.shape if array is None else array.shape
            expected = (len(rows), *shape[1:3], self.store_dim(array_name))
            if tuple(data.shape) != expected:
                raise StoreError(f"task {self.name}: block {block} of {array_name} has shape {data.shape}, expected {expected}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = np.array(data, dtype=dtype, order="C", copy=True)
            finite = np.isfinite(cast).reshape(len(rows), -1).all(axis=1)
            bad = sorted(int(rows[i]) for i in np.nonzero(~finite & ~unwritten)[0])
            if bad:
                raise StoreError(
                    f"task {self.name}: rows {bad[:5]} of {array_name} are not finite in {dtype} "
                    "(values overflow float16? re-run with --dtype float32)"
                )
            if array is None:  # a compact task: the tokens become its arrays, from the values as stored at full size
                cast[unwritten] = 0
                for (name, target), encoded in zip(self.arrays(), encode(cast, self.compact, self.pca)):
                    if encoded.dtype.kind == "f":
                        encoded[unwritten] = np.nan  # NaN marks "never written", as in full-size tokens
                    parts.append((name, target, encoded))
                continue
            # NaN marks "never written", so a skipped image can't pass for data (format 1 wrote zeros)
            cast[unwritten] = np.nan if self.layout.fill_nan else 0
            parts.append((array_name, array, cast))
        hashed: dict[str, Written] = {}  # shards written (fsynced, renamed) and hashed as they went to disk
        for array_name, array, cast in parts:
            # a shard left by a killed attempt goes first: zarr would read (and trip over) its index
            key = self.key(array_name, array, block)
            path = self.path / key
            path.unlink(missing_ok=True)
            written = write_shard(array, cast, path, threads=self.threads)
            if not written:  # a layout shardwrite leaves to zarr
                array[rows.start : rows.stop] = cast
            elif written.sha256 is not None:
                hashed[key] = written
            if not path.exists():  # every chunk the fill value (every row skipped): neither writer keeps a file,
                # yet every shard is in the manifest, so the block's NaN chunks are written out explicitly
                with zarr.config.set({"array.write_empty_chunks": True}):
                    zarr.open_array(array.store, path=array.path, mode="r+")[rows.start : rows.stop] = cast
        checksums, sizes = {}, {}
        for array_name, array in self.arrays():
            key = self.key(array_name, array, block)
            path = self.path / key
            if self.remote is None and key in hashed:  # durable already; no need to read it back
                checksums[key], sizes[key] = hashed[key].sha256, hashed[key].size
                continue
            if self.remote is None:
                _fsync_file(path)  # the data is durable before the journal says it is there
            data = path.read_bytes()
            checksums[key], sizes[key] = sha256_bytes(data), len(data)
            if self.remote is not None:  # one put (atomic), its sha256 kept with it; the local copy goes
                self.remote.write_bytes(key, data, sha256=checksums[key])
                path.unlink()
            else:
                fsync_dir(path.parent)
        return {"block": block, "checksums": checksums, "sizes": sizes, "skipped": [s.__dict__ for s in skipped]}


class TaskWriter:
    """Writes one task's shards; safe to call `write_block` from one background thread."""

    def __init__(self, store: StoreWriter, name: str):
        self.store = store
        self.name = name
        self.shards = ShardWriter(store.path, name, layout=store.layout, compact=store.compact,
                                  feature_dim=int(store.attrs["features"]["feature_dim"]), remote=store.remote)
        self.group = self.shards.group
        self.compact = store.compact
        self.tokens = self.shards.tokens
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
        tokens: np.ndarray,
        prefix: np.ndarray | None = None,
        *,
        skipped: Iterable[Skipped] = (),
    ) -> None:
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
                                 sample_table.to_bytes(table, classes=attrs.get("classes") or [], task=self.name))
            self.group["valid"][:] = table.column("valid").to_numpy(zero_copy_only=False).astype(bool)
        attrs = self.attrs
        attrs.update(complete=True, skipped=[s.__dict__ for s in skipped], completed=utc_now())
        self.group.attrs[TASK_ATTR] = attrs
        _fsync_file(self.store.path / self.name / "zarr.json")
        journal = {k: Entry(sha256=v, size=self.sizes.get(k)) for d in self.done.values() for k, v in d.items()}
        self.store.publish({self.name: task_entries(self.store.path, self.name, journal,
                                                    staged=self.store.remote is not None)})
        self._journal_path.unlink(missing_ok=True)
