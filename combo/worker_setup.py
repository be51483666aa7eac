"""What every dask worker of a combo run sets up in its own process (registered by combo/cluster.py)."""

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


class KeepFreedMemory(WorkerPlugin):
    """`keep_freed_memory` on every worker, including those that join or are restarted later."""

    name = "combo-keep-freed-memory"

    def setup(self, worker: Any) -> None:
        keep_freed_memory()
