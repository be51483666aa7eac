"""Structure and integrity checks: every problem is reported with the task, array and chunk.

Format 2: the attributes against the published JSON Schema (`format-2.schema.json`), then every
object of the manifest (root and task zarr.json, array metadata, coordinates, sample table,
shards): present, of the recorded size, and hashed (the small objects always, shards all or a
sample); objects the manifest does not know are reported too. Format 1 stores are checked as
format 1 defined them (shards only)."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from . import samples as sample_table
from .errors import StoreError, StoreNotFoundError, StoreValidationError
from .location import is_hidden, list_sizes, resolve
from .manifest import MANIFEST_NAME, Manifest, sha256_bytes
from .grids import grid_array, grid_problems
from .metadata import ID_BYTES_SINCE, MULTI_GRID_SINCE, ROOT_ATTR, TASK_ATTR
from .reader import FeatureStore, _load_json, consolidated
from .writer import CHECKSUMS_NAME, JOURNAL_NAME, PREFIX, SAMPLE_ID, SAMPLES_NAME, TOKENS, shard_key

SCHEMA_FILE = "format-2.schema.json"


@lru_cache(maxsize=1)
def format_schema() -> dict[str, Any]:
    """The published JSON Schema of format 2's attributes (shipped in the package)."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())


def schema_problems(doc: Any, part: str, where: str) -> list[str]:
    """Each way `doc` breaks `$defs/<part>` of the format's JSON Schema, as one sentence."""
    import jsonschema

    schema = format_schema()
    validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{part}", "$defs": schema["$defs"]})
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path) or "(document)"
        out.append(f"{where}: {path}: {err.message} (format {SCHEMA_FILE})")
    return out

REQUIRED_ROOT = {
    "backbone": ("alias", "timm_name", "weights_source"),
    "preprocessing": ("image_size", "mean", "std", "interpolation"),
    "features": ("token_grid", "num_prefix_tokens", "layers", "feature_dim"),
    "storage": ("dtype", "rows_per_shard"),
    "dataset": ("name",),
}
REQUIRED_TASK = ("num_samples", "splits", "protocols", "classes", "complete")


@dataclass
class ValidationReport:
    location: str
    problems: list[str] = field(default_factory=list)
    tasks: dict[str, str] = field(default_factory=dict)  # task -> "ok" | "incomplete" | "invalid"
    chunks_checked: int = 0
    chunks_total: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_invalid(self) -> None:
        if self.problems:
            raise StoreValidationError(self.location, self.problems)


def _unreadable(where: str, err: StoreError) -> str:
    """A problem line for an object that cannot be read (a zip entry failing its CRC, a server that cannot be
    reached), without the error's own advice to run validate: this is validate."""
    return f"{where} cannot be read: {str(err).split('; run `combo store validate', 1)[0]}"


def validate_store(
    location: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    checksums: str = "all",
    sample_fraction: float = 0.05,
    seed: int = 0,
) -> ValidationReport:
    """Check a store; `checksums` is "all", "sample" (a random `sample_fraction` of shards) or "none".

    Existence of every shard is always checked: a missing shard would read back as zeros.
    """
    if checksums not in ("all", "sample", "none"):
        raise ValueError(f"checksums must be 'all', 'sample' or 'none', not {checksums!r}")
    try:
        loc = resolve(location, storage_options=storage_options)
    except StoreNotFoundError:
        raise
    except StoreError as err:  # e.g. a zip cut short: a problem of the store, listed like the others
        return ValidationReport(location=str(location), problems=[str(err)])
    report = ValidationReport(location=loc.url)
    try:
        store = FeatureStore(loc)
    except StoreError as err:
        report.problems.append(str(err))
        return report
    for section, keys in REQUIRED_ROOT.items():
        missing = [k for k in keys if k not in (store.attrs.get(section) or {})]
        if missing:
            report.problems.append(f"root metadata: {section} lacks {', '.join(missing)}")
    if store.format_major >= 2:
        report.problems += schema_problems(store.attrs, "root", f"root attribute '{ROOT_ATTR}'")
    if not report.problems:
        report.problems += _grid_problems(store)
    if report.problems:
        return report
    manifest: Manifest | None = None
    if store.format_major >= 2:
        try:
            manifest = store.manifest
        except StoreError as err:
            report.problems.append(str(err))
    rng = random.Random(seed)
    for task in store.tasks:
        before = len(report.problems)
        status = _validate_task(store, task, report, checksums=checksums, fraction=sample_fraction, rng=rng,
                                manifest=manifest)
        report.tasks[task] = "invalid" if status == "ok" and len(report.problems) > before else status
    if manifest is not None:
        _check_root_objects(store, manifest, report)
    return report


