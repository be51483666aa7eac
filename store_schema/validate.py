"""Structure and integrity checks: every problem is reported with the task, array and chunk."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import samples as sample_table
from .errors import StoreError, StoreValidationError
from .location import resolve
from .metadata import TASK_ATTR
from .reader import FeatureStore, _load_json
from .writer import CHECKSUMS_NAME, JOURNAL_NAME, PREFIX, SAMPLES_NAME, TOKENS, sha256_bytes, shard_key

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
    loc = resolve(location, storage_options=storage_options)
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
    if report.problems:
        return report
    rng = random.Random(seed)
    for task in store.tasks:
        before = len(report.problems)
        status = _validate_task(store, task, report, checksums=checksums, fraction=sample_fraction, rng=rng)
        report.tasks[task] = "invalid" if status == "ok" and len(report.problems) > before else status
    return report


def _validate_task(store: FeatureStore, task: str, report: ValidationReport, *, checksums: str, fraction: float, rng: random.Random) -> str:
    loc = store.location
    problems = report.problems
    try:
        doc = _load_json(loc, f"{task}/zarr.json")
    except StoreError as err:
        problems.append(f"task {task}: {err}")
        return "invalid"
    attrs = (doc.get("attributes") or {}).get(TASK_ATTR) or {}
    missing = [k for k in REQUIRED_TASK if k not in attrs]
    if missing:
        problems.append(f"task {task}: metadata lacks {', '.join(missing)}")
        return "invalid"
    n = int(attrs["num_samples"])
    feats = store.features
    grid = feats["token_grid"]
    expected = {TOKENS: (n, len(feats["layers"]), int(grid[0]) * int(grid[1]), int(feats["feature_dim"]))}
    if int(feats["num_prefix_tokens"]):
        expected[PREFIX] = (n, len(feats["layers"]), int(feats["num_prefix_tokens"]), int(feats["feature_dim"]))
    dtype = store.attrs["storage"]["dtype"]
    for name, shape in expected.items():
        try:
            meta = _load_json(loc, f"{task}/{name}/zarr.json")
        except StoreError as err:
            problems.append(f"task {task}: array {name}: {err}")
            continue
        if tuple(meta.get("shape", ())) != shape:
            problems.append(f"task {task}: array {name} has shape {tuple(meta.get('shape', ()))}, expected {shape}")
        if meta.get("data_type") != dtype:
            problems.append(f"task {task}: array {name} has dtype {meta.get('data_type')}, metadata says {dtype}")
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
                if sha256_bytes(loc.read_bytes(key)) != digests[local_key]:
                    problems.append(f"{where} is corrupt (checksum mismatch)")
    return "ok"
