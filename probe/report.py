"""Render a run folder (probe, relevance, select, atlas) as report.md plus PNG figures (a study folder: probe.studyreport).

Headless by construction: figures are ``matplotlib.figure.Figure`` objects saved through the Agg canvas,
never pyplot, so nothing needs a display and the caller's matplotlib backend is left alone.
Everything is read back from the run folder's CSV files and config.json, so a report can be rendered
long after the run, on another machine, without the stores.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atlasbest import best_per_task
from .results import GROUP_ORDER, GROUP_TITLES, VTAB_GROUPS, group_means, markdown_table
from .runstate import read_state

__all__ = [
    "ReportError",
    "accuracy_figure",
    "colour_scale_label",
    "layer_heatmap_figure",
    "plot_accuracy",
    "plot_atlas",
    "plot_layer_heatmap",
    "plot_heldout",
    "plot_relevance",
    "read_csv",
    "render_report",
    "run_kind",
]

KINDS = ("probe", "relevance", "select", "atlas", "study")
DPI = 110
POOLING_STYLES = {"cls": "-", "mean": "--"}


class ReportError(ValueError):
    """The folder is not a run folder this version can render."""


# --------------------------------------------------------------------------------------------------- input


def _value(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a run-folder CSV with numbers, booleans and empty cells (None) decoded."""
    try:
        with open(path, newline="") as handle:
            return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except FileNotFoundError:
        raise ReportError(f"{path} is missing (was the run interrupted before its first task finished?)") from None


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from err


def run_kind(run_dir: Path, config: Mapping[str, Any] | None = None) -> str:
    """The run's kind from config.json, else guessed from the files it holds."""
    config = _config(run_dir) if config is None else config
    kind = config.get("kind")
    if kind:
        if kind not in KINDS:
            raise ReportError(f"{run_dir}: run kind {kind!r} is not one of {', '.join(KINDS)}")
        return str(kind)
    for kind, marker in (("study", "study.csv"), ("atlas", "atlas.csv"), ("select", "selection.csv"), ("relevance", "relevance.csv"), ("probe", "metrics.csv")):
        if (run_dir / marker).exists():
            return kind
    raise ReportError(f"{run_dir} is not a run folder (no config.json, metrics.csv, relevance.csv, atlas.csv or study.csv)")


def _group(row: Mapping[str, Any]) -> str:
    return str(row.get("group") or VTAB_GROUPS.get(str(row.get("task")), "other"))


