"""`combo relevance`, `combo atlas`, `combo report`: where the useful features are, from stores already extracted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from .cluster import client_for, scheduler_option, workers_option
from .progress import run_progress
from .clikit import (GRID_HELP, configure_threads, console, err_console, friendly_errors, log_line, parse_grid, plain, say, split_list,
                     threads_option)

SELECT_HELP = (
    "Also pick backbones per task and retrain ComBo on them WITHOUT the penalty: 'top-K' keeps the K most "
    "important (e.g. top-2); a number such as 0.2 (or ge0.2, >=0.2) keeps every backbone whose normalised "
    "importance s_k/sum(s) is >= 0.2 (the top one is always kept)."
)
BY_HELP = (
    "What --select ranks by: norm (the paper's s_k, default) or heldout (the drop in held-out accuracy when a "
    "backbone's features are shuffled; the threshold then applies to its share of the positive drops)."
)
PROTOCOL_HELP = (
    "Where --select's retrained subset trains and is evaluated: final (train800val200 -> test) or dev "
    "(train800 -> val200). The relevance pass itself always trains on train800 and measures on val200 "
    "(never the test split)."
)


def _stores(text: str) -> tuple[str, ...]:
    refs = split_list(text)
    if not refs:
        raise ValueError("--stores: give at least one store (short names, paths or URLs, comma-separated)")
    return tuple(refs)


def _storage_options(items: Optional[list[str]]) -> dict[str, Any] | None:
    from store_schema import parse_storage_options

    return parse_storage_options(items) or None



def _run_folder(run_dir: Any) -> None:
    """The run folder on one line of its own, never wrapped (a wrapped path breaks copy-paste)."""
    say("run folder: ", (str(run_dir), "bold"))


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


# ------------------------------------------------------------------------------------------------ relevance


@friendly_errors
def relevance_command(
    stores: str = typer.Option(..., "--stores", "-s", help="Comma-separated stores: short names (under --store-root), paths or URLs."),
    dataset: str = typer.Option("vtab", "--dataset", "-d", help="Dataset of the stores (short names resolve to <root>/<name>/<dataset>.zarr)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Comma-separated tasks; default: every task all stores hold."),
    group_lambda: float = typer.Option(0.01, "--lambda", min=0.0, help="Weight of the group penalty sum_k s_k (paper: 0.01)."),
    select: Optional[str] = typer.Option(None, "--select", help=SELECT_HELP),
    by: str = typer.Option("norm", "--by", help=BY_HELP),
    layer_heldout: bool = typer.Option(False, "--layer-heldout", help="Also measure each layer's held-out drop (one evaluation per layer of every backbone) for layer_relevance.csv and the report."),
    protocol: str = typer.Option("final", "--protocol", help=PROTOCOL_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (default: the protocol's, 1600 final / 1300 dev; the relevance pass: 1300)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Training batch size (paper: 64)."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate (paper: 1e-3)."),
    seed: int = typer.Option(42, "--seed", help="Seed for the init and the sample order (paper: 42)."),
    grid: Optional[str] = typer.Option(None, "--grid", help=GRID_HELP),
    cache: str = typer.Option("auto", "--cache", help="Where the training split lives: auto, device, ram, stream."),
    cache_budget: Optional[str] = typer.Option(None, "--cache-budget", help="RAM for the training split, e.g. 8GiB (default: half the RAM); a larger split is streamed within it. The run holds at most this plus the overhead its cache line states (batches, adapter)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu, mps; default: the best available."),
    out: str = typer.Option("runs", "--out", "-o", help="Folder for run folders."),
    store_root: Optional[str] = typer.Option(None, "--store-root", help="Where short store names live (default $COMBO_STORE_ROOT or ./stores)."),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for remote stores (repeatable)."),
    width: int = typer.Option(128, "--width", hidden=True, help="Adapter width (paper: 128; smaller only for tests/demos)."),
    depth: int = typer.Option(6, "--depth", hidden=True, help="Adapter depth (paper: 6)."),
    heads: int = typer.Option(2, "--heads", hidden=True, help="Adapter heads (paper: 2)."),
    init: str = typer.Option("timm", "--init", help="Init of the adapter's Linear layers: timm (the authors') or torch (PyTorch's default)."),
    workers: Optional[int] = workers_option("the tasks (one dask task per task and pass; this process writes the run folder)"),
    scheduler: Optional[str] = scheduler_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Rank backbones per task: the paper's norm of ComBo's Lambda slices after training with a group penalty,
    beside the held-out accuracy drop when each backbone's features are shuffled (with a 95% interval)."""
    configure_threads(threads)
    from probe.data import budget_from_text
    from probe.relevance import parse_select, run_relevance, run_select
    from probe.run import ProbeConfig

    from probe.relevance import check_measure

    check_measure(by)  # also without --select: a typo fails before any training
    selection = parse_select(select, by=by) if select else None  # bad syntax fails before any training
    kwargs: dict[str, Any] = {}
    if cache_budget:
        kwargs["cache_budget"] = budget_from_text(cache_budget)
    cfg = ProbeConfig(
        stores=_stores(stores), store_root=store_root, dataset=dataset, tasks=tuple(split_list(task) or ()) or None,
        protocol=protocol, method="combo", steps=steps, batch_size=batch_size, lr=lr, seed=seed, grid=parse_grid(grid),
        cache=cache, device=device, out=out, storage_options=_storage_options(storage_option),
        width=width, depth=depth, num_heads=heads, init=init, **kwargs,
    )
    announce = lambda line: say(line, console_=err_console)  # noqa: E731
    if selection is None:
        with client_for(workers, scheduler, announce=announce) as client, run_progress(err_console) as progress:
            run = run_relevance(cfg, group_lambda=group_lambda, log=log_line, layer_heldout=layer_heldout, progress=progress,
                                client=client)
        console.print(_relevance_table(run.importances, {m["task"]: m for m in run.metrics}, None, run.backbones,
                                       title=f"Backbone relevance (lambda = {group_lambda:g}): s_k share (rank), held-out drop"))
        run_dir, warnings = run.run_dir, run.warnings
    else:
        with client_for(workers, scheduler, announce=announce) as client, run_progress(err_console) as progress:
            result = run_select(cfg, select=selection, group_lambda=group_lambda, log=log_line, layer_heldout=layer_heldout,
                                progress=progress, client=client)
        console.print(_relevance_table(result.relevance.importances, {m["task"]: m for m in result.relevance.metrics},
                                       {m["task"]: m for m in result.metrics}, result.relevance.backbones,
                                       title=f"Relevance (lambda = {group_lambda:g}) and ComBo retrained on {result.selection.describe()}"))
        run_dir, warnings = result.run_dir, result.relevance.warnings
    print_warnings(warnings)
    _run_folder(run_dir)


