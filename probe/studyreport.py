"""Render a study run folder (``combo study``: several heads per task) as report.md plus PNG figures.

A study asks which head wins, so the report puts the heads side by side as columns and gives each paired
comparison a 95% interval: two heads were scored on the same test samples, so the per-sample paired
bootstrap of their difference is much tighter than comparing two independent accuracies. Everything is read
back from the run folder (study.csv, the predictions Parquet files, io.csv, the relevance CSVs), never the
stores. This module imports probe.report, never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .report import (ReportError, _config, _group, _image, _importance_table, _is_vtab, _ordered_tasks, plot_accuracy,
                     plot_heldout, plot_relevance, read_csv)
from .results import GROUP_ORDER, GROUP_TITLES, PARTIAL_MEANS, group_means
from .runstate import read_state

__all__ = ["COMPARISON_HEADER", "comparison_cells", "comparisons", "heads_grid", "io_grid", "io_totals", "markdown_grid",
           "paired_bootstrap",
           "paired_bootstrap_tasks", "render_study_report", "study_rows", "study_summary", "study_tables"]

FAMILY_ORDER = ("combo", "select", "single", "linear")
MEAN_OVER_TASKS = "mean over tasks"
SUMMARY_COLUMNS = ("task", "group", "head", "column", "family", "stores", "split", "n", "accuracy")


# ------------------------------------------------------------------------------------------------ bootstrap


def _resampled_means(diff: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``diff``, drawn as multinomial counts of its distinct
    values: the same distribution as resampling indices, in O(resamples x distinct values) memory instead of
    O(resamples x n) (a 0/1 correctness difference has at most 3 distinct values; a VTAB test split 20k samples)."""
    values, counts = np.unique(diff, return_counts=True)
    draws = rng.multinomial(diff.size, counts / diff.size, size=resamples)
    return draws @ values / diff.size


