"""`combo study`: the paper's whole per-task study (relevance, selection, ComBo on all / selected / each store,
linear on each store) in one command and one run folder, each split of each store read once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .cli_probe import STORES_HELP
from .cluster import client_for, scheduler_option, workers_option
from .clikit import (GRID_HELP, configure_threads, console, err_console, friendly_errors, log_line, parse_grid, plain, say,
                     split_list, threads_option)
from .progress import run_progress

HEADS_HELP = ("Which heads to fit per task: combo (ComBo on all stores), select (ComBo on the selected ones), single "
              "(ComBo on each store alone), linear (the linear probe on each store).")
SELECT_HELP = ("Which backbones the select head keeps per task: top-K (e.g. top-2, the paper's) or a threshold on the "
               "normalised measure (e.g. 0.2).")
BY_HELP = ("What the selection ranks by: heldout (default: the drop in held-out accuracy when a backbone's features "
           "are shuffled) or norm (the paper's s_k; reproduces the paper). The other is shown beside it.")


def io_lines(run_dir: Any) -> list[str]:
    """Bytes read per split against the split's stored bytes, summed over tasks and stores (io.csv)."""
    from probe.studyreport import io_totals

    return [f"{split}: read {t['bytes_read'] / 2**20:,.1f} MiB of {t['bytes_stored'] / 2**20:,.1f} MiB stored "
            f"({t['bytes_read'] / t['bytes_stored'] if t['bytes_stored'] else 0:.2f}x)"
            for split, t in io_totals(run_dir).items()]


@friendly_errors
def study_command(
    stores: str = typer.Option(..., "--stores", "-s", help=STORES_HELP),
    dataset: str = typer.Option("vtab", "--dataset", "-d", help="Dataset of the stores (for short names)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Comma-separated tasks; default: every task all stores hold."),
    select: str = typer.Option("top-2", "--select", help=SELECT_HELP),
    by: str = typer.Option("heldout", "--by", help=BY_HELP),
    heads: str = typer.Option("combo,select,single,linear", "--heads", help=HEADS_HELP),
    group_lambda: float = typer.Option(0.01, "--lambda", help="Weight of the relevance pass's group penalty (paper: 0.01)."),
    protocol: str = typer.Option("final", "--protocol", help="Where the heads train and are measured: final (train800val200 -> test) or dev (train800 -> val200). Relevance always trains on train800 and measures on val200."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps of every fit (default: the protocol's; the relevance pass: 1,300)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Training batch size (paper: 64)."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak learning rate (paper: 1e-3)."),
    seed: int = typer.Option(42, "--seed", help="Seed of every fit's init and sample order (paper: 42)."),
    grid: Optional[str] = typer.Option(None, "--grid", help=GRID_HELP),
    init: str = typer.Option("timm", "--init", help="Init of ComBo's Linear layers: timm (the authors') or torch."),
    cache: str = typer.Option("auto", "--cache", help="Where each fit's training split lives: auto, device, ram, stream."),
    cache_budget: Optional[str] = typer.Option(None, "--cache-budget", help="RAM for the training rows, held once for every fit of a task (default: half the RAM); rows that do not fit are streamed by each fit."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu, mps; default: the best available."),
    out: str = typer.Option("runs", "--out", "-o", help="Folder the run folder is created in."),
    store_root: Optional[str] = typer.Option(None, "--store-root", help="Where short store names live (default $COMBO_STORE_ROOT or ./stores)."),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for remote stores (repeatable; never written anywhere)."),
    width: int = typer.Option(128, "--width", hidden=True, help="Adapter width (paper: 128; smaller only for tests/demos)."),
    depth: int = typer.Option(6, "--depth", hidden=True, help="Adapter depth (paper: 6)."),
    num_heads: int = typer.Option(2, "--attention-heads", hidden=True, help="Adapter attention heads (paper: 2)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Finish an interrupted study folder (give its options again). Rerunning the same command resumes the newest unfinished study under --out by itself."),
    workers: Optional[int] = workers_option("the tasks (one dask task per task: its fits share its cached rows)"),
    scheduler: Optional[str] = scheduler_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """The paper's study per task: relevance (s_k and the held-out drop), the selection, then ComBo on all
    stores, on the selected ones and on each alone, and the linear probe on each; one run folder with
    study.csv, the relevance tables and io.csv (bytes read per split). `combo report RUN` renders it."""
    configure_threads(threads)
    from probe.data import budget_from_text
    from probe.run import ProbeConfig, RunInterrupted
    from probe.runstate import check_out_folder, find_unfinished, read_state
    from probe.study import StudyConfig
    from probe.studyrun import run_study

    from .cli_store import storage_options
    from probe.studyreport import study_tables

    from .cli_study import print_grid, print_warnings

    refs = split_list(stores)
    if not refs:
        raise ValueError("--stores: give at least one store (short names, paths or URLs, comma-separated)")
    kwargs: dict[str, Any] = {}
    if cache_budget:
        kwargs["cache_budget"] = budget_from_text(cache_budget)
    probe = ProbeConfig(
        stores=tuple(refs), store_root=store_root, dataset=dataset, tasks=tuple(split_list(task) or ()) or None,
        protocol=protocol, steps=steps, batch_size=batch_size, lr=lr, seed=seed, grid=parse_grid(grid), cache=cache,
        device=device, out=out, storage_options=storage_options(storage_option, *refs, store_root) or None, width=width,
        depth=depth, num_heads=num_heads, init=init, **kwargs,
    )
    cfg = StudyConfig(probe=probe, select=select, by=by, heads=tuple(split_list(heads) or ()), group_lambda=group_lambda)
    if resume is None:
        check_out_folder(out)
        resume = find_unfinished(out, cfg.options())
        if resume is not None:
            state = read_state(resume)
            say(("resuming", "bold"), f" {resume}: {len(state.done)} of {len(state.tasks)} tasks done", console_=err_console)
    elif not resume.is_dir():
        raise ValueError(f"--resume {resume}: no such run folder")
    try:
        with client_for(workers, scheduler, announce=lambda line: say(line, console_=err_console)) as client, \
                run_progress(err_console) as progress:
            run = run_study(cfg, log=log_line, progress=progress, resume=resume, client=client)
    except RunInterrupted as stop:
        say(("interrupted", "yellow"), f": {stop.done} of {stop.planned} tasks finished in {stop.run_dir}; rerun the same "
            f"command (or add --resume {stop.run_dir}) to finish the rest; trained fits are kept", console_=err_console)
        raise typer.Exit(130) from None
    title, header, body, left = study_tables(run.run_dir)[0]  # the accuracy table `combo report` shows
    print_grid(title, header, body, left)
    chosen = Table(title=plain(f"selected backbones ({select} by {'held-out drop' if by == 'heldout' else 's_k'})"))
    chosen.add_column("task")
    chosen.add_column("kept")
    for name, kept in run.selection.items():
        chosen.add_row(plain(name), plain(", ".join(kept)))
    if len(run.backbones) > 1:
        console.print(chosen)
    for line in io_lines(run.run_dir):
        say("bytes ", line)
    print_warnings(run.warnings)
    say("run folder: ", (str(run.run_dir), "bold"))
