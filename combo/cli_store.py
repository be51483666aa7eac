"""`combo store ...`: inspect, validate and share feature stores."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect, validate and share feature stores.", no_args_is_help=True)
