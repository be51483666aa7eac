"""Does streaming from the store cost training speed, and does it bound memory?

1. Speed: the same ComBo adapter trained on the same split, (a) from tensors already in memory
   (`cache ram`) and (b) streamed from the store with a budget a quarter of the split
   (`cache stream`: shuffle windows read in a background thread). Prints steps/s of each and
   stream / memory (target >= 0.95). Modes alternate over `--repeats` rounds; medians are reported.
2. Memory: peak RSS (VmHWM) of a fresh process training two epochs in `stream` mode, with the
   split several times the budget (1 / `--budget-fraction`), against the same in `ram` mode and
   against training on one reused batch (the training's own memory). The data buffers alone
   (windows, batches, zarr's decode buffers: numpy/Python allocations) are measured with
   tracemalloc. RSS also holds freed blocks that glibc keeps in per-thread malloc arenas (the
   reader thread has its own); MALLOC_ARENA_MAX=2 shows the difference.

3. With ``--compact FORMAT`` (e.g. ``int8`` or ``pca:64,int8``): the same store compacted
   (store_schema.compactor), its stream / memory steps/s, and its streamed steps/s over the float16
   store's streamed steps/s (issue 9's goal: >= 1.0; the probe decodes each batch where it trains).
   Memory is then measured on the compact store.

    python benchmarks/probe_stream.py [--rows 1024] [--grid 7] [--layers 12] [--dim 192] [--steps 12]
                                      [--threads 1] [--repeats 3] [--budget-fraction 0.33] [--compact pca:64,int8]

Each measurement runs in a subprocess, so RSS figures are per mode and unaffected by the others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_synthetic_store(path: Path, *, rows: int, layers: int, grid: int, dim: int, classes: int = 10) -> Path:
    """Token maps with a class signal, float16, the default layout (zstd, 32-row shards)."""
    from store_schema import StoreLayout, StoreWriter, build_sample_table
    from synthetic_store import synthetic_info

    rng = np.random.default_rng(0)
    n_test = max(64, rows // 8)
    total = rows + n_test
    labels = np.arange(total) % classes
    directions = rng.standard_normal((classes, dim)).astype(np.float32)
    # the first 80% of the training rows are also "train800" (as in VTAB-1k): PCA compaction fits on them
    splits = [("train800", "train800val200") if i < 0.8 * rows else ("train800val200",) for i in range(rows)]
    splits += [("test",)] * n_test
    info = synthetic_info(alias="bench", dataset="bench", grid=(grid, grid), layers=layers, dim=dim)
    table = build_sample_table(sample_ids=[f"bench/{i:06d}" for i in range(total)], labels=list(labels), splits=splits,
                               split_names=("train800", "train800val200", "test"))
    with StoreWriter(path, info, StoreLayout()) as writer:
        tw = writer.task("bench", samples=table, num_layers=layers, num_tokens=grid * grid, feature_dim=dim,
                         num_prefix_tokens=0, protocols={"final": ("train800val200", "test")},
                         classes=[str(c) for c in range(classes)])
        for b in tw.pending():
            r = tw.blocks[b]
            x = rng.standard_normal((len(r), layers, grid * grid, dim)).astype(np.float32)
            x += 0.5 * directions[labels[r.start:r.stop]][:, None, None, :]
            tw.write_block(b, x.astype(np.float16), None)
        tw.finalize()
    return path


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from probe.adapter import ComboAdapter, ComboConfig
    from probe.data import plan_cache, training_batches
    from probe.stores import align_tasks, open_stores
    from probe.train import TrainConfig, set_seed, train_steps

    aligned = align_tasks(open_stores([args.store]), "bench")
    from probe.data import SplitSource

    source = SplitSource(aligned, aligned.rows("train800val200"))
    split_bytes = source.n * source.row_bytes()
    budget = int(split_bytes * args.budget_fraction)
    cpu = torch.device("cpu")
    from probe.run import combo_prepare

    prepare = combo_prepare(aligned, source, aligned.grids[0])  # as run_probe: a compact store is decoded here

    def model() -> torch.nn.Module:
        set_seed(0)
        return ComboAdapter(ComboConfig(num_layers=aligned.layers_per_backbone[0], feature_dim=aligned.feature_dims[0],
                                        num_tokens=source.task.grids[0][0] * source.task.grids[0][1], num_classes=10))

    def run(mode: str, steps: int) -> tuple[float, object]:
        if mode == "none":  # the training's own memory: one batch, served again and again
            import itertools

            from probe.data import CachePlan

            plan = CachePlan(mode="none", window_rows=None, split_bytes=0)
            one = SplitSource(aligned, source.rows[: args.batch_size])
            batch = ([torch.from_numpy(a) for a in one.read(np.arange(one.n))], torch.from_numpy(one.labels.astype(np.int64)))
            batches = (b for b in itertools.repeat(batch))
        else:
            plan = plan_cache(source, mode=mode, budget_bytes=budget if mode == "stream" else 2 * split_bytes,
                              device=cpu, batch_size=args.batch_size)
            batches = training_batches(source, plan, batch_size=args.batch_size, seed=0, device=cpu)
        net = model()
        next(batches)  # a cached mode reads the whole split here; a stream starts its reader thread
        started = time.perf_counter()
        train_steps(net, batches, TrainConfig(steps=steps, batch_size=args.batch_size), device=cpu, prepare=prepare)
        seconds = time.perf_counter() - started
        batches.close()
        return steps / seconds, plan

    if args.child == "speed":
        run("ram", 3)
        run("stream", 3)  # warm-up: allocator, kernels, page cache
        rates: dict[str, list[float]] = {"ram": [], "stream": []}
        plan = None
        for _ in range(args.repeats):
            for mode in ("ram", "stream"):
                rate, p = run(mode, args.steps)
                rates[mode].append(rate)
                plan = p if mode == "stream" else plan
        print(json.dumps({"rates": rates, "window": plan.window_rows, "n": source.n, "split_bytes": split_bytes,
                          "budget": budget}))
    else:  # rss: one mode, one fresh process, enough steps to pass every window
        import tracemalloc

        before = _rss_kib("VmRSS")
        steps = args.rss_steps or -(-source.n // args.batch_size) * 2
        tracemalloc.start()  # numpy and Python buffers (windows, batches, zarr's decode buffers), not torch's
        rate, plan = run(args.child, steps)
        _, traced_peak = tracemalloc.get_traced_memory()
        print(json.dumps({"mode": plan.mode, "window": plan.window_rows, "baseline_kib": before,
                          "peak_kib": _rss_kib("VmHWM"), "split_bytes": split_bytes, "budget": budget, "steps": steps,
                          "traced_peak": traced_peak}))


def spawn(args: argparse.Namespace, mode: str, store: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--store", str(store), "--threads", str(args.threads),
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
           "--budget-fraction", str(args.budget_fraction)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="training rows in the store")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the reader thread comes on top)")
    parser.add_argument("--budget-fraction", type=float, default=0.33, help="cache budget / split size for stream")
    parser.add_argument("--compact", default=None, help="also measure a compact copy (e.g. int8, pca:64,int8)")
    parser.add_argument("--rss-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic_store(Path(tmp) / "bench.zarr", rows=args.rows, layers=args.layers, grid=args.grid,
                                      dim=args.dim)
        fp16_speed = None
        if args.compact:
            from store_schema.compact import CompactSpec
            from store_schema.compactor import compact_store

            fp16_speed = spawn(args, "speed", store)
            store = compact_store(store, Path(tmp) / "bench-compact.zarr", CompactSpec.parse(args.compact)).store
        on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        speed = spawn(args, "speed", store)
        ram = spawn(args, "ram", store)
        stream = spawn(args, "stream", store)
        none = spawn(args, "none", store)
    mib = 2**20
    ram_rate, stream_rate = (statistics.median(speed["rates"][m]) for m in ("ram", "stream"))
    kind = f"compact {args.compact}" if args.compact else "float16"
    print(f"split: {speed['n']} rows x [{args.layers}, {args.grid}x{args.grid}, {args.dim}] {kind} = "
          f"{speed['split_bytes'] / mib:.1f} MiB ({on_disk / mib:.1f} MiB on disk); ComBo 128x6, batch {args.batch_size}, "
          f"torch threads {args.threads}")
    print(f"stream budget {speed['budget'] / mib:.1f} MiB ({args.budget_fraction:g} of the split) -> shuffle window "
          f"{speed['window']} rows")
    print(f"steps/s in memory: {ram_rate:.2f}  streamed: {stream_rate:.2f}  (rounds: ram {speed['rates']['ram']}, "
          f"stream {speed['rates']['stream']})")
    print(f"stream / memory steps/s = {stream_rate / ram_rate:.3f}  (target >= 0.95)")
    if fp16_speed is not None:
        fp16_ram, fp16_stream = (statistics.median(fp16_speed["rates"][m]) for m in ("ram", "stream"))
        print(f"float16 store: steps/s in memory {fp16_ram:.2f}, streamed {fp16_stream:.2f} "
              f"({fp16_speed['split_bytes'] / mib:.1f} MiB read per epoch)")
        print(f"compact / float16 steps/s: streamed {stream_rate / fp16_stream:.3f}, in memory {ram_rate / fp16_ram:.3f}"
              f"  (target >= 1.0)")
    growth = {name: (r["peak_kib"] - r["baseline_kib"]) * 1024 for name, r in (("ram", ram), ("stream", stream), ("none", none))}
    for name, r in (("ram", ram), ("stream", stream), ("none", none)):
        what = {"none": "one batch reused (the training's own memory)"}.get(name, f"{name} mode")
        print(f"peak RSS, {what}: {r['peak_kib'] / 1024:.0f} MiB (after imports {r['baseline_kib'] / 1024:.0f} MiB, "
              f"+{growth[name] / mib:.0f} MiB over {r['steps']} steps = {r['steps'] * args.batch_size / speed['n']:.1f} epochs)")
    for name, r in (("ram", ram), ("stream", stream)):
        data = growth[name] - growth["none"]
        print(f"{name:6s} mode: data buffers at peak (tracemalloc: numpy/zarr, not torch) {r['traced_peak'] / mib:.0f} MiB = "
              f"{r['traced_peak'] / speed['budget']:.2f} x stream budget; RSS growth less the training's own "
              f"{data / mib:.0f} MiB = {data / speed['budget']:.2f} x stream budget")
    print(f"store / budget = {speed['split_bytes'] / speed['budget']:.1f}x")


if __name__ == "__main__":
    main()
