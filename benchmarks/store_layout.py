"""Store format 1 vs format 2 token-array layouts, measured the way the two readers read.

For the old format-1 default (32 rows per shard, inner chunks of 8 rows x 1 layer, zstd-1, no
checksum) and the format-2 candidates (shards sized by raw bytes: 16, 32 (the default) and
64 MiB; one inner chunk = all of a shard's rows x 1 layer; zstd-1 with its frame checksum; and
the default without the checksum), one run prints side by side:

* rows per shard and bytes per image on disk (shard files only; ratio to raw float16 in brackets);
* write MB/s, writing one whole shard per assignment (how the packer writes);
* whole-shard read MB/s: every shard read as `array[s : s + rows_per_shard]`, all layers
  (a probe's pattern);
* one-layer read MB/s: `array[:, layer]` for every layer, MB/s over that layer's bytes
  (a per-layer study's pattern: atlas, linear probe);
* store requests: `get` calls (each byte range one request; `get_partial_values` counts each
  key/range) that zarr makes while reading, counted by a thin `zarr.storage.WrapperStore`
  around `LocalStore`, metadata (`zarr.json`) excluded. A partial read of a shard costs one
  request for the shard index plus one per inner chunk; a whole-shard read is one request.
* checksum cost: (read MB/s without checksum - with) / without, for both read patterns, by wall
  time and by CPU time of the process (all threads: less sensitive to other load); and
  the same in the codec alone (zstd-1 decode of one inner chunk with vs without its frame
  checksum, and what a crc32c over the compressed chunk would cost instead);
* threaded writes (store_schema/shardwrite.py, as `ShardWriter` writes): write MB/s of the default
  layout through zarr (`array[s : s + rows] = ...`, then each shard fsynced as the writer does) and
  through `write_shard` (temp file, fsync, rename) at 1, 2 and all cores' threads, the same data in
  the same run, each with its ratio to 1 thread; every file's bytes are checked equal to zarr's.

Reads are timed `--repeats` times, interleaved across layouts (order alternating each
repeat), and the median is printed, because the machine is noisy. Files are read from the
page cache right after writing, so read MB/s is decode cost (decompression, checksum, copy),
not disk speed. Features come from a random-init timm ViT over smooth random images (real
network activations, prefix tokens dropped; pretrained ones compress similarly or better).
Last, a computed table (no data) shows how big a shard gets under the old rule (fixed 32
rows) and under the byte targets, for a few ViTs (prefix token included): under format 2 the
shard no longer grows with the model.

    python benchmarks/store_layout.py [--images 64] [--model vit_small_patch16_224] [--repeats 5] [--no-write-threads]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import google_crc32c
import numpy as np
import torch
import timm
import zarr
from numcodecs import Zstd
from zarr.abc.store import ByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from store_schema import StoreLayout
from store_schema.shardwrite import write_shard

MiB = 2**20
OLD = StoreLayout(rows_per_shard=32, rows_per_chunk=8, layers_per_chunk=1, codec="zstd", clevel=1, checksum=False, fill_nan=False)
NEW = StoreLayout()  # format 2 default: 32 MiB shards, inner chunk = shard rows x 1 layer, zstd-1 + checksum
LAYOUTS = {
    "v1: 32 rows, inner 8x1L, zstd1": OLD,
    "v2: 16 MiB, inner rows x1L, zstd1+ck": replace(NEW, shard_bytes=16 * MiB),
    "v2: 32 MiB (default) zstd1+ck": NEW,
    "v2: 64 MiB, inner rows x1L, zstd1+ck": replace(NEW, shard_bytes=64 * MiB),
    "v2: 32 MiB, no checksum": replace(NEW, checksum=False),
}
CHECKSUM_PAIR = ("v2: 32 MiB (default) zstd1+ck", "v2: 32 MiB, no checksum")

# (name, layers, tokens incl. the prefix token, width), float16
MODELS = [
    ("ViT-S/16 224", 12, 197, 384),
    ("ViT-B/14 224 (DINOv2)", 12, 257, 768),
    ("ViT-L/14 224", 24, 257, 1024),
    ("ViT-g/14 224", 40, 257, 1536),
]


class CountingStore(WrapperStore[LocalStore]):
    """Counts the data requests zarr makes (metadata excluded); each byte range is one request."""

    def __init__(self, store: LocalStore, counts: Counter | None = None) -> None:
        super().__init__(store)
        self.counts = Counter() if counts is None else counts

    def _with_store(self, store: LocalStore) -> "CountingStore":
        return type(self)(store, self.counts)

    def _count(self, key: str, byte_range: ByteRequest | None) -> None:
        if key.endswith("zarr.json"):
            return
        self.counts["requests"] += 1
        self.counts["index" if isinstance(byte_range, SuffixByteRequest) else "data"] += 1

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        self._count(key, byte_range)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        for key, byte_range in key_ranges:
            self._count(key, byte_range)
        return await self._store.get_partial_values(prototype, key_ranges)


def features(n: int, model_name: str) -> np.ndarray:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=224).eval()
    g = torch.Generator().manual_seed(0)
    # smooth random images (low-frequency noise upsampled) look more like photos than white noise
    low = torch.rand(n, 3, 14, 14, generator=g)
    images = torch.nn.functional.interpolate(low, size=224, mode="bicubic", align_corners=False)
    images = (images - 0.5) / 0.25
    outs: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, n, 16):
            x = model.patch_embed(images[i : i + 16])
            x = model._pos_embed(x)
            layers = []
            for blk in model.blocks:
                x = blk(x)
                layers.append(x[:, model.num_prefix_tokens :])
            outs.append(torch.stack(layers, 1).half().numpy())
    return np.concatenate(outs)


def write(layout: StoreLayout, data: np.ndarray, path: Path) -> dict[str, Any]:
    shutil.rmtree(path, ignore_errors=True)
    array = zarr.create_array(LocalStore(path), **layout.array_kwargs(data.shape))
    rows = layout.rows_per_shard
    t = time.perf_counter()
    for s in range(0, data.shape[0], rows):
        array[s : s + rows] = data[s : s + rows]
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
    return {"write_MBps": data.nbytes / seconds / 1e6, "bytes_per_image": size / data.shape[0], "ratio": size / data.nbytes}


def shard_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted((path / "c").rglob("*")) if p.is_file()}


def write_threaded(layout: StoreLayout, data: np.ndarray, path: Path, threads: int | None) -> float:
    """Seconds to write every shard, durably: zarr's own write then an fsync (`threads` None), or `write_shard`."""
    shutil.rmtree(path, ignore_errors=True)
    array = zarr.create_array(LocalStore(path), **layout.array_kwargs(data.shape))
    rows = layout.rows_per_shard
    t = time.perf_counter()
    for block, s in enumerate(range(0, data.shape[0], rows)):
        shard = path / array.metadata.encode_chunk_key((block, 0, 0, 0))
        if threads is None:
            array[s : s + rows] = data[s : s + rows]
            with open(shard, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            assert write_shard(array, data[s : s + rows], shard, threads=threads)
    return time.perf_counter() - t


def threaded_writes(layout: StoreLayout, data: np.ndarray, tmp: Path, repeats: int) -> None:
    """Write MB/s through zarr and through shardwrite at 1, 2 and all threads; median of `repeats`, interleaved."""
    cores = os.cpu_count() or 1
    runs: dict[int | None, list[float]] = {None: [], **{n: [] for n in sorted({1, 2, cores})}}
    order = list(runs)
    for r in range(repeats):
        for threads in order if r % 2 == 0 else order[::-1]:
            runs[threads].append(write_threaded(layout, data, tmp / f"t{threads}.zarr", threads))
    reference = shard_files(tmp / "tNone.zarr")
    assert all(shard_files(tmp / f"t{n}.zarr") == reference for n in runs if n is not None), "bytes differ from zarr's"
    one, one_best = statistics.median(runs[1]), min(runs[1])
    print(f"\nThreaded shard writes, default layout ({layout.rows_per_shard} rows/shard, {len(reference)} shards, "
          f"{data.nbytes / 1e6:.0f} MB), each shard fsynced; {repeats} runs interleaved; {cores} cores; "
          "shard bytes identical to zarr's. MB/s: median (x 1 thread), best of the runs (x 1 thread's best)")
    for threads, seconds in runs.items():
        med, best = statistics.median(seconds), min(seconds)
        label = "zarr (array[...] = ..., fsync)" if threads is None else \
            f"shardwrite, {threads} thread{'s' if threads > 1 else ''}" + (" (all cores)" if threads == cores else "")
        each = ", ".join(f"{data.nbytes / x / 1e6:.0f}" for x in seconds)
        print(f"  {label:36s}: median {data.nbytes / med / 1e6:4.0f} ({one / med:.2f}x), "
              f"best {data.nbytes / best / 1e6:4.0f} ({one_best / best:.2f}x)  runs: {each}")


def store_write(data: np.ndarray, path: Path, threads: int | None) -> float:
    """Seconds of a whole task written through `StoreWriter` / `TaskWriter.write_block` (NaN check, cast, shard
    write, hash, journal fsync), as `combo extract` writes: zarr's shard write (`threads` None) or shardwrite's."""
    import store_schema.writer.shard as writer_module
    from store_schema import StoreWriter, build_sample_table
    from synthetic_store import synthetic_info

    shutil.rmtree(path, ignore_errors=True)
    n, num_layers, num_tokens, dim = data.shape
    grid = int(round(num_tokens ** 0.5))
    info = synthetic_info(alias="bench", dataset="bench", grid=(grid, num_tokens // grid), layers=num_layers, dim=dim)
    table = build_sample_table(sample_ids=[f"b/{i}" for i in range(n)], labels=[0] * n, splits=[("test",)] * n,
                               split_names=("test",))
    real = writer_module.write_shard
    if threads is None:
        writer_module.write_shard = lambda *a, **k: None  # every shard through zarr
    try:
        with StoreWriter(path, info, StoreLayout()) as writer:
            tw = writer.task("t", samples=table, num_layers=num_layers, num_tokens=num_tokens, feature_dim=dim,
                             num_prefix_tokens=0, protocols={"final": ("test", "test")}, classes=["a"])
            tw.shards.threads = threads or 1
            started = time.perf_counter()
            for b in tw.pending():
                r = tw.blocks[b]
                tw.write_block(b, data[r.start:r.stop])
            seconds = time.perf_counter() - started
            tw.finalize()
    finally:
        writer_module.write_shard = real
    return seconds


def store_writes(data: np.ndarray, tmp: Path, repeats: int) -> None:
    """End-to-end write MB/s through the store writer: zarr's shard write against shardwrite at 1, 2, all threads."""
    cores = os.cpu_count() or 1
    runs: dict[int | None, list[float]] = {None: [], **{n: [] for n in sorted({1, 2, cores})}}
    order = list(runs)
    for r in range(repeats):
        for threads in order if r % 2 == 0 else order[::-1]:
            runs[threads].append(store_write(data, tmp / f"w{threads}.zarr", threads))
    reference = shard_files(tmp / "wNone.zarr" / "t" / "tokens")
    assert all(shard_files(tmp / f"w{n}.zarr" / "t" / "tokens") == reference for n in runs), "bytes differ from zarr's"
    print(f"\nEnd to end, TaskWriter.write_block (as combo extract writes), {data.nbytes / 1e6:.0f} MB float16, "
          f"{repeats} runs interleaved; shard bytes identical. MB/s: median (x zarr)")
    base = statistics.median(runs[None])
    for threads, seconds in runs.items():
        label = "zarr's shard write" if threads is None else f"shardwrite, {threads} thread{'s' if threads > 1 else ''}"
        print(f"  {label:24s}: {data.nbytes / statistics.median(seconds) / 1e6:4.0f} ({base / statistics.median(seconds):.2f}x)")


def read(layout: StoreLayout, data: np.ndarray, path: Path) -> dict[str, float]:
    store = CountingStore(LocalStore(path, read_only=True))
    array = zarr.open_array(store, mode="r")
    n, num_layers = data.shape[:2]
    rows = layout.rows_per_shard
    shards = -(-n // rows)

    store.counts.clear()
    t, c = time.perf_counter(), time.process_time()
    for s in range(0, n, rows):
        block = array[s : s + rows]
    whole, whole_cpu = time.perf_counter() - t, time.process_time() - c
    assert np.array_equal(block, data[s : s + rows], equal_nan=True)
    whole_requests = store.counts["requests"] / shards

    store.counts.clear()
    t, c = time.perf_counter(), time.process_time()
    for layer in range(num_layers):
        one = array[:, layer]
    per_layer, per_layer_cpu = time.perf_counter() - t, time.process_time() - c
    assert np.array_equal(one, data[:, num_layers - 1], equal_nan=True)
    layer_requests = store.counts["requests"] / num_layers / shards
    layer_index = store.counts["index"] / num_layers / shards
    return {
        "whole_MBps": data.nbytes / whole / 1e6,
        "layer_MBps": data.nbytes / per_layer / 1e6,  # = (bytes of one layer) / (seconds per layer)
        "whole_cpu_MBps": data.nbytes / whole_cpu / 1e6,  # MB per CPU second (all threads): less hit by other load
        "layer_cpu_MBps": data.nbytes / per_layer_cpu / 1e6,
        "whole_requests": whole_requests,
        "layer_requests": layer_requests,
        "layer_index": layer_index,
    }


def codec_only(data: np.ndarray, rows: int, repeats: int) -> None:
    """The checksum's cost in the codec alone: decode of one inner chunk (one shard's rows x one layer)."""
    chunk = np.ascontiguousarray(data[:rows, data.shape[1] // 2]).tobytes()
    with_ck, without = Zstd(level=1, checksum=True), Zstd(level=1, checksum=False)
    frames = {"ck": with_ck.encode(chunk), "no": without.encode(chunk)}
    seconds: dict[str, list[float]] = {"ck": [], "no": [], "crc32c": []}
    for _ in range(repeats):
        for key in seconds:
            t = time.perf_counter()
            for _ in range(10):
                if key == "crc32c":
                    google_crc32c.value(frames["no"])  # zarr's Crc32cCodec checksums the compressed bytes
                else:
                    (with_ck if key == "ck" else without).decode(frames[key])
            seconds[key].append(time.perf_counter() - t)
    ck, no, crc = (statistics.median(seconds[k]) for k in ("ck", "no", "crc32c"))
    print(f"  codec alone, one {len(chunk) / 1e6:.1f} MB inner chunk: zstd-1 decode {len(chunk) * 10 / no / 1e6:.0f} MB/s; "
          f"+ frame checksum (xxh64) {(ck - no) / no * 100:+.1f}%; crc32c of the compressed chunk instead {crc / no * 100:+.1f}%")


def size_table() -> None:
    targets = (16, 32, 64)
    print("\nShard size by model, float16, prefix token included (computed, no data)")
    head = f"{'model':24s} {'L x T x D':>16s} {'MB/image':>8s} {'v1 rows':>7s} {'v1 shard MiB':>12s}"
    for mib in targets:
        head += f" {f'{mib}MiB rows':>10s} {f'{mib}MiB shard':>11s}"
    print(head)
    for name, layers, tokens, dim in MODELS:
        row_bytes = layers * tokens * dim * 2
        line = f"{name:24s} {f'{layers} x {tokens} x {dim}':>16s} {row_bytes / 1e6:8.2f} {32:7d} {32 * row_bytes / MiB:12.1f}"
        for mib in targets:
            rows = replace(NEW, shard_bytes=mib * MiB).for_rows(row_bytes).rows_per_shard
            line += f" {rows:10d} {rows * row_bytes / MiB:11.1f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write-threads", action=argparse.BooleanOptionalAction, default=True,
                        help="also time threaded shard writes (store_schema/shardwrite.py)")
    args = parser.parse_args()
    start = time.perf_counter()
    data = features(args.images, args.model)
    n, num_layers, tokens, dim = data.shape
    row_bytes = data[0].nbytes
    layouts = {name: layout.for_rows(row_bytes) for name, layout in LAYOUTS.items()}
    print(f"# {args.model}, random init: features {data.shape} float16 (prefix tokens dropped), "
          f"{data.nbytes / 1e6:.1f} MB raw, {row_bytes / 1e6:.2f} MB/image; reads: median of {args.repeats}, interleaved\n")

    with tempfile.TemporaryDirectory() as tmp:
        written = {name: write(layout, data, Path(tmp) / f"{i}.zarr") for i, (name, layout) in enumerate(layouts.items())}
        reads: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
        order = list(enumerate(layouts.items()))
        for r in range(args.repeats):
            for i, (name, layout) in order if r % 2 == 0 else order[::-1]:
                reads[name].append(read(layout, data, Path(tmp) / f"{i}.zarr"))

    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in reads.items()}
    print(f"{'layout':38s} | {'rows/shard':>10s} | {'bytes/image on disk':>21s} | {'write MB/s':>10s} | "
          f"{'whole-shard read MB/s':>21s} | {'one-layer read MB/s':>19s} | {'requests/layer/shard':>20s} | {'requests/whole-shard read':>25s}")
    for name, layout in layouts.items():
        w, m = written[name], med[name]
        disk = f"{w['bytes_per_image']:,.0f} ({w['ratio']:.3f}x)"
        req = f"{m['layer_requests']:g} ({m['layer_index']:g} idx + {m['layer_requests'] - m['layer_index']:g})"
        print(f"{name:38s} | {layout.rows_per_shard:10d} | {disk:>21s} | {w['write_MBps']:10.0f} | "
              f"{m['whole_MBps']:21.0f} | {m['layer_MBps']:19.0f} | {req:>20s} | {m['whole_requests']:25g}")

    with_ck, without = CHECKSUM_PAIR
    print(f"\nChecksum cost ({with_ck!r} vs {without!r}; target < 3%; wall MB/s, then MB per CPU second of all threads)")
    for key, label in (
        ("whole_MBps", "whole-shard read"),
        ("layer_MBps", "one-layer read"),
        ("whole_cpu_MBps", "whole-shard, CPU"),
        ("layer_cpu_MBps", "one-layer, CPU"),
    ):
        a, b = med[with_ck][key], med[without][key]
        runs = ", ".join(f"{x[key]:.0f}/{y[key]:.0f}" for x, y in zip(reads[with_ck], reads[without]))
        print(f"  {label:17s}: {(b - a) / b * 100:+5.1f}%  (median {a:.0f} with vs {b:.0f} without; runs with/without: {runs})")

    codec_only(data, layouts[with_ck].rows_per_shard, args.repeats)
    if args.write_threads:
        with tempfile.TemporaryDirectory() as tmp:
            threaded_writes(layouts[with_ck], data, Path(tmp), args.repeats)
            store_writes(data.astype(np.float16), Path(tmp), args.repeats)
    size_table()
    print(f"\n# took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