def _grid_problems(store: FeatureStore) -> list[str]:
    """A multi-grid store's `features.grids` against the rest of `features` and the store's version."""
    feats = store.features
    if not feats.get("grids"):
        return []
    where = f"root attribute '{ROOT_ATTR}': "
    if store.format_version < MULTI_GRID_SINCE:
        return [f"{where}features.grids is recorded, but format {'.'.join(map(str, store.format_version))} has no "
                f"multi-grid layout (from {'.'.join(map(str, MULTI_GRID_SINCE))} on)"]
    try:
        grids = store.grids
    except (KeyError, TypeError, ValueError) as err:
        return [f"{where}features.grids cannot be read ({err})"]
    return [where + p for p in grid_problems(grids, layers=feats["layers"], token_grid=feats["token_grid"],
                                             feature_dim=feats["feature_dim"], num_prefix_tokens=feats["num_prefix_tokens"])]


def _check_root_objects(store: FeatureStore, manifest: Manifest, report: ValidationReport) -> None:
    """The root zarr.json against the manifest, and objects no manifest entry accounts for."""
    loc = store.location
    entry = manifest.objects.get("zarr.json")
    if entry is None:
        report.problems.append(f"{MANIFEST_NAME} does not list the root zarr.json")
    elif sha256_bytes(loc.read_bytes("zarr.json")) != entry.sha256:
        report.problems.append(f"root zarr.json does not match {MANIFEST_NAME} (changed after the store was written)")
    listed = list_sizes(loc)
    if listed is None:
        return
    complete = manifest.tasks()
    extra = sorted(
        k for k in listed
        if k not in manifest.objects and k != MANIFEST_NAME and not is_hidden(k)
        and k.split("/", 1)[0] in complete
    )
    for key in extra[:20]:
        report.problems.append(f"{key} is not in {MANIFEST_NAME} (added or left behind after the store was written)")