def _diff(correct_a: Any, correct_b: Any) -> np.ndarray:
    a, b = np.asarray(correct_a, dtype=np.float64).ravel(), np.asarray(correct_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: {a.size} and {b.size} samples (a pair needs the same samples)")
    if a.size == 0:
        raise ValueError("paired bootstrap: no samples")
    return a - b


def paired_bootstrap(correct_a: Any, correct_b: Any, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(correct_a - correct_b) and its 95% percentile interval from a per-sample paired bootstrap."""
    diff = _diff(correct_a, correct_b)
    means = _resampled_means(diff, resamples, np.random.default_rng(seed))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def paired_bootstrap_tasks(pairs: Sequence[tuple[Any, Any]], *, resamples: int = 2000,
                           seed: int = 0) -> tuple[float, float, float]:
    """The mean over tasks of the per-task mean differences, and its 95% interval: each task's samples are
    resampled on their own (tasks have their own test sets) and the per-task means averaged, as the score is."""
    if not pairs:
        raise ValueError("paired bootstrap over tasks: no task")
    rng = np.random.default_rng(seed)
    diffs = [_diff(a, b) for a, b in pairs]
    means = np.mean([_resampled_means(d, resamples, rng) for d in diffs], axis=0)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.mean([d.mean() for d in diffs])), float(low), float(high)


# -------------------------------------------------------------------------------------------------- input


def _family_key(row: Mapping[str, Any]) -> int:
    family = str(row.get("family") or "")
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def study_rows(run_dir: Path) -> list[dict[str, Any]]:
    """study.csv's rows (one per task and head); an interrupted study may hold only some heads of its last task."""
    rows = read_csv(Path(run_dir) / "study.csv")
    for row in rows:
        row["task"], row["column"] = str(row["task"]), str(row.get("column") or row["head"])
        row["stores"] = "" if row.get("stores") is None else str(row["stores"])
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The head columns: combo, select, single, linear, each in study.csv's order."""
    first = {}
    for i, row in enumerate(rows):
        first.setdefault(row["column"], (_family_key(row), i))
    return sorted(first, key=first.__getitem__)


def _partial(run_dir: Path) -> str | None:
    state = read_state(run_dir)
    return state.describe() if state is not None and state.partial else None


def _correct(run_dir: Path, row: Mapping[str, Any], cache: dict[Path, dict[Any, bool]]) -> dict[Any, bool]:
    """sample_id -> whether the head predicted it right, from ``<folder>/predictions-<task>.parquet``."""
    path = Path(run_dir) / str(row.get("folder") or "") / f"predictions-{row['task']}.parquet"
    if path not in cache:
        if not path.is_file():
            raise ReportError(f"{path} is missing: the predictions of head {row['head']} on task {row['task']}")
        table = pq.read_table(path, columns=["sample_id", "label", "prediction"]).to_pydict()
        cache[path] = {s: int(y) == int(p) for s, y, p in zip(table["sample_id"], table["label"], table["prediction"])}
    return cache[path]


# ------------------------------------------------------------------------------------------------ comparisons


def _pairs(rows: Sequence[Mapping[str, Any]], rule: str) -> list[tuple[str, str, Mapping[str, Any], Mapping[str, Any]]]:
    """(task, comparison, row a, row b) for every comparison whose two heads the task has."""
    out = []
    for task in _ordered_tasks(rows):
        mine = [r for r in rows if r["task"] == task]
        fam = {f: [r for r in mine if r.get("family") == f] for f in FAMILY_ORDER}
        for a in fam["select"]:
            for b in fam["combo"]:
                out.append((task, f"{rule} vs all", a, b))
        if fam["single"]:
            best = max(fam["single"], key=lambda r: float(r["accuracy"]))
            for a in fam["combo"]:
                out.append((task, "all vs best single", a, best))
        linear = {r["stores"]: r for r in fam["linear"]}
        one_store = {r["stores"]: r for r in fam["combo"] + fam["single"] if "+" not in r["stores"]}  # combo[x]
        for store, a in one_store.items():
            if store in linear:
                out.append((task, f"combo vs linear on {store}", a, linear[store]))
    return [(t, c, a, b) for t, c, a, b in out if a["column"] != b["column"]]  # one store: combo[a] is the single


def comparisons(run_dir: str | Path, *, resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Paired comparisons per task (top-k vs all, all vs the best single backbone, ComBo vs linear on the same
    store), then their mean over tasks (none for a partial run or one task); samples matched by sample_id."""
    run_dir = Path(run_dir)
    config = _config(run_dir)
    rows = study_rows(run_dir)
    rule = str((config.get("select") or {}).get("text") or "selected")
    cache: dict[Path, dict[Any, bool]] = {}
    out: list[dict[str, Any]] = []
    per_comparison: dict[str, list[tuple[dict[str, Any], np.ndarray, np.ndarray]]] = {}
    for task, name, a, b in _pairs(rows, rule):
        ca, cb = _correct(run_dir, a, cache), _correct(run_dir, b, cache)
        shared = [s for s in ca if s in cb]
        if not shared:
            raise ReportError(f"task {task}: heads {a['head']} and {b['head']} share no sample_id in their predictions")
        xa = np.array([ca[s] for s in shared], dtype=np.float64)
        xb = np.array([cb[s] for s in shared], dtype=np.float64)
        diff, low, high = paired_bootstrap(xa, xb, resamples=resamples, seed=seed)
        row = {"task": task, "comparison": name, "head_a": a["head"], "head_b": b["head"], "accuracy_a": float(xa.mean()),
               "accuracy_b": float(xb.mean()), "diff": diff, "low": low, "high": high, "n": len(shared)}
        out.append(row)
        per_comparison.setdefault(name, []).append((row, xa, xb))
    if _partial(run_dir):  # a mean over the tasks that happened to finish is not the study's
        return out
    for name, items in per_comparison.items():
        if len(items) < 2:  # a mean over one task is that task's row again
            continue
        diff, low, high = paired_bootstrap_tasks([(xa, xb) for _, xa, xb in items], resamples=resamples, seed=seed)
        heads_a = {_column_of(rows, r["task"], r["head_a"]) for r, _, _ in items}
        heads_b = {_column_of(rows, r["task"], r["head_b"]) for r, _, _ in items}
        out.append({"task": MEAN_OVER_TASKS, "comparison": name, "head_a": " / ".join(sorted(heads_a)),
                    "head_b": "best single (per task)" if name == "all vs best single" else " / ".join(sorted(heads_b)),
                    "accuracy_a": float(np.mean([r["accuracy_a"] for r, _, _ in items])),
                    "accuracy_b": float(np.mean([r["accuracy_b"] for r, _, _ in items])), "diff": diff, "low": low,
                    "high": high, "n": int(sum(r["n"] for r, _, _ in items))})
    return out


def _column_of(rows: Sequence[Mapping[str, Any]], task: str, head: str) -> str:
    return next((r["column"] for r in rows if r["task"] == task and r["head"] == head), head)


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def comparison_cells(row: Mapping[str, Any]) -> list[str]:
    """A comparison row as table cells: accuracies in %, the difference and its interval in points."""
    return [str(row["task"]), str(row["comparison"]), str(row["head_a"]), str(row["head_b"]),
            f"{100 * row['accuracy_a']:.1f}", f"{100 * row['accuracy_b']:.1f}", _points(row["diff"]),
            f"[{_points(row['low'])}, {_points(row['high'])}]", str(row["n"])]


COMPARISON_HEADER = ["task", "comparison", "head a", "head b", "a (%)", "b (%)", "a - b (points)", "95% interval", "n"]


# ------------------------------------------------------------------------------------------------ tables


def heads_grid(rows: Sequence[Mapping[str, Any]], *, vtab: bool, partial: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the accuracy table with the heads as columns: one row per task (VTAB group order),
    then the group means and Overall = mean of the group means (VTAB), else the mean over tasks; a head's mean
    is given only where it has every task of that group, and no mean at all for a partial run."""
    columns = _columns(rows)
    tasks = _ordered_tasks(rows)
    header = ["task", "group", "split", "n", *columns]
    cell = {(r["task"], r["column"]): float(r["accuracy"]) for r in rows}
    body = []
    for task in tasks:
        first = next(r for r in rows if r["task"] == task)
        body.append([task, str(first.get("group") or ""), str(first.get("split") or ""), str(first.get("n") or ""),
                     *[f"{100 * cell[(task, c)]:.1f}" if (task, c) in cell else "-" for c in columns]])
    if partial or not rows:
        return header, body
    group_of = {t: _group(next(r for r in rows if r["task"] == t)) for t in tasks}

    def complete(column: str, among: Sequence[str]) -> list[dict[str, Any]] | None:
        got = [{"task": t, "group": group_of[t], "accuracy": cell[(t, column)]} for t in among if (t, column) in cell]
        return got if len(got) == len(among) else None

    if vtab and any(g in GROUP_ORDER for g in group_of.values()):
        groups = [g for g in GROUP_ORDER if g in group_of.values()]
        per_column = {c: {g: complete(c, [t for t in tasks if group_of[t] == g]) for g in groups} for c in columns}
        for g in groups:
            body.append([GROUP_TITLES[g], "", "", "", *[f"{100 * group_means(per_column[c][g])[1]:.1f}"
                                                       if per_column[c][g] else "-" for c in columns]])
        overall = []
        for c in columns:
            ok = all(per_column[c][g] for g in groups)
            overall.append(f"{100 * group_means([r for g in groups for r in per_column[c][g]])[1]:.1f}" if ok else "-")
        body.append(["Overall", "", "", "", *overall])
    else:
        means = [complete(c, tasks) for c in columns]
        body.append([MEAN_OVER_TASKS, "", "", "", *[f"{100 * np.mean([r['accuracy'] for r in m]):.1f}" if m else "-"
                                                    for m in means]])
    return header, body


def markdown_grid(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A header and rows (cells as text) as the lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def io_totals(run_dir: str | Path) -> dict[str, dict[str, int]]:
    """Bytes read and bytes stored per split, summed over tasks and stores from io.csv (empty without one)."""
    path = Path(run_dir) / "io.csv"
    totals: dict[str, dict[str, int]] = {}
    for r in read_csv(path) if path.is_file() else []:
        t = totals.setdefault(str(r["split"]), {"bytes_read": 0, "bytes_stored": 0})
        t["bytes_read"] += int(r.get("bytes_read") or 0)
        t["bytes_stored"] += int(r.get("bytes_stored") or 0)
    return totals


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n:,} ({n / size:.1f} {unit})"
    return f"{n:,}"


def io_grid(totals: Mapping[str, Mapping[str, int]]) -> tuple[list[str], list[list[str]]]:
    header = ["split", "bytes read", "bytes stored", "read / stored"]
    body = [[split, _bytes(t["bytes_read"]), _bytes(t["bytes_stored"]),
             f"{t['bytes_read'] / t['bytes_stored']:.2f}" if t["bytes_stored"] else "-"] for split, t in totals.items()]
    return header, body


def _selected(run_dir: Path, config: Mapping[str, Any]) -> dict[str, list[str]]:
    if config.get("selection"):
        return {str(t): [str(n) for n in names] for t, names in config["selection"].items()}
    selected: dict[str, list[str]] = {}
    for r in read_csv(run_dir / "selection.csv") if (run_dir / "selection.csv").is_file() else []:
        if r["selected"]:
            selected.setdefault(str(r["task"]), []).append(str(r["backbone"]))
    return selected


# ------------------------------------------------------------------------------------------------ report


def render_study_report(run_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the study's figures into ``run_dir``; returns the files written (report.md first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    config = _config(run_dir)
    rows = study_rows(run_dir)
    partial = _partial(run_dir)
    vtab = _is_vtab(config, rows)
    names = [str(b) for b in config.get("backbones") or []]
    select = config.get("select") or {}
    by = str(select.get("by") or "norm")
    md = [f"# Study: heads on {' + '.join(names) or '?'} (dataset {config.get('dataset', '?')}, protocol "
          f"{config.get('protocol', '?')})", ""]
    if partial:
        md += [f"**{partial}**: this study was interrupted; the tables hold what finished and {PARTIAL_MEANS}. "
               "Rerun the command to measure every task.", ""]
    families = {r.get("family") for r in rows}
    legend = ["combo[...] = ComBo on those backbones"]
    legend += [f"combo[{select.get('text', 'top-k')}] = ComBo retrained on each task's selection"] if "select" in families else []
    legend += ["linear[...] = the linear probe on one backbone"] if "linear" in families else []
    md += ["## Accuracy per head (%)", "", "One column per head: " + "; ".join(legend) + "."
           + ("" if partial else (" Overall = mean of the group means (as in the paper)." if vtab else "")
              + " A head's mean is given only where it has every task it averages."), ""]
    md += markdown_grid(*heads_grid(rows, vtab=vtab, partial=bool(partial))) + [""]
    figures = []
    if rows:
        series = {c: [r for r in rows if r["column"] == c] for c in _columns(rows)}
        title = f"Accuracy per task and head ({', '.join(names)})" + (f", {partial}" if partial else "")
        figures.append(plot_accuracy(series, run_dir / "accuracy.png", title=title, means=not partial))
        md += _image(figures[-1], "accuracy per task and head")
    selected = _selected(run_dir, config)
    importances = read_csv(run_dir / "relevance.csv") if (run_dir / "relevance.csv").exists() else []
    if importances:  # none in a one-store study: nothing to rank
        lam = config.get("group_lambda")
        md += ["## Backbone relevance", "",
               f"Measured by the penalised ComBo (lambda = {lam}) on {config.get('relevance_protocol', 'dev')} data: "
               "normalised importance s_k / sum s (rank), beside the held-out drop (accuracy points lost when the "
               "backbone's features are shuffled, 95% interval, rank) where measured; bold = selected.", ""]
        md += _importance_table(importances, selected) + [""]
        figures.append(plot_relevance(importances, run_dir / "relevance.png", selected=selected, group_lambda=lam))
        md += _image(figures[-1], "backbone relevance")
        if importances and importances[0].get("heldout_drop") is not None:
            figures.append(plot_heldout(importances, run_dir / "heldout.png"))
            md += _image(figures[-1], "held-out drop")
    if selected and len(names) > 1:
        md += ["## Selection per task", "", f"Rule {select.get('text', '?')}, ranked by {by}.", "",
               "| task | kept backbones | by |", "|---|---|---|"]
        for task in sorted(selected, key=lambda t: _ordered_tasks(rows).index(t) if t in _ordered_tasks(rows) else 1e9):
            md.append(f"| {task} | {', '.join(selected[task])} | {by} |")
        md.append("")
    compared = comparisons(run_dir)
    md += ["## Paired comparisons", "",
           "Difference in accuracy (head a - head b, points) on the same test samples, with a 95% percentile "
           "interval from a per-sample paired bootstrap (2000 resamples)"
           + ("" if partial else "; the mean over tasks resamples each task on its own")
           + ". The best single backbone is picked per task on the test split it is scored on, which favours it.", ""]
    md += (markdown_grid(COMPARISON_HEADER, [comparison_cells(r) for r in compared]) if compared
           else ["No comparison: the study lacks the heads to pair."]) + [""]
    if config.get("warnings"):
        md += ["**Warnings**", ""] + [f"- {w}" for w in config["warnings"]] + [""]
    totals = io_totals(run_dir)
    if totals:
        md += ["## Bytes read", "", "Bytes read from the stores per split (all tasks and stores), against the "
               "bytes the stores hold for what was read.", ""] + markdown_grid(*io_grid(totals)) + [""]
    report = run_dir / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n")
    return [report, *figures]


def study_summary(run_dir: str | Path) -> dict[str, Any]:
    """The study's heads, comparisons and bytes read, as plain values for scripts (``combo report --json``)."""
    run_dir = Path(run_dir)
    return {"heads": [{c: r.get(c) for c in SUMMARY_COLUMNS} for r in study_rows(run_dir)],
            "comparisons": comparisons(run_dir), "io": io_totals(run_dir)}


def study_tables(run_dir: str | Path, summary: Mapping[str, Any] | None = None) -> list[tuple[str, list[str], list[list[str]], int]]:
    """The report's tables for a console, as (title, header, rows, leading text columns): accuracy per head,
    the paired comparisons and the bytes read (the last two only when there is something to show)."""
    run_dir = Path(run_dir)
    summary = study_summary(run_dir) if summary is None else summary
    heads = list(summary["heads"])
    header, body = heads_grid(heads, vtab=_is_vtab(_config(run_dir), heads), partial=_partial(run_dir) is not None)
    splits = ", ".join(dict.fromkeys(str(r.get("split")) for r in heads if r.get("split")))
    narrow = [[row[0], *row[3:]] for row in [header, *body]]  # a console is narrow: group and split left out
    tables = [(f"study run: {run_dir.name}, accuracy (%) per head" + (f" on {splits}" if splits else ""),
               narrow[0], narrow[1:], 1)]
    if summary["comparisons"]:
        tables.append(("paired comparisons (a - b in points, 95% interval)", COMPARISON_HEADER,
                       [comparison_cells(r) for r in summary["comparisons"]], 4))
    if summary["io"]:
        tables.append(("bytes read per split", *io_grid(summary["io"]), 1))
    return tables
