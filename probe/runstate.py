"""What a probe run folder planned and finished (state.json), so an interrupted run can be resumed and a
partial one is never reported as if it were whole.

A run of the paper's protocol is hours of training per task; Ctrl-C, a full disk or a lost machine must
leave a folder that says which tasks finished. ``state.json`` lists the planned tasks with their state
(``pending``, ``running``, ``done``, ``interrupted``, ``failed``), the options that decide the results (to
refuse resuming with other ones), and ``complete``, set only after results.md is written. It is replaced
atomically (temp file + ``os.replace``), so a crash mid-write leaves the previous state. Folders written
before combo recorded a state have no state.json and count as complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from store_schema.location import nearest_existing, write_file_atomic

STATE_FILE = "state.json"
DONE = "done"

# ProbeConfig field -> the CLI option that sets it (for "--resume: --steps differs")
OPTION_NAMES = {
    "stores": "--stores", "store_root": "--store-root", "dataset": "--dataset", "tasks": "--task",
    "protocol": "--protocol", "method": "--method", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr",
    "weight_decay": "weight_decay", "seed": "--seed", "grid": "--grid", "cache": "--cache",
    "cache_budget": "--cache-budget", "device": "--device", "group_lambda": "--lambda",
    "eval_batch_size": "eval_batch_size", "width": "--width", "depth": "--depth", "num_heads": "--heads",
    "shuffle_window": "--shuffle-window", "pool": "--pool", "init": "--init",
}


@dataclass
class RunState:
    """The planned tasks of a run in order, each one's state, and whether the run (results.md too) finished."""

    tasks: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    started: str = ""

    @property
    def done(self) -> list[str]:
        return [t for t, s in self.tasks.items() if s == DONE]

    @property
    def missing(self) -> list[str]:
        return [t for t, s in self.tasks.items() if s != DONE]

    @property
    def partial(self) -> bool:
        return not self.complete

    def describe(self) -> str:
        """``partial: 3 of 19 planned tasks finished`` (or ``complete: ...``)."""
        word = "complete" if self.complete else "partial"
        return f"{word}: {len(self.done)} of {len(self.tasks)} planned tasks finished"

    def to_doc(self) -> dict[str, Any]:
        return {"tasks": dict(self.tasks), "complete": self.complete, "started": self.started, "options": self.options}

    def save(self, run_dir: Path) -> None:
        text = json.dumps(self.to_doc(), indent=2, default=str) + "\n"
        write_file_atomic(Path(run_dir) / STATE_FILE, text.encode())


def new_state(tasks: list[str], options: dict[str, Any]) -> RunState:
    return RunState(tasks={t: "pending" for t in tasks}, options=options,
                    started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"))


def read_state(run_dir: str | os.PathLike) -> RunState | None:
    """The folder's recorded state; None when it has none (a folder from before states: complete)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return RunState(tasks={str(k): str(v) for k, v in doc["tasks"].items()}, options=dict(doc.get("options") or {}),
                        complete=bool(doc.get("complete")), started=str(doc.get("started") or ""))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a run state combo can read ({err})") from None


def partial_note(run_dir: str | os.PathLike) -> str | None:
    """``partial: k of n planned tasks finished`` for an unfinished run; None for a finished or old one."""
    state = read_state(run_dir)
    return state.describe() if state is not None and state.partial else None


def option_differences(recorded: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The CLI options whose values differ, as ``--steps (run: 20, now: 10)``."""
    keys = list(dict.fromkeys([*recorded, *given]))
    return [f"{OPTION_NAMES.get(k, k)} (run: {_show(recorded.get(k))}, now: {_show(given.get(k))})"
            for k in keys if recorded.get(k) != given.get(k)]


def _show(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def find_unfinished(out: str | os.PathLike, options: dict[str, Any]) -> Path | None:
    """The newest unfinished run folder directly under ``out`` recorded with exactly these options."""
    out = Path(out)
    if not out.is_dir():
        return None
    found: list[tuple[str, str, Path]] = []
    for child in out.iterdir():
        try:
            state = read_state(child) if child.is_dir() else None
        except ValueError:
            continue
        if state is not None and state.partial and state.options == options:
            found.append((state.started, child.name, child))
    return max(found)[2] if found else None


def check_out_folder(out: str | os.PathLike) -> Path:
    """Fail in one sentence, before any store is opened, when run folders cannot be created under ``out``."""
    out = Path(out).expanduser()
    probe = nearest_existing(out)
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out else f"cannot be created: {probe} is a file"
        raise ValueError(f"--out {out} {where}, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {probe} is not writable (read-only or no permission)")
    return out


def finished_rows(run_dir: Path, done: Sequence[str]) -> list[dict[str, Any]]:
    """Metric rows of the tasks the folder's state says finished, as written (types kept by Parquet)."""
    path = run_dir / "metrics.parquet"
    rows = pq.read_table(path).to_pylist() if path.is_file() else []
    by_task = {r["task"]: r for r in rows}
    lost = [t for t in done if t not in by_task]
    if lost:
        raise ValueError(f"{run_dir}: the metrics of finished task(s) {', '.join(lost)} are missing from metrics.parquet")
    return [by_task[t] for t in done]


def open_resumed(run_dir: Path, options: dict[str, Any], planned: list[str]) -> tuple[RunState, dict[str, Any]]:
    """The state and config.json of a run to resume, refused when its options or plan differ."""
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"--resume {run_dir}: not a run folder written by combo probe (no config.json)")
    state = read_state(run_dir)
    if state is None or state.complete:
        raise ValueError(f"--resume {run_dir}: that run is finished (or from before combo recorded run states); "
                         "it is never changed: start a new run instead")
    differ = option_differences(state.options, options)
    if differ:
        raise ValueError(f"--resume {run_dir}: the options differ from the run's: {'; '.join(differ)}; "
                         "give the run's options (see its config.json) or start a new run")
    if list(state.tasks) != planned:
        raise ValueError(f"--resume {run_dir}: the run planned tasks {', '.join(state.tasks)} but the stores now give "
                         f"{', '.join(planned)}; start a new run (under another --out)")
    return state, json.loads((run_dir / "config.json").read_text())


__all__ = ["DONE", "STATE_FILE", "RunState", "check_out_folder", "find_unfinished", "finished_rows",
           "new_state", "open_resumed", "option_differences", "partial_note", "read_state"]
