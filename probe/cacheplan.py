"""Where the training split lives (`plan_cache`: on the GPU, in RAM, or streamed), what RAM that takes, the
batches a plan feeds (`training_batches`), and the cache budget (`budget_from_text`, `default_budget`).

The memory a plan states is the training data it holds (the whole split, or the stream's windows and batches:
probe/stream.py) plus `memory_overhead`, whatever the split's size."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cacheerror import CachePlanError
from .cachedbatches import cached_batches
from .epochorder import piece_rows
from .evalbatches import EVAL_BATCH_SIZE, eval_batch_rows
from .source import Batch, SplitSource
from .stream import STREAM_BATCHES_IN_RAM, STREAM_WINDOWS_IN_RAM, stream_batches

CACHE_MODES = ("auto", "device", "ram", "stream")

# What a run holds beyond its cache budget and what it held after its imports (peak RSS, measured with
# benchmarks/large_store.py and tests/test_memory_budget.py): torch's kernels, thread pools and the adapter ...
FIXED_OVERHEAD_BYTES = 256 * 2**20
# ... and copies of one training batch's stored bytes: the batch itself and the one being assembled, its float32
# copy (2x for float16), gradients and activations; the bound was measured when the adapter also made a contiguous
# copy of the float32 batch for Lambda (2x), which prepare's token-major layout no longer needs: kept, as a margin
TRAIN_BATCH_COPIES = 10
# ... and of one evaluation batch's: the reads in flight (EVAL_BATCHES_IN_RAM), its float32 copies, and freed blocks glibc keeps
EVAL_BATCH_COPIES = 10


@dataclass(frozen=True)
class CachePlan:
    mode: str  # "device" | "ram" | "stream"
    window_rows: int | None  # rows per shuffle window (None: the whole split)
    split_bytes: int
    budget_bytes: int | None = None
    note: str = ""  # why the plan differs from what was asked, if it does
    cache_bytes: int | None = None  # RAM the training split takes at most (whole, or the stream's windows)
    overhead_bytes: int | None = None  # RAM beyond that: batches, the adapter, torch (`memory_overhead`)

    def describe(self) -> str:
        window = "whole split" if self.window_rows is None else f"{self.window_rows} rows"
        text = f"cache {self.mode} ({self.split_bytes / 2**20:.1f} MiB, shuffle window {window})"
        if self.cache_bytes is not None and self.overhead_bytes is not None:
            text += (f"; holds at most {(self.cache_bytes + self.overhead_bytes) / 2**20:.0f} MiB of RAM after the "
                     f"imports (training data {self.cache_bytes / 2**20:.0f} MiB, batches and adapter "
                     f"{self.overhead_bytes / 2**20:.0f} MiB)")
        return f"{text}; {self.note}" if self.note else text


def memory_overhead(source: SplitSource, *, batch_size: int, eval_batch_size: int = EVAL_BATCH_SIZE) -> int:
    """Bytes a fit holds on top of its cache budget (and of the process after its imports), whatever the split's
    size: a fixed part plus a fixed number of training and evaluation batches (see the constants above)."""
    row = source.row_bytes()
    return (FIXED_OVERHEAD_BYTES + TRAIN_BATCH_COPIES * batch_size * row
            + EVAL_BATCH_COPIES * eval_batch_rows(source, eval_batch_size) * row)


def _device_room(device: torch.device) -> int | None:
    """Bytes we allow a cached split to take on a CUDA device: half of what is free now."""
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except Exception:  # noqa: BLE001
        return None
    return int(free // 2)


def plan_cache(source: SplitSource, *, mode: str, budget_bytes: int, device: torch.device, batch_size: int,
               shuffle_window: int | None = None, eval_batch_size: int = EVAL_BATCH_SIZE) -> CachePlan:
    """Pick where the training split lives.

    `auto`: on the GPU when there is one and the split fits both the budget and half the free GPU
    memory; else in RAM when it fits the budget; else streamed. `stream` sizes its shuffle window
    so that `STREAM_WINDOWS_IN_RAM` windows and `STREAM_BATCHES_IN_RAM` batches fit the budget
    (never below one shard: pieces are whole shards unless the store is class-clustered). `shuffle_window` (rows) overrides the window
    in every mode; `ram`/`device` default to the whole split.
    """
    if mode not in CACHE_MODES:
        raise CachePlanError(f"--cache {mode!r}: choose one of {', '.join(CACHE_MODES)}")
    if budget_bytes <= 0:
        raise CachePlanError(f"--cache-budget must be positive, got {budget_bytes} bytes")
    if shuffle_window is not None and shuffle_window < 1:
        raise CachePlanError(f"shuffle window must hold at least one row, got {shuffle_window}")
    row_bytes = source.row_bytes()
    split_bytes = source.n * row_bytes
    fits = split_bytes <= budget_bytes
    note = ""
    if mode == "auto":
        room = _device_room(device)
        if device.type == "cuda" and fits and room is not None and split_bytes <= room:
            mode = "device"
        else:
            mode = "ram" if fits else "stream"
    if mode == "device" and device.type != "cuda":
        mode, note = "ram", f"no CUDA device ({device}): cached in RAM"
    if mode in ("ram", "device") and not fits:  # asked for: the whole split is read, whatever the budget
        over = (f"warning: --cache {mode} holds the whole training split ({split_bytes / 2**20:.1f} MiB) in "
                f"{'RAM' if mode == 'ram' else 'GPU memory'}, over the cache budget ({budget_bytes / 2**20:.1f} MiB), "
                "which it does not honour; use --cache stream (or auto) to stay within --cache-budget")
        note = f"{note}; {over}" if note else over
    window: int | None = None
    if mode == "stream":
        if shuffle_window is not None:
            window = shuffle_window
        else:
            budget_rows = int(budget_bytes // max(1, row_bytes))
            window = (budget_rows - STREAM_BATCHES_IN_RAM * batch_size) // STREAM_WINDOWS_IN_RAM
            floor = source.task.reference.rows_per_shard
            if window < floor:
                note = (f"budget {budget_bytes / 2**20:.1f} MiB leaves {max(window, 0)} rows per window; raised to "
                        f"one shard ({floor} rows), so RAM use exceeds the budget")
                window = floor
    elif shuffle_window is not None:
        window = shuffle_window
    if window is not None and window >= source.n:
        window = None
    pieces = piece_rows(source) if window is not None else None
    if pieces is not None and pieces < source.task.reference.rows_per_shard:
        clustered = ("the split is stored class by class (a store written before combo shuffled training rows): "
                     f"windows are built from {pieces}-row pieces, more reads per window; "
                     "extract it again for whole-shard reads")
        note = f"{note}; {clustered}" if note else clustered
    if window is None:
        cache_bytes = split_bytes  # read into RAM whole (and from there to the GPU in `device` mode)
    else:
        cache_bytes = min(split_bytes, (STREAM_WINDOWS_IN_RAM * window + STREAM_BATCHES_IN_RAM * batch_size) * row_bytes)
    return CachePlan(mode=mode, window_rows=window, split_bytes=split_bytes, budget_bytes=budget_bytes, note=note,
                     cache_bytes=int(cache_bytes),
                     overhead_bytes=memory_overhead(source, batch_size=batch_size, eval_batch_size=eval_batch_size))


def training_batches(source: SplitSource, plan: CachePlan, *, batch_size: int, seed: int, device: torch.device) -> Iterator[Batch]:
    if plan.mode == "stream":
        return stream_batches(source, batch_size=batch_size, seed=seed, window_rows=int(plan.window_rows or source.n),
                              device=device if device.type == "cuda" else None)
    return cached_batches(source, batch_size=batch_size, seed=seed, window_rows=plan.window_rows,
                          device=device if plan.mode == "device" else None)


_UNITS = {
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1,
}  # fmt: skip


def budget_from_text(text: str) -> int:
    """'8GiB', '8G' (binary), '512MB' (decimal), '1e9' -> bytes."""
    raw = str(text).strip().lower().replace(" ", "")
    number, factor = raw, 1
    for unit, size in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if raw.endswith(unit):
            number, factor = raw[: -len(unit)], size
            break
    try:
        value = float(number) * factor
    except ValueError:
        raise CachePlanError(f"--cache-budget {text!r}: expected a size like 8GiB, 500MB or 2e9") from None
    if not value > 0 or value != value:
        raise CachePlanError(f"--cache-budget {text!r}: must be a positive size")
    return int(value)


def default_budget() -> int:
    """Half the machine's RAM (at least 1 GiB) when the OS tells us; else 4 GiB."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(2**30, int(pages // 2))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


__all__ = [
    "CACHE_MODES",
    "CachePlan",
    "EVAL_BATCH_COPIES",
    "FIXED_OVERHEAD_BYTES",
    "TRAIN_BATCH_COPIES",
    "budget_from_text",
    "default_budget",
    "memory_overhead",
    "plan_cache",
    "training_batches",
]
