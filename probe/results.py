"""Run folders: what a probe run leaves behind, and the VTAB-style results table."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store_schema.location import write_file_atomic

# VTAB-1k task groups (shared/VTAB.md); the store's task metadata names the group when it knows it.
VTAB_GROUPS: dict[str, str] = {
    **{t: "natural" for t in ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397")},
    **{t: "specialised" for t in ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")},
    **{t: "structured" for t in ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele")},
}
GROUP_ORDER = ("natural", "specialised", "structured")
GROUP_TITLES = {"natural": "Natural", "specialised": "Specialised", "structured": "Structured"}
METRIC_COLUMNS = ("task", "split", "accuracy", "n")


def sanitise_url(url: str) -> str:
    """Drop any user:password@ part and any query string (pre-signed URLs carry signatures there) of a URL,
    so no credential reaches a run folder. Local paths are returned unchanged."""
    text = str(url)
    if "://" not in text:
        return text
    text = re.sub(r"(?<=://)[^/@]+@", "", text)
    return re.split(r"[?#]", text, maxsplit=1)[0]


def new_run_dir(out: str | Path, label: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "-", label).strip("-")[:80] or "run"
    base = Path(out) / f"{stamp}-{safe}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    path.mkdir(parents=True)
    return path


def write_json(path: Path, doc: Any) -> None:
    """Replaced atomically: a crash or a full disk mid-write leaves the previous document, never half of one."""
    write_file_atomic(Path(path), (json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_table(rows: Sequence[dict[str, Any]], path_stem: Path, *, columns: Sequence[str] | None = None) -> None:
    """Write rows as CSV and Parquet (same stem)."""
    if not rows:
        columns = list(columns or [])
    else:
        columns = list(columns or rows[0].keys())
        for row in rows:
            columns += [k for k in row if k not in columns]
    with open(path_stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in columns})
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]) if rows else
                   pa.table({c: pa.array([], type=pa.string()) for c in columns}), path_stem.with_suffix(".parquet"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["accuracy"] = float(row["accuracy"])
        row["n"] = int(row["n"])
    return rows


def group_means(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, float], float | None]:
    """Mean accuracy per VTAB group and the overall score = mean of the group means (the paper's)."""
    by_group: dict[str, list[float]] = {}
    for row in rows:
        group = row.get("group") or VTAB_GROUPS.get(str(row["task"]))
        if group in GROUP_ORDER:
            by_group.setdefault(group, []).append(float(row["accuracy"]))
    means = {g: float(np.mean(by_group[g])) for g in GROUP_ORDER if g in by_group}
    overall = float(np.mean(list(means.values()))) if means else None
    return means, overall


PARTIAL_MEANS = "no group or overall mean is computed from a partial run: it would not be comparable to a whole one"


def markdown_table(rows: Sequence[dict[str, Any]], *, title: str, vtab: bool, partial: str | None = None) -> str:
    """One row per task (accuracy in %), then group means and the overall mean for VTAB.

    ``partial`` (e.g. ``partial: 3 of 19 planned tasks finished``) marks an unfinished run: it is said under the
    title and no mean is computed (a mean over the tasks that happened to finish is not the run's score)."""
    lines = [f"# {title}", ""]
    if partial:
        lines += [f"**{partial}**; {PARTIAL_MEANS}.", ""]
        vtab = False
    lines += ["| task | group | split | n | accuracy (%) |", "|---|---|---|---|---|"]
    ordered = sorted(rows, key=lambda r: (GROUP_ORDER.index(r.get("group") or VTAB_GROUPS.get(r["task"], "zz")) if (r.get("group") or VTAB_GROUPS.get(r["task"])) in GROUP_ORDER else 9, str(r["task"])))
    for row in ordered:
        group = row.get("group") or VTAB_GROUPS.get(str(row["task"]), "")
        lines.append(f"| {row['task']} | {group} | {row['split']} | {row['n']} | {100 * float(row['accuracy']):.1f} |")
    if vtab:
        means, overall = group_means(rows)
        lines += ["", "| Natural | Specialised | Structured | Overall |", "|---|---|---|---|"]
        cells = [f"{100 * means[g]:.1f}" if g in means else "-" for g in GROUP_ORDER]
        cells.append(f"{100 * overall:.1f}" if overall is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Overall = mean of the group means (as in the paper); a group with no task is left out."]
    return "\n".join(lines) + "\n"
