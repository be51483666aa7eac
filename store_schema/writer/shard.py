"""`ShardWriter`: writes whole shards of one task, with no lock and no journal of its own.

Separate from `TaskWriter` so that a worker process of a distributed extraction can write shards into
a store knowing only its path, while the one process holding the lock journals them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import staging as stage
from ..compact import CODES, PCA_COMPONENTS, PCA_MEAN, CompactSpec, PcaBasis, encode
from ..errors import StoreError
from ..grids import GridSpec, grid_array, multi_grids, split_array
from ..layout import StoreLayout
from ..location import Location, fsync_dir, is_url, resolve, write_file_atomic
from ..manifest import sha256_bytes
from ..metadata import ROOT_ATTR
from ..shardwrite import Written, write_shard, write_threads
from .disk import _fsync_file, _read_doc
from .keys import PREFIX, TOKENS, is_row_shard, shard_key
from .skipped import Skipped


class ShardWriter:
    """Writes whole shards of one task and returns their journal entry; it takes no lock and keeps no journal.

    The process holding the store's lock (`StoreWriter`) records each entry (`TaskWriter.record`), so a
    worker process of a distributed extraction (extract/cluster.py) writes shards into the store knowing
    only its path, while one client owns the lock, the journal and `finalize`. A shard's inner chunks are
    encoded on `threads` threads (store_schema/shardwrite.py; default $COMBO_WRITE_THREADS, else every core)."""

    def __init__(self, path: str | os.PathLike, name: str, *, layout: StoreLayout, compact: CompactSpec | None,
                 feature_dim: int, remote: Location | None = None, threads: int | None = None,
                 grids: Sequence[GridSpec] | None = None):
        self.path = Path(path)
        self.threads = write_threads(threads)
        self.remote = remote  # a remote store: `path` is a staging folder, each shard is uploaded, then deleted here
        self.name = name
        self.layout = layout
        self.compact = compact
        self.feature_dim = feature_dim
        # format 2.3: a multi-grid store's groups (None: one grid, whose arrays keep their plain names)
        self.grids: list[GridSpec] | None = list(grids) if grids else None
        self.grid_names: list[str] = [g.name for g in self.grids] if self.grids else [""]
        self._dims = {g.name: g.feature_dim for g in self.grids} if self.grids else {"": feature_dim}
        self.group = zarr.open_group(zarr.storage.LocalStore(self.path), path=name, mode="r+", zarr_format=3,
                                     use_consolidated=False)
        main = CODES if compact else TOKENS
        # each group's main array (tokens, or a compact task's codes); `tokens` is a single-grid task's
        self.mains: list[zarr.Array] = [self._open(grid_array(main, g)) for g in self.grid_names]
        self.tokens: zarr.Array | None = None if self.grids else self.mains[0]
        self.prefix = self.group[PREFIX] if (self.path / name / PREFIX / "zarr.json").exists() else None
        bases = [PcaBasis(self._open(grid_array(PCA_COMPONENTS, g))[...], self._open(grid_array(PCA_MEAN, g))[...])
                 if compact is not None and compact.pca is not None else None for g in self.grid_names]
        self._bases: list[PcaBasis | None] = bases
        # the PCA basis: a single-grid task's, or a multi-grid task's list of one per group (None: no PCA)
        self.pca: PcaBasis | list[PcaBasis] | None = (bases if bases[0] is not None else None) if self.grids else bases[0]
        self.num_rows = int(self.mains[0].shape[0])
        step = layout.rows_per_shard
        self.blocks: list[range] = [range(s, min(s + step, self.num_rows)) for s in range(0, self.num_rows, step)]
        self._arrays = [pair for g in self.grid_names for pair in self._group_arrays(g)] \
            + ([(PREFIX, self.prefix)] if self.prefix is not None else [])

    def _open(self, array: str) -> zarr.Array:
        try:
            return self.group[array]
        except KeyError:
            raise StoreError(f"{self.path}/{self.name}: the {array!r} array is missing (a task created by another "
                             "writer, or damaged); extract the task again with --overwrite") from None

    def _group_arrays(self, grid: str) -> list[tuple[str, zarr.Array]]:
        """One group's row arrays: its tokens, or a compact task's arrays in `CompactSpec.arrays()` order."""
        if self.compact is None:
            return [(grid_array(TOKENS, grid), self.mains[self.grid_names.index(grid)])]
        return [(grid_array(n, grid), self._open(grid_array(n, grid))) for n in self.compact.arrays()]

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
                     feature_dim=int(attrs["features"]["feature_dim"]), remote=remote, grids=multi_grids(attrs["features"]))
        writer._scratch = scratch  # removed with the writer
        return writer

    def arrays(self) -> list[tuple[str, zarr.Array]]:
        """Every row array, a shard of each per block (tokens, or a compact task's arrays, of every group in
        order; prefix)."""
        return list(self._arrays)

    def store_dim(self, array_name: str) -> int:
        """Channels of the values `write` takes for an array (a compact task takes full-size tokens)."""
        if array_name == PREFIX and self.prefix is not None:
            return int(self.prefix.shape[3])
        grid = split_array(array_name)[1]
        if grid not in self._dims:
            raise StoreError(f"task {self.name}: no array {array_name!r} (its groups: {', '.join(map(repr, self.grid_names))})")
        return self._dims[grid] if self.compact else int(self.mains[self.grid_names.index(grid)].shape[3])

    def _inputs(self, block: int, tokens: Any) -> list[tuple[str, Any]]:
        """(group, values) pairs of a block: a single-grid task takes one array, a multi-grid one a list of one per
        group in order (each [rows, L_k, T_k, D_k])."""
        several = isinstance(tokens, (list, tuple))
        if self.grids is None:
            if several and len(tokens) != 1:
                raise StoreError(f"task {self.name}: block {block}: a single-grid store takes one tokens array, "
                                 f"got a list of {len(tokens)}")
            return [("", tokens[0] if several else tokens)]
        rows = len(self.blocks[block])
        wanted = ", ".join(f"{g.name} [{rows}, {g.num_layers}, {g.num_tokens}, {g.feature_dim}]" for g in self.grids)
        if not several or len(tokens) != len(self.grids):
            got = f"a list of {len(tokens)}" if several else f"one array of shape {tuple(getattr(tokens, 'shape', ()))}"
            raise StoreError(f"task {self.name}: block {block}: a multi-grid store takes one array per grid group, "
                             f"in order ({wanted}); got {got}")
        return list(zip(self.grid_names, tokens))

    def key(self, array_name: str, array: zarr.Array, block: int) -> str:
        return shard_key(self.name, array_name, block, array.ndim)

    def write(
        self,
        block: int,
        tokens: np.ndarray | Sequence[np.ndarray],
        prefix: np.ndarray | None = None,
        *,
        skipped: Iterable[Skipped] = (),
    ) -> dict[str, Any]:
        """Write block `block`'s shards (each fsynced) and return the journal entry naming them with their sha256.

        `tokens`: [rows, L, T, D] for a single-grid store; for a multi-grid one a list of [rows, L_k, T_k, D_k],
        one per group in order. A multi-grid store has no prefix tokens: `prefix` is then ignored."""
        rows = self.blocks[block]
        skipped = list(skipped)
        unwritten = np.zeros(len(rows), dtype=bool)
        for s in skipped:
            if s.row not in rows:
                raise StoreError(f"task {self.name}: skipped row {s.row} is not in block {block} (rows {rows.start}..{rows.stop - 1})")
            unwritten[s.row - rows.start] = True
        dtype = np.dtype(self.layout.dtype)
        inputs: list[tuple[str, str, zarr.Array | None, Any]] = []
        for grid, values in self._inputs(block, tokens):
            main = self.mains[self.grid_names.index(grid)]
            inputs.append((grid, grid_array(TOKENS, grid), main if self.compact is None else None, values))
        if self.prefix is not None:
            if prefix is None:
                raise StoreError(f"task {self.name}: block {block} needs prefix tokens")
            inputs.append(("", PREFIX, self.prefix, prefix))
        parts: list[tuple[str, zarr.Array, np.ndarray]] = []
        for grid, array_name, array, data in inputs:
            shape = self.mains[self.grid_names.index(grid)].shape if array is None else array.shape
            expected = (len(rows), *shape[1:3], self.store_dim(array_name))
            if tuple(data.shape) != expected:
                raise StoreError(f"task {self.name}: block {block} of {array_name} has shape {tuple(data.shape)}, expected {expected}")
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
                basis = self._bases[self.grid_names.index(grid)]
                for (name, target), encoded in zip(self._group_arrays(grid), encode(cast, self.compact, basis)):
                    fill = target.metadata.fill_value
                    # the array's fill marks "never written", as NaN does in full-size tokens: NaN, and from format 2.2
                    # -128 codes / -1 outlier indexes (a 2.1 store's integer arrays fill with 0: left as encoded)
                    if encoded.dtype.kind == "f" or fill != 0:
                        encoded[unwritten] = fill
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
