"""Extraction on dask workers against one process, on this machine, in one run.

Three extractions of the same generated image folder (a random-init timm ViT; each writes its own store):

1. ``local``: one process, ``--threads`` torch threads (default 2), DataLoader decoding in
   ``--num-workers`` processes, the writer thread behind the model (today's `combo extract`);
2. ``dask 1x2``: a LocalCluster of 1 worker with the same thread count: the distributed path's own cost
   (shard jobs, scatter, results, the client journaling) against (1). Goal: <= 5% slower;
3. ``dask 2x1``: a LocalCluster of 2 workers, 1 thread each (what `--workers 2` starts).

Images/s are over each task's image loop (`TaskResult.seconds`: opening the task, every image run and
written, finalize), after a warm-up extraction that loads the model on the workers (a worker keeps it
between tasks), so cluster start-up is not counted; it is printed beside. The stores are checked
byte-identical (every object but the zarr.json documents, which hold timestamps). Runs are
interleaved ``--repeats`` times and the median is printed, because the machine is noisy.

    python benchmarks/scale_extract.py [--model vit_small_patch16_224] [--images 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.pipeline import ExtractConfig, extract  # noqa: E402


def make_folder(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        path = root / f"class{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(path, quality=90)


def data_objects(store: Path) -> dict:
    objects = json.loads((store / "manifest.json").read_text())["objects"]
    return {k: v["sha256"] for k, v in objects.items() if not k.endswith("zarr.json")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader decoding processes of the local run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from combo.cluster import ClusterConfig, open_client  # what `--workers N` starts

    torch.set_num_threads(args.threads)
    logging.getLogger("distributed").setLevel(logging.ERROR)  # no INFO lines from the clusters closing
    work = Path(tempfile.mkdtemp(prefix="scale-extract-"))
    stack = ExitStack()
    try:
        make_folder(work / "data", args.images, 320)
        make_folder(work / "warm", 8, 320)

        def cfg(root: Path, out: Path) -> ExtractConfig:
            return ExtractConfig(model=args.model, dataset="folder", root=str(root), out=str(out), image_size=args.image_size,
                                 random_init=True, batch_size=args.batch_size, num_workers=args.num_workers)

        clusters = {}
        for name, (n, threads) in {"dask 1x2": (1, args.threads), "dask 2x1": (2, 1)}.items():
            started = time.perf_counter()
            client = stack.enter_context(open_client(ClusterConfig(workers=n, threads_per_worker=threads)))
            extract(cfg(work / "warm", work / f"warm-{n}"), client=client)  # loads the model on every worker it reaches
            clusters[name] = (None, client, time.perf_counter() - started)
        rates: dict[str, list[float]] = {"local": [], "dask 1x2": [], "dask 2x1": []}
        reference = None
        for repeat in range(args.repeats):
            order = list(rates) if repeat % 2 == 0 else list(reversed(rates))
            for name in order:
                out = work / f"out-{name.replace(' ', '')}"
                shutil.rmtree(out, ignore_errors=True)
                client = clusters[name][1] if name in clusters else None
                result = extract(cfg(work / "data", out), client=client)
                task = result.tasks[0]
                rates[name].append(task.images / task.seconds)
                objects = data_objects(result.store)
                reference = reference or objects
                assert objects == reference, f"{name}: the store differs from the first run's"
        stack.close()
        med = {name: statistics.median(v) for name, v in rates.items()}
        print(f"{args.model} at {args.image_size} px, random init, {args.images} images, batch {args.batch_size}; "
              f"torch {torch.__version__}; median of {args.repeats} interleaved runs; stores byte-identical: yes\n")
        print("| run | torch threads x processes | images/s (median) | runs | cluster start + warm-up (s) |")
        print("|---|---|---|---|---|")
        for name, what in (("local", f"{args.threads} x 1 (+{args.num_workers} decoding)"), ("dask 1x2", f"{args.threads} x 1 worker"),
                           ("dask 2x1", "1 x 2 workers")):
            start = f"{clusters[name][2]:.1f}" if name in clusters else "-"
            runs = ", ".join(f"{r:.1f}" for r in rates[name])
            print(f"| {name} | {what} | {med[name]:.1f} | {runs} | {start} |")
        # paired: each repeat runs both back to back, so a slow spell of the machine hits both of a pair
        paired = [loc / dask - 1 for loc, dask in zip(rates["local"], rates["dask 1x2"])]
        overhead = statistics.median(paired)
        print(f"\ndistributed path at 1 worker vs one process: {100 * overhead:+.1f}% time per image, median of the "
              f"{len(paired)} paired repeats ({', '.join(f'{100 * p:+.1f}%' for p in paired)}; ratio of the medians "
              f"{100 * (med['local'] / med['dask 1x2'] - 1):+.1f}%) (goal <= +5%) -> {'met' if overhead <= 0.05 else 'NOT met'}")
        print(f"2 workers x 1 thread / one process x {args.threads} threads: {med['dask 2x1'] / med['local']:.2f}x images/s")
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
