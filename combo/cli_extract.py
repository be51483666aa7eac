"""`combo extract`: stage 1 from the command line."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from .clikit import configure_threads, console, friendly_errors, split_list, threads_option


def _rate(task) -> str:  # images/s column
    speed = task.finished_speed or task.speed
    return f"{speed:6.1f} img/s" if speed else "   ... img/s"


class _RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        return Text(_rate(task), style="cyan")


@contextmanager
def progress_bars() -> Iterator:
    """A rich progress bar per task: images done, images/s and ETA."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bars:

        def factory(name: str, total: int):
            task_id = bars.add_task(name, total=total)
            return lambda n: bars.advance(task_id, n)

        yield factory


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@friendly_errors
def extract_command(
    model: str = typer.Option(..., "--model", "-m", help="Alias (sam, clip, dfn-clip, siglip, dinov2, in21k, in21k-augreg, mae) or any timm ViT name."),
    dataset: str = typer.Option("digits", "--dataset", "-d", help="vtab | folder | parquet | digits (bundled, offline)."),
    root: Optional[str] = typer.Option(None, "--root", help="Dataset root folder (vtab, folder) or Parquet file/folder."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Comma-separated tasks (vtab); default: every task under --root."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Store root; the store goes to OUT/<model>/<dataset>.zarr. Default $COMBO_STORE_ROOT or ./stores."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (seeded, recorded in the store) instead of pretrained ones."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local .safetensors/.pth checkpoint to load instead of timm's pretrained weights."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random-init."),
    image_size: int = typer.Option(224, "--image-size", help="Square input size (bilinear resize, no crop)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu ...; default: CUDA when present."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16 or float32."),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", min=1, help="Images per shard (one object); default: as many as fit in 32 MiB."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record undecodable images in the store's metadata and go on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute tasks (or replace a store made with other settings)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Image-decoding worker processes (default: up to 4)."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Run a frozen backbone once over a dataset and store every layer's tokens."""
    configure_threads(threads)
    from extract.pipeline import ExtractConfig, extract
    from store_schema import default_store_root

    cfg_kwargs = dict(
        model=model,
        dataset=dataset,
        root=root,
        tasks=tuple(split_list(task) or ()) or None,
        out=out or default_store_root(),
        image_size=image_size,
        random_init=random_init,
        weights=str(weights) if weights else None,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        rows_per_shard=rows_per_shard,
        skip_bad=skip_bad,
        overwrite=overwrite,
    )
    if num_workers is not None:
        cfg_kwargs["num_workers"] = num_workers
    cfg = ExtractConfig(**cfg_kwargs)
    if random_init:
        console.print(f"[yellow]note[/yellow]: {model} has RANDOM weights (--random-init, seed {seed}); features are not pretrained")
    with progress_bars() as factory:
        result = extract(cfg, progress=factory)
    table = Table(title=f"store {result.store}")
    for column in ("task", "status", "images run", "skipped", "seconds", "img/s"):
        table.add_column(column, justify="right" if column not in ("task", "status") else "left")
    for t in result.tasks:
        rate = f"{t.images / t.seconds:.1f}" if t.seconds > 0 and t.images else "-"
        table.add_row(t.task, t.status, str(t.images), str(len(t.skipped)), f"{t.seconds:.1f}", rate)
    console.print(table)
    for t in result.tasks:
        for s in t.skipped:
            console.print(f"[yellow]skipped[/yellow] {t.task}: {s.sample_id}: {s.error}")
    rate = result.images / result.seconds if result.seconds > 0 else 0.0
    console.print(
        f"{result.images} images in {result.seconds:.1f} s ({rate:.1f} img/s); "
        f"{human_bytes(result.bytes_on_disk)} on disk at {result.store}"
    )
