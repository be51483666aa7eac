"""`combo store ...`: inspect, validate and share feature stores.

Every command takes `--storage-option KEY=VALUE` for remote locations (endpoint_url, anon,
profile, ...). Credentials are refused there: they come from the environment or the usual
config files only, so they never sit in shell history, process lists or output.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from store_schema import default_store_root, parse_storage_options, validate_store
from store_schema.catalog import DEFAULT_DEPTH, human_bytes, list_stores, store_info
from store_schema.errors import StoreError
from store_schema.location import redact, secret_option_paths, url_has_password
from store_schema.pack import pack_store
from store_schema.transfer import TransferProgress, copy_store

from .clikit import console, err_console, friendly_errors

app = typer.Typer(help="Inspect, validate and share feature stores.", no_args_is_help=True)

StorageOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-o",
        help="fsspec option for remote locations, KEY=VALUE, repeatable (endpoint_url=http://..., anon=true, "
        "profile=NAME). Credentials come from the environment / config files, not from here.",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]
VerifyOption = Annotated[
    str,
    typer.Option("--verify", help="Final check of the copy: all checksums, a sample, or none (presence only)."),
]
WorkersOption = Annotated[int, typer.Option("--workers", min=1, max=64, help="Objects copied at once.")]

CREDENTIAL_HELP = (
    "credentials are not taken on the command line (they would end up in shell history and process lists). "
    "Use the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), the usual config files "
    "(~/.aws/credentials with --storage-option profile=NAME), or ~/.netrc for web servers "
    "(--storage-option client_kwargs.trust_env=true)"
)


def storage_options(items: list[str] | None, *locations: str | None) -> dict[str, Any]:
    """Parse --storage-option values, refusing credentials in options or URLs."""
    options = parse_storage_options(items)
    secrets = secret_option_paths(options)
    if secrets:
        raise ValueError(f"--storage-option {', '.join(secrets)}: {CREDENTIAL_HELP}")
    for location in locations:
        if location and url_has_password(location):
            raise ValueError(f"{redact(location)}: a password in the URL is refused; {CREDENTIAL_HELP}")
    return options


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as AiohttpClientError

        errors.append(AiohttpClientError)
    return tuple(errors)


@contextlib.contextmanager
def scrubbed(options: dict[str, Any] | None) -> Iterator[None]:
    """Errors leave with secrets masked; network and permission errors become one clear line."""
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - re-raised, masked
        text = str(err)
        clean = redact(text, options)
        if clean != text:
            raise StoreError(clean) from None
        if isinstance(err, (ValueError, RuntimeError, FileNotFoundError, KeyError)):
            raise
        if isinstance(err, _network_errors()):
            raise StoreError(f"{type(err).__name__}: {clean}") from err
        raise


def echo_json(doc: Any, options: dict[str, Any] | None = None) -> None:
    typer.echo(redact(json.dumps(doc, indent=2, default=str), options))


class RichTransferProgress(TransferProgress):
    """Objects and bytes on stderr, so `--json` output on stdout stays clean."""

    def __init__(self, label: str):
        self.label = label
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[objects]} objects"),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.task = None
        self.done = 0
        self.total = 0

    def __enter__(self) -> "RichTransferProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, total_objects: int, total_bytes: int | None) -> None:
        self.total = total_objects
        self.task = self.progress.add_task(self.label, total=total_bytes, objects=f"0/{total_objects}")

    def advance(self, key: str, nbytes: int, *, copied: bool) -> None:
        if self.task is not None:
            self.done += 1
            self.progress.update(self.task, advance=nbytes, objects=f"{self.done}/{self.total}")


# -- ls -------------------------------------------------------------------------------------------


@app.command("ls")
@friendly_errors
def ls_command(
    root: Annotated[str | None, typer.Argument(help="Store root: folder or URL (default: $COMBO_STORE_ROOT or ./stores).")] = None,
    json_output: JsonFlag = False,
    depth: Annotated[int, typer.Option("--depth", min=0, help="How many folder levels to search.")] = DEFAULT_DEPTH,
    storage_option: StorageOptions = None,
) -> None:
    """List the stores under a root; incomplete or broken ones are shown as such."""
    root = root or default_store_root()
    options = storage_options(storage_option, root)
    with scrubbed(options):
        summaries = list_stores(root, storage_options=options, max_depth=depth)
    if json_output:
        echo_json([s.to_dict() for s in summaries], options)
        return
    if not summaries:
        console.print(f"no stores under {redact(root, options)}")
        return
    table = Table(title=f"stores under {redact(root, options)}", title_justify="left")
    table.add_column("store", overflow="fold", ratio=3)
    table.add_column("backbone", overflow="fold")
    table.add_column("dataset", overflow="fold")
    table.add_column("tasks", overflow="fold", ratio=2)
    table.add_column("splits", overflow="fold", ratio=2)
    for column in ("samples", "dtype", "size", "created", "ver"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("samples", "size", "ver") else "left")
    table.add_column("status", overflow="fold", ratio=3)
    style = {"ok": "green", "incomplete": "yellow", "invalid": "red"}
    for s in summaries:
        status = f"[{style[s.status]}]{s.status}[/]" + (f": {redact(s.reason, options)}" if s.reason else "")
        table.add_row(
            s.name, s.backbone or "?", s.dataset or "?", _count_list(s.tasks), ",".join(s.splits) or "-",
            "?" if s.samples is None else str(s.samples), s.dtype or "?", human_bytes(s.size_bytes),
            (s.created or "?")[:10], "?" if s.schema_version is None else str(s.schema_version), status,
        )
    console.print(table)


def _count_list(items: list[str], shown: int = 3) -> str:
    if len(items) <= shown:
        return ", ".join(items) or "-"
    return f"{len(items)}: {', '.join(items[:shown])}, …"


# -- info -----------------------------------------------------------------------------------------


@app.command("info")
@friendly_errors
def info_command(
    store: Annotated[str, typer.Argument(help="Store: folder, .zip or URL.")],
    json_output: JsonFlag = False,
    storage_option: StorageOptions = None,
) -> None:
    """Provenance of a store: model, weights, preprocessing, layout, library versions, tasks."""
    options = storage_options(storage_option, store)
    with scrubbed(options):
        doc = store_info(store, storage_options=options)
    if json_output:
        echo_json(doc, options)
        return
    backbone, pre, feats, storage = doc["backbone"], doc["preprocessing"], doc["features"], doc["storage"]
    weights = backbone.get("weights_source") or "?"
    if backbone.get("weights_sha256"):
        weights += f"  sha256 {backbone['weights_sha256']}"
    elif weights == "random-init":
        weights += f"  seed {backbone.get('seed')}"
    rows = [
        ("store", doc["location"]),
        ("backbone", f"{backbone.get('alias')}  (timm {backbone.get('timm_name')}"
         + (f", tag {backbone['pretrained_tag']}" if backbone.get("pretrained_tag") else "") + ")"),
        ("weights", weights),
        ("dataset", f"{doc['dataset'].get('name')}" + (f"  from {doc['dataset']['root']}" if doc["dataset"].get("root") else "")),
        ("preprocessing", f"{pre.get('image_size')} px, {pre.get('resize')}, {pre.get('interpolation')}, "
         f"mean {pre.get('mean')}, std {pre.get('std')}"),
        ("tokens", f"grid {feats.get('token_grid')} = {feats.get('num_tokens')} tokens + {feats.get('num_prefix_tokens')} prefix; "
         f"dim {feats.get('feature_dim')}; {feats.get('kind')}"),
        ("layers", f"{feats.get('num_layers')}: {feats.get('layers')}"),
        ("storage", f"{storage.get('dtype')}, {storage.get('codec')} level {storage.get('clevel')} {storage.get('shuffle')}, "
         f"shard {storage.get('rows_per_shard')} rows, chunk {storage.get('rows_per_chunk')} rows x "
         f"{storage.get('layers_per_chunk')} layer(s)"),
        ("checksums", str(storage.get("chunk_checksum", "?"))),
        ("size", human_bytes(doc.get("size_bytes"))),
        ("created", str(doc.get("created"))),
        ("schema version", str(doc.get("schema_version"))),
        ("libraries", ", ".join(f"{k} {v}" for k, v in (doc.get("library_versions") or {}).items())),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, redact(str(value), options))
    console.print(grid)
    tasks = Table(title="tasks", title_justify="left")
    for column in ("task", "group", "samples", "splits", "classes", "skipped", "status"):
        tasks.add_column(column, justify="right" if column in ("samples", "classes", "skipped") else "left")
    for name, t in doc["task_details"].items():
        if "error" in t:
            tasks.add_row(name, "", "", "", "", "", f"[red]{t['error']}[/]")
            continue
        splits = ", ".join(f"{k} {v}" for k, v in t["splits"].items())
        status = "[green]complete[/]" if t["complete"] else "[yellow]incomplete[/]"
        tasks.add_row(name, str(t.get("group") or ""), str(t["num_samples"]), splits, str(t["num_classes"]), str(t["skipped"]), status)
    console.print(tasks)


# -- validate -------------------------------------------------------------------------------------


@app.command("validate")
@friendly_errors
def validate_command(
    store: Annotated[str, typer.Argument(help="Store: folder, .zip or URL.")],
    quick: Annotated[bool, typer.Option("--quick", help="Checksum a random sample of shards instead of all.")] = False,
    fraction: Annotated[float, typer.Option("--fraction", min=0.0, max=1.0, help="Sample share for --quick.")] = 0.05,
    json_output: JsonFlag = False,
    storage_option: StorageOptions = None,
) -> None:
    """Check structure, completeness and checksums; exit 1 listing every problem (array + chunk)."""
    options = storage_options(storage_option, store)
    with scrubbed(options):
        report = validate_store(store, storage_options=options, checksums="sample" if quick else "all", sample_fraction=fraction)
    if json_output:
        echo_json({"location": report.location, "ok": report.ok, "tasks": report.tasks, "problems": report.problems,
                   "chunks_checked": report.chunks_checked, "chunks_total": report.chunks_total}, options)
        raise typer.Exit(0 if report.ok else 1)
    where = redact(report.location, options)
    if report.ok:
        console.print(f"[green]valid[/green]: {where} ({len(report.tasks)} task(s); "
                      f"{report.chunks_checked} of {report.chunks_total} shards checksummed)", highlight=False)
        return
    err_console.print(f"[bold red]invalid[/bold red]: {where} ({len(report.problems)} problem(s))", highlight=False)
    for problem in report.problems:
        err_console.print(f"  - {redact(problem, options)}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# -- push / pull ----------------------------------------------------------------------------------


def _copy(label: str, source: str, destination: str, *, verify: str, workers: int, items: list[str] | None, json_output: bool) -> None:
    if verify not in ("all", "sample", "none"):
        raise ValueError(f"--verify {verify!r}: choose all, sample or none")
    options = storage_options(items, source, destination)
    with scrubbed(options), RichTransferProgress(label) as progress:
        result = copy_store(source, destination, storage_options=options, verify=verify, workers=workers, progress=progress)
    if json_output:
        echo_json(result.to_dict(), options)
        return
    check = {"all": "every checksum", "sample": "sampled checksums", "none": "structure only"}[verify]
    console.print(
        f"[green]{label}[/green] {result.source} -> {redact(result.destination, options)}: copied {result.copied} "
        f"object(s) ({human_bytes(result.bytes_copied)}, {result.mb_per_s:.1f} MB/s), {result.skipped} already there; "
        f"verified ({check}): valid",
        highlight=False,
    )


@app.command("push")
@friendly_errors
def push_command(
    source: Annotated[str, typer.Argument(help="Local store (or any store location).")],
    destination: Annotated[str, typer.Argument(help="Where to: a store path ending in .zarr, or a store root (s3://bucket/stores).")],
    verify: VerifyOption = "all",
    workers: WorkersOption = 8,
    json_output: JsonFlag = False,
    storage_option: StorageOptions = None,
) -> None:
    """Copy a store to a shared location, object by object; a rerun resumes; validated at the end."""
    _copy("push", source, destination, verify=verify, workers=workers, items=storage_option, json_output=json_output)


@app.command("pull")
@friendly_errors
def pull_command(
    source: Annotated[str, typer.Argument(help="Shared store: s3://..., https://... (read-only is fine) or a path.")],
    destination: Annotated[str, typer.Argument(help="A store root (the store goes to ROOT/<backbone>/<dataset>.zarr) or a path ending in .zarr.")],
    verify: VerifyOption = "all",
    workers: WorkersOption = 8,
    json_output: JsonFlag = False,
    storage_option: StorageOptions = None,
) -> None:
    """Fetch a store (never writes to the source); a rerun resumes; validated at the end."""
    _copy("pull", source, destination, verify=verify, workers=workers, items=storage_option, json_output=json_output)


# -- pack -----------------------------------------------------------------------------------------


@app.command("pack")
@friendly_errors
def pack_command(
    source: Annotated[str, typer.Argument(help="Store: folder or URL.")],
    target: Annotated[str, typer.Argument(help="Zip file to write (e.g. sam-vtab.zarr.zip).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing zip.")] = False,
    verify: VerifyOption = "all",
    json_output: JsonFlag = False,
    storage_option: StorageOptions = None,
) -> None:
    """Pack a store into one uncompressed .zip (readable by zarr's ZipStore and `combo` as is)."""
    options = storage_options(storage_option, source)
    with scrubbed(options), RichTransferProgress("pack") as progress:
        result = pack_store(source, target, storage_options=options, overwrite=overwrite, verify=verify, progress=progress)
    if json_output:
        echo_json(result.to_dict(), options)
        return
    console.print(f"[green]packed[/green] {result.source} -> {result.target}: {result.objects} objects, "
                  f"{human_bytes(result.bytes_packed)}; valid", highlight=False)
