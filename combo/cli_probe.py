"""`combo probe`, `combo predict`, `combo demo`: stage 2 from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .cluster import client_for, scheduler_option, workers_option
from .progress import run_progress
from .clikit import (GRID_HELP, configure_threads, console, err_console, friendly_errors, log_line, parse_grid, plain, say, split_list,
                     threads_option)

STORES_HELP = "Comma-separated stores: short names (resolved as <store root>/<name>/<dataset>.zarr), paths or URLs."


def parse_weights(items: Optional[list[str]]) -> dict[str, str]:
    """['dinov2=/ckpt/dinov2.safetensors'] -> {'dinov2': '/ckpt/dinov2.safetensors'}."""
    out: dict[str, str] = {}
    for item in items or []:
        alias, sep, path = item.partition("=")
        if not sep or not alias.strip() or not path.strip():
            raise ValueError(f"--weights {item!r}: expected ALIAS=PATH")
        out[alias.strip()] = path.strip()
    return out


def _pct(value: Any) -> str:
    return "-" if value is None or value == "" else f"{100 * float(value):.1f}"


def results_table(rows: list[dict[str, Any]], *, title: str, vtab: bool, partial: str | None = None) -> Table:
    """Per-task accuracy; for VTAB also the group means and the overall mean (mean of the group means).
    ``partial`` (``partial: k of n planned tasks finished``) is shown as the caption, and no mean is computed."""
    from probe.results import GROUP_ORDER, GROUP_TITLES, PARTIAL_MEANS, VTAB_GROUPS, group_means

    table = Table(title=plain(title), caption=plain(f"{partial}; {PARTIAL_MEANS}", "yellow") if partial else None)
    for column, justify in (("task", "left"), ("group", "left"), ("split", "left"), ("n", "right"), ("accuracy (%)", "right")):
        table.add_column(column, justify=justify)

    def group_of(row: dict[str, Any]) -> str:
        return str(row.get("group") or VTAB_GROUPS.get(str(row["task"])) or "")

    def order(row: dict[str, Any]) -> tuple[int, str]:
        g = group_of(row)
        return (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), str(row["task"]))

    for row in sorted(rows, key=order):
        table.add_row(plain(row["task"]), plain(group_of(row)), plain(row["split"]), str(row["n"]), _pct(row["accuracy"]))
    if vtab and not partial:
        means, overall = group_means(rows)
        table.add_section()
        for g in GROUP_ORDER:
            table.add_row(f"[bold]{GROUP_TITLES[g]}[/bold] (mean)", g, "", "", _pct(means.get(g)))
        table.add_row("[bold]Overall[/bold] (mean of group means)", "", "", "", f"[bold]{_pct(overall)}[/bold]")
    return table


# ---------------------------------------------------------------------------------------------------- probe


@friendly_errors
def probe_command(
    stores: str = typer.Option(..., "--stores", "-s", help=STORES_HELP),
    store_root: Optional[str] = typer.Option(None, "--store-root", help="Where short store names live (default $COMBO_STORE_ROOT or ./stores)."),
    dataset: str = typer.Option("vtab", "--dataset", "-d", help="Dataset of the stores (for short names)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Comma-separated tasks; default: every task all stores hold."),
    protocol: str = typer.Option("final", "--protocol", help="final: train800val200 -> test (1,600 steps); dev: train800 -> val200 (1,300 steps)."),
    method: str = typer.Option("combo", "--method", help="combo (the adapter over every layer) or linear (last-layer linear probe)."),
    pool: str = typer.Option("mean", "--pool", help="--method linear: mean (the last layer's patch tokens, each map normalised, mean-pooled: the authors' linear probe) or cls (the cls token where a store has one)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (default: the protocol's)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Training batch size (paper: 64)."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate (paper: 1e-3)."),
    seed: int = typer.Option(42, "--seed", help="Seed for the adapter's init and the sample order (paper: 42)."),
    grid: Optional[str] = typer.Option(None, "--grid", help=GRID_HELP),
    cache: str = typer.Option("auto", "--cache", help="Where the training split lives: auto, device (GPU), ram, stream."),
    cache_budget: Optional[str] = typer.Option(None, "--cache-budget", help="RAM for the training split, e.g. 8GiB (default: half the RAM); a larger split is streamed within it. The run holds at most this plus the overhead its cache line states (batches, adapter)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu, mps; default: the best available."),
    out: str = typer.Option("runs", "--out", "-o", help="Folder the run folder is created in."),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for remote stores (repeatable; never written anywhere)."),
    select: Optional[str] = typer.Option(None, "--select", help="Backbone selection: train with the group penalty (--lambda), keep top-K (e.g. top-2) or those with normalised importance >= a threshold (e.g. 0.2) per task, retrain without it."),
    group_lambda: float = typer.Option(0.01, "--lambda", help="Group-penalty weight for --select (paper: 0.01)."),
    by: str = typer.Option("norm", "--by", help="What --select ranks by: norm (the paper's s_k) or heldout (the held-out accuracy drop when a backbone's features are shuffled)."),
    shuffle_window: Optional[int] = typer.Option(None, "--shuffle-window", help="Rows per shuffle window (default: the whole split when cached; what the budget allows when streamed)."),
    width: int = typer.Option(128, "--width", hidden=True, help="Adapter width (paper: 128; smaller only for tests/demos)."),
    depth: int = typer.Option(6, "--depth", hidden=True, help="Adapter depth (paper: 6)."),
    heads: int = typer.Option(2, "--heads", hidden=True, help="Adapter heads (paper: 2)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Finish the missing tasks of an interrupted run folder (give the run's options again). Rerunning the same command resumes the newest unfinished run under --out by itself."),
    init: str = typer.Option("timm", "--init", help="Init of the adapter's Linear layers: timm (trunc-normal 0.02, the authors') or torch (PyTorch's default; leaves chance level sooner in short runs, see the README)."),
    workers: Optional[int] = workers_option("the tasks (one dask task per task and pass; this process writes the run folder)"),
    scheduler: Optional[str] = scheduler_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Train ComBo (or the linear baseline) on feature stores and evaluate it; never reruns a backbone.

    Every default is the authors' recipe (PAPER.md): each (image, layer) map normalised, the grid rule of
    --grid, Lambda [128, L, D] (a slice per backbone when widths differ), a 6-block pre-norm ViT of width 128
    with 2 heads, MLP 512 and LayerNorm eps 1e-5, AdamW lr 1e-3 / weight decay 1e-4, batch 64, 10% warm-up
    then cosine, 1,600 (final) or 1,300 (dev) steps, seed 42.
    """
    configure_threads(threads)
    from probe.data import budget_from_text
    from probe.results import GROUP_ORDER
    from probe.run import ProbeConfig
    from probe.runstate import check_out_folder

    from .cli_store import storage_options

    refs = split_list(stores)
    if not refs:
        raise ValueError("--stores: give at least one store (short names, paths or URLs, comma-separated)")
    if resume is not None and select:
        raise ValueError("--resume works with plain probe runs, not with --select")
    options = storage_options(storage_option, *refs, store_root)
    kwargs: dict[str, Any] = {}
    if cache_budget:
        kwargs["cache_budget"] = budget_from_text(cache_budget)
    selection = None
    if select:
        if method != "combo":
            raise ValueError("--select works with --method combo (the penalty is on ComBo's Lambda)")
        from probe.relevance import parse_select

        selection = parse_select(select, by=by)  # bad syntax fails before anything is opened
    cfg = ProbeConfig(
        stores=tuple(refs), store_root=store_root, dataset=dataset, tasks=tuple(split_list(task) or ()) or None,
        protocol=protocol, method=method, steps=steps, batch_size=batch_size, lr=lr, seed=seed, grid=parse_grid(grid),
        cache=cache, device=device, out=out, storage_options=options or None, width=width, depth=depth,
        num_heads=heads, shuffle_window=shuffle_window, pool=pool, init=init, **kwargs,
    )
    if resume is None:
        check_out_folder(cfg.out)  # a file or a read-only folder fails here, before any store is opened
    if selection is not None:
        from probe.relevance import run_select

        with client_for(workers, scheduler, announce=lambda line: say(line, console_=err_console)) as client, \
                run_progress(err_console) as progress:
            result = run_select(cfg, select=selection, group_lambda=group_lambda, log=log_line, progress=progress,
                                client=client)
        rows, run_dir = result.metrics, result.run_dir
        title = f"ComBo on the backbones chosen per task ({selection.describe()}, lambda {group_lambda:g})"
        chosen = Table(title="selected backbones")
        chosen.add_column("task")
        chosen.add_column("kept")
        for name, kept in result.chosen.items():
            chosen.add_row(plain(name), plain(", ".join(kept)))
        console.print(chosen)
        from .cli_study import print_warnings

        print_warnings(result.relevance.warnings)
    else:
        with client_for(workers, scheduler, announce=lambda line: say(line, console_=err_console)) as client:
            run = _probe_or_resume(cfg, resume, client=client)
        rows, run_dir = run.metrics, run.run_dir
        title = run.title  # the stores' own dataset and backbones, also for stores given as paths
    vtab = any(r.get("group") in GROUP_ORDER for r in rows)  # VTAB stores record each task's group
    console.print(results_table(rows, title=title, vtab=vtab))
    say("run folder: ", (str(run_dir), "bold"))


