"""What the per-chunk checksum (crc32c) costs a reader, at three depths of the read path, in one run.

The same features (a random-init timm ViT over smooth random images, as benchmarks/store_layout.py) are
written twice through `store_schema.StoreWriter`: the format-2 default layout (zstd-1, crc32c on every
inner chunk) and the same layout without the checksum. Then, `--repeats` times, interleaved (order
alternating), each store is read shard by shard three ways, timed in CPU seconds of this process (all
threads; less sensitive to other load than wall time):

1. ``zarr``: ``array[s : s + rows]`` on the task's token array (decompression, checksum, copy);
2. ``TaskStore.read``: combo's reader (1 + the shard-completeness and never-written (NaN) checks);
3. ``+ normalise``: (2) then ComBo's per-(image, layer) normalisation in float32 (probe.align.normalise_maps),
   the least a probe does with what it reads.

Two measures of the cost, both ratios within one run:

- *paired*: per repeat, (CPU with checksum - without) / without. Honest but noisy: the difference of two
  timings a few percent apart on a shared 2-core machine (its interquartile range is printed). Beside it,
  *best of N*: the fastest read with the checksum over the fastest without (interference only ever adds
  time, so each variant's minimum is its least disturbed run, as `timeit` reports).
- *attributed*: during the reads of the checksummed store, the time spent inside crc32c itself (zarr's
  codec calls `google_crc32c.value`, wrapped here with a timer), over that read's CPU time. It measures
  the checksum where it runs, on inner chunks just read and still in cache.

The floor printed below is crc32c's own speed over one inner chunk (the unit the decoder checks).

Last, the threaded decode: wall-clock MB/s of `TaskStore.read` at 1, 2 and all decode threads, per store.

    python benchmarks/checksum_cost.py [--images 96] [--model vit_small_patch16_224] [--repeats 25]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr.codecs.crc32c_ as crc_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe.align import normalise_maps  # noqa: E402
from store_schema import shardread  # noqa: E402
from store_layout import features  # noqa: E402
from store_schema import (BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, StoreLayout, StoreWriter,  # noqa: E402
                          build_sample_table, open_store)


def write_store(path: Path, data: np.ndarray, layout: StoreLayout) -> None:
    n, layers, tokens, dim = data.shape
    grid = int(round(tokens ** 0.5))
    info = StoreInfo(
        backbone=BackboneInfo(alias="bench", timm_name="bench", pretrained_tag=None, weights_source="random-init",
                              weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3),
        features=FeatureInfo(token_grid=(grid, grid), num_prefix_tokens=0, layers=tuple(range(layers)), feature_dim=dim),
        dataset="bench")
    table = build_sample_table(sample_ids=[f"x/{i:05d}" for i in range(n)], labels=[i % 2 for i in range(n)],
                               splits=[("train",)] * n, split_names=["train"])
    with StoreWriter(path, info, layout) as writer:
        tw = writer.task("task", samples=table, num_layers=layers, num_tokens=tokens, feature_dim=dim, num_prefix_tokens=0,
                         protocols={"final": ("train", "train")}, classes=["a", "b"])
        for b in tw.pending():
            r = tw.blocks[b]
            tw.write_block(b, data[r.start:r.stop])
        tw.finalize()


class CrcTimer:
    """Stands in for the `google_crc32c` module inside zarr's crc32c codec, adding up the seconds spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def value(self, data: object) -> int:
        started = time.perf_counter()
        out = google_crc32c.value(data)
        spent = time.perf_counter() - started
        with self._lock:
            self.seconds += spent
        return out


