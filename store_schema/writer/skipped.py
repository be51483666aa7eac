"""`Skipped`: a row the extraction could not fill (a bad image under --skip-bad).

Shards are written with its rows NaN-filled, the journal and the task document record it; its own
module because the shard writer, the task writer and the compactor all pass it around.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Skipped:
    row: int
    sample_id: str
    error: str
