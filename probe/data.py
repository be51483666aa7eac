"""Feeding stored features to training: in RAM, on the GPU, or streamed with bounded memory.

This module only gathers the names that live in the modules below, so `probe.data` keeps importing as before:

- probe/source.py: `SplitSource`, the split a fit reads (positions -> stored rows, per part of the task), and
  `Batch`;
- probe/nonfinite.py: the checks that refuse rows reading NaN or inf (`non_finite_error`, `_all_finite`);
- probe/epochorder.py: the epoch order, its shuffle windows and pieces (`epoch_order`, `epoch_windows`,
  `piece_rows`, `label_clustered`): why every cache mode trains on the same batches;
- probe/cachedbatches.py: training batches from a split held whole (`cached_batches`, `read_all`);
- probe/stream.py: training batches streamed window by window (`stream_batches`) and what streaming holds in
  RAM (`STREAM_WINDOWS_IN_RAM`, `STREAM_BATCHES_IN_RAM`);
- probe/prefetch.py: the background reader thread both streams use (`Prefetcher`);
- probe/evalbatches.py: evaluation batches in stored order (`eval_batches`, `eval_batch_rows`, `direct_reads`,
  `EVAL_BATCH_SIZE`, `EVAL_BATCH_BYTES`, `EVAL_BATCHES_IN_RAM`);
- probe/cacheplan.py: where the training split lives and what RAM that takes (`plan_cache`, `CachePlan`,
  `memory_overhead` and its constants, `CACHE_MODES`), the batches a plan feeds (`training_batches`) and the
  cache budget (`budget_from_text`, `default_budget`);
- probe/cacheerror.py: `CachePlanError`.

A test that replaces one of these functions patches the module it lives in (a name replaced here would not be
seen by the code that calls it).
"""

from __future__ import annotations

from .cachedbatches import cached_batches, read_all
from .cacheerror import CachePlanError
from .cacheplan import (CACHE_MODES, EVAL_BATCH_COPIES, FIXED_OVERHEAD_BYTES, TRAIN_BATCH_COPIES, CachePlan,
                        budget_from_text, default_budget, memory_overhead, plan_cache, training_batches)
from .epochorder import epoch_order, epoch_windows, label_clustered, piece_rows
from .evalbatches import (EVAL_BATCH_BYTES, EVAL_BATCH_SIZE, EVAL_BATCHES_IN_RAM, direct_reads, eval_batch_rows,
                          eval_batches)
from .nonfinite import _all_finite, non_finite_error
from .prefetch import Prefetcher
from .source import Batch, SplitSource
from .stream import STREAM_BATCHES_IN_RAM, STREAM_WINDOWS_IN_RAM, stream_batches

# every name other modules, tests and benchmarks import from here (the public names of before, and the
# constants and checks they also took from this module)
__all__ = [
    "Batch",
    "CACHE_MODES",
    "CachePlan",
    "CachePlanError",
    "EVAL_BATCHES_IN_RAM",
    "EVAL_BATCH_BYTES",
    "EVAL_BATCH_COPIES",
    "EVAL_BATCH_SIZE",
    "FIXED_OVERHEAD_BYTES",
    "Prefetcher",
    "STREAM_BATCHES_IN_RAM",
    "STREAM_WINDOWS_IN_RAM",
    "SplitSource",
    "TRAIN_BATCH_COPIES",
    "_all_finite",
    "budget_from_text",
    "cached_batches",
    "default_budget",
    "direct_reads",
    "epoch_order",
    "epoch_windows",
    "eval_batch_rows",
    "eval_batches",
    "label_clustered",
    "memory_overhead",
    "non_finite_error",
    "piece_rows",
    "plan_cache",
    "read_all",
    "stream_batches",
    "training_batches",
]