def _probe_or_resume(cfg: Any, resume: Optional[Path], *, client: Any = None) -> Any:
    """run_probe, resuming ``--resume RUN``, or else the newest unfinished run under --out with the same options
    (rerunning the same command finishes it); Ctrl-C says what finished and how to go on."""
    from probe.run import RunInterrupted, resume_options, run_probe
    from probe.runstate import find_unfinished, read_state

    if resume is not None:
        if not resume.is_dir():
            raise ValueError(f"--resume {resume}: no such run folder")
    else:
        resume = find_unfinished(cfg.out, resume_options(cfg))
        if resume is not None:
            state = read_state(resume)
            say(("resuming", "bold"), f" {resume}: {len(state.done)} of {len(state.tasks)} tasks done", console_=err_console)
    try:
        with run_progress(err_console) as progress:
            return run_probe(cfg, log=log_line, progress=progress, resume=resume, client=client)
    except RunInterrupted as stop:
        say(("interrupted", "yellow"), f": {stop.done} of {stop.planned} tasks finished in {stop.run_dir}; rerun the same "
            f"command (or `combo probe ... --resume {stop.run_dir}`) to finish the rest", console_=err_console)
        raise typer.Exit(130) from None


# -------------------------------------------------------------------------------------------------- predict


@friendly_errors
def predict_command(
    probe: Path = typer.Option(..., "--probe", "-p", help="A run folder written by combo probe (or relevance / select / study; a study needs --head)."),
    images: Path = typer.Option(..., "--images", "-i", help="An image file, or a folder searched recursively."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="CSV to write (path, task, prediction, class, confidence)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Which task's model, when the run holds several."),
    head: Optional[str] = typer.Option(None, "--head", help="A study run's head, as study.csv names it (e.g. 'combo[top-2]', 'linear[sam]')."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cpu ...; default: the best available."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    weights: Optional[list[str]] = typer.Option(None, "--weights", help="ALIAS=PATH: a local checkpoint for a backbone (repeatable); its sha256 must match the run's record."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="List undecodable images with their error instead of stopping."),
    show: int = typer.Option(20, "--show", min=0, help="Rows of the table printed (all are written to --out)."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Run the recorded backbones and the trained adapter on new images; print/write the predicted classes."""
    configure_threads(threads)
    from .predict import check_output_file, predict_images, write_predictions

    if out is not None:
        check_output_file(out)  # before any backbone is loaded
    result = predict_images(probe, images, task=task, device=device, batch_size=batch_size,
                            weights=parse_weights(weights), skip_bad=skip_bad, log=log_line, head=head)
    if result.partial:
        say(("warning", "yellow"), f": {probe} is an unfinished run ({result.partial}); task {result.task} finished "
            "and is used", console_=err_console)
    say(f"{result.task}: {len(result.rows)} image(s), backbones {', '.join(result.backbones)}")
    base = images if images.is_dir() else images.parent
    table = Table(title=plain(f"predictions ({base})") if images.is_dir() else None)
    for column, justify in (("image", "left"), ("class", "left"), ("index", "right"), ("confidence", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in result.rows[: max(0, show)]:
        shown = Path(row["path"]).relative_to(base).as_posix() if Path(row["path"]).is_relative_to(base) else row["path"]
        if row["error"]:
            table.add_row(plain(shown), plain(row["error"], "red"), "-", "-")
        else:
            table.add_row(plain(shown), plain(row["class"]), str(row["prediction"]), f"{row['confidence']:.3f}")
    console.print(table)
    if len(result.rows) > show:
        console.print(f"... {len(result.rows) - show} more row(s)" + ("" if out else "; pass --out FILE.csv to keep them all"))
    if out:
        say("predictions: ", (str(write_predictions(result, out)), "bold"))


# ----------------------------------------------------------------------------------------------------- demo


@friendly_errors
def demo_command(
    out: Path = typer.Option(Path("combo-demo"), "--out", "-o", help="Everything goes here: OUT/stores and OUT/runs."),
    models: str = typer.Option("vit_tiny_patch16_224,deit_tiny_patch16_224", "--models", help="Comma-separated timm ViTs of equal width (random-init)."),
    image_size: int = typer.Option(32, "--image-size", help="Input size of the backbones (patch 16 -> a 2x2 token grid at 32)."),
    steps: int = typer.Option(300, "--steps", min=1, help="Training steps per method (the paper's protocol: 1,600)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Training batch size (paper: 64)."),
    width: int = typer.Option(64, "--width", help="Adapter width (paper: 128)."),
    depth: int = typer.Option(2, "--depth", help="Adapter depth (paper: 6)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cpu ...; default: the best available."),
    seed: int = typer.Option(42, "--seed"),
    threads: Optional[int] = threads_option(),
) -> None:
    """The whole pipeline offline on sklearn's digits: extract two random-init ViTs, probe with ComBo and linear."""
    configure_threads(threads)
    from .demo import DemoConfig, REAL_WEIGHTS_HELP, run_demo

    cfg = DemoConfig(out=str(out), models=tuple(split_list(models) or ()), image_size=image_size, steps=steps,
                     batch_size=batch_size, width=width, depth=depth, device=device, seed=seed)
    console.print(
        "[bold yellow]Demo with RANDOMLY INITIALISED backbones[/bold yellow] (no weights can be downloaded offline): "
        "the accuracies below only show that the pipeline runs end to end; they say nothing about the method.",
        soft_wrap=True,
    )
    settings = Table(title="demo settings")
    settings.add_column("setting")
    settings.add_column("value")
    for key, value in cfg.describe().items():
        settings.add_row(key, str(value))
    console.print(settings)
    with run_progress(err_console) as progress:
        result = run_demo(cfg, log=log_line, progress=progress)
    for name, rows in result.metrics.items():
        console.print(results_table(rows, title=f"{name} on {' + '.join(cfg.models)} (digits, train800val200 -> test)", vtab=False))
    console.print(f"stores: [bold]{result.store_root}[/bold]", soft_wrap=True)
    for name, path in result.run_dirs.items():
        console.print(f"run folder ({name}): [bold]{path}[/bold]", soft_wrap=True)
    console.print(f"took {result.seconds:.0f} s")
    console.print(REAL_WEIGHTS_HELP, soft_wrap=True, highlight=False)
