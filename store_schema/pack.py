"""Packing a store into one .zip file to hand over (readable as is by zarr's ZipStore).

Entries are the store keys at the top of the archive (`zarr.json`, `<task>/tokens/c/0/0/0/0`, ...),
which is the layout zarr's ZipStore and fsspec's zip filesystem read. Entries are STORED, not
deflated: the shards are already compressed, and stored entries can be read by byte range
without inflating the archive. A fixed timestamp makes the same store give the same bytes.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError, StoreValidationError
from .location import is_url, redact, resolve
from .transfer import TransferProgress, prefetched, read_verified, refresh, store_objects
from .validate import ValidationReport, validate_store

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass
class PackResult:
    source: str
    target: str
    objects: int = 0
    bytes_packed: int = 0
    seconds: float = 0.0
    report: ValidationReport | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "objects": self.objects,
            "bytes": self.bytes_packed,
            "zip_bytes": os.path.getsize(self.target) if os.path.exists(self.target) else None,
            "seconds": round(self.seconds, 3),
            "valid": bool(self.report.ok) if self.report is not None else None,
        }


def pack_store(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    verify: str = "all",
    workers: int = 4,
    progress: TransferProgress | None = None,
) -> PackResult:
    """Write a complete store (local or remote) into the local zip file `target`, then validate the zip.

    Every shard is checked against its recorded checksum on the way in. The archive is written
    beside the target under a hidden name and renamed at the end, so a half-written zip never
    carries the final name.
    """
    if verify not in ("written", "all", "sample", "none"):
        raise ValueError(f"verify must be 'written', 'all', 'sample' or 'none', not {verify!r}")
    if verify == "written":
        verify = "all"  # a pack writes every object
    target = Path(target).expanduser()
    if is_url(str(target)) or target.suffix != ".zip":
        raise ValueError(f"pack target {target} must be a local file name ending in .zip")
    if target.exists() and not overwrite:
        raise StoreError(f"{target} already exists; pass --overwrite to replace it")
    progress = progress or TransferProgress()
    src = refresh(resolve(source, storage_options=storage_options if is_url(str(source)) else None))
    contents = store_objects(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    result = PackResult(source=redact(src.url), target=str(target), objects=len(contents.objects))
    progress.start(len(contents.objects), contents.total_bytes)
    started = time.perf_counter()
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for obj, data in prefetched(lambda o: read_verified(src, o), contents.objects, depth=workers):
                entry = zipfile.ZipInfo(obj.key, date_time=ZIP_EPOCH)
                entry.compress_type = zipfile.ZIP_STORED
                entry.external_attr = 0o644 << 16
                archive.writestr(entry, data)
                result.bytes_packed += len(data)
                progress.advance(obj.key, len(data), copied=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    result.report = validate_store(target, checksums=verify)
    if not result.report.ok:
        target.unlink(missing_ok=True)
        raise StoreValidationError(str(target), result.report.problems)
    return result
