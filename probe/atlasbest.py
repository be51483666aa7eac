"""The atlas's best probe per task (atlas_best.csv, and the report's "Best probe per task" table).

Its own module because both sides use it: probe.atlas writes the table after a run, probe.report renders it
from atlas.csv long after, and the report also draws the atlas's figures for probe.atlas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["best_per_task"]


def best_per_task(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Highest accuracy per task; ties go to the earliest (backbone, pooling, layer) in the table."""
    best: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        current = best.get(row["task"])
        if current is None or row["accuracy"] > current["accuracy"]:
            best[row["task"]] = row
    out = []
    for task, row in best.items():
        last = [r for r in rows if r["task"] == task and r["backbone"] == row["backbone"] and r["pooling"] == row["pooling"]]
        last_row = max(last, key=lambda r: r["layer_position"])
        out.append({
            "task": task, "group": row.get("group"), "backbone": row["backbone"], "layer": row["layer"],
            "pooling": row["pooling"], "accuracy": row["accuracy"], "split": row["split"], "n": row["n"],
            "last_layer": last_row["layer"], "last_layer_accuracy": last_row["accuracy"],
        })
    return out
