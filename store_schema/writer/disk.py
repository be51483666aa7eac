"""Small disk helpers the store, task and shard writers all need: read a zarr.json, fsync a file.

Their own module so that the writers share them without importing one another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
