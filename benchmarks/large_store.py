"""Does `combo probe`'s memory follow its cache budget on a store larger than RAM, and does it read at disk speed?

Writes a ViT-B-geometry store (12 layers x 196 tokens x 768 channels, float16, synthetic features with a class
signal) through `store_schema`: `--train-rows` train800val200 rows (80% of them train800) and `--test-rows` test rows;
the default test split makes the store larger than this machine's RAM. Then, each in a fresh process, in one run:

1. a plain sequential read of the same shard files, with O_DIRECT (the disk) and through the page cache;
2. `combo probe --stores STORE --task big --protocol final --steps N` at the default budget (half the RAM) and at
   `--budget` (default 2GiB), each reporting peak RSS against the budget, user and system time, minor page faults,
   train steps/s, test images/s, and the bytes it read against the O_DIRECT rate.

    python benchmarks/large_store.py [--test-rows 7000] [--train-rows 1000] [--steps 20] [--budget 2GiB]
                                     [--store /path/big.zarr (kept; reused when it exists)] [--skip-default]

Peak RSS comes from the child's rusage (ru_maxrss); times and faults from the same. The store is removed at the end
unless `--store` names where to keep it.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, GRID, DIM = 12, 14, 768


def write_store(path: Path, *, train_rows: int, test_rows: int, classes: int = 10, layers: int = LAYERS,
                grid: int = GRID, dim: int = DIM) -> Path:
    """The store, shard by shard (the writer's own layout: 32 MiB raw shards, zstd-1, crc32c)."""
    from store_schema import StoreLayout, StoreWriter, build_sample_table
    from synthetic_store import synthetic_info

    rng = np.random.default_rng(0)
    total = train_rows + test_rows
    labels = np.arange(total) % classes
    directions = rng.standard_normal((classes, dim)).astype(np.float16)
    splits = [("train800", "train800val200") if i < 0.8 * train_rows else ("val200", "train800val200")
              for i in range(train_rows)] + [("test",)] * test_rows
    info = synthetic_info(alias="big", dataset="big", grid=(grid, grid), layers=layers, dim=dim)
    table = build_sample_table(sample_ids=[f"big/{i:07d}" for i in range(total)], labels=list(labels), splits=splits,
                               split_names=("train800", "val200", "train800val200", "test"))
    # one pool of noise, sliced at random offsets: generating fresh normals would take longer than compressing them
    pool = rng.standard_normal(64 * layers * grid * grid * dim, dtype=np.float32).astype(np.float16)
    row = layers * grid * grid * dim
    with StoreWriter(path, info, StoreLayout()) as writer:
        tw = writer.task("big", samples=table, num_layers=layers, num_tokens=grid * grid, feature_dim=dim,
                         num_prefix_tokens=0, protocols={"final": ("train800val200", "test"), "dev": ("train800", "val200")},
                         classes=[str(c) for c in range(classes)])
        started = time.perf_counter()
        for b in tw.pending():
            r = tw.blocks[b]
            starts = rng.integers(0, pool.size - row, size=len(r))
            x = np.stack([pool[s:s + row] for s in starts]).reshape(len(r), layers, grid * grid, dim)
            x += directions[labels[r.start:r.stop]][:, None, None, :]
            tw.write_block(b, x, None)
            if b % 100 == 0:
                print(f"  wrote shard {b}/{len(tw.blocks)} ({time.perf_counter() - started:.0f} s)", flush=True)
        tw.finalize()
    return path


def shard_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "big" / "tokens" / "c").rglob("*") if p.is_file())