def _group_key(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def _ordered_tasks(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    first: dict[str, str] = {}
    for row in rows:
        first.setdefault(str(row["task"]), _group(row))
    return sorted(first, key=lambda t: (_group_key(first[t]), list(first).index(t)))


def _backbones(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen = sorted({(int(r.get("store_index") or 0), str(r["backbone"])) for r in rows})
    return list(dict.fromkeys(name for _, name in seen))


# ------------------------------------------------------------------------------------------------- figures


def _figure(n: int, *, width: float, height: float, max_cols: int = 4):
    """A figure with n subplots on a grid (spare cells hidden)."""
    from matplotlib.figure import Figure

    ncols, nrows = _grid(n, max_cols)
    fig = Figure(figsize=(width * ncols, height * nrows + 1.2), dpi=DPI)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return cols, int(math.ceil(n / cols))


def _colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def plot_atlas(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per task group (``atlas-<group>.png``): a subplot per task, one line per (backbone, pooling),
    x = layer, y = accuracy; a star on each task's best probe."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise ReportError("no atlas rows to plot")
    names = _backbones(rows)
    colours = _colours(names)
    by_group: dict[str, list[str]] = {}
    for task in _ordered_tasks(rows):
        by_group.setdefault(_group(next(r for r in rows if r["task"] == task)), []).append(task)
    poolings = list(dict.fromkeys(str(r["pooling"]) for r in rows))
    paths = []
    for group in sorted(by_group, key=_group_key):
        tasks = by_group[group]
        fig, axes = _figure(len(tasks), width=4.4, height=3.4)
        split = ""
        for ax, task in zip(axes, tasks):
            task_rows = [r for r in rows if r["task"] == task]
            split = str(task_rows[0].get("split") or "")
            for name in names:
                for pooling in poolings:
                    line = sorted((r for r in task_rows if r["backbone"] == name and r["pooling"] == pooling),
                                  key=lambda r: int(r.get("layer_position", r["layer"])))
                    if line:
                        ax.plot([r["layer"] for r in line], [100 * float(r["accuracy"]) for r in line], color=colours[name],
                                linestyle=POOLING_STYLES.get(pooling, ":"), marker="o", markersize=3, linewidth=1.4)
            best = max(task_rows, key=lambda r: float(r["accuracy"]))
            ax.plot([best["layer"]], [100 * float(best["accuracy"])], marker="*", markersize=16, color=colours[best["backbone"]],
                    markeredgecolor="black", linestyle="none", zorder=5)
            ax.set_title(f"{task}\nbest: {best['backbone']} layer {best['layer']} ({best['pooling']}) "
                         f"{100 * float(best['accuracy']):.1f}%", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer (block index)")
            ax.set_ylabel(f"accuracy on {split} (%)" if split else "accuracy (%)")
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colours[n], linewidth=2, label=n) for n in names]
        handles += [Line2D([], [], color="grey", linestyle=POOLING_STYLES.get(p, ":"), label=f"{p} pooling") for p in poolings]
        handles.append(Line2D([], [], marker="*", markersize=12, color="grey", markeredgecolor="black", linestyle="none", label="best probe"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, bbox_to_anchor=(0.5, -0.02))
        fig.suptitle(f"Linear probe on every layer: {GROUP_TITLES.get(group, group)} tasks", fontsize=13)
        fig.tight_layout(rect=(0, 0.06, 1, 0.97))
        paths.append(_save(fig, Path(out_dir) / f"atlas-{group}.png"))
    return paths


def _backbone_panels(rows: Sequence[Mapping[str, Any]]):
    """Backbone names, their colours, a figure with one panel per task, and (axis, task, rows by backbone)."""
    names = _backbones(rows)
    tasks = _ordered_tasks(rows)
    fig, axes = _figure(len(tasks), width=max(3.2, 0.8 * len(names) + 1.6), height=3.2)
    panels = [(ax, task, {r["backbone"]: r for r in rows if r["task"] == task}) for ax, task in zip(axes, tasks)]
    return names, _colours(names), fig, panels


def plot_relevance(rows: Sequence[Mapping[str, Any]], path: Path, *, selected: Mapping[str, Sequence[str]] | None = None,
                   group_lambda: float | None = None) -> Path:
    """Bar chart per task of normalised importance s_k / sum(s); chosen backbones solid, others faded."""
    from matplotlib.patches import Patch

    if not rows:
        raise ReportError("no relevance rows to plot")
    names, colours, fig, panels = _backbone_panels(rows)
    for ax, task, task_rows in panels:
        heights = [float(task_rows[n]["importance_normalised"]) if n in task_rows else 0.0 for n in names]
        chosen = set(selected.get(task, names)) if selected else set(names)
        bars = ax.bar(range(len(names)), heights, color=[colours[n] for n in names], edgecolor="black", linewidth=0.6)
        for bar, name in zip(bars, names):
            bar.set_alpha(1.0 if name in chosen else 0.3)
            if name in task_rows:
                ax.annotate(f"#{task_rows[name]['rank']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, max(heights + [1.0 / max(1, len(names))]) * 1.25)
        ax.axhline(1.0 / len(names), color="grey", linestyle=":", linewidth=1)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("backbone")
        ax.set_ylabel("importance s_k / sum s")
    handles = [Patch(facecolor="white", edgecolor="grey", linestyle=":", label="uniform (1/K)")]
    if selected:
        handles = [Patch(facecolor="grey", edgecolor="black", label="selected"),
                   Patch(facecolor="grey", edgecolor="black", alpha=0.3, label="not selected")] + handles
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    lam = f" (group penalty lambda = {group_lambda:g})" if group_lambda is not None else ""
    fig.suptitle(f"Backbone relevance per task{lam}", fontsize=13)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, Path(path))


def plot_heldout(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Bar chart per task of the held-out drop (accuracy points lost when a backbone is shuffled), 95% interval."""
    names, colours, fig, panels = _backbone_panels(rows)
    for ax, task, task_rows in panels:
        drops = [100 * float(task_rows[n]["heldout_drop"]) if n in task_rows else 0.0 for n in names]
        low = [d - 100 * float(task_rows[n]["heldout_low"]) if n in task_rows else 0.0 for n, d in zip(names, drops)]
        high = [100 * float(task_rows[n]["heldout_high"]) - d if n in task_rows else 0.0 for n, d in zip(names, drops)]
        ax.bar(range(len(names)), drops, yerr=[low, high], capsize=3, color=[colours[n] for n in names],
               edgecolor="black", linewidth=0.6)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("held-out drop (acc. points)")
    fig.suptitle("Held-out accuracy lost when a backbone's features are shuffled (95% interval)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, Path(path))


def plot_layer_heatmap(rows: Sequence[Mapping[str, Any]], path: Path, *, value: str = "importance") -> Path:
    """Per task: backbone x layer heat map of ||W[:, l, :]|| (where the adapter reads its features), or with
    ``value="heldout_drop"`` of each layer's held-out drop (accuracy points lost when it alone is shuffled)."""
    return _save(layer_heatmap_figure(rows, value=value), Path(path))


def colour_scale_label(label: str, vmin: float | None) -> str:
    """A colour bar's label, saying so when its scale does not start at zero (colours then exaggerate
    differences: a scale from 1.42 makes 1.5 look three times 1.45)."""
    if vmin is None or not math.isfinite(vmin) or abs(vmin) < 1e-12:
        return label
    return f"{label}\n(scale from {vmin:.3g}, not 0)"


def layer_heatmap_figure(rows: Sequence[Mapping[str, Any]], *, value: str = "importance"):
    """The figure of `plot_layer_heatmap`. Norms are >= 0 and their colour scale starts at 0; held-out drops
    may be negative, so that scale spans the values and its colour bar says where it starts."""
    if not rows:
        raise ReportError("no per-layer relevance rows to plot")
    names = _backbones(rows)
    tasks = _ordered_tasks(rows)
    width = max(int(r.get("layer_position", 0)) for r in rows) + 1
    fig, axes = _figure(len(tasks), width=max(4.0, 0.35 * width + 2.5), height=max(2.4, 0.45 * len(names) + 1.6), max_cols=3)
    for ax, task in zip(axes, tasks):
        grid = np.full((len(names), width), np.nan)
        labels: dict[int, Any] = {}
        for r in rows:
            if r["task"] == task:
                pos = int(r.get("layer_position", r["layer"]))
                scale = 100.0 if value == "heldout_drop" else 1.0
                grid[names.index(r["backbone"]), pos] = scale * float(r[value])
                labels.setdefault(pos, r["layer"])
        finite = grid[np.isfinite(grid)]
        low = float(finite.min()) if finite.size else 0.0
        vmin = min(0.0, low) if value == "importance" else low  # norms: from zero; drops: their range
        vmax = float(finite.max()) if finite.size else 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9)
        if np.isfinite(grid).any():
            i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
            ax.plot([j], [i], marker="*", color="white", markeredgecolor="black", markersize=12, linestyle="none")
        ax.set_xticks(range(width), [str(labels.get(p, p)) for p in range(width)], fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("layer (block index)")
        ax.set_ylabel("backbone")
        ax.set_title(task, fontsize=10)
        fig.colorbar(image, ax=ax, label=colour_scale_label(
            "||W[:, l, :]||" if value == "importance" else "held-out drop (points)", vmin))
    fig.suptitle("Per-layer importance: norm of Lambda's slice for each layer (star = largest)" if value == "importance"
                 else "Per-layer held-out drop: accuracy lost when one layer is shuffled (star = largest)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_accuracy(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *, title: str,
                  means: bool = True) -> Path:
    """Grouped bars of accuracy per task (one bar per series), tasks ordered by VTAB group, group means dotted
    (``means=False``: none, e.g. for a partial run whose means would be over the finished tasks only)."""
    return _save(accuracy_figure(series, title=title, means=means), Path(path))


def accuracy_figure(series: Mapping[str, Sequence[Mapping[str, Any]]], *, title: str, means: bool = True):
    """The figure of `plot_accuracy`: each task's group is named above its tasks (tasks of one group side by
    side, groups parted by a line) and the task labels are coloured per group, with a legend of the groups."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    all_rows = [r for rows in series.values() for r in rows]
    if not all_rows:
        raise ReportError("no metrics to plot")
    tasks = _ordered_tasks(all_rows)
    labels = list(series)
    colours = _colours(labels)
    width = 0.8 / len(labels)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.55 * len(tasks) * max(1, len(labels)) + 2), 4.6), dpi=DPI)
    ax = fig.subplots()
    for s, label in enumerate(labels):
        by_task = {r["task"]: float(r["accuracy"]) for r in series[label]}
        xs = [i + (s - (len(labels) - 1) / 2) * width for i, t in enumerate(tasks) if t in by_task]
        ax.bar(xs, [100 * by_task[t] for t in tasks if t in by_task], width=width, color=colours[label], label=label,
               edgecolor="black", linewidth=0.5)
        for group, mean in (group_means(series[label])[0] if means else {}).items():
            span = [i for i, t in enumerate(tasks) if _group(next(r for r in all_rows if r["task"] == t)) == group]
            ax.hlines(100 * mean, min(span) - 0.45, max(span) + 0.45, colors=colours[label], linestyles=":", linewidth=1.5)
    ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlabel("task")
    ax.set_ylim(0, 115)  # room above 100 for the group names
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=11)
    # the task's group: named over its tasks, the tick labels in the group's colour, groups parted by a line
    group_of = {t: _group(next(r for r in all_rows if r["task"] == t)) for t in tasks}
    groups = list(dict.fromkeys(group_of[t] for t in tasks))
    if not any(g in GROUP_ORDER for g in groups):  # not VTAB (digits, a folder): no groups to name
        groups = []
        ax.set_ylim(0, 105)
    group_colours = _group_colours(groups)
    for tick, task in zip(ax.get_xticklabels(), tasks):
        if group_of[task] in group_colours:
            tick.set_color(group_colours[group_of[task]])
    for g, group in enumerate(groups):
        span = [i for i, t in enumerate(tasks) if group_of[t] == group]
        ax.text((min(span) + max(span)) / 2, 108, GROUP_TITLES.get(group, group), ha="center", va="center",
                fontsize=9, fontweight="bold", color=group_colours[group], gid="group-label")
        if g:
            ax.axvline(min(span) - 0.5, color="grey", linewidth=0.8, linestyle="-", alpha=0.6)
    handles = [Patch(facecolor=colours[l], edgecolor="black", label=l) for l in labels]
    if means and any(_group(r) in GROUP_ORDER for r in all_rows):
        handles.append(Line2D([], [], color="grey", linestyle=":", label="VTAB group mean"))
    handles += [Line2D([], [], color=group_colours[g], marker="s", linestyle="none", label=f"group: {GROUP_TITLES.get(g, g)}")
                for g in groups]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, never over a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


GROUP_COLOURS = {"natural": "#1b7837", "specialised": "#2166ac", "structured": "#b2182b"}


def _group_colours(groups: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per VTAB group (the same in every report); other groups grey shades."""
    spare = ["#555555", "#8c510a", "#762a83", "#01665e"]
    return {g: GROUP_COLOURS.get(g, spare[i % len(spare)]) for i, g in enumerate(groups)}


# ------------------------------------------------------------------------------------------------ markdown


def _names(config: Mapping[str, Any]) -> list[str]:
    if config.get("backbones"):
        return [str(b) for b in config["backbones"]]
    return [str((s.get("backbone") or {}).get("alias", "?")) for s in config.get("stores", []) if isinstance(s, Mapping)]


def _is_vtab(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> bool:
    return config.get("dataset") == "vtab" or any(r.get("group") for r in rows)


def _setup_section(config: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """What was read and how: per backbone its layers, width and native grid; the grid and adapter size used.

    Covers backbones of different widths: Lambda's slice of backbone k has width * L_k * D_k weights; a multi-grid
    (hierarchical) store lists each group's width and grid and the sum of its groups' slices."""
    stores = [s for s in config.get("stores", []) if isinstance(s, Mapping)]
    if not stores:
        return []
    method = config.get("method", "combo")
    width = int(config.get("width") or 128)
    md = ["## Setup", "", "| backbone | checkpoint | layers | width D | native grid | "
          + ("Lambda weights |" if method == "combo" else "feature read |"), "|---|---|---|---|---|---|"]
    for name, store in zip(names, stores):
        feats = store.get("features") or {}
        bb = store.get("backbone") or {}
        checkpoint = ".".join(str(v) for v in (bb.get("timm_name"), bb.get("pretrained_tag")) if v) or "?"
        if bb.get("weights_source") == "random-init":
            checkpoint += " (random init)"
        layers, dim = feats.get("num_layers"), feats.get("feature_dim")
        grid = "x".join(str(v) for v in feats.get("token_grid") or []) or "?"
        groups = [g for g in feats.get("grids") or [] if isinstance(g, Mapping)]  # a multi-grid (hierarchical) store
        if method != "combo":
            last = f"last layer, {config.get('pool', 'mean')}-pooled"
        elif groups:  # one Lambda slice per group
            last = f"{sum(width * len(g.get('layers') or []) * int(g.get('feature_dim') or 0) for g in groups):,}"
        else:
            last = f"{width * int(layers) * int(dim):,}" if layers and dim else "?"
        if groups:  # per group, the deepest last
            dim = " / ".join(str(g.get("feature_dim")) for g in groups)
            grid = " / ".join("x".join(str(v) for v in g.get("token_grid") or []) for g in groups)
        md.append(f"| {name} | {checkpoint} | {layers} | {dim} | {grid} | {last} |")
    md.append("")
    if method == "combo":
        grid = config.get("grid")
        asked = config.get("grid_requested")
        used = "x".join(str(v) for v in grid) if grid else "per task (see config.json)"
        how = "forced by --grid" if isinstance(asked, list) else "the authors' rule: the stores' common grid, else the smallest"
        md.append(f"Common grid: **{used}** ({how}). Adapter: width {width}, depth {config.get('depth')}, "
                  f"{config.get('num_heads')} heads, init {config.get('init', 'timm')}.")
        models = [t.get("model") for t in (config.get("tasks") or {}).values() if isinstance(t, Mapping)]
        models = [m for m in models if isinstance(m, Mapping) and m.get("kind") == "combo"]
        if models:
            from .adapter import ComboConfig, expected_num_params

            md.append(f"Trainable parameters (first task): {expected_num_params(ComboConfig.from_record(models[0])):,}.")
        md.append("")
    return md


def _importance_table(rows: Sequence[Mapping[str, Any]], selected: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    names = _backbones(rows)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in _ordered_tasks(rows):
        by_name = {r["backbone"]: r for r in rows if r["task"] == task}
        cells = []
        for n in names:
            r = by_name.get(n)
            cell = "-" if r is None else f"{float(r['importance_normalised']):.3f} (#{r['rank']})"
            if r is not None and r.get("heldout_drop") is not None:
                cell += (f"; drop {100 * float(r['heldout_drop']):+.1f} [{100 * float(r['heldout_low']):+.1f}, "
                         f"{100 * float(r['heldout_high']):+.1f}] (#{r['heldout_rank']})")
            if r is not None and selected and n in selected.get(task, ()):
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _layer_agreement(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per task and backbone: Spearman correlation of layer norm and layer held-out drop, and each one's top layer."""
    lines = ["| task | backbone | top layer by norm | top layer by held-out drop | Spearman rho |", "|---|---|---|---|---|"]
    for task in _ordered_tasks(rows):
        for name in _backbones(rows):
            own = [r for r in rows if r["task"] == task and r["backbone"] == name]
            if not own:
                continue
            norm = np.array([float(r["importance"]) for r in own])
            drop = np.array([float(r["heldout_drop"]) for r in own])
            rho = _spearman(norm, drop)
            lines.append(f"| {task} | {name} | {own[int(norm.argmax())]['layer']} | {own[int(drop.argmax())]['layer']} | "
                         + ("-" if rho is None else f"{rho:+.2f}") + " |")
    return lines


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _atlas_summary(rows: Sequence[Mapping[str, Any]], vtab: bool) -> list[str]:
    """Per (backbone, pooling): last-layer probe vs best layer per task, as VTAB group means (or a plain mean)."""
    names = _backbones(rows)
    poolings = list(dict.fromkeys(str(r["pooling"]) for r in rows))
    cols = [GROUP_TITLES[g] for g in GROUP_ORDER] + ["Overall"] if vtab else ["mean over tasks"]
    lines = ["| backbone | pooling | probe | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for name in names:
        for pooling in poolings:
            mine = [r for r in rows if r["backbone"] == name and r["pooling"] == pooling]
            if not mine:
                continue
            per_task: dict[str, list[Mapping[str, Any]]] = {}
            for r in mine:
                per_task.setdefault(str(r["task"]), []).append(r)
            for probe, pick in (("last layer", lambda rs: max(rs, key=lambda r: int(r.get("layer_position", r["layer"])))),
                                ("best layer", lambda rs: max(rs, key=lambda r: float(r["accuracy"])))):
                chosen = [dict(pick(rs)) for rs in per_task.values()]
                if vtab:
                    means, overall = group_means(chosen)
                    cells = [f"{100 * means[g]:.1f}" if g in means else "-" for g in GROUP_ORDER]
                    cells.append(f"{100 * overall:.1f}" if overall is not None else "-")
                else:
                    cells = [f"{100 * float(np.mean([float(r['accuracy']) for r in chosen])):.1f}"]
                lines.append(f"| {name} | {pooling} | {probe} | " + " | ".join(cells) + " |")
    return lines


def _image(path: Path, title: str) -> list[str]:
    return [f"![{title}]({path.name})", ""]


def render_report(run_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the run's figures into ``run_dir``; returns the files written (report.md first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder")
    config = _config(run_dir)
    kind = run_kind(run_dir, config)
    if kind == "study":  # its own module (which imports this one): heads as columns, paired comparisons
        raise ReportError(f"{run_dir} is a study run folder: render it with probe.studyreport.render_study_report")
    names = _names(config)
    figures: list[Path] = []
    md: list[str] = []
    where = f"dataset {config.get('dataset', '?')}, protocol {config.get('protocol', '?')}"
    setup = _setup_section(config, names) if kind != "atlas" else []
    run_state = read_state(run_dir)
    unfinished = run_state.describe() if run_state is not None and run_state.partial else None
    if unfinished and kind != "probe":  # relevance, select, atlas: said first, and no means below
        md += [f"**{unfinished}**: this run was interrupted; the tables hold the finished tasks only and no "
               "group or overall mean is computed. Rerun the command to measure every task.", ""]
    if kind == "probe":
        state = read_state(run_dir)  # an unfinished run: said, its finished tasks only, and no mean computed
        partial = state.describe() if state is not None and state.partial else None
        metrics = read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() or not partial else []
        if state is not None and partial:
            metrics = [r for r in metrics if r["task"] in state.done]
        title = f"{config.get('method', 'probe')} on {' + '.join(names) or '?'} ({where})"
        md.append(markdown_table(metrics, title=title, vtab=_is_vtab(config, metrics), partial=partial))
        if metrics:
            figure_title = f"{title}, {partial}" if partial else title
            figures.append(plot_accuracy({config.get("method", "probe"): metrics}, run_dir / "accuracy.png",
                                         title=figure_title, means=not partial))
            md += _image(figures[-1], "accuracy per task")
    elif kind in ("relevance", "select"):
        importances = read_csv(run_dir / "relevance.csv")
        layers = read_csv(run_dir / "layer_relevance.csv")
        lam = config.get("group_lambda")
        selected = None
        if kind == "select":
            selection = read_csv(run_dir / "selection.csv")
            selected = {}
            for r in selection:
                if r["selected"]:
                    selected.setdefault(str(r["task"]), []).append(str(r["backbone"]))
            metrics = read_csv(run_dir / "metrics.csv")
            penalised = read_csv(run_dir / "penalised_metrics.csv")
            rule = (config.get("select") or {}).get("text", "?")
            vtab = _is_vtab(config, metrics)
            md.append(markdown_table(metrics, title=f"ComBo retrained on the backbones chosen by relevance (--select {rule}; {where})", vtab=vtab, partial=unfinished))
            md += ["## Chosen backbones", "", "| task | selected | penalised, all backbones (%) | retrained, selected (%) |", "|---|---|---|---|"]
            acc_pen = {r["task"]: float(r["accuracy"]) for r in penalised}
            for r in sorted(metrics, key=lambda r: _ordered_tasks(metrics).index(r["task"])):
                md.append(f"| {r['task']} | {', '.join(selected.get(str(r['task']), []))} | {100 * acc_pen.get(r['task'], float('nan')):.1f} | {100 * float(r['accuracy']):.1f} |")
            md.append("")
            md.append(markdown_table(penalised, title=f"Penalised ComBo on all backbones (lambda = {lam})", vtab=vtab,
                                     partial=unfinished).replace("# ", "## ", 1))
            figures.append(plot_accuracy({"penalised, all": penalised, "retrained, selected": metrics}, run_dir / "accuracy.png",
                                         title="Accuracy per task: penalised ComBo on all backbones vs retrained on the selection",
                                         means=not unfinished))
            md += _image(figures[-1], "accuracy per task")
        else:
            metrics = read_csv(run_dir / "metrics.csv")
            md.append(markdown_table(metrics, title=f"ComBo with group penalty (lambda = {lam}) on {' + '.join(names)} ({where})",
                                     vtab=_is_vtab(config, metrics), partial=unfinished))
        md += ["## Backbone relevance", "",
               "Normalised importance s_k / sum s (rank), s_k = ||W[:, layers of k, :]||_F of the penalised model"
               + ("; bold = selected." if selected else "."), ""]
        heldout = bool(importances) and importances[0].get("heldout_drop") is not None
        if heldout:
            md += ["Beside it, the held-out drop: accuracy points the penalised probe loses on "
                   f"{importances[0].get('heldout_split', 'the held-out split')} (data it never trained on) when that "
                   "backbone's features are shuffled across samples, with its 95% interval (rank). s_k says how much "
                   "the probe uses a backbone; the drop, whether that use helps on new data.", ""]
        md += _importance_table(importances, selected) + [""]
        if config.get("warnings"):
            md += ["**Warnings**", ""] + [f"- {w}" for w in config["warnings"]] + [""]
        figures.append(plot_relevance(importances, run_dir / "relevance.png", selected=selected, group_lambda=lam))
        md += _image(figures[-1], "backbone relevance")
        if heldout:
            figures.append(plot_heldout(importances, run_dir / "heldout.png"))
            md += _image(figures[-1], "held-out drop")
        figures.append(plot_layer_heatmap(layers, run_dir / "layer_relevance.png"))
        md += ["## Where the features are", "", "Norm of Lambda's weight slice for each layer of each backbone.", ""]
        md += _image(figures[-1], "per-layer importance")
        if layers and layers[0].get("heldout_drop") is not None:
            figures.append(plot_layer_heatmap(layers, run_dir / "layer_heldout.png", value="heldout_drop"))
            md += ["", "Held-out drop of each layer (that layer alone shuffled across the held-out samples), and how "
                   "well the two per-layer measures agree (Spearman rank correlation over the layers of each backbone):", ""]
            md += _layer_agreement(layers) + [""]
            md += _image(figures[-1], "per-layer held-out drop")
    else:  # atlas
        rows = read_csv(run_dir / "atlas.csv")
        if not rows:
            raise ReportError(f"{run_dir / 'atlas.csv'} holds no probe results")
        vtab = _is_vtab(config, rows)
        md += [f"# Per-layer linear probes of {' + '.join(names) or _backbones(rows)} ({where})", "",
               "## Best probe per task", "", "| task | group | backbone | layer | pooling | accuracy (%) | last layer (%) |",
               "|---|---|---|---|---|---|---|"]
        for b in sorted(best_per_task(rows), key=lambda r: _ordered_tasks(rows).index(r["task"])):
            md.append(f"| {b['task']} | {_group(b)} | {b['backbone']} | {b['layer']} | {b['pooling']} | "
                      f"{100 * float(b['accuracy']):.1f} | {100 * float(b['last_layer_accuracy']):.1f} |")
        if not unfinished:  # means over the finished tasks only would pass for the whole benchmark's
            md += ["", "## Last layer vs best layer", "",
                   "Per backbone and pooling: the last layer's probe, and the best layer chosen per task on the evaluation split "
                   "(an oracle, as in the paper's figure)" + (", as VTAB group means (Overall = mean of the group means)." if vtab else "."), ""]
            md += _atlas_summary(rows, vtab) + [""]
        for path in plot_atlas(rows, run_dir):
            figures.append(path)
            md += _image(path, path.stem)
    md[1:1] = setup  # after the headline table
    report = run_dir / "report.md"
    report.write_text("\n".join(md).rstrip() + "\n")
    return [report, *figures]
