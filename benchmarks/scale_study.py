"""A study's fits on dask workers against one process: wall time of 4 tasks probed sequentially vs on 2 workers.

One generated store (4 tasks; --rows images each, a --grid token grid, --layers layers of width --dim;
the label is a brighter token, so there is something to learn), probed with ComBo (`run_probe`):

1. ``sequential``: this process, ``--threads`` torch threads (default 2);
2. ``dask 2x1``: a LocalCluster of 2 worker processes, 1 thread each (what `--workers 2` starts); the
   cluster's start is printed beside, not counted (a warm-up probe loads torch and the code on both).

The run folders are checked equal (accuracy and predictions of every task). Wall time per run; runs are
interleaved ``--repeats`` times and the median is printed, because the machine is noisy.

    python benchmarks/scale_study.py [--steps 300] [--width 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe.run import ProbeConfig, run_probe  # noqa: E402
from store_schema import StoreLayout, StoreWriter, build_sample_table  # noqa: E402
from synthetic_store import synthetic_info  # noqa: E402

TASKS = ("t0", "t1", "t2", "t3")


def make_store(path: Path, *, rows: int, grid: int, layers: int, dim: int) -> None:
    tokens_per_map = grid * grid
    info = synthetic_info(alias="synthetic", dataset="synthetic", grid=(grid, grid), layers=layers, dim=dim)
    n_test = rows // 4
    n_train = rows - n_test
    splits = [("train800", "train800val200")] * (n_train * 4 // 5) + [("val200", "train800val200")] * (n_train - n_train * 4 // 5) \
        + [("test",)] * n_test
    with StoreWriter(path, info, StoreLayout()) as writer:
        for k, task in enumerate(TASKS):
            rng = np.random.default_rng(k)
            labels = rng.integers(0, 4, rows)
            tokens = rng.normal(size=(rows, layers, tokens_per_map, dim)).astype(np.float32)
            tokens[np.arange(rows), :, labels * (tokens_per_map // 4)] += 2.0
            table = build_sample_table(sample_ids=[f"{task}/{i:05d}" for i in range(rows)], labels=labels.tolist(),
                                       splits=splits, split_names=["train800", "val200", "train800val200", "test"])
            tw = writer.task(task, samples=table, num_layers=layers, num_tokens=tokens_per_map, feature_dim=dim,
                             num_prefix_tokens=0, protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")},
                             classes=["a", "b", "c", "d"])
            for b in tw.pending():
                r = tw.blocks[b]
                tw.write_block(b, tokens[r.start:r.stop])
            tw.finalize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from combo.cluster import ClusterConfig, open_client  # what `--workers N` starts

    torch.set_num_threads(args.threads)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="scale-study-"))
    try:
        store = work / "synthetic.zarr"
        make_store(store, rows=args.rows, grid=args.grid, layers=args.layers, dim=args.dim)

        def cfg(out: str, steps: int = args.steps, tasks=None) -> ProbeConfig:
            return ProbeConfig(stores=(str(store),), dataset="synthetic", out=str(work / out), steps=steps, width=args.width,
                               depth=args.depth, cache="ram", tasks=tasks)

        started = time.perf_counter()
        clients = open_client(ClusterConfig(workers=2))
        client = clients.__enter__()
        run_probe(cfg("warm", steps=2), client=client)  # torch and combo imported on both workers
        start_seconds = time.perf_counter() - started
        seconds: dict[str, list[float]] = {"sequential": [], "dask 2x1": []}
        results = {}
        for repeat in range(args.repeats):
            for name in (list(seconds) if repeat % 2 == 0 else list(reversed(seconds))):
                shutil.rmtree(work / name.replace(" ", ""), ignore_errors=True)
                t = time.perf_counter()
                run = run_probe(cfg(name.replace(" ", "")), client=client if name != "sequential" else None)
                seconds[name].append(time.perf_counter() - t)
                results[name] = [(m["task"], m["accuracy"]) for m in run.metrics]
        clients.__exit__(None, None, None)
        same = results["sequential"] == results["dask 2x1"]
        med = {k: statistics.median(v) for k, v in seconds.items()}
        print(f"4 tasks x {args.rows} rows ({args.layers} layers, {args.grid}x{args.grid} tokens, D={args.dim}); ComBo width "
              f"{args.width}, depth {args.depth}, {args.steps} steps, cache ram; torch {torch.__version__}; median of "
              f"{args.repeats} interleaved runs; accuracies equal: {'yes' if same else 'NO'}\n")
        print("| run | torch threads x processes | wall s (median) | runs |")
        print("|---|---|---|---|")
        print(f"| sequential | {args.threads} x 1 | {med['sequential']:.1f} | {', '.join(f'{v:.1f}' for v in seconds['sequential'])} |")
        print(f"| dask 2x1 | 1 x 2 workers | {med['dask 2x1']:.1f} | {', '.join(f'{v:.1f}' for v in seconds['dask 2x1'])} |")
        print(f"\nsequential / 2 workers: {med['sequential'] / med['dask 2x1']:.2f}x faster on 2 workers "
              f"(cluster start + warm-up {start_seconds:.1f} s, not counted)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
