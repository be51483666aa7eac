"""`combo store ...`: inspect, validate and share feature stores.

Every command takes `--storage-option KEY=VALUE` for remote locations (endpoint_url, anon,
profile, ...). Credentials are refused there: they come from the environment or the usual
config files only, so they never sit in shell history, process lists or output.
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
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
from rich.cells import cell_len
from rich.text import Text

from store_schema import default_store_root, parse_storage_options, validate_store
from store_schema.catalog import DEFAULT_DEPTH, StoreSummary, human_bytes, list_stores, store_info
from store_schema.errors import StoreError
from store_schema.location import connection_problem, redact, secret_option_paths, url_has_password
from store_schema.pack import pack_store
from store_schema.transfer import TransferProgress, copy_store

from .clikit import console, err_console, friendly_errors, say

app = typer.Typer(help="Inspect, validate and share feature stores.", no_args_is_help=True)

StorageOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",  # no short name: `-o` is --out in extract / probe / relevance / atlas
        help="fsspec option for remote locations, KEY=VALUE, repeatable (endpoint_url=http://..., anon=true, "
        "profile=NAME). Credentials come from the environment / config files, not from here.",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]
VerifyOption = Annotated[
    str,
    typer.Option("--verify", help="Final check of the copy: written (read back what this copy wrote; sizes of "
                 "the rest), all checksums, a sample, or none (presence only)."),
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
def scrubbed(options: dict[str, Any] | None, *where: str) -> Iterator[None]:
    """Errors leave with secrets masked; network and permission errors become one clear line (a connection
    that failed: `cannot reach WHERE: connection refused`)."""
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
        reason = connection_problem(err)
        if reason is not None:
            places = " or ".join(redact(str(w), options) for w in where if w) or "the server"
            raise StoreError(f"cannot reach {places}: {redact(reason, options)}") from err
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
    with scrubbed(options, root):
        summaries = list_stores(root, storage_options=options, max_depth=depth)
    if json_output:
        echo_json([s.to_dict() for s in summaries], options)
        return
    if not summaries:
        console.print(Text(f"no stores under {redact(root, options)}"), soft_wrap=True)
        return
    width = _width()
    shown = redact(root, options)
    heading = [f"stores under {shown}"] if cell_len(shown) + 13 <= width else ["stores under", shown]
    for line in heading:  # the root whole on a line of its own rather than broken
        console.print(Text(line, style="bold"), soft_wrap=True)
    for line in _ls_lines(summaries, width, options):  # lines already fit `width`; a longer name is never broken
        console.print(line, soft_wrap=True)


# Plain-text rendering for `ls` and `info`: it must stay legible in an 80-column terminal and when
# piped (rich then renders 80 columns). Cells are `Text`, never markup, so `[...]` in store names,
# reasons or values is printed as is.

STATUS_STYLE = {"ok": "green", "incomplete": "yellow", "invalid": "red", "complete": "green", "error": "red"}
GAP = 2


def _width() -> int:
    """The console's width; with stdout piped and no $COLUMNS, 80 (rich would take the width of a
    terminal on stdin or stderr), so `combo store ls > file` or `| less` stays 80 columns."""
    width = console.width
    explicit = getattr(console, "_width", None) is not None or os.environ.get("COLUMNS", "").isdigit()
    return width if explicit or console.is_terminal else min(width, 80)


def _arrow() -> str:
    return "↳" if (console.encoding or "").lower().startswith("utf") else "->"


@dataclass
class _Column:
    """One column of a plain table; `shrink` is the narrowest it may get (longer cells end in …)."""

    header: str
    cells: list[Text]
    justify: str = "left"
    shrink: int | None = None  # None: always shown whole
    width: int = 0

    def __post_init__(self) -> None:
        self.width = max([cell_len(self.header)] + [c.cell_len for c in self.cells])


def _fit(essential: list[_Column], optional: list[_Column], width: int) -> list[_Column] | None:
    """Essential columns whole plus as many optional ones (in priority order) as fit, shrinkable ones
    at their narrowest first, then widened into what room is left; None: not even the essential fit."""
    used = sum(c.width for c in essential) + GAP * (len(essential) - 1)
    if used > width:
        return None
    chosen = list(essential)
    shrunk: list[tuple[_Column, int]] = []
    for column in optional:
        need = column.width if column.shrink is None else min(column.width, column.shrink)
        if used + GAP + need > width:
            continue
        chosen.append(column)
        if need < column.width:
            shrunk.append((column, column.width))
            column.width = need
        used += GAP + need
    for column, full in shrunk:
        grow = min(full - column.width, width - used)
        column.width += grow
        used += grow
    return chosen


def _cell(text: Text, width: int, justify: str) -> Text:
    text = text.copy()
    if text.cell_len > width:
        text.truncate(width, overflow="ellipsis")
    pad = " " * (width - text.cell_len)
    return Text(pad) + text if justify == "right" else text + pad


def _table_lines(columns: list[_Column], order: list[str]) -> list[Text]:
    """Header, rule and one line per row, columns in `order` (headers), joined by GAP spaces."""
    columns = sorted(columns, key=lambda c: order.index(c.header))
    rule = "─" if _arrow() == "↳" else "-"
    header = Text(" " * GAP).join(_cell(Text(c.header, style="bold"), c.width, c.justify) for c in columns)
    header.rstrip()
    lines = [header, Text(rule * (sum(c.width for c in columns) + GAP * (len(columns) - 1)), style="dim")]
    for row in range(len(columns[0].cells)):
        line = Text(" " * GAP).join(_cell(c.cells[row], c.width, c.justify) for c in columns)
        line.rstrip()
        lines.append(line)
    return lines


def _wrap_items(items: list[str], width: int, sep: str = ", ") -> list[str]:
    """Pack items onto lines of at most `width` cells, never splitting an item that fits on a line;
    an item longer than a line is broken at spaces, then after '/' (paths, URLs), then anywhere."""
    width = max(width, 8)
    glue = sep.rstrip()  # ends a line ("," or ";"), or nothing
    space = sep[len(glue):]  # between items on one line
    lines: list[str] = []
    current = ""
    for i, item in enumerate(items):
        piece = item + (glue if i < len(items) - 1 else "")
        candidate = f"{current}{space}{piece}" if current else piece
        if cell_len(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        parts = _break_long(piece, width) if cell_len(piece) > width else [piece]
        lines += parts[:-1]
        current = parts[-1]
    lines.append(current)
    return lines


def _break_long(text: str, width: int) -> list[str]:
    out: list[str] = []
    for chunk in textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]:
        while cell_len(chunk) > width:
            cut = chunk.rfind("/", 0, width) + 1  # keep the '/' at the line end
            cut = cut if cut > width // 2 else width
            out.append(chunk[:cut])
            chunk = chunk[cut:]
        out.append(chunk)
    return out


def _reason_lines(reason: str, style: str, width: int) -> list[Text]:
    lead = f"  {_arrow()} "
    wrapped = _wrap_items([reason], width - len(lead), sep=" ")
    return [Text(("" if i else lead) + ("" if not i else " " * len(lead)) + part, style=style) for i, part in enumerate(wrapped)]


def _ls_lines(summaries: list[StoreSummary], width: int, options: dict[str, Any]) -> list[Text]:
    """A table that keeps name, status, backbone, dataset, samples and size whole and adds the other
    columns while they fit; reasons go on their own line under the row. Too narrow even for those
    six: one block per store."""
    def texts(values: list[str]) -> list[Text]:
        return [Text(v) for v in values]

    def unknown(value: Any) -> str:
        return "?" if value is None or value == "" else str(value)

    status = [Text(s.status, style=STATUS_STYLE.get(s.status, "")) for s in summaries]
    essential = [
        _Column("store", texts([s.name for s in summaries])),
        _Column("status", status),
        _Column("backbone", texts([unknown(s.backbone) for s in summaries])),
        _Column("dataset", texts([unknown(s.dataset) for s in summaries])),
        _Column("samples", texts([unknown(s.samples) for s in summaries]), justify="right"),
        _Column("size", texts([human_bytes(s.size_bytes) for s in summaries]), justify="right"),
    ]
    optional = [  # most useful first: the first to be dropped as the terminal narrows is the last
        _Column("tasks", texts([_count_list(s.tasks) for s in summaries]), shrink=12),
        _Column("dtype", texts([unknown(s.dtype) for s in summaries])),
        _Column("created", texts([(s.created or "?")[:10] for s in summaries])),
        _Column("timm", texts([unknown(s.timm_name) for s in summaries]), shrink=10),
        _Column("splits", texts([", ".join(s.splits) or "-" for s in summaries]), shrink=12),
        _Column("ver", texts([unknown(s.format_version) for s in summaries]), justify="right"),
    ]
    order = ["store", "status", "backbone", "timm", "dataset", "tasks", "splits", "samples", "dtype", "size", "created", "ver"]
    columns = _fit(essential, optional, width)
    own_line: set[int] = set()
    if columns is None:  # a long store name? it goes on a line of its own above its row, the table stays
        rest = sum(c.width for c in essential[1:]) + GAP * (len(essential) - 1)
        cap = width - rest
        if cap >= 16:
            own_line = {i for i, s in enumerate(summaries) if cell_len(s.name) > cap}
            essential[0] = _Column("store", [Text("") if i in own_line else Text(s.name) for i, s in enumerate(summaries)])
            columns = _fit(essential, optional, width)
    if columns is None:
        return _ls_blocks(summaries, width, options)
    table = _table_lines(columns, order)
    lines = table[:2]
    for i, (s, row) in enumerate(zip(summaries, table[2:])):
        if i in own_line:  # whole, never cut or broken (it may be longer than the terminal)
            lines.append(Text(s.name))  # its row follows with the store cell blank
        lines.append(row)
        if s.reason:
            lines += _reason_lines(redact(s.reason, options), STATUS_STYLE.get(s.status, ""), width)
    return lines


def _ls_blocks(summaries: list[StoreSummary], width: int, options: dict[str, Any]) -> list[Text]:
    """Narrow terminals: `name  status`, then the details wrapped under it, a blank line between stores."""
    lines: list[Text] = []
    for i, s in enumerate(summaries):
        if i:
            lines.append(Text(""))
        head = Text(s.name, style="bold")
        if cell_len(s.name) + GAP + len(s.status) > width:
            lines.append(head)
            head = Text("  ")
        else:
            head.append(" " * GAP)
        head.append(s.status, style=STATUS_STYLE.get(s.status, ""))
        lines.append(head)
        details = [f"backbone {s.backbone or '?'}", f"dataset {s.dataset or '?'}",
                   f"{'?' if s.samples is None else s.samples} samples", human_bytes(s.size_bytes)]
        if s.tasks:
            details.append(f"tasks {_count_list(s.tasks)}")
        lines += [Text("  " + part) for part in _wrap_items(details, width - 2)]
        if s.reason:
            lines += _reason_lines(redact(s.reason, options), STATUS_STYLE.get(s.status, ""), width)
    return lines


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
    with scrubbed(options, store):
        doc = store_info(store, storage_options=options)
    if json_output:
        echo_json(doc, options)
        return
    for line in _info_lines(doc, _width(), options):
        console.print(line, soft_wrap=True)


def _info_lines(doc: dict[str, Any], width: int, options: dict[str, Any]) -> list[Text]:
    backbone, pre, feats, storage = doc["backbone"], doc["preprocessing"], doc["features"], doc["storage"]
    weights = [str(backbone.get("weights_source") or "?")]
    if backbone.get("weights_sha256"):
        weights.append(f"sha256 {backbone['weights_sha256']}")
    elif weights[0] == "random-init":
        weights.append(f"seed {backbone.get('seed')}")
    timm = f"(timm {backbone.get('timm_name')}" + (f", tag {backbone['pretrained_tag']}" if backbone.get("pretrained_tag") else "") + ")"
    dataset = [str(doc["dataset"].get("name"))] + ([f"from {doc['dataset']['root']}"] if doc["dataset"].get("root") else [])
    rows: list[tuple[str, list[str], str]] = [  # key, items (kept whole on a line where they fit), separator
        ("store", [doc["location"]], ""),
        ("backbone", [str(backbone.get("alias")), timm], "  "),
        ("weights", weights, "  "),
        ("dataset", dataset, "  "),
        ("preprocessing", [f"{pre.get('image_size')} px", str(pre.get("resize")), str(pre.get("interpolation")),
                           f"mean {pre.get('mean')}", f"std {pre.get('std')}"], ", "),
        ("tokens", [("last stage: " if feats.get("grids") else "")
                    + f"grid {feats.get('token_grid')} = {feats.get('num_tokens')} tokens + {feats.get('num_prefix_tokens')} prefix",
                    f"dim {feats.get('feature_dim')}", str(feats.get("kind"))], "; "),
        ("layers", [f"{feats.get('num_layers')}: {feats.get('layers')}"
                    + (f" of the model's {feats['model_layers']}" if feats.get("model_layers") else "")], ""),
        *_grid_rows(feats),
        ("storage", [str(storage.get("dtype")), f"{storage.get('codec')} level {storage.get('clevel')} {storage.get('shuffle')}",
                     f"shard {storage.get('rows_per_shard')} rows",
                     f"chunk {storage.get('rows_per_chunk')} rows x {storage.get('layers_per_chunk')} layer(s)"], ", "),
        *_encoding_row(storage, doc.get("task_details") or {}),
        ("checksums", [str(storage.get("chunk_checksum", "?"))], ""),
        ("size", [human_bytes(doc.get("size_bytes"))], ""),
        ("created", [str(doc.get("created"))], ""),
        ("format", [str(doc.get("format_version") or f"{doc.get('schema_version')}.0")], ""),
        ("libraries", [f"{k} {v}" for k, v in (doc.get("library_versions") or {}).items()] or ["?"], ", "),
    ]
    key_width = max(len(key) for key, _, _ in rows)
    value_width = width - key_width - GAP
    lines: list[Text] = []
    for key, items, sep in rows:
        items = [redact(str(item), options) for item in items]
        if key == "store" and cell_len(items[0]) > value_width:  # a path is never broken: on a line of its own
            lines += [Text(key, style="bold"), Text(items[0])]
            continue
        if value_width < 30:  # very narrow: the value under its key
            lines.append(Text(key, style="bold"))
            lines += [Text("  " + part) for part in _wrap_items(items, width - 2, sep or " ")]
            continue
        for i, part in enumerate(_wrap_items(items, value_width, sep or " ")):
            lines.append(Text(key.ljust(key_width) if not i else " " * key_width, style="bold") + Text(" " * GAP + part))
    lines += [Text(""), Text("tasks", style="bold")]
    lines += _task_lines(doc["task_details"], width, options)
    sources = {name: t["source"] for name, t in doc["task_details"].items() if isinstance(t.get("source"), dict)}
    if sources:
        lines += [Text(""), Text("sources", style="bold")]
        for name, src in sources.items():
            where = (f"{src.get('repo')}@{str(src.get('revision') or '?')[:12]}" if src.get("kind") == "huggingface"
                     else str(src.get("kind")))
            lines.append(Text(f"  {name}: {where}"))
    return lines


def _grid_rows(feats: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    """A multi-grid (hierarchical) store's groups, one item each: name, grid, width and layers (the tokens row
    above describes the last group, the one a linear probe reads); none for a single-grid store."""
    groups = [g for g in feats.get("grids") or [] if isinstance(g, dict)]
    if not groups:
        return []
    items = [f"{g.get('name')}: grid {'x'.join(str(v) for v in g.get('token_grid') or [])} = {g.get('num_tokens')} tokens, "
             f"dim {g.get('feature_dim')}, layers {g.get('layers')}" for g in groups]
    return [("grid groups", items, "; ")]


def _encoding_row(storage: dict[str, Any], details: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    """A compact store's encoding and, for PCA, the split each task's basis was fitted on."""
    compact = storage.get("compact")
    if not compact:
        return [("encoding", ["full-size tokens"], "")]
    items = [f"{compact.get('name')}: {compact.get('description')}"]
    if compact.get("pca_components"):
        fits = sorted({f"{t['compact'].get('fit_split')}" for t in details.values() if t.get("compact")})
        rows = [int(t["compact"].get("fit_rows") or 0) for t in details.values() if t.get("compact")]
        kept = [v for t in details.values() if t.get("compact") for v in t["compact"].get("explained_variance") or []]
        items.append(f"PCA fitted per task on its training split only ({', '.join(fits) or '?'}; "
                     f"{min(rows, default=0)}-{max(rows, default=0)} images)")
        if kept:
            items.append(f"variance kept {min(kept):.1%}-{max(kept):.1%} per layer")
    items.append("map mean/std exact, token values approximate")
    return [("encoding", items, "; ")]


def _task_lines(details: dict[str, Any], width: int, options: dict[str, Any]) -> list[Text]:
    """task, samples and status whole, then classes, skipped and group while they fit; the splits
    last, wrapped in the room left (or under the row when little is left)."""
    names = list(details)
    if not names:
        return [Text("  (none)")]
    ok = {name: t for name, t in details.items() if "error" not in t}

    def cells(fn: Any) -> list[Text]:
        return [Text("" if name not in ok else str(fn(ok[name]))) for name in names]

    status = [Text("error", style="red") if name not in ok else
              Text("damaged", style="red") if ok[name].get("problems") else
              Text("complete", style="green") if ok[name]["complete"] else Text("incomplete", style="yellow") for name in names]
    essential = [
        _Column("task", [Text(n) for n in names]),
        _Column("samples", cells(lambda t: t["num_samples"]), justify="right"),
        _Column("status", status),
    ]
    optional = [
        _Column("classes", cells(lambda t: t["num_classes"]), justify="right"),
        _Column("skipped", cells(lambda t: t["skipped"]), justify="right"),
    ]
    if any(t.get("group") for t in ok.values()):
        optional.append(_Column("group", cells(lambda t: t.get("group") or ""), shrink=8))
    columns = _fit(essential, optional, width) or essential
    splits = {name: [f"{k} {v}" for k, v in t["splits"].items()] for name, t in ok.items()}
    offset = sum(c.width + GAP for c in columns)
    beside = width - offset >= 20
    wrapped = {name: _wrap_items(items, width - offset if beside else width - 4) for name, items in splits.items()}
    if beside:
        columns.append(_Column("splits", [Text(wrapped.get(n, [""])[0]) for n in names]))
    order = ["task", "group", "samples", "classes", "skipped", "status", "splits"]
    table = _table_lines(columns, order)
    lines = table[:2]
    for name, row in zip(names, table[2:]):
        lines.append(row)
        if name not in ok:
            lines += _reason_lines(redact(str(details[name]["error"]), options), "red", width)
        elif beside:
            lines += [Text(" " * offset + part) for part in wrapped[name][1:]]
        else:
            lines += [Text("    splits " + wrapped[name][0])] + [Text("           " + part) for part in wrapped[name][1:]]
        for problem in (ok.get(name) or {}).get("problems") or []:
            lines += _reason_lines(redact(f"{problem}; run `combo store validate`", options), "red", width)
    return lines


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
    with scrubbed(options, store):
        report = validate_store(store, storage_options=options, checksums="sample" if quick else "all", sample_fraction=fraction)
    if json_output:
        echo_json({"location": report.location, "ok": report.ok, "tasks": report.tasks, "problems": report.problems,
                   "chunks_checked": report.chunks_checked, "chunks_total": report.chunks_total}, options)
        raise typer.Exit(0 if report.ok else 1)
    where = redact(report.location, options)
    if report.ok:
        say(("valid", "green"), f": {where} ({len(report.tasks)} task(s); "
            f"{report.chunks_checked} of {report.chunks_total} shards checksummed)")
        return
    say(("invalid", "bold red"), f": {where} ({len(report.problems)} problem(s))", console_=err_console)
    for problem in report.problems:
        err_console.print(f"  - {redact(problem, options)}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# -- push / pull ----------------------------------------------------------------------------------


def _copy(label: str, source: str, destination: str, *, verify: str, workers: int, items: list[str] | None, json_output: bool) -> None:
    if verify not in ("written", "all", "sample", "none"):
        raise ValueError(f"--verify {verify!r}: choose written, all, sample or none")
    options = storage_options(items, source, destination)
    with scrubbed(options, source, destination), RichTransferProgress(label) as progress:
        result = copy_store(source, destination, storage_options=options, verify=verify, workers=workers, progress=progress)
    if json_output:
        echo_json(result.to_dict(), options)
        return
    check = {"written": f"{result.verified} written object(s) read back", "all": "every checksum",
             "sample": "sampled checksums", "none": "structure only"}[verify]
    say((label, "green"),
        f" {redact(str(result.source), options)} -> {redact(result.destination, options)}: copied {result.copied} "
        f"object(s) ({human_bytes(result.bytes_copied)}, {result.mb_per_s:.1f} MB/s), {result.skipped} already there; "
        f"verified ({check}): valid")


@app.command("push")
@friendly_errors
def push_command(
    source: Annotated[str, typer.Argument(help="Local store (or any store location).")],
    destination: Annotated[str, typer.Argument(help="Where to: a store path ending in .zarr, or a store root (s3://bucket/stores).")],
    verify: VerifyOption = "written",
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
    verify: VerifyOption = "written",
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
    target: Annotated[str | None, typer.Argument(help="Zip file to write (e.g. sam-vtab.zarr.zip); or give it with -o.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Zip file to write (the same as TARGET).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing zip.")] = False,
    verify: VerifyOption = "all",
    json_output: JsonFlag = False,
    storage_option: StorageOptions = None,
) -> None:
    """Pack a store into one uncompressed .zip (readable by zarr's ZipStore and `combo` as is)."""
    if target and out and target != out:
        raise ValueError(f"two zip files given ({target} and --out {out}): give one")
    target = target or out
    if not target:
        raise ValueError("give the zip file to write: `combo store pack STORE FILE.zarr.zip` (or -o FILE.zarr.zip)")
    options = storage_options(storage_option, source)
    with scrubbed(options, source), RichTransferProgress("pack") as progress:
        result = pack_store(source, target, storage_options=options, overwrite=overwrite, verify=verify, progress=progress)
    if json_output:
        echo_json(result.to_dict(), options)
        return
    say(("packed", "green"), f" {redact(str(result.source), options)} -> {result.target}: {result.objects} objects, "
        f"{human_bytes(result.bytes_packed)}; valid")
