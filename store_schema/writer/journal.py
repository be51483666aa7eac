"""Reading a task's journal back and turning it into manifest entries.

The journal (`JOURNAL_NAME`, one JSON line per finished block) is what a killed run resumes from and
what `StoreWriter._repair` / `TaskWriter.finalize` build the manifest's entries of a task from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..location import is_hidden
from ..manifest import Entry, sha256_bytes


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