def print_grid(title: str, header: list[str], body: list[list[str]], left: int) -> None:
    """A table of text cells, its first `left` columns text, the rest numbers: on a narrow console a long head
    name folds, its numbers stay whole."""
    table = Table(title=plain(title))
    widest = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
    cells_only = [max([len(c[i]) for c in body] + [1]) for i in range(len(header))]
    spare = console.width - 3 * len(header) - 1 - sum(widest[:left])  # for the number columns
    share = max(1, spare // max(1, len(header) - left))
    for i, col in enumerate(header):
        cap = None if i < left or sum(widest[left:]) <= spare else max(cells_only[i], share)
        table.add_column(plain(col), justify="left" if i < left else "right", overflow="fold", max_width=cap)
    for cells in body:
        table.add_row(*[plain(c) for c in cells])
    console.print(table)


def print_warnings(warnings: list[str]) -> None:
    """Each warning of a relevance run as its own paragraph, on stderr (user text escaped)."""
    for text in warnings:
        err_console.print(Text.assemble(("warning:", "bold yellow"), " ", str(text)), highlight=False)


def _relevance_table(importances, penalised, selected, names, *, title: str) -> Table:
    table = Table(title=plain(title))
    table.add_column("task")
    for name in names:
        table.add_column(plain(name), justify="right")
    table.add_column("held-out acc. (%)", justify="right")
    if selected:
        table.add_column("selected", style="bold")
        table.add_column("acc. selected (%)", justify="right")
    for task in dict.fromkeys(r["task"] for r in importances):
        rows = {r["backbone"]: r for r in importances if r["task"] == task}
        chosen = set(selected[task]["backbones"].split("+")) if selected and task in selected else set()
        cells = []
        for name in names:
            r = rows[name]
            text = f"{r['importance_normalised']:.3f} (#{r['rank']})"
            if "heldout_drop" in r:
                text += f"\n{100 * r['heldout_drop']:+.1f} ± {100 * (r['heldout_high'] - r['heldout_drop']):.1f} pts (#{r['heldout_rank']})"
            cells.append(plain(text, "bold green" if (name in chosen or (not selected and r["rank"] == 1)) else ""))
        extra = [plain(_pct(penalised.get(task, {}).get("accuracy")))]
        if selected:
            extra += [plain(", ".join(n for n in names if n in chosen)), plain(_pct(selected.get(task, {}).get("accuracy")))]
        table.add_row(plain(task), *cells, *extra)
    return table


# ------------------------------------------------------------------------------------------------ atlas


@friendly_errors
def atlas_command(
    stores: str = typer.Option(..., "--stores", "-s", help="Comma-separated stores: short names (under --store-root), paths or URLs."),
    dataset: str = typer.Option("vtab", "--dataset", "-d", help="Dataset of the stores (short names resolve to <root>/<name>/<dataset>.zarr)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Comma-separated tasks; default: every task of the stores."),
    protocol: str = typer.Option("dev", "--protocol", help="dev: train800 -> val200 (default); final: train800val200 -> test."),
    pooling: str = typer.Option("cls,mean", "--pooling", help="cls (prefix token 0, where stored) and/or mean (of the patch tokens)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (default: the protocol's)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Training batch size (paper: 64)."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate (paper: 1e-3)."),
    seed: int = typer.Option(42, "--seed", help="Seed for the init and the sample order (paper: 42)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu, mps; default: the best available."),
    out: str = typer.Option("runs", "--out", "-o", help="Folder for run folders."),
    store_root: Optional[str] = typer.Option(None, "--store-root", help="Where short store names live (default $COMBO_STORE_ROOT or ./stores)."),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE (repeatable)."),
    workers: Optional[int] = workers_option("the probes (one dask task per task and backbone; this process writes the run folder)"),
    scheduler: Optional[str] = scheduler_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Linear probe on every layer of every backbone (cls token and mean of patch tokens), all layers at once."""
    configure_threads(threads)
    from probe.atlas import run_atlas

    with client_for(workers, scheduler, announce=lambda line: say(line, console_=err_console)) as client, \
            run_progress(err_console) as progress:
        run = run_atlas(
            _stores(stores), dataset=dataset, tasks=split_list(task), protocol=protocol, poolings=pooling, steps=steps,
            batch_size=batch_size, lr=lr, seed=seed, device=device, out=out, store_root=store_root,
            storage_options=_storage_options(storage_option), log=log_line, progress=progress, client=client,
        )
    table = Table(title=plain(f"Best layer per task (linear probe, {run.best[0]['split'] if run.best else ''})"))
    for col, justify in (("task", "left"), ("backbone", "left"), ("layer", "right"), ("pooling", "left"),
                         ("accuracy (%)", "right"), ("last layer (%)", "right")):
        table.add_column(col, justify=justify)
    for b in run.best:
        table.add_row(*[plain(v) for v in (b["task"], b["backbone"], b["layer"], b["pooling"], _pct(b["accuracy"]),
                                            _pct(b["last_layer_accuracy"]))])
    console.print(table)
    for path in run.figures:
        say("figure: ", _relative(path, run.run_dir))
    _run_folder(run.run_dir)


# ------------------------------------------------------------------------------------------------ report


def _relative(path: Any, folder: Any) -> str:
    """`path` relative to `folder` when it lies inside it (so every row of a files table looks the same)."""
    try:
        return str(Path(path).relative_to(Path(folder)))
    except ValueError:
        return str(path)


@friendly_errors
def report_command(
    run: Path = typer.Argument(..., help="A run folder written by combo probe, relevance, atlas or study."),
    json_output: bool = typer.Option(False, "--json", help="Print the files written and the summary as one JSON "
                                     "document (for scripts) instead of tables."),
) -> None:
    """Render a run folder (probe, relevance, select, atlas or study) as report.md plus PNG figures (VTAB table,
    relevance bars, layer heat map, atlas curves; for a study the heads side by side and their paired comparisons)."""
    from probe.report import read_csv, render_report, run_kind
    from probe.runstate import partial_note

    if not run.exists():
        raise FileNotFoundError(f"no run folder at {run}")
    study = run.is_dir() and run_kind(run) == "study"
    if study:  # heads as columns, paired comparisons, bytes read: probe.studyreport
        from probe.studyreport import render_study_report, study_summary, study_tables

        written = render_study_report(run)
    else:
        written = render_report(run)
    partial = partial_note(run)  # an interrupted run: its table has no means, and the user must hear it
    kind = run_kind(run)
    metrics_file = {"atlas": "atlas_best.csv"}.get(kind, "metrics.csv")
    rows = read_csv(run / metrics_file) if (run / metrics_file).exists() and not study else []
    cols = ["task", "backbone", "layer", "pooling", "accuracy"] if kind == "atlas" else ["task", "group", "split", "n", "accuracy"]
    files = [{"path": _relative(path, run), "bytes": path.stat().st_size} for path in written]
    summary = study_summary(run) if study else None
    if json_output:
        import json

        doc = {"run_folder": str(run), "kind": kind, "complete": partial is None, "state": partial or "complete",
               "files": files, "summary": [{c: r.get(c) for c in cols} for r in rows]}
        if summary is not None:
            doc.update(summary=summary["heads"], comparisons=summary["comparisons"], io=summary["io"])
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    if summary is not None:
        for title, header, body, left in study_tables(run, summary):
            print_grid(title, header, body, left)
    if rows:
        table = Table(title=plain(f"{kind} run: {run.name}"))
        for col in cols:
            table.add_column(col + (" (%)" if col == "accuracy" else ""), justify="right" if col in ("n", "layer", "accuracy") else "left")
        for r in rows:
            table.add_row(*[plain(_pct(r.get(c)) if c == "accuracy" else (r.get(c) if r.get(c) is not None else "")) for c in cols])
        console.print(table)
    table = Table(title="files written", title_justify="left")
    table.add_column("file", overflow="ellipsis", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for f in files:
        table.add_row(plain(f["path"]), plain(f"{f['bytes']:,}"))
    console.print(table)
    if partial:
        finish = (f"Finish it by rerunning the same command, or `combo probe ... --resume {run}`." if kind == "probe"
                  else "Rerun the command to measure every task (this kind of run cannot be resumed yet).")
        say((partial, "bold yellow"), f"; no group or overall mean is computed from it. {finish}")
    _run_folder(run)
