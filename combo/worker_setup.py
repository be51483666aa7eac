"""What every combo process sets up for its memory: the `combo` command itself (`tensor_huge_pages`) and every dask
worker of a run (both functions; registered by combo/cluster.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Undo, in this process, dask's `MALLOC_TRIM_THRESHOLD_=65536` (its nanny sets it for every worker so that
    freed memory goes back to the OS at once). That setting also pins glibc's mmap threshold at 128 KiB, so
    every activation tensor of a forward pass is mmapped, page-faulted and unmapped again: +25-45% time per
    ViT-S forward on CPU, measured (benchmarks/RESULTS.md, scale_extract). Raises both thresholds back to
    what glibc would reach by itself; True when it did (glibc only, and only where the variable is set)."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 * 2**20))


THP_ENV = "THP_MEM_ALLOC_ENABLE"


def tensor_huge_pages() -> bool:
    """Let torch back its large CPU tensors with transparent huge pages (its `THP_MEM_ALLOC_ENABLE`), unless the
    user chose otherwise. A batch's float32 copy and the adapter's activations are fresh allocations of tens to
    hundreds of MiB every step, above glibc's largest mmap threshold (32 MiB), so each is faulted in anew: in 4 KiB
    pages that was 3.7 M minor faults in a 5-step ViT-B probe; in 2 MiB pages 0.25 M, and 15 s instead of 18 s of
    system time (benchmarks/large_store.py, RESULTS.md). Torch reads the variable at its first large allocation,
    so this must run before any. True when it set it."""
    if THP_ENV in os.environ:
        return False
    os.environ[THP_ENV] = "1"
    return True


class KeepFreedMemory(WorkerPlugin):
    """`keep_freed_memory` on every worker, including those that join or are restarted later."""

    name = "combo-keep-freed-memory"

    def setup(self, worker: Any) -> None:
        keep_freed_memory()
        tensor_huge_pages()
