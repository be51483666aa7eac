"""Reading a store: read-only by construction, lazily, from a path, a zip or a URL."""

from __future__ import annotations

import json
import os
import threading
import zipfile
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import zarr

from . import samples as sample_table
from .errors import SchemaVersionError, StoreError, StoreIncompleteError, StoreNotFoundError
from .compact import CODES, PCA_COMPONENTS, PCA_MEAN, CompactSpec, PcaBasis, decode
from .grids import GridSpec, grid_array, grid_features, grids_of
from .layout import StoreLayout
from .location import Location, list_sizes, resolve
from .manifest import Manifest, absent_or_resized, describe_missing, load_manifest, verify_bytes
from .metadata import FORMAT_MAJOR, FORMAT_NAME, FORMAT_VERSION, ROOT_ATTR, TASK_ATTR, UPGRADE_HINT, format_version
from . import shardread
from .shardread import ShardFiles, ShardSpec
from .writer import PREFIX, SAMPLES_NAME, TOKENS, shard_key


def _load_json(location: Location, key: str) -> dict[str, Any]:
    try:
        raw = location.read_bytes(key)
    except StoreError:  # missing, unreachable, a damaged zip entry: each already names the store and key
        raise
    except Exception as err:  # noqa: BLE001 - network / permission errors name the key
        raise StoreError(f"{location.url}: cannot read {key}: {err}") from err
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{location.url}: {key} is not valid JSON ({err}; truncated or corrupt); "
                         f"run `combo store validate {location.url}`") from err


def check_root_attrs(location: Location, doc: dict[str, Any]) -> dict[str, Any]:
    """The `combo` root attribute, after the checks every reader needs (format, version)."""
    attrs = (doc.get("attributes") or {}).get(ROOT_ATTR)
    if doc.get("node_type") != "group" or not isinstance(attrs, dict):
        raise StoreError(f"{location.url} is a zarr node but not a combo feature store (no '{ROOT_ATTR}' attribute)")
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{location.url}: unexpected format {attrs.get('format')!r}, expected {FORMAT_NAME!r}")
    version = format_version(attrs)
    if version is None or version[0] < 1 or version[0] > FORMAT_MAJOR:
        shown = attrs.get("format_version") or attrs.get("schema_version")
        raise SchemaVersionError(
            f"{location.url} was written in store format {shown}; this combo reads formats 1.x and "
            f"{FORMAT_MAJOR}.x (it writes {FORMAT_VERSION}). Upgrade it ({UPGRADE_HINT}) to read this store."
        )
    return attrs