def _validate_task(store: FeatureStore, task: str, report: ValidationReport, *, checksums: str, fraction: float,
                   rng: random.Random, manifest: Manifest | None) -> str:
    loc = store.location
    problems = report.problems
    try:
        doc = _load_json(loc, f"{task}/zarr.json")
    except StoreError as err:
        problems.append(f"task {task}: {err}")
        return "invalid"
    attrs = (doc.get("attributes") or {}).get(TASK_ATTR) or {}
    if store.format_major >= 2:
        problems += schema_problems(attrs, "task", f"task {task}: attribute '{TASK_ATTR}'")
        copy = (consolidated(store.doc) or {}).get(task)
        if not isinstance(copy, dict) or copy.get("attributes") != doc.get("attributes"):
            problems.append(f"task {task}: the consolidated metadata in the root zarr.json is not current "
                            "(rerun the extraction, or copy the store again)")
    missing = [k for k in REQUIRED_TASK if k not in attrs]
    if missing:
        problems.append(f"task {task}: metadata lacks {', '.join(missing)}")
        return "invalid"
    n = int(attrs["num_samples"])
    expected = expected_arrays(store, n)
    for name, (shape, array_dtype) in expected.items():
        try:
            meta = _load_json(loc, f"{task}/{name}/zarr.json")
        except StoreError as err:
            problems.append(f"task {task}: array {name}: {err}")
            continue
        if tuple(meta.get("shape", ())) != shape:
            problems.append(f"task {task}: array {name} has shape {tuple(meta.get('shape', ()))}, expected {shape}")
        if meta.get("data_type") != array_dtype:
            problems.append(f"task {task}: array {name} has dtype {meta.get('data_type')}, metadata says {array_dtype}")
    if store.multi_grid:
        problems += _layer_problems(store, task)
    try:
        table = sample_table.from_bytes(loc.read_bytes(f"{task}/{SAMPLES_NAME}"))
    except Exception as err:  # noqa: BLE001 - unreadable parquet, missing file, ...
        problems.append(f"task {task}: sample table {SAMPLES_NAME} unreadable: {err}")
        table = None
    if table is not None:
        lacking = [c for c in sample_table.REQUIRED_COLUMNS if c not in table.column_names]
        if lacking:
            problems.append(f"task {task}: sample table lacks columns {', '.join(lacking)}")
        elif table.num_rows != n:
            problems.append(f"task {task}: sample table has {table.num_rows} rows, arrays have {n}")
        else:
            if not np.array_equal(table.column("row").to_numpy(), np.arange(n)):
                problems.append(f"task {task}: sample table 'row' column is not 0..{n - 1}")
            for split, count in attrs["splits"].items():
                column = sample_table.SPLIT_PREFIX + split
                if column not in table.column_names:
                    problems.append(f"task {task}: sample table lacks split column {column}")
                elif int(table.column(column).to_numpy(zero_copy_only=False).sum()) != int(count):
                    problems.append(f"task {task}: split {split} has {table.column(column).to_numpy(zero_copy_only=False).sum()} rows, metadata says {count}")
            labels = table.column("label").to_numpy()
            if n and (labels.min() < 0 or labels.max() >= len(attrs["classes"])):
                problems.append(f"task {task}: labels outside 0..{len(attrs['classes']) - 1}")
            if store.format_major >= 2:
                problems += _sample_id_problems(store, task, table.column("sample_id").to_pylist())
    rows_per_shard = int(store.attrs["storage"]["rows_per_shard"])
    num_blocks = math.ceil(n / rows_per_shard)
    report.chunks_total += num_blocks * len(expected)
    if not attrs["complete"]:
        written = 0
        if loc.exists(f"{task}/{JOURNAL_NAME}"):
            written = sum(1 for line in loc.read_bytes(f"{task}/{JOURNAL_NAME}").decode(errors="replace").splitlines() if line.strip())
        problems.append(
            f"task {task}: incomplete: {written} of {num_blocks} shards recorded as written "
            "(rerun the extraction to finish it)"
        )
        return "incomplete"
    if manifest is not None:
        return _check_task_objects(store, task, {k: len(v[0]) for k, v in expected.items()}, num_blocks, manifest, report,
                                   checksums=checksums, fraction=fraction, rng=rng)
    try:
        manifest = _load_json(loc, f"{task}/{CHECKSUMS_NAME}")["arrays"]
    except (StoreError, KeyError) as err:
        problems.append(f"task {task}: checksum manifest {CHECKSUMS_NAME} unreadable: {err}")
        return "invalid"
    for name in expected:
        digests = manifest.get(name, {})
        blocks = list(range(num_blocks))
        to_hash = set(blocks) if checksums == "all" else set()
        if checksums == "sample" and blocks:
            to_hash = set(rng.sample(blocks, max(1, math.ceil(fraction * len(blocks)))))
        for block in blocks:
            key = shard_key(task, name, block)
            local_key = key[len(f"{task}/{name}/"):]
            where = f"task {task}: array {name} chunk ({block}, 0, 0, 0) [{key}]"
            if local_key not in digests:
                problems.append(f"{where} has no recorded checksum")
                continue
            if not loc.exists(key):
                problems.append(f"{where} is missing (it would read back as zeros)")
                continue
            if block in to_hash:
                report.chunks_checked += 1
                try:
                    data = loc.read_bytes(key)
                except StoreError as err:  # a zip entry failing its CRC
                    problems.append(_unreadable(where, err))
                    continue
                if sha256_bytes(data) != digests[local_key]:
                    problems.append(f"{where} is corrupt (checksum mismatch)")
    return "ok"


