"""Shared CLI plumbing: clean one-line errors instead of tracebacks, one console."""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

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
            # Commands that can resume say so themselves (they know what was finished); this is only what is
            # true of every command.
            err_console.print(Text.assemble(("interrupted", "yellow"), ": stopped before the command finished"))
            raise typer.Exit(130) from None
        except (*USER_ERRORS, OSError) as err:  # OSError: disk full, read-only, a file in the way
            if os.environ.get("COMBO_DEBUG"):
                raise
            error_line(error_message(err))
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


_OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "something is already in the way",
    errno.ENOENT: "no such file or folder",
}


def error_message(err: BaseException) -> str:
    """The one sentence `friendly_errors` prints for ``err``."""
    if isinstance(err, OSError) and err.errno is not None:
        return describe_os_error(err)  # not "[Errno 2] No such file or directory: 'x'"
    return f"not found: {err}" if isinstance(err, KeyError) else str(err)


def describe_os_error(err: OSError) -> str:
    """One sentence for a file-system fault: the path at fault (when known) and the cause in words."""
    reason = _OS_REASONS.get(err.errno or -1) or (err.strerror or str(err)).rstrip(".").lower()
    where = f"{err.filename}: " if err.filename is not None else ""
    also = f" (and {err.filename2})" if getattr(err, "filename2", None) else ""
    return f"{where}{reason}{also}"


# ------------------------------------------------------------------------------------------ printing user text
# Every string that comes from the user or the disk (paths, class names, store names, error messages) may hold
# square brackets, which rich would read as markup and drop (`photo[final].png` -> `photo.png`). Print such
# strings through these helpers, never inside an f-string given to `console.print`.


def plain(value: Any, style: str = "") -> Text:
    """User or disk text as a rich Text: printed verbatim, brackets and all (also a safe table cell)."""
    return Text(str(value), style=style)


def error_line(message: str, *, label: str = "error", style: str = "bold red") -> None:
    """`error: <message>` on stderr, the message verbatim and never wrapped inside a word."""
    err_console.print(Text.assemble((label, style), ": ", str(message)), highlight=False, soft_wrap=True)


def log_line(message: str) -> None:
    """A dim progress/log line on stderr (the `log=` of the library calls), verbatim."""
    err_console.print(plain(message, "dim"), highlight=False, soft_wrap=True)


def say(*parts: Any, console_: Console | None = None) -> None:
    """Print a line built from (text, style) pairs and plain strings, none of them read as markup."""
    text = Text.assemble(*[(p if isinstance(p, (tuple, Text)) else str(p)) for p in parts])
    (console_ or console).print(text, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------- threads

THREADS_HELP = ("CPU threads for torch and BLAS (default: $OMP_NUM_THREADS when set, else the CPUs this process "
                "may use that other processes are not keeping busy, sampled for 0.2 s at start).")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no /proc (macOS, Windows)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cpus(sample_seconds: float = 0.2) -> float:
    """CPUs other processes keep busy now, measured over ``sample_seconds`` (this process sleeps meanwhile).

    Not the load average: it lags by a minute and counts tasks blocked on I/O (on the CI VM an idle
    machine reads 0.9), so it would take a core away from an idle 2-core machine."""
    first = _cpu_times()
    if first is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    time.sleep(sample_seconds)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * busy / total if total > 0 else 0.0


def default_threads() -> int:
    """Threads that do not fight other processes for cores.

    Measured on the 2-core CI machine with one busy competing process (benchmarks/threads.py): torch's
    default of one thread per core made an adapter step several times slower than 1 thread, because
    OpenMP threads wait at every barrier for a sibling that the scheduler has parked. So:
    $OMP_NUM_THREADS when set, else the CPUs this process may use minus those other processes keep busy
    (rounded), at least 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = available_cpus()
    return max(1, min(cpus, cpus - int(round(busy_cpus()))))


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and the BLAS/OpenMP variables that worker processes inherit) once, before
    any work; returns the count used. Call it at the start of every command that runs torch."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    n = int(threads or default_threads())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if threads is not None or not os.environ.get(var):
            os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def threads_option() -> Any:
    return typer.Option(None, "--threads", min=1, help=THREADS_HELP)
