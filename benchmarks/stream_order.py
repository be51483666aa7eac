"""Does streaming see the classes in order? Cost and effect of the shuffled store row order.

1. Extraction cost: `combo extract` wall time with training rows in the seeded shuffled order
   (extract/order.py) / in the dataset's natural order, on a class-sorted image folder and on a
   parquet file (row groups of 32 images), same model, same process; modes alternate, each run
   `--rounds` times, the fastest run of each is compared. Target <= 1.05. Then the part the order
   changes, alone: reading and decoding every image in natural / shuffled order (for parquet also
   shuffled through the plain `ParquetReader`, which keeps only the last two row groups).
2. Effect: sklearn's digits written as a class-sorted image folder, extracted twice (natural order,
   as combo wrote before, and shuffled), probed with a shuffle window of 35 rows (a split far
   larger than the cache budget: what `cache stream` does) and with the whole split shuffled
   (`cache ram`), over `--seeds` probe seeds. Prints the stream - cached accuracy as paired
   differences (same store, same seed), mean and spread, and the mean number of distinct labels per
   batch against a uniform shuffle's, for: the natural-order store read in whole-shard windows (the
   old reader), the natural-order store read in chunk pieces (probe/epochorder.py on an old store), and
   the shuffled store (whole shards). The windowed runs use `cache ram` with `shuffle_window 35`,
   which trains on exactly the batches `cache stream` would (probe/epochorder.py; tests/test_probe.py
   checks it), without the reads.
3. Read cost of chunk-piece windows: one epoch of window reads from a class-sorted store of
   ViT-sized rows (14x14 tokens x 12 layers x 192, float16, default layout), whole-shard windows vs
   8-row pieces, local disk, page cache warm; then the requests one epoch makes over HTTP
   (loopback): a piece is read chunk by chunk (one request per inner chunk it touches, plus the
   shard index), a whole shard with one request.

    python benchmarks/stream_order.py [--per-class 30] [--seeds 3] [--steps 400] [--width 32] [--depth 1]
                                      [--rounds 3] [--parts 1,2,3]

About 4 minutes on 2 shared CPU cores with the defaults (the issue's 800 steps: --steps 800, longer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


@contextmanager
def natural_rows():
    """Extract as combo did before rows were shuffled (natural order, no source_index)."""
    import extract.pipeline as pipeline
    from extract.order import natural_order

    saved = pipeline.row_order
    pipeline.row_order = natural_order
    try:
        yield
    finally:
        pipeline.row_order = saved


@contextmanager
def whole_shard_windows():
    """probe/epochorder.py as before: windows of whole shards whatever the stored order."""
    import probe.epochorder as epochorder

    saved = epochorder.label_clustered
    epochorder.label_clustered = lambda labels: False
    try:
        yield
    finally:
        epochorder.label_clustered = saved


def class_folder(root: Path, per_class: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            low = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
            low[c % 8, :, :] = 255  # a class signal
            path = root / f"class{c}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(low).resize((size, size), Image.BICUBIC).save(path, quality=90)


def class_parquet(path: Path, per_class: int, size: int, classes: int = 10) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    blobs, labels = [], []
    for c in range(classes):
        for _ in range(per_class):
            low = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(low).resize((size, size), Image.BICUBIC).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
            labels.append(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(blobs, type=pa.binary()), "label": pa.array(labels)}), path,
                   row_group_size=32)


def extraction_cost(args, tmp: Path) -> None:
    import dataclasses

    from extract.datasets import plan_dataset
    from extract.images import PlanImages
    from extract.order import row_order
    from extract.pipeline import ExtractConfig, extract

    class_folder(tmp / "folder", args.per_class, 96)
    class_parquet(tmp / "pq" / "data.parquet", args.per_class, 96)
    print(f"1. extraction, {args.extract_model} random-init at {args.extract_size}px, {10 * args.per_class} "
          f"class-sorted images, batch 32, {args.num_workers} worker(s); fastest of {args.rounds}")
    for kind, root in (("folder", tmp / "folder"), ("parquet", tmp / "pq")):
        best = {"natural": float("inf"), "shuffled": float("inf")}
        for r in range(args.rounds + 1):  # round 0 warms the page cache and the allocator
            for mode in ("natural", "shuffled"):
                cfg = ExtractConfig(model=args.extract_model, dataset=kind, root=str(root), random_init=True,
                                    out=str(tmp / f"x-{kind}-{mode}-{r}"), image_size=args.extract_size, batch_size=32,
                                    num_workers=args.num_workers, device="cpu")
                started = time.perf_counter()
                if mode == "natural":
                    with natural_rows():
                        extract(cfg)
                else:
                    extract(cfg)
                if r:
                    best[mode] = min(best[mode], time.perf_counter() - started)
        print(f"   {kind:8s} natural {best['natural']:.2f} s, shuffled {best['shuffled']:.2f} s, "
              f"ratio shuffled/natural {best['shuffled'] / best['natural']:.3f}")
    print("   reading + decoding every image alone (PlanImages, the part the order changes):")
    for kind, root in (("folder", tmp / "folder"), ("parquet", tmp / "pq")):
        modes = {"natural": lambda p: p, "shuffled": lambda p: row_order(p).plan}
        if kind == "parquet":  # shuffled rows through the plain reader (it keeps the last two row groups)
            modes["shuffled, plain reader"] = lambda p: dataclasses.replace(row_order(p).plan, reader=p.reader)
        best = {}
        for _ in range(args.rounds + 1):
            for mode, make in modes.items():
                plan = make(plan_dataset(kind, root=str(root))[0])
                images = PlanImages(plan, image_size=args.extract_size, mean=(0.5,) * 3, std=(0.5,) * 3)
                started = time.perf_counter()
                for i in range(len(images)):
                    images[i]
                best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - started)
        print(f"   {kind:8s} " + ", ".join(f"{m} {t:.3f} s" for m, t in best.items())
              + "".join(f"; ratio {m}/natural {t / best['natural']:.2f}" for m, t in best.items() if m != "natural"))


def digits_folder(root: Path) -> None:
    from extract.datasets import _digits_arrays

    images, targets = _digits_arrays()
    for k, (img, label) in enumerate(zip(images, targets)):
        path = root / f"digit{label}" / f"{k:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def distinct_per_batch(labels: np.ndarray, orders: list[np.ndarray], batch: int) -> float:
    return float(np.mean([len(np.unique(labels[o[s:s + batch]])) for o in orders for s in range(0, o.size, batch)]))


def order_effect(args, tmp: Path) -> None:
    from extract.pipeline import ExtractConfig, extract
    from probe.data import SplitSource, epoch_order, piece_rows
    from probe.run import ProbeConfig, run_probe
    from probe.stores import align_tasks, open_stores

    digits_folder(tmp / "digits")
    stores = {}
    for mode in ("natural", "shuffled"):
        cfg = ExtractConfig(model="vit_tiny_patch16_224", dataset="folder", root=str(tmp / "digits"), random_init=True,
                            out=str(tmp / f"d-{mode}"), image_size=32, batch_size=64, num_workers=0, device="cpu")
        if mode == "natural":
            with natural_rows():
                stores[mode] = str(extract(cfg).store)
        else:
            stores[mode] = str(extract(cfg).store)
    window, batch = args.window, 64
    configs = [("natural store, whole-shard windows (before)", "natural", True),
               ("natural store, chunk-piece windows", "natural", False),
               ("shuffled store, whole-shard windows", "shuffled", False)]

    def probe(store: str, seed: int, shuffle_window: int | None) -> float:
        cfg = ProbeConfig(stores=(store,), dataset="folder", out=str(tmp / "runs"), steps=args.steps, batch_size=batch,
                          width=args.width, depth=args.depth, num_heads=2, device="cpu", seed=seed, cache="ram",
                          shuffle_window=shuffle_window)
        return float(run_probe(cfg).metrics[0]["accuracy"])

    full = {(mode, seed): probe(stores[mode], seed, None) for mode in stores for seed in range(args.seeds)}
    aligned = align_tasks(open_stores([stores["natural"]]), "default")
    n_train = aligned.rows("trainval").size
    print(f"\n2. digits as a class-sorted folder ({n_train} trainval rows, 10 classes), vit_tiny random-init 32px; "
          f"adapter width {args.width} depth {args.depth}, batch {batch}, {args.steps} steps; window {window} rows vs whole split; "
          f"probe seeds 0..{args.seeds - 1}")
    print(f"   {'':46s} {'distinct labels/batch':>22s}   {'stream - cached accuracy (points)':>34s}")
    for name, mode, old in configs:
        aligned = align_tasks(open_stores([stores[mode]]), "default")
        source = SplitSource(aligned, aligned.rows("trainval"))
        labels = source.labels
        with whole_shard_windows() if old else _null():
            piece = piece_rows(source)
            orders = [epoch_order(source, epoch=e, seed=0, window_rows=window) for e in range(20)]
            uniform = [epoch_order(source, epoch=e, seed=0, window_rows=None) for e in range(20)]
            diffs = [100 * (probe(stores[mode], seed, window) - full[mode, seed]) for seed in range(args.seeds)]
        got, ref = distinct_per_batch(labels, orders, batch), distinct_per_batch(labels, uniform, batch)
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(f"   {name:46s} {got:5.2f} vs {ref:5.2f} ({100 * (got / ref - 1):+5.1f}%)   "
              f"{statistics.mean(diffs):+5.2f} +- {spread:4.2f} sd  [{', '.join(f'{d:+.1f}' for d in diffs)}]  "
              f"(pieces of {piece} rows)")
    print("   cached accuracy, whole split: " + ", ".join(
        f"{mode} {100 * statistics.mean(full[mode, s] for s in range(args.seeds)):.1f}%" for mode in stores))


@contextmanager
def _null():
    yield


def read_cost(args, tmp: Path) -> None:
    from probe.data import SplitSource, epoch_windows, piece_rows
    from probe.stores import align_tasks, open_stores
    from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo, StoreLayout, StoreWriter, build_sample_table

    rows, layers, grid, dim = args.read_rows, 12, 14, 192
    labels = np.repeat(np.arange(10), -(-rows // 10))[:rows]  # class by class
    info = StoreInfo(
        backbone=BackboneInfo(alias="bench", timm_name="synthetic", pretrained_tag=None, weights_source="random-init",
                              weights_sha256=None, seed=0),
        preprocessing=Preprocessing(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3),
        features=FeatureInfo(token_grid=(grid, grid), num_prefix_tokens=0, layers=tuple(range(layers)), feature_dim=dim),
        dataset="bench",
    )
    table = build_sample_table(sample_ids=[f"b/{i:05d}" for i in range(rows)], labels=list(labels),
                               splits=[("train",)] * rows, split_names=("train",))
    path = tmp / "read.zarr"
    rng = np.random.default_rng(0)
    with StoreWriter(path, info, StoreLayout()) as writer:
        tw = writer.task("bench", samples=table, num_layers=layers, num_tokens=grid * grid, feature_dim=dim,
                         num_prefix_tokens=0, protocols={"final": ("train", "train")}, classes=[str(c) for c in range(10)])
        for b in tw.pending():
            r = tw.blocks[b]
            tw.write_block(b, rng.standard_normal((len(r), layers, grid * grid, dim)).astype(np.float16), None)
        tw.finalize()
    aligned = align_tasks(open_stores([str(path)]), "bench")
    source = SplitSource(aligned, aligned.rows("train"))
    mib = source.n * source.row_bytes() / 2**20
    print(f"\n3. read cost: one epoch of windows of {args.read_window} rows from a class-sorted store of {rows} rows "
          f"({mib:.0f} MiB; 32-row shards, 8-row chunks), local disk, fastest of {args.rounds + 1}")
    times = {}
    for name, old in (("whole-shard windows", True), ("chunk-piece windows", False)):
        with whole_shard_windows() if old else _null():
            piece = piece_rows(source)
            windows = epoch_windows(source, epoch=0, seed=0, window_rows=args.read_window)
        best = float("inf")
        for _ in range(args.rounds + 1):
            started = time.perf_counter()
            for w in windows:
                source.read(w)
            best = min(best, time.perf_counter() - started)
        times[name] = best
        print(f"   {name:20s} (pieces of {piece:2d} rows): {best:.2f} s, {mib / best:.0f} MiB/s")
    print(f"   ratio pieces/shards {times['chunk-piece windows'] / times['whole-shard windows']:.2f}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from servers import static_http_server  # tests/servers.py: a loopback HTTP server that logs requests

    with static_http_server(tmp) as server:
        aligned = align_tasks(open_stores([f"{server.url}/read.zarr"]), "bench")
        remote = SplitSource(aligned, aligned.rows("train"))
        counts = {}
        for name, old in (("whole-shard windows", True), ("chunk-piece windows", False)):
            with whole_shard_windows() if old else _null():
                windows = epoch_windows(remote, epoch=0, seed=0, window_rows=args.read_window)
            before = len(server.requests)
            started = time.perf_counter()
            for w in windows:
                remote.read(w)
            seconds = time.perf_counter() - started
            counts[name] = sum("/tokens/" in r for r in server.requests[before:])
            print(f"   over HTTP (loopback), {name}: {counts[name]} token requests per epoch, {seconds:.2f} s")
    print(f"   ratio of requests pieces/shards {counts['chunk-piece windows'] / counts['whole-shard windows']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=30, help="images per class for the extraction timing")
    parser.add_argument("--extract-model", default="vit_tiny_patch16_224")
    parser.add_argument("--extract-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--window", type=int, default=35)
    parser.add_argument("--read-rows", type=int, default=256)
    parser.add_argument("--read-window", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="1,2,3")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    parts = {int(p) for p in args.parts.split(",")}
    print(" ".join(["python"] + sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if 1 in parts:
            extraction_cost(args, tmp)
        if 2 in parts:
            order_effect(args, tmp)
        if 3 in parts:
            read_cost(args, tmp)


if __name__ == "__main__":
    main()
