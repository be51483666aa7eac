"""The `combo` command: thin typer wrappers that parse options and call library functions."""

from __future__ import annotations

import typer

from . import cli_compact, cli_extract, cli_fullstudy, cli_probe, cli_store, cli_study
from .worker_setup import tensor_huge_pages

app = typer.Typer(
    name="combo",
    help="Feature stores and ComBo probing for frozen vision foundation models.\n\n"
    "Stage 1 (`combo extract`) runs each frozen backbone once and writes every layer's tokens to a Zarr store; "
    "stage 2 (`combo probe`, `study`, `relevance`, `atlas`) trains small adapters from those stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("extract", epilog=cli_extract.ALIAS_HELP)(cli_extract.extract_command)
app.command("probe")(cli_probe.probe_command)
app.command("predict")(cli_probe.predict_command)
app.command("study")(cli_fullstudy.study_command)
app.command("relevance")(cli_study.relevance_command)
app.command("atlas")(cli_study.atlas_command)
app.command("report")(cli_study.report_command)
app.command("demo")(cli_probe.demo_command)
cli_store.app.command("compact")(cli_compact.compact_command)
app.add_typer(cli_store.app, name="store")


def main() -> None:
    tensor_huge_pages()
    app()


if __name__ == "__main__":
    main()
