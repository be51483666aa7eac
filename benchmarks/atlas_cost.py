"""What the per-layer atlas costs compared with ONE single-layer linear probe.

The atlas trains every (pooling, layer) head of a backbone in one ``MultiLayerLinearProbe`` after one pass
over the store. A naive atlas would run a single-layer probe (a store read + a training run) per layer and
pooling: 2 x L times the cost of one. This prints

  training ratio    = time(train 2L heads together) / time(train 1 head)            (target ~1x, << 2L x)
  end-to-end ratio  = time(read + pool all layers + train 2L heads)
                      / time(read + pool one layer + train 1 head)                    (target ~1x, << 2L x)

on a synthetic store written to a temporary folder (ViT-B-like: L = 12, D = 768; a small token grid keeps the
store small; the split sizes are VTAB-1k's train800 / val200).

    python benchmarks/atlas_cost.py                 # CPU, 300 steps
    python benchmarks/atlas_cost.py --device cuda --steps 1300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.storefactory, when run as a script

from probe.align import normalise_maps
from probe.atlas import pool_split, probe_layers
from probe.data import SplitSource, eval_batches
from probe.stores import align_tasks
from probe.train import TrainConfig, pick_device
from store_schema import StoreLayout, open_store
from tests.storefactory import vtab_like_splits, write_store


def make_store(path: Path, *, layers: int, dim: int, grid: int, classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = 1000
    labels = np.arange(n) % classes
    tokens = rng.standard_normal((n, layers, grid * grid, dim), dtype=np.float32).astype(np.float16)
    prefix = rng.standard_normal((n, layers, 1, dim), dtype=np.float32).astype(np.float16)
    return write_store(path, tokens=tokens, prefix=prefix, labels=labels, splits=vtab_like_splits(800, 200, 0),
                       grid=(grid, grid), alias="bench", task="bench", num_classes=classes,
                       layout=StoreLayout(rows_per_shard=64, rows_per_chunk=16))


def single_layer_features(store, rows: np.ndarray, layer: int, device: torch.device) -> torch.Tensor:
    """Mean-pooled features of ONE layer (what a per-layer probe would read)."""
    source = SplitSource(align_tasks([store], "bench"), rows, layers=[[layer]])
    pieces = []
    for parts, _ in eval_batches(source, batch_size=256):
        v = parts[0].to(device).float().mean(dim=2)
        pieces.append(normalise_maps(v[:, :, None, :])[:, :, 0, :])
    return torch.cat(pieces)


def timed(fn, device: torch.device, repeats: int):
    """Best of ``repeats`` wall times (the machine may be shared: the minimum is the least disturbed run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--grid", type=int, default=4, help="token grid side of the synthetic store (4 -> 16 tokens)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = TrainConfig(steps=args.steps, batch_size=64, lr=1e-3, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_store(Path(tmp) / "bench.zarr", layers=args.layers, dim=args.dim, grid=args.grid, classes=args.classes)
        store = open_store(path)
        part = store.task("bench")
        train_rows, eval_rows = part.rows("train800"), part.rows("val200")
        y_train, y_eval = part.labels[train_rows], part.labels[eval_rows]

        def atlas_pass():
            train = pool_split(store, "bench", train_rows, poolings=("cls", "mean"), device=device)
            evaluation = pool_split(store, "bench", eval_rows, poolings=("cls", "mean"), device=device)
            x_train = torch.cat([train["cls"], train["mean"]], dim=1)
            x_eval = torch.cat([evaluation["cls"], evaluation["mean"]], dim=1)
            return x_train, x_eval, probe_layers(x_train, y_train, x_eval, y_eval, num_classes=args.classes, cfg=cfg, device=device)

        def single_pass():
            last = args.layers - 1
            x_train = single_layer_features(store, train_rows, last, device)
            x_eval = single_layer_features(store, eval_rows, last, device)
            return x_train, x_eval, probe_layers(x_train, y_train, x_eval, y_eval, num_classes=args.classes, cfg=cfg, device=device)

        single_pass()  # warm-up: page cache, kernels
        r = args.repeats
        t_single, (s_train, s_eval, _) = timed(single_pass, device, r)
        t_atlas, (a_train, a_eval, _) = timed(atlas_pass, device, r)
        t_train_one, _ = timed(lambda: probe_layers(s_train, y_train, s_eval, y_eval, num_classes=args.classes, cfg=cfg, device=device), device, r)
        t_train_all, _ = timed(lambda: probe_layers(a_train, y_train, a_eval, y_eval, num_classes=args.classes, cfg=cfg, device=device), device, r)
    heads = a_train.shape[1]
    print(f"device {device}, {args.threads} CPU threads, best of {args.repeats}; store: 1000 images x {args.layers} layers x {args.grid ** 2} tokens x "
          f"D={args.dim} (float16), {args.classes} classes; {args.steps} steps of batch 64")
    print(f"heads in one atlas pass: {heads} (cls + mean x {args.layers} layers); naive per-layer atlas = {heads}x one probe")
    print(f"training only : 1 head {t_train_one:7.2f} s | {heads} heads {t_train_all:7.2f} s | ratio {t_train_all / t_train_one:5.2f}x "
          f"(naive: {heads}x)")
    print(f"end to end    : 1 layer {t_single:7.2f} s | all layers {t_atlas:7.2f} s | ratio {t_atlas / t_single:5.2f}x "
          f"(naive: {heads}x)")


if __name__ == "__main__":
    main()