def drop_cache(files: list[Path]) -> None:
    """Ask the kernel to forget these files' pages (so the next read comes from the disk)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path], *, direct: bool, limit_bytes: int) -> tuple[int, float]:
    """Bytes and seconds of reading the files front to back in 4 MiB requests (O_DIRECT: aligned buffer)."""
    block = 4 * 2**20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    done, started = 0, time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while True:
                n = os.readv(fd, [buf])
                done += n
                if n < block:
                    break
        finally:
            os.close(fd)
        if done >= limit_bytes:
            break
    return done, time.perf_counter() - started


def threaded_reads(store: Path, files: list[Path], *, limit_bytes: int) -> dict[int, float]:
    """On-disk bytes per second of reading the test split through `TaskStore.read` (a shard's worth of rows per
    call, as the evaluation stream reads) with 1, 2 and all cores' decode threads, each from a cold cache."""
    from store_schema import open_store
    from store_schema.shardread import set_read_threads

    task = open_store(store).task("big")
    rows = task.rows("test")
    per_row = sum(f.stat().st_size for f in files) / task.num_samples
    step = 4 * task.rows_per_shard
    rows = rows[: max(step, int(limit_bytes // per_row) // step * step)]
    rates: dict[int, float] = {}
    for threads in sorted({1, 2, os.cpu_count() or 1}):
        set_read_threads(threads)
        drop_cache(files)
        started = time.perf_counter()
        for s in range(0, rows.size, step):
            task.read(rows[s:s + step])
        rates[threads] = rows.size * per_row / (time.perf_counter() - started)
    set_read_threads(None)
    return rates


def run_probe(store: Path, *, budget: str | None, steps: int, workdir: Path, env: dict[str, str]) -> dict:
    out = workdir / f"runs-{budget or 'default'}"
    cmd = [sys.executable, "-m", "combo.cli", "probe", "--stores", str(store), "--task", "big", "--protocol", "final",
           "--steps", str(steps), "--out", str(out)]
    if budget:
        cmd += ["--cache-budget", budget]
    started = time.perf_counter()
    log = workdir / f"probe-{budget or 'default'}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS, times, faults)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    output = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"probe failed ({proc.returncode}):\n{output[-3000:]}")
    import pyarrow.parquet as pq

    task = pq.read_table(next(out.glob("*/metrics.parquet"))).to_pylist()[0]
    plan = next((line for line in output.splitlines() if "cache " in line), "")
    return {
        "budget": budget or "default",
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "minor_faults": usage.ru_minflt,
        "peak_rss": usage.ru_maxrss * 1024,
        "train_seconds": task.get("train_seconds"),
        "seconds": task.get("seconds"),
        "n": task.get("n"),
        "accuracy": task.get("accuracy"),
        "plan": plan.strip(),
        "output": output[-2000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=7000, help="test rows (default: a store larger than 24 GiB of RAM)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", default="2GiB", help="the small cache budget (the other run uses the default)")
    parser.add_argument("--store", type=Path, default=None, help="where to write the store (kept; reused if complete)")
    parser.add_argument("--skip-default", action="store_true", help="only the run at --budget")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="large_store-"))
    store = args.store or tmp / "big.zarr"
    try:
        if not (store / "zarr.json").exists():
            print(f"writing {args.train_rows} + {args.test_rows} rows of 12 x 196 x 768 float16 to {store}", flush=True)
            started = time.perf_counter()
            write_store(store, train_rows=args.train_rows, test_rows=args.test_rows)
            print(f"written in {time.perf_counter() - started:.0f} s", flush=True)
        files = shard_files(store)
        on_disk = sum(f.stat().st_size for f in files)
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        print(f"store: {len(files)} token shards, {on_disk / 1e9:.2f} GB on disk; RAM {ram / 2**30:.1f} GiB")
        sample = min(on_disk, 4 * 2**30)
        drop_cache(files)
        n, s = sequential_read(files, direct=True, limit_bytes=sample)
        direct_rate = n / s
        drop_cache(files)
        n, s = sequential_read(files, direct=False, limit_bytes=sample)
        cached_rate = n / s
        print(f"plain sequential read of {n / 1e9:.2f} GB: O_DIRECT {direct_rate / 1e6:.0f} MB/s, "
              f"page cache (cold) {cached_rate / 1e6:.0f} MB/s")
        threaded = threaded_reads(store, files, limit_bytes=sample)
        for threads, rate in threaded.items():
            print(f"TaskStore.read of the test split (cold cache), {threads} decode thread(s): {rate / 1e6:.0f} MB/s read "
                  f"= {rate / direct_rate:.2f} x O_DIRECT, {rate / cached_rate:.2f} x page-cache sequential "
                  f"({rate / threaded[1]:.2f} x 1 thread)")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        runs = []
        for budget in ([] if args.skip_default else [None]) + [args.budget]:
            drop_cache(files)
            r = run_probe(store, budget=budget, steps=args.steps, workdir=tmp, env=env)
            runs.append(r)
            read_rate = on_disk / max(1e-9, r["wall_s"])
            print(f"\nprobe --cache-budget {r['budget']}: {r['plan']}")
            print(f"  peak RSS {r['peak_rss'] / 2**30:.2f} GiB; wall {r['wall_s']:.0f} s, user {r['user_s']:.0f} s, "
                  f"system {r['sys_s']:.0f} s ({100 * r['sys_s'] / max(1e-9, r['user_s'] + r['sys_s']):.1f}% of CPU time), "
                  f"{r['minor_faults'] / 1e6:.2f} M minor faults")
            test_s = (r["seconds"] or 0) - (r["train_seconds"] or 0)
            print(f"  train {args.steps / max(1e-9, r['train_seconds'] or 0):.2f} steps/s; test {r['n']} images in "
                  f"{test_s:.0f} s = {r['n'] / max(1e-9, test_s):.1f} images/s; whole store / wall = "
                  f"{read_rate / 1e6:.0f} MB/s = {read_rate / direct_rate:.2f} x O_DIRECT")
        print(json.dumps({"direct_rate": direct_rate, "cached_rate": cached_rate, "on_disk": on_disk,
                          "threaded": threaded,
                          "runs": [{k: v for k, v in r.items() if k != "output"} for r in runs]}))
    finally:
        if args.store is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