def expected_arrays(store: FeatureStore, n: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every row array a task of `n` rows holds: each grid group's tokens (or compact arrays),
    suffixed in a multi-grid store (format 2.3), then prefix tokens."""
    feats = store.features
    dtype = store.attrs["storage"]["dtype"]
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for grid in store.grids:
        if store.compact is not None:
            specs = store.compact.array_specs(n, grid.num_layers, grid.num_tokens, grid.feature_dim)
            expected.update({grid_array(name, grid.name): spec for name, spec in specs.items()})
        else:
            expected[grid_array(TOKENS, grid.name)] = ((n, grid.num_layers, grid.num_tokens, grid.feature_dim), dtype)
    if int(feats["num_prefix_tokens"]):
        expected[PREFIX] = ((n, len(feats["layers"]), int(feats["num_prefix_tokens"]), int(feats["feature_dim"])), dtype)
    return expected


def _layer_problems(store: FeatureStore, task: str) -> list[str]:
    """A multi-grid task's `layer_<g>` coordinates: each group's model layer indices, as `features.grids` says."""
    out = []
    for grid in store.grids:
        name = grid_array("layer", grid.name)
        try:
            values = [int(v) for v in np.asarray(store.group[f"{task}/{name}"][...])]
        except Exception as err:  # noqa: BLE001 - missing or undecodable: a problem of the store
            out.append(f"task {task}: coordinate {name} cannot be read ({err})")
            continue
        if values != list(grid.layers):
            out.append(f"task {task}: coordinate {name} holds layers {values}; features.grids says {list(grid.layers)}")
    return out


def _sample_id_problems(store: FeatureStore, task: str, ids: list[str]) -> list[str]:
    """The sample_id coordinate in the layout the store's version says (2.2: uint8 UTF-8 bytes, which every Zarr
    implementation reads; 2.0 and 2.1: zarr-python strings), holding the sample table's ids row for row."""
    where = f"task {task}: coordinate sample_id"
    try:
        meta = _load_json(store.location, f"{task}/{SAMPLE_ID}/zarr.json")
        values = np.asarray(store.group[f"{task}/{SAMPLE_ID}"][...])
    except Exception as err:  # noqa: BLE001 - missing, undecodable, a damaged chunk: each is a problem of the store
        return [f"{where} cannot be read ({err})"]
    want = "uint8" if store.format_version >= ID_BYTES_SINCE else "string"
    shown = "{}.{}".format(*store.format_version)
    if meta.get("data_type") != want:
        return [f"{where} has data type {meta.get('data_type')!r}; format {shown} stores it as {want!r}"]
    try:
        stored = sample_table.ids_from_array(values)
    except (ValueError, UnicodeDecodeError) as err:
        return [f"{where} cannot be decoded ({err})"]
    if stored != ids:
        row = next((i for i, (a, b) in enumerate(zip(stored, ids)) if a != b), min(len(stored), len(ids)))
        return [f"{where} disagrees with {SAMPLES_NAME} from row {row} "
                f"({stored[row] if row < len(stored) else 'no row'!r} vs {ids[row] if row < len(ids) else 'no row'!r})"]
    return []


def _chunk(block: int, ndim: int) -> str:
    return "(" + ", ".join([str(block)] + ["0"] * (ndim - 1)) + ")"


def _check_task_objects(store: FeatureStore, task: str, arrays: dict[str, int], num_blocks: int, manifest: Manifest,
                        report: ValidationReport, *, checksums: str, fraction: float, rng: random.Random) -> str:
    """Format 2: every object of the task against the manifest. Small objects are always hashed
    (they are what a shifted label or an edited attribute would change); shards all or a sample."""
    loc = store.location
    problems = report.problems
    entries = manifest.for_task(task)
    if not entries:
        problems.append(f"task {task}: complete, but not in {MANIFEST_NAME} (its writer was killed while finishing "
                        "it: rerun the extraction to complete it)")
        return "invalid"
    shard_keys = {shard_key(task, name, block, ndim): (name, block) for name, ndim in arrays.items() for block in range(num_blocks)}
    for key in shard_keys:
        if key not in entries:
            name, block = shard_keys[key]
            problems.append(f"task {task}: array {name} chunk {_chunk(block, arrays[name])} [{key}] is not in {MANIFEST_NAME}")
    for key in (f"{task}/zarr.json", f"{task}/{SAMPLES_NAME}"):
        if key not in entries:
            problems.append(f"task {task}: {key} is not in {MANIFEST_NAME}")
    listed = list_sizes(loc, prefix=f"{task}/")
    shards = sorted(k for k in entries if k in shard_keys)
    to_hash = set(shards) if checksums == "all" else set()
    if checksums == "sample" and shards:
        to_hash = set(rng.sample(shards, max(1, math.ceil(fraction * len(shards)))))
    for key, entry in sorted(entries.items()):
        if key in shard_keys:
            name, block = shard_keys[key]
            where = f"task {task}: array {name} chunk {_chunk(block, arrays[name])} [{key}]"
        else:
            where = f"task {task}: {key}"
        present = (key in listed) if listed is not None else loc.exists(key)
        if not present:
            problems.append(f"{where} is missing (it would read as NaN, never as data)")
            continue
        if listed is not None and entry.size is not None and listed[key] != entry.size:
            problems.append(f"{where} has {listed[key]} bytes, {MANIFEST_NAME} records {entry.size} (truncated or replaced)")
            continue
        if key in shard_keys and key not in to_hash:
            continue
        report.chunks_checked += key in shard_keys
        try:
            data = loc.read_bytes(key)
        except StoreNotFoundError:
            problems.append(f"{where} is missing (it would read as NaN, never as data)")
            continue
        except StoreError as err:  # a zip entry failing its CRC, an unreachable server: listed, not fatal
            problems.append(_unreadable(where, err))
            continue
        if sha256_bytes(data) != entry.sha256:
            problems.append(f"{where} is corrupt (does not match its sha256 in {MANIFEST_NAME})")
    return "ok"
