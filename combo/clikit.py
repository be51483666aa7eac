"""Shared CLI plumbing: clean one-line errors instead of tracebacks, one console."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Errors that are the user's input (bad file, option, store), reported without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, KeyError)


def friendly_errors(fn: F) -> F:
    """Report expected failures as `error: ...` with exit code 2; COMBO_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]: what was written so far is kept; rerun the command to resume")
            raise typer.Exit(130) from None
        except USER_ERRORS as err:
            if os.environ.get("COMBO_DEBUG"):
                raise
            message = str(err) if not isinstance(err, KeyError) else f"not found: {err}"
            err_console.print(f"[bold red]error[/bold red]: {message}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


GRID_HELP = ("Common token grid every backbone's maps are resized to (14 or 14x14). Default: the stores' own grid "
             "when they all share one, else the smallest among them (14x14 for every combination in the paper), "
             "as the authors ran it.")


def parse_grid(text: str | None) -> tuple[int, int] | None:
    """'14' or '14x14' (also '14,14') -> (14, 14); None, '' or 'auto' -> None (the authors' default grid)."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    parts = str(text).lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise ValueError(f"--grid {text!r}: expected a size such as 14 or 14x14") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"--grid {text!r}: expected a size such as 14 or 14x14")
    return values[0], values[1]


def split_list(value: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None or '' -> None."""
    if not value:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def is_tty() -> bool:
    return sys.stderr.isatty()
