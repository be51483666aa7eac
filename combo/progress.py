"""How the CLI shows a training run's progress (`probe.progress.RunProgress` hooks).

On a terminal: one rich line that updates in place (fit i/n, step, loss, steps/s, ETA of the fit and of the
run). Piped or redirected (a log file, CI): a plain line every ``every_percent`` of each fit and one per
finished fit, so a multi-hour run is never silent and the log stays short.
"""

from __future__ import annotations

import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from probe.progress import RunProgress


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Clock:
    """Which fit of how many, steps per second over the current fit, and the ETA of the fit and of the run:
    the bookkeeping both renderers share."""

    def __init__(self) -> None:
        self.total = 0
        self.index = 0
        self.steps = 0
        self.done = 0
        self.fit_started = time.perf_counter()

    def begin(self, steps: int) -> None:
        self.index += 1
        self.steps, self.done = steps, 0
        self.fit_started = time.perf_counter()

    def prefix(self) -> str:
        """``[i/n] `` (nothing when the caller planned no fits)."""
        return f"[{self.index}/{self.total}] " if self.total else ""

    def done_line(self, label: str, summary: str) -> str:
        took = time.perf_counter() - self.fit_started
        return f"{self.prefix()}{label}: done in {_duration(took)}" + (f", {summary}" if summary else "")

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.fit_started
        return self.done / elapsed if elapsed > 0 and self.done else 0.0

    def eta_fit(self) -> float | None:
        rate = self.rate()
        return (self.steps - self.done) / rate if rate else None

    def eta_run(self) -> float | None:
        rate = self.rate()
        if not rate:
            return None
        later = max(0, self.total - self.index) * self.steps  # fits not started yet, assumed as long as this one
        return (self.steps - self.done + later) / rate


class _Clocked(RunProgress):
    clock: _Clock

    def plan(self, total: int) -> None:
        self.clock.total += total


class LineProgress(_Clocked):
    """Plain lines (no cursor movement): for pipes, files and CI logs."""

    def __init__(self, stream: TextIO | Console, *, every_percent: int = 10) -> None:
        self.out = stream
        self.every = max(1, every_percent)
        self.clock = _Clock()
        self.next_percent = self.every

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _print(self, text: str) -> None:
        if isinstance(self.out, Console):
            self.out.print(Text(text), highlight=False, soft_wrap=True)
        else:
            print(text, file=self.out, flush=True)

    def start(self, label: str, *, steps: int) -> None:
        self.clock.begin(steps)
        self.label = label
        self.next_percent = self.every
        self._print(f"{self.clock.prefix()}{label}: training, {steps} steps")

    def step(self, done: int, *, loss: float) -> None:
        c = self.clock
        c.done = done
        percent = 100 * done // max(1, c.steps)
        if percent < self.next_percent or done >= c.steps:
            return
        while self.next_percent <= percent:
            self.next_percent += self.every
        eta_fit, eta_run = c.eta_fit(), c.eta_run()
        eta = f", ETA {_duration(eta_fit)}" if eta_fit is not None else ""
        if eta_run is not None and c.total > 1:
            eta += f" (run {_duration(eta_run)})"
        self._print(f"{c.prefix()}{self.label}: step {done}/{c.steps} ({percent}%), loss {loss:.4f}, "
                    f"{c.rate():.1f} steps/s{eta}")

    def finish(self, label: str, *, summary: str = "") -> None:
        self._print(self.clock.done_line(label, summary))


class BarProgress(_Clocked):
    """A live rich bar on a terminal; each finished fit leaves one line above it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.clock = _Clock()
        self.bars = Progress(
            TextColumn("{task.fields[prefix]}"), TextColumn("{task.fields[label]}", markup=False), BarColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[stats]}", markup=False), TimeRemainingColumn(),
            console=console, transient=True,
        )
        self.task_id = None

    def __enter__(self) -> "BarProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def start(self, label: str, *, steps: int) -> None:
        self.clock.begin(steps)
        if self.task_id is not None:
            self.bars.remove_task(self.task_id)
        self.task_id = self.bars.add_task("", total=max(1, steps), prefix=self.clock.prefix().rstrip(), label=label,
                                          stats="")

    def step(self, done: int, *, loss: float) -> None:
        c = self.clock
        c.done = done
        eta_run = c.eta_run()
        stats = f"step {done}/{c.steps}  loss {loss:.4f}  {c.rate():.1f} steps/s"
        if eta_run is not None and c.total > 1:
            stats += f"  run ETA {_duration(eta_run)}"
        self.bars.update(self.task_id, completed=done, stats=stats)

    def finish(self, label: str, *, summary: str = "") -> None:
        self.bars.console.print(Text(self.clock.done_line(label, summary)), highlight=False, soft_wrap=True)


def run_progress(console: Console) -> BarProgress | LineProgress:
    """Bars when ``console`` is a terminal, plain lines otherwise. Use as a context manager."""
    if console.is_terminal and not console.is_dumb_terminal:
        return BarProgress(console)
    return LineProgress(console)


__all__ = ["BarProgress", "LineProgress", "run_progress"]
