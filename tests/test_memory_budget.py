"""Peak RSS of a streamed probe follows its cache budget on a store several times larger (issue 24).

A fresh process trains and evaluates on a store five times the budget; its peak RSS, less what it held after
its imports, must stay under the budget plus the stated overhead (probe.data.stream_overhead_bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from store_schema import StoreLayout
from storefactory import vtab_like_splits, write_store

L, GRID, D = 12, (7, 7), 192  # 226 KB a row in float16
BUDGET = 48 * 2**20
BATCH = 16

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from probe.data import SplitSource, memory_overhead
    from probe.run import ProbeConfig, run_probe
    from probe.stores import align_tasks, open_stores

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))

    store, out, budget, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    aligned = align_tasks(open_stores([store]), "task")
    baseline = status("VmRSS")
    cfg = ProbeConfig(stores=(store,), dataset="synthetic", protocol="final", steps=40, batch_size=batch, width=16,
                      depth=1, num_heads=2, device="cpu", out=out, cache="auto", cache_budget=budget)
    run = run_probe(cfg)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "cache": run.metrics[0]["cache"],
                      "window": run.metrics[0]["shuffle_window"],
                      "n": run.metrics[0]["n"], "overhead": memory_overhead(SplitSource(aligned, aligned.rows("train800val200")), batch_size=batch)}))
""")


def test_streamed_probe_peak_rss_stays_under_budget_plus_overhead(tmp_path):
    rng = np.random.default_rng(0)
    n = (400, 100, 600)  # train800 / val200 / test rows: 1,100 rows = 250 MB = 5.2x the budget
    labels = np.arange(sum(n)) % 4
    tokens = rng.standard_normal((sum(n), L, GRID[0] * GRID[1], D), dtype=np.float32).astype(np.float16)
    tokens[:, 6, :, :4] += np.eye(4, dtype=np.float16)[labels][:, None, :] * 2
    store = write_store(tmp_path / "s.zarr", tokens=tokens, labels=labels, splits=vtab_like_splits(*n), grid=GRID,
                        num_classes=4, layout=StoreLayout(shard_bytes=4 * 2**20))  # 18-row shards: windows fit the budget
    del tokens
    stored = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert stored > 4.5 * BUDGET
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(tmp_path / "runs"), str(BUDGET), str(BATCH)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cache"] == "stream" and result["n"] == 600, result
    growth = result["peak"] - result["baseline"]
    limit = BUDGET + result["overhead"]
    assert growth <= limit, (f"peak RSS grew {growth / 2**20:.0f} MiB over its baseline; budget "
                             f"{BUDGET / 2**20:.0f} MiB + stated overhead {result['overhead'] / 2**20:.0f} MiB")