def consolidated(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The consolidated metadata of a root zarr.json document (key -> node document), if any."""
    meta = (doc.get("consolidated_metadata") or {}).get("metadata")
    return meta if isinstance(meta, dict) else None


def task_document(location: Location, root_doc: dict[str, Any], task: str) -> dict[str, Any]:
    """A task group's zarr.json document: from the root's consolidated metadata when it holds one
    (no request), else read from the store."""
    meta = consolidated(root_doc)
    if meta is not None and isinstance(meta.get(task), dict):
        return meta[task]
    return _load_json(location, f"{task}/zarr.json")


def open_root_group(location: Location, doc: dict[str, Any]) -> zarr.Group:
    """The zarr group of a store whose root document is already read: with consolidated metadata
    it is built from that document, so opening costs no further request (and no v2 probes)."""
    store = location.zarr_store(read_only=True)
    if consolidated(doc) is not None:
        from zarr.core.group import AsyncGroup
        from zarr.core.sync import sync
        from zarr.storage import StorePath

        if not store._is_open:  # zarr's open_group would have opened it (a ZipStore must be)
            sync(store._open())
        return zarr.Group(AsyncGroup.from_dict(StorePath(store, ""), doc))
    return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)


class FeatureStore:
    """One (backbone, dataset) store. Nothing here writes to the store."""

    def __init__(self, location: Location):
        self.location = location
        try:
            self.doc = _load_json(location, "zarr.json")
        except StoreNotFoundError:
            raise StoreNotFoundError(f"no feature store at {location.url} (no zarr.json)") from None
        self.attrs = check_root_attrs(location, self.doc)
        self.format_version: tuple[int, int] = format_version(self.attrs) or (1, 0)
        try:
            self.group = open_root_group(location, self.doc)
        except Exception as err:  # noqa: BLE001
            raise StoreError(f"{location.url}: zarr cannot open the store: {err}") from err

    @property
    def format_major(self) -> int:
        return self.format_version[0]

    @cached_property
    def manifest(self) -> Manifest:
        """Size and sha256 of every object (format 1: the shards' sha256 only)."""
        tasks = [t for t in self.tasks if (self.task_doc(t).get("attributes") or {}).get(TASK_ATTR, {}).get("complete")]
        return load_manifest(self.location, format_major=self.format_major, tasks=tasks)

    def task_doc(self, name: str) -> dict[str, Any]:
        """A task group's zarr.json document (see `task_document`)."""
        return task_document(self.location, self.doc, name)

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def tasks(self) -> list[str]:
        return list(self.attrs.get("tasks", []))

    @property
    def backbone(self) -> dict[str, Any]:
        return self.attrs["backbone"]

    @property
    def features(self) -> dict[str, Any]:
        return self.attrs["features"]

    @property
    def token_grid(self) -> tuple[int, int]:
        h, w = self.features["token_grid"]
        return int(h), int(w)

    @property
    def num_layers(self) -> int:
        return int(self.features["num_layers"])

    @property
    def feature_dim(self) -> int:
        return int(self.features["feature_dim"])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.features["num_prefix_tokens"])

    @property
    def dataset(self) -> str:
        return str(self.attrs["dataset"]["name"])

    @cached_property
    def layout(self) -> StoreLayout:
        return StoreLayout.from_attrs(self.attrs["storage"])

    @cached_property
    def compact(self) -> CompactSpec | None:
        """How the tokens are encoded (store_schema/compact.py); None for full-size tokens."""
        return CompactSpec.from_attrs(self.attrs["storage"].get("compact"))

    @cached_property
    def grids(self) -> list[GridSpec]:
        """The store's grid groups (format 2.3, store_schema/grids.py); one, named "", for a single-grid store."""
        return grids_of(self.features)

    @property
    def multi_grid(self) -> bool:
        """Whether the layers have more than one (grid, width): each group has arrays of its own."""
        return len(self.grids) > 1

    def task(self, name: str) -> "TaskStore":
        if name not in self.tasks:
            raise StoreError(f"store {self.url} has no task {name!r}; it holds: {', '.join(self.tasks) or 'none'}")
        return TaskStore(self, name)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, backbone={self.backbone['alias']!r}, tasks={self.tasks})"


class GridView(FeatureStore):
    """A multi-grid store as one of its grid groups sees it: that group's token_grid, num_layers, feature_dim and
    features["layers"], no prefix tokens; everything else (url, backbone, tasks, manifest ...) is the store's.
    What a per-group `TaskStore` reports as its `.store`, so code written for single-grid stores reads a group."""

    def __init__(self, base: FeatureStore, grid: GridSpec):  # noqa: D107 - shares the open store, reads nothing
        self.base, self.grid = base, grid
        self.location, self.doc, self.attrs = base.location, base.doc, base.attrs
        self.format_version, self.group = base.format_version, base.group

    @property
    def features(self) -> dict[str, Any]:
        return grid_features(self.base.features, self.grid)

    @property
    def grids(self) -> list[GridSpec]:  # type: ignore[override]
        return [self.grid]

    @property
    def manifest(self) -> Manifest:  # type: ignore[override]
        return self.base.manifest

    @property
    def layout(self) -> StoreLayout:  # type: ignore[override]
        return self.base.layout

    @property
    def compact(self) -> CompactSpec | None:  # type: ignore[override]
        return self.base.compact

    def task(self, name: str) -> "TaskStore":
        return self.base.task(name).grid_task(self.grid.name)

    def __repr__(self) -> str:
        return f"GridView({self.url!r}, grid={self.grid.name!r})"


