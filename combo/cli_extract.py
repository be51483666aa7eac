"""`combo extract`: stage 1 from the command line."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .cluster import client_for, scheduler_option, workers_option
from .clikit import (
    configure_threads,
    console,
    error_line,
    error_message,
    friendly_errors,
    plain,
    say,
    split_list,
    threads_option,
)


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
        TextColumn("{task.description}", markup=False, style="bold"),  # task names are user text
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


# `combo extract --help`'s list of aliases: extract.backbones.alias_help() written out, so that the CLI does not
# build 18 architectures at start-up (tests/test_backbones.py checks that the two agree).
ALIAS_HELP = (
    "Aliases at 224 px (prefix tokens, float16 MiB per image, grid and layers x width; for a hierarchical model "
    "its stages' grid x width, first .. last):\n"
    '\n'
    '\b\n'
    'sam             samvit_base_patch16.sa1b                 0   3.45  14x14  12x768\n'
    'clip            vit_base_patch16_clip_224.openai         1   3.46  14x14  12x768\n'
    'dfn-clip        vit_base_patch16_clip_224.dfn2b          1   3.46  14x14  12x768\n'
    'siglip          vit_base_patch16_siglip_224.webli        0   3.45  14x14  12x768\n'
    'dinov2          vit_base_patch14_reg4_dinov2.lvd142m     5   4.59  16x16  12x768\n'
    'in21k           vit_base_patch16_224.orig_in21k          1   3.46  14x14  12x768\n'
    'in21k-augreg    vit_base_patch16_224.augreg_in21k        1   3.46  14x14  12x768\n'
    'mae             vit_base_patch16_224.mae                 1   3.46  14x14  12x768\n'
    'dinov3          vit_base_patch16_dinov3.lvd1689m         5   3.53  14x14  12x768\n'
    'siglip2         vit_base_patch16_siglip_224.v2_webli     0   3.45  14x14  12x768\n'
    'pe              vit_pe_core_base_patch16_224.fb          1   3.46  14x14  12x768\n'
    'pe-spatial      vit_pe_spatial_base_patch16_512.fb       1   3.46  14x14  12x768\n'
    'aimv2           aimv2_large_patch14_224.apple_pt         0  12.00  16x16  24x1024\n'
    'radio           naflexvit_base_patch16_radio_v3.c_radio  8   3.59  14x14  12x768\n'
    'tipsv2          vit_base_patch14_reg1_tipsv2.webli       2   4.54  16x16  12x768\n'
    'eva02           eva02_base_patch14_224.mim_in22k         1   4.52  16x16  12x768\n'
    'sam2            sam2_hiera_base_plus.fb_r896             0   1.26  4 stages 56x56x112 .. 7x7x896\n'
    'dinov3-convnext convnext_base.dinov3_lvd1689m            0   1.44  4 stages 56x56x128 .. 7x7x1024\n'
)


NUM_WORKERS_HELP = ("Image-decoding worker processes (0: decode in the main process). Default: up to 4, one fewer "
                    "than the CPUs this process may use, so the decoders leave a CPU to the backbone's own threads.")


def _shards(n: int) -> str:
    return f"{n} shard{'s' if n != 1 else ''}"


def _kept_clause(state) -> str:
    """What an interrupted or failed run leaves behind, in words (no markup: printed as plain text)."""
    if state.removed or state.store is None or (isinstance(state.store, Path) and not state.store.exists()):
        return "nothing was written"
    if state.task is None or not state.shards_kept:
        return f"no shard was finished; what {state.store} held before is kept"
    verb = "is" if state.shards_kept == 1 else "are"
    return (f"{_shards(state.shards_kept)} of task {state.task} written to {state.store} {verb} kept; "
            "rerun the same command to resume")


@friendly_errors
def extract_command(
    model: str = typer.Option(..., "--model", "-m", help="An alias (listed below) or any timm model name (arch or arch.tag) with per-layer outputs (forward_intermediates): ViT, DeiT, EVA, SAM, NaFlexViT ...; hierarchical ones (ConvNeXt, Swin, Hiera, SAM2, MaxViT, ResNet) keep each stage on its own grid and width."),
    dataset: str = typer.Option("vtab", "--dataset", "-d", help="vtab (needs --root) | folder | parquet | digits (bundled, offline demo data)."),
    root: Optional[str] = typer.Option(None, "--root", help="Dataset root folder (vtab, folder) or Parquet file/folder; for vtab also Hugging Face dataset repos in the local hub cache: hf://datasets/ORG/REPO, a comma-separated list of them, or a glob (hf://datasets/bramtoula/vtab_*), or a save_to_disk folder."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Comma-separated tasks (vtab); default: every task under --root."),
    task_name: Optional[str] = typer.Option(None, "--task-name", help="--dataset vtab from one Hugging Face repo: its task's name (default: the VTAB folder name of the authors' repo name, e.g. vtab_cifar100 -> cifar, else the repo's name)."),
    download: bool = typer.Option(False, "--download", help="--root hf://...: download repos missing from the hub cache through huggingface_hub (needs network; never with HF_HUB_OFFLINE=1). Off: a missing repo is an error saying how to fill the cache."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Store root; the store goes to OUT/<model>/<dataset>.zarr. Default $COMBO_STORE_ROOT or ./stores."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (seeded, recorded in the store) instead of pretrained ones."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local .safetensors/.pth checkpoint to load instead of timm's pretrained weights."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for --random-init."),
    image_size: int = typer.Option(224, "--image-size", min=1, help="Square input size (bilinear resize, no crop); a multiple of the model's patch size (16; 14 for dinov2, aimv2, tipsv2, eva02), or for a hierarchical model of its largest reduction (32 for sam2, dinov3-convnext)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Which layer outputs to store (indices into the model's feature_info): all, last:N, or indices such as 0,5,11 (negative ones count from the end). Default: every block of a ViT (the paper's); every stage output of a hierarchical model, without a stem entry (MaxViT, ResNet: 'all' adds it)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Images per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1, cpu ...; default: CUDA when present."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16 or float32."),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", min=1, help="Images per shard (one object); default: as many as fit in 32 MiB."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record undecodable images in the store's metadata and go on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute tasks (or replace a store made with other settings)."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take over a remote store's write lock held by a writer that died (killed, or its machine gone) without waiting for its heartbeat to go stale ($COMBO_LOCK_STALE_AFTER, default 10 min). Never while that writer runs: both would write the store."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=0, help=NUM_WORKERS_HELP),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="--dataset parquet: the image-bytes column (default: image, img, ... or the first binary / {bytes, path} column)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="--dataset parquet: the label column (default: label, labels or target)."),
    split_column: Optional[str] = typer.Option(None, "--split-column", help="--dataset parquet: the split column (default: split; without one, the split comes from the file names, else a 70/10/20 cut)."),
    compact: Optional[str] = typer.Option(None, "--compact", help="Store the tokens encoded instead of at full size: "
                                          "int8, pca:R or pca:R,int8 (PCA fitted on each task's training split first). "
                                          "The store goes to OUT/<model>/<dataset>-<encoding>.zarr, e.g. vtab-pca128-int8.zarr."),
    storage_option: Optional[list[str]] = typer.Option(None, "--storage-option", help="fsspec option KEY=VALUE for a remote --out such as s3://bucket/stores (repeatable; never written anywhere; credentials come from the environment)."),
    workers: Optional[int] = workers_option("the backbone (whole shards per worker; this process keeps the store's lock and journal)"),
    scheduler: Optional[str] = scheduler_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Run a frozen backbone once over a dataset and store every layer's tokens."""
    configure_threads(threads)
    from extract.pipeline import ExtractConfig, ExtractState, check_config, extract
    from store_schema import default_store_root
    from store_schema.manifest import describe_missing

    from .cli_store import storage_options

    cfg_kwargs = dict(
        model=model,
        dataset=dataset,
        root=root,
        tasks=tuple(split_list(task) or ()) or None,
        out=out or default_store_root(),
        image_size=image_size,
        layers=layers,
        random_init=random_init,
        weights=str(weights) if weights else None,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        rows_per_shard=rows_per_shard,
        skip_bad=skip_bad,
        overwrite=overwrite,
        break_lock=break_lock,
        image_column=image_column,
        label_column=label_column,
        split_column=split_column,
        task_name=task_name,
        download=download,
        compact=compact,
        storage_options=storage_options(storage_option, out) or None,
    )
    if num_workers is not None:
        cfg_kwargs["num_workers"] = num_workers
    cfg = ExtractConfig(**cfg_kwargs)
    check_config(cfg)  # bad options fail before anything is printed (extract() checks again: it is free)
    if random_init:
        say(("note", "yellow"), ": ", model, f" has RANDOM weights (--random-init, seed {seed}); features are not pretrained")
    state = ExtractState()

    def warn(message: str) -> None:
        say(("warning", "yellow"), ": ", message)

    try:
        with client_for(workers, scheduler, announce=lambda line: say(line)) as client, progress_bars() as factory:
            result = extract(cfg, progress=factory, state=state, warn=warn, client=client)
    except KeyboardInterrupt:
        error_line(_kept_clause(state), label="interrupted", style="yellow")
        raise typer.Exit(130) from None
    except OSError as err:
        if os.environ.get("COMBO_DEBUG") or (isinstance(err, FileNotFoundError) and err.errno is None):
            raise
        # a file-system fault (disk full, read-only, permission): the path and cause, then what is kept
        cause = error_message(err)
        error_line(f"{cause}; {_kept_clause(state)}" if state.task is not None else cause)
        raise typer.Exit(2) from None
    table = Table(title=Text.assemble("store ", str(result.store)))
    for column in ("task", "status", "images run", "skipped", "seconds", "img/s"):
        table.add_column(column, justify="right" if column not in ("task", "status") else "left")
    for t in result.tasks:
        rate = f"{t.images / t.seconds:.1f}" if t.seconds > 0 and t.images else "-"
        table.add_row(plain(t.task), t.status, str(t.images), str(len(t.skipped)), f"{t.seconds:.1f}", rate)
    console.print(table)
    for t in result.tasks:
        if t.repaired:
            how = "the whole task was extracted again" if t.whole_task else "their shards were extracted again"
            say(("repaired", "green"), " ", t.task, f": {len(t.repaired)} object(s) missing or resized since the task "
                f"was finished ({describe_missing(t.repaired)}); {how}")
        for s in t.skipped:
            say(("skipped", "yellow"), " ", t.task, ": ", s.sample_id, ": ", s.error)
    rate = result.images / result.seconds if result.seconds > 0 else 0.0
    say(f"{result.images} images in {result.seconds:.1f} s ({rate:.1f} img/s); "
        f"{human_bytes(result.bytes_on_disk)} on disk at ", str(result.store))
