"""The store's manifest: size and sha256 of every object, so nothing damaged passes as data.

Format 2 keeps one `manifest.json` at the store root, covering every object of every complete
task (shards, array and group `zarr.json`, coordinate chunks, `samples.parquet`) and the root
`zarr.json`; only the manifest itself is not in it. The writer rewrites it last, after each
task completes, so a store whose manifest is missing a complete task is one a writer was killed
in: the next writer completes it. Format 1 stores had a per-task `checksums.json` covering the
shards only, without sizes; `load_manifest` reads both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import StoreError, StoreNotFoundError
from .location import Location

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "combo-feature-store-manifest"
V1_CHECKSUMS_NAME = "checksums.json"  # format 1: <task>/checksums.json, shards only


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int | None = None  # None in format 1 manifests


@dataclass
class Manifest:
    objects: dict[str, Entry] = field(default_factory=dict)  # store key -> entry

    def for_task(self, task: str) -> dict[str, Entry]:
        prefix = f"{task}/"
        return {k: e for k, e in self.objects.items() if k.startswith(prefix)}

    def tasks(self) -> set[str]:
        return {k.split("/", 1)[0] for k in self.objects if "/" in k}

    def to_bytes(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "algorithm": "sha256",
            "objects": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(self.objects.items())},
        }
        return json.dumps(doc, indent=0, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> "Manifest":
        try:
            doc = json.loads(data)
            objects = {str(k): Entry(sha256=str(v["sha256"]), size=int(v["size"])) for k, v in doc["objects"].items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{where} is not a valid manifest (truncated or corrupt): {err}") from err
        if doc.get("format") != MANIFEST_FORMAT or doc.get("algorithm") != "sha256":
            raise StoreError(f"{where}: unexpected manifest format {doc.get('format')!r} / {doc.get('algorithm')!r}")
        return cls(objects=objects)


def load_manifest(location: Location, *, format_major: int, tasks: Iterable[str] = ()) -> Manifest:
    """The manifest of a store (format 2: manifest.json; format 1: the complete `tasks`' checksums.json)."""
    if format_major >= 2:
        try:
            data = location.read_bytes(MANIFEST_NAME)
        except StoreNotFoundError:
            raise StoreError(
                f"{location.url} has no {MANIFEST_NAME} (a copy that stopped early, or a writer killed before "
                "its first task completed); finish the copy or rerun the extraction"
            ) from None
        return Manifest.from_bytes(data, where=f"{location.url}/{MANIFEST_NAME}")
    manifest = Manifest()
    for task in tasks:
        try:
            doc = json.loads(location.read_bytes(f"{task}/{V1_CHECKSUMS_NAME}"))
            arrays = doc["arrays"]
        except StoreNotFoundError:
            continue
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise StoreError(f"{location.url}/{task}/{V1_CHECKSUMS_NAME} is not valid (truncated or corrupt): {err}") from err
        for array, digests in arrays.items():
            for local_key, digest in digests.items():
                manifest.objects[f"{task}/{array}/{local_key}"] = Entry(sha256=str(digest))
    return manifest


def verify_bytes(manifest: Manifest, key: str, data: bytes, *, where: str) -> bytes:
    """`data` if it matches the manifest's entry for `key` (or there is none); else a clear error."""
    entry = manifest.objects.get(key)
    if entry is not None and (
        (entry.size is not None and entry.size != len(data)) or sha256_bytes(data) != entry.sha256
    ):
        raise StoreError(
            f"{where}/{key} does not match the store's manifest (damaged or changed after the store was "
            f"written); run `combo store validate {where}`"
        )
    return data


def absent_or_resized(entries: dict[str, Entry], listed: dict[str, int]) -> tuple[list[str], list[str]]:
    """Keys of `entries` a listing lacks, and keys it lists at another size than recorded (sorted)."""
    missing = sorted(k for k in entries if k not in listed)
    resized = sorted(k for k, e in entries.items() if k in listed and e.size is not None and listed[k] != e.size)
    return missing, resized


def describe_missing(keys: list[str]) -> str:
    first = keys[0]
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f"{first}{more}"