def read_all(path: Path, how: str) -> float:
    task = open_store(path).task("task")
    rows = task.rows_per_shard
    n = task.num_samples
    started = time.process_time()
    for s in range(0, n, rows):
        if how == "zarr":
            task.tokens[s : s + rows]
        else:
            x = task.read(slice(s, min(s + rows, n)))
            if how == "+ normalise":
                normalise_maps(torch.from_numpy(x).float())
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    data = features(args.images, args.model)
    work = Path(tempfile.mkdtemp(prefix="checksum-cost-"))
    try:
        stores = {"crc32c": work / "ck.zarr", "none": work / "no.zarr"}
        write_store(stores["crc32c"], data, StoreLayout())
        write_store(stores["none"], data, replace(StoreLayout(), checksum=False))
        hows = ("zarr", "TaskStore.read", "+ normalise")
        costs: dict[str, list[float]] = {h: [] for h in hows}
        attributed: dict[str, list[float]] = {h: [] for h in hows}
        timer = CrcTimer()
        cpu: dict[tuple[str, str], list[float]] = {(h, k): [] for h in hows for k in stores}
        for r in range(args.repeats):
            for how in hows:
                order = list(stores) if r % 2 == 0 else list(reversed(stores))
                seconds = {}
                for k in order:
                    timer.seconds = 0.0
                    crc_module.google_crc32c = shardread.google_crc32c = timer if k == "crc32c" else google_crc32c
                    try:
                        seconds[k] = read_all(stores[k], how)
                    finally:
                        crc_module.google_crc32c = shardread.google_crc32c = google_crc32c
                    if k == "crc32c":
                        attributed[how].append(timer.seconds / seconds[k])
                for k, v in seconds.items():
                    cpu[(how, k)].append(v)
                costs[how].append((seconds["crc32c"] - seconds["none"]) / seconds["none"])
        # the floor: crc32c over one inner chunk's worth of compressed bytes (one layer of a shard), the unit
        # the decoder checks right after reading it, against the read without checksum
        task = open_store(stores["none"]).task("task")
        rows = task.rows_per_shard
        blob = next(p for p in (stores["crc32c"] / "task" / "tokens" / "c").rglob("*") if p.is_file()).read_bytes()
        chunk = blob[: len(blob) // data.shape[1]]
        t = time.perf_counter()
        for _ in range(20 * data.shape[1]):
            google_crc32c.value(chunk)
        crc_gbps = 20 * data.shape[1] * len(chunk) / (time.perf_counter() - t) / 1e9
        raw = data.nbytes
        print(f"{args.model}, random init: {data.shape} float16, {raw / 1e6:.0f} MB raw, {rows} rows/shard; "
              f"CPU seconds, {args.repeats} interleaved repeats\n")
        print("| read path | MB/s, no checksum (median) | MB/s, crc32c (median) | paired cost: median [IQR] "
              "| best of N | attributed cost: median [IQR] |")
        print("|---|---|---|---|---|---|")
        for how in hows:
            q = statistics.quantiles(costs[how], n=4)
            a = statistics.quantiles(attributed[how], n=4)
            no = raw / statistics.median(cpu[(how, 'none')]) / 1e6
            ck = raw / statistics.median(cpu[(how, 'crc32c')]) / 1e6
            print(f"| {how} | {no:.0f} | {ck:.0f} | {100 * statistics.median(costs[how]):+.1f}% "
                  f"[{100 * q[0]:+.1f}, {100 * q[2]:+.1f}] "
                  f"| {100 * (min(cpu[(how, 'crc32c')]) / min(cpu[(how, 'none')]) - 1):+.1f}% "
                  f"| {100 * statistics.median(attributed[how]):.2f}% "
                  f"[{100 * a[0]:.2f}, {100 * a[2]:.2f}] |")
        zarr_no = raw / statistics.median(cpu[("zarr", "none")]) / 1e9
        print(f"\ncrc32c on this CPU: {crc_gbps:.1f} GB/s over {len(chunk) / 1e6:.1f} MB (one inner chunk); "
              f"floor of its cost on the zarr read (compressed/raw {sum(p.stat().st_size for p in (stores['crc32c'] / 'task' / 'tokens' / 'c').rglob('*') if p.is_file()) / raw:.2f}): "
              f"{100 * zarr_no * 0.92 / crc_gbps:.1f}%")
        # threaded decode (store_schema/shardread.py): wall-clock MB/s of TaskStore.read at 1, 2 and all threads
        print("\n| TaskStore.read, wall MB/s (best of 3) | " + " | ".join(f"{t} thread(s)" for t in thread_counts()) + " |")
        print("|---|" + "---|" * len(thread_counts()))
        for k in stores:
            rates = []
            for threads in thread_counts():
                shardread.set_read_threads(threads)
                rates.append(max(raw / wall_read(stores[k]) / 1e6 for _ in range(3)))
            shardread.set_read_threads(None)
            print(f"| {k} | " + " | ".join(f"{r:.0f} ({r / rates[0]:.2f}x)" for r in rates) + " |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def thread_counts() -> list[int]:
    import os

    return sorted({1, 2, os.cpu_count() or 1})


def wall_read(path: Path) -> float:
    task = open_store(path).task("task")
    rows, n = task.rows_per_shard, task.num_samples
    started = time.perf_counter()
    for s in range(0, n, rows):
        task.read(slice(s, min(s + rows, n)))
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