SPAN_BYTES = 16 * 2**20  # most bytes one zarr call may decode (neighbouring shards merge up to this)


def read_spans(sorted_rows: np.ndarray, *, rows_per_shard: int, num_rows: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """Row ranges to read for `sorted_rows`: one zarr call per run of touched shards, not per run of rows.

    Each call to zarr costs a round trip per inner chunk it touches, while a call covering a whole
    shard is one request for the whole object. So a shard that is mostly needed is read whole
    (remote stores: 1 request instead of dozens; local disk: one read), a sparsely used one from its
    first to its last needed row; neighbouring spans merge into one call of at most `max_rows` rows.
    """
    spans: list[tuple[int, int]] = []
    shard_ids = sorted_rows // rows_per_shard
    bounds = np.flatnonzero(np.diff(shard_ids)) + 1
    for group in np.split(sorted_rows, bounds):
        shard = int(group[0]) // rows_per_shard
        lo, hi = int(group[0]), int(group[-1]) + 1
        shard_lo, shard_hi = shard * rows_per_shard, min((shard + 1) * rows_per_shard, num_rows)
        if 2 * (hi - lo) >= shard_hi - shard_lo:
            lo, hi = shard_lo, shard_hi
        if spans and spans[-1][1] >= lo and (max_rows is None or hi - spans[-1][0] <= max_rows):
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return spans


def read_rows(array: zarr.Array, rows: Sequence[int] | np.ndarray, *, layers: Sequence[int] | None, rows_per_shard: int,
              where: str = "", files: ShardFiles | None = None) -> np.ndarray:
    """Rows (any order, repeats allowed) of a [N, L, ...] zarr array into one preallocated array.

    With ``files`` (where the array's shards are) and an array in combo's own layout, the inner chunks are
    decoded on the read pool straight into the output (store_schema/shardread.py). Otherwise spans come
    from `read_spans` (capped at `SPAN_BYTES` per call, so zarr fetches and decodes
    their chunks concurrently: one round trip per span on remote stores) and are scattered
    straight into the output: peak memory is the output plus one span. A layer selection is read
    with orthogonal indexing, so only those layers' inner chunks are decoded.
    """
    rows = np.asarray(rows, dtype=np.int64)
    num_rows = int(array.shape[0])
    layer_list = None if layers is None else [int(l) for l in layers]
    shape = (rows.size, array.shape[1] if layer_list is None else len(layer_list), *array.shape[2:])
    out = np.empty(shape, dtype=array.dtype)
    if rows.size == 0:
        return out
    if rows.min() < 0 or rows.max() >= num_rows:
        raise IndexError(f"{where}: rows outside 0..{num_rows - 1}")
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    spec = ShardSpec.of(array) if files is not None else None
    if spec is not None:
        shardread.read_into(spec, files, out, sorted_rows, order, layers=layer_list, where=where)
        return out
    row_bytes = int(np.prod(shape[1:])) * out.dtype.itemsize
    max_rows = max(rows_per_shard, SPAN_BYTES // max(1, row_bytes))
    for lo, hi in read_spans(sorted_rows, rows_per_shard=rows_per_shard, num_rows=num_rows, max_rows=max_rows):
        first, last = np.searchsorted(sorted_rows, [lo, hi])
        try:
            block = array[lo:hi] if layer_list is None else array.oindex[lo:hi, layer_list]
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as err:  # zstd / crc32c / zip CRC, truncated object
            first_shard, last_shard = lo // rows_per_shard, (hi - 1) // rows_per_shard
            shards = ", ".join(f"{array.path}/c/{b}" + "/0" * (array.ndim - 1) for b in range(first_shard, min(last_shard, first_shard + 2) + 1))
            raise StoreError(
                f"{where}: rows {lo}..{hi - 1} cannot be decoded ({err}): shard {shards}"
                f"{' ...' if last_shard > first_shard + 2 else ''} is damaged. Run `combo store validate` on the store"
            ) from err
        wanted = sorted_rows[first:last] - lo
        whole = wanted.size == block.shape[0] and np.array_equal(wanted, np.arange(wanted.size))
        out[order[first:last]] = block if whole else block[wanted]  # no second copy of a wholly used span
        del block
    return out


class TaskStore:
    """One task group: token arrays, prefix tokens and the sample table.

    A multi-grid task (format 2.3) holds one set of arrays per grid group: `grid_tasks()` gives a TaskStore per
    group (`grid` set), which reads that group's arrays as a single-grid task reads its own; the task itself
    reads no tokens (`read` refuses, pointing there), while its samples, labels and rows are the groups'."""

    def __init__(self, store: FeatureStore, name: str, *, grid: GridSpec | None = None, parent: "TaskStore | None" = None):
        self.name = name
        self._ready = False
        self._parent = parent
        doc = store.task_doc(name)
        attrs = (doc.get("attributes") or {}).get(TASK_ATTR)
        if not isinstance(attrs, dict):
            raise StoreError(f"{store.url}/{name}: task group has no '{TASK_ATTR}' attribute")
        self.attrs: dict[str, Any] = attrs
        self.compact = store.compact
        # the task's own grid group: a single-grid store's one ("" names), a group of a multi-grid store's
        # (`grid_tasks`); None for a multi-grid task itself, which holds several
        self.grid: GridSpec | None = grid if grid is not None else (None if store.multi_grid else store.grids[0])
        self.store: FeatureStore = GridView(store, grid) if grid is not None and grid.name else store
        # a compact task's main array is its codes ([N, L, T, C]); `read` decodes them
        self.tokens: zarr.Array | None = None if self.grid is None else self._array(self.array_name(CODES if self.compact else TOKENS))
        self.prefix: zarr.Array | None = self._array(PREFIX) if self.grid is not None and self.store.num_prefix_tokens else None
        # feature bytes returned by `read` / `read_encoded` (rows x layers x tokens x width x stored itemsize, every
        # array of a compact encoding), so a caller can say how much of a split it read; prefetch threads add to it
        self.bytes_read = 0
        self._count_lock = threading.Lock()

    def array_name(self, base: str) -> str:
        """The name of array `base` in this task's grid group ("tokens" -> "tokens_g1"; single-grid: "tokens")."""
        return grid_array(base, self._grid().name)

    def _grid(self) -> GridSpec:
        """The task's grid group; a multi-grid task itself has several, and its tokens are read per group."""
        if self.grid is None:
            names = ", ".join(g.name for g in self.store.grids)
            raise StoreError(
                f"task {self.name} of {self.store.url} is multi-grid: its layers have {len(self.store.grids)} token "
                f"grids / widths (groups {names}), each in arrays of its own; read them through "
                f"`task.grid_tasks()` (one TaskStore per group)"
            )
        return self.grid

    def grid_tasks(self) -> list["TaskStore"]:
        """One TaskStore per grid group, in order ([self] for a single-grid task): each reads its group's arrays,
        and shares this task's samples, labels and rows."""
        if self.grid is not None:
            return [self]
        return [TaskStore(self.store, self.name, grid=g, parent=self) for g in self.store.grids]

    def grid_task(self, name: str) -> "TaskStore":
        """The TaskStore of grid group `name` ("" for a single-grid task)."""
        for task in self.grid_tasks():
            if task.grid is not None and task.grid.name == name:
                return task
        raise StoreError(f"task {self.name} of {self.store.url} has no grid group {name!r}; it has: "
                         f"{', '.join(repr(g.name) for g in self.store.grids)}")

    @cached_property
    def encoded(self) -> list[zarr.Array]:
        """A compact task's row arrays, in `CompactSpec.arrays()` order (what `decode` takes)."""
        if self.compact is None:
            raise StoreError(f"task {self.name} of {self.store.url} holds full-size tokens, not a compact encoding")
        self._grid()
        return [self.tokens if n == CODES else self._array(self.array_name(n)) for n in self.compact.arrays()]

    @cached_property
    def pca(self) -> PcaBasis | None:
        """The task's PCA basis (components [L, D, R], mean [L, D]) when its encoding has PCA."""
        if self.compact is None or self.compact.pca is None:
            return None
        self.require_complete()
        return PcaBasis(np.asarray(self._array(self.array_name(PCA_COMPONENTS))[...], dtype=np.float32),
                        np.asarray(self._array(self.array_name(PCA_MEAN))[...], dtype=np.float32))

    def _array(self, array: str) -> zarr.Array:
        """An array of the task; a missing or unreadable array metadata document is named (zarr reads it
        itself where the root has no consolidated metadata, and would only say "Unterminated string ...")."""
        url, key = self.store.url, f"{self.name}/{array}/zarr.json"
        try:
            return self.store.group[f"{self.name}/{array}"]
        except KeyError as err:
            raise StoreError(f"{url}/{self.name}: the '{array}' array is missing") from err
        except StoreError:
            raise
        except zipfile.BadZipFile as err:
            raise StoreError(f"{url}: {key} cannot be read from the zip ({err}); run `combo store validate {url}`") from err
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            what = "is not valid JSON" if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)) else "is not valid array metadata"
            raise StoreError(f"{url}: {key} {what} ({err}; truncated or corrupt); run `combo store validate {url}`") from err

    # -- metadata ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def require_complete(self) -> None:
        """Refuse a task that is not whole: never finished, or (where the store can be listed) an
        object of its manifest missing or of another size, e.g. after an interrupted copy."""
        if self._ready:
            return
        if self._parent is not None:  # a grid group's task: the task's objects are checked once, for all groups
            self._parent.require_complete()
            self._ready = True
            return
        if not self.complete:
            raise StoreIncompleteError(
                f"task {self.name} of {self.store.url} is incomplete (extraction interrupted?); "
                "rerun the same `combo extract` command to finish it"
            )
        expected = self.store.manifest.for_task(self.name)
        if self.store.format_major >= 2 and not expected:
            raise StoreIncompleteError(
                f"task {self.name} of {self.store.url} is not in the store's manifest (its writer was killed "
                "while finishing it); rerun the same `combo extract` command to complete it"
            )
        listed = list_sizes(self.store.location, prefix=f"{self.name}/")
        if listed is not None:
            missing, resized = absent_or_resized(expected, listed)
            if missing:
                raise StoreIncompleteError(
                    f"task {self.name} of {self.store.url} is missing {len(missing)} object(s) its manifest lists: "
                    f"{describe_missing(missing)} (an interrupted copy?); they would read as NaN, so nothing is read. "
                    f"Copy the store again or run `combo store validate {self.store.url}`"
                )
            if resized:
                raise StoreIncompleteError(
                    f"task {self.name} of {self.store.url}: {describe_missing(resized)} has another size than its "
                    f"manifest records (truncated or replaced); run `combo store validate {self.store.url}`"
                )
        self._ready = True

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs.get("classes", []))

    @property
    def protocols(self) -> dict[str, tuple[str, str]]:
        return {k: (v[0], v[1]) for k, v in self.attrs.get("protocols", {}).items()}

    @property
    def rows_per_shard(self) -> int:
        return int(self.store.layout.rows_per_shard)

    @cached_property
    def samples(self) -> pa.Table:
        """The sample table, checked against the manifest (a shifted label column is refused)."""
        if self._parent is not None:
            return self._parent.samples
        key = f"{self.name}/{SAMPLES_NAME}"
        data = self.store.location.read_bytes(key)
        if self.complete and self.store.format_major >= 2:
            verify_bytes(self.store.manifest, key, data, where=self.store.url)
        try:
            return sample_table.from_bytes(data)
        except (pa.ArrowException, ValueError, OSError) as err:
            raise StoreError(f"{self.store.url}: {key} is not a readable Parquet table ({err}; truncated or corrupt); "
                             f"run `combo store validate {self.store.url}`") from err

    @cached_property
    def labels(self) -> np.ndarray:
        return self.samples.column("label").to_numpy()

    @cached_property
    def sample_ids(self) -> list[str]:
        return self.samples.column("sample_id").to_pylist()

    def rows(self, split: str) -> np.ndarray:
        """Row indices of a split's valid samples, ascending."""
        column = sample_table.SPLIT_PREFIX + split
        if column not in self.samples.column_names:
            raise StoreError(
                f"task {self.name} of {self.store.url} has no split {split!r}; "
                f"it has: {', '.join(sample_table.split_names(self.samples))}"
            )
        member = self.samples.column(column).to_numpy(zero_copy_only=False)
        valid = self.samples.column("valid").to_numpy(zero_copy_only=False)
        return np.nonzero(member & valid)[0].astype(np.int64)

    # -- data ---------------------------------------------------------------------------------
    def read(self, rows: Sequence[int] | np.ndarray | slice, *, layers: Sequence[int] | None = None, prefix: bool = False,
             normalised: bool = False, direct: bool = False) -> np.ndarray:
        """Rows (any order) of the token (or prefix) array as numpy; see `read_rows`. A compact task's
        tokens come back decoded, float32 in original units (``normalised``: ComBo's per-map
        normalisation, with the stored statistics). ``direct``: local shard files are read with O_DIRECT, past
        the page cache (for one pass over more than RAM holds)."""
        self._grid()  # a multi-grid task is read per group (`grid_tasks`)
        if self.compact is not None and not prefix:
            encoded = self.read_encoded(rows, layers=layers, direct=direct)
            return decode(encoded, self.compact, self.pca, layers=layers, normalised=normalised)
        array = self.prefix if prefix else self.tokens
        if array is None:
            raise StoreError(f"store {self.store.url} has no prefix tokens (the backbone has none)")
        self.require_complete()
        rows = self._rows(rows)
        out = read_rows(array, rows, layers=layers, rows_per_shard=self.rows_per_shard,
                        where=f"task {self.name} of {self.store.url}", files=self.files(array, direct=direct))
        self._check_written(out, rows, array_name=PREFIX if prefix else self.array_name(TOKENS))
        self._count(out.nbytes)
        return out

    def _count(self, nbytes: int) -> None:
        with self._count_lock:
            self.bytes_read += int(nbytes)

    def files(self, array: zarr.Array, *, direct: bool = False) -> ShardFiles | None:
        """Where the shard reader fetches `array`'s shards (None: zarr reads them; $COMBO_SHARD_READER=zarr
        forces that, for comparison)."""
        if os.environ.get("COMBO_SHARD_READER") == "zarr":
            return None
        return shardread.files_for(self.store.location, array, direct=direct)

    def _rows(self, rows: Sequence[int] | np.ndarray | slice) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(self.num_samples)[rows]
        return np.asarray(rows, dtype=np.int64)

    def read_encoded(self, rows: Sequence[int] | np.ndarray | slice, *, layers: Sequence[int] | None = None,
                     direct: bool = False) -> list[np.ndarray]:
        """A compact task's arrays for these rows (and layers), in `CompactSpec.arrays()` order, undecoded:
        what a reader that decodes elsewhere (on a GPU, in the batch) needs."""
        self._grid()
        arrays = self.encoded
        self.require_complete()
        rows = self._rows(rows)
        where = f"task {self.name} of {self.store.url}"
        out = [read_rows(a, rows, layers=layers, rows_per_shard=self.rows_per_shard, where=where,
                         files=self.files(a, direct=direct)) for a in arrays]
        for name, array, values in zip(self.compact.arrays(), arrays, out):  # each array is its own shard objects
            self._check_written(values, rows, array_name=self.array_name(name), fill=array.metadata.fill_value)
        self._count(sum(a.nbytes for a in out))
        return out

    def _check_written(self, out: np.ndarray, rows: np.ndarray, *, array_name: str, fill: Any = None) -> None:
        """A valid row reading its array's never-written fill (NaN; from format 2.2 also -128 int8 codes and -1
        outlier indexes, values the writer never stores) was never written: a shard lost after opening, or on a
        server that cannot be listed. Refuse it, naming the shard. One value per row is enough: the writer
        refuses non-finite values, so a written row has none. (A 2.1 store's integer arrays fill with 0,
        which is data: those are not checked.)"""
        if self.store.format_major < 2 or out.size == 0:
            return
        first = out.reshape(out.shape[0], -1)[:, 0]
        if out.dtype.kind == "f":
            holes = np.isnan(first)
        elif fill is not None and fill != 0:
            holes = first == fill
        else:
            return
        if not holes.any():
            return
        valid = self.samples.column("valid").to_numpy(zero_copy_only=False)
        bad = rows[holes & valid[rows]]
        if bad.size:
            shards = sorted({int(r) // self.rows_per_shard for r in bad})
            keys = [shard_key(self.name, array_name, b, out.ndim) for b in shards]  # a read keeps its array's ndim
            raise StoreIncompleteError(
                f"task {self.name} of {self.store.url}: rows {bad[:5].tolist()} read as never written: shard "
                f"{describe_missing(keys)} is missing. Copy the store again or run "
                f"`combo store validate {self.store.url}`"
            )

    def to_dask(self, *, split: str | None = None, layer: int | None = None, prefix: bool = False) -> da.Array:
        """Lazy view; chunks follow the shards (dask's from_zarr would use the inner chunks). A compact
        task's tokens are decoded chunk by chunk (float32, original units)."""
        self._grid()
        array = self.prefix if prefix else self.tokens
        if array is None:
            raise StoreError(f"store {self.store.url} has no prefix tokens")
        self.require_complete()
        if self.compact is not None and not prefix:
            lazy = _decoded_dask(self.encoded, self.compact, self.pca, (*array.shape[:3], self.store.feature_dim),
                                 self.rows_per_shard)
            if layer is not None:
                lazy = lazy[:, layer]
            if split is not None:
                lazy = lazy[self.rows(split)]
            return lazy
        chunks = (self.rows_per_shard, *array.shape[1:])
        lazy = da.from_zarr(array, chunks=chunks)
        if layer is not None:
            lazy = lazy[:, layer]
        if split is not None:
            lazy = lazy[self.rows(split)]
        return lazy


def _decoded_dask(arrays: list[zarr.Array], spec: CompactSpec, basis: PcaBasis | None, shape: tuple[int, ...],
                  rows_per_shard: int) -> da.Array:
    """Decoded tokens [N, L, T, D] float32 as dask, one chunk per shard, from a compact task's arrays."""
    import dask

    def shard(lo: int, hi: int) -> np.ndarray:
        return decode([a[lo:hi] for a in arrays], spec, basis)

    blocks = [da.from_delayed(dask.delayed(shard)(lo, min(lo + rows_per_shard, shape[0])),
                              shape=(min(lo + rows_per_shard, shape[0]) - lo, *shape[1:]), dtype=np.float32)
              for lo in range(0, shape[0], rows_per_shard)]
    return da.concatenate(blocks, axis=0) if blocks else da.zeros((0, *shape[1:]), dtype=np.float32)


def open_store(location: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a store read-only (a folder, a .zip, or an fsspec URL)."""
    return FeatureStore(resolve(location, storage_options=storage_options))
