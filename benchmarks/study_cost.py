"""What `combo study` saves over the separate commands of the paper's per-task study, in one run.

The separate commands a user runs today for one task and K stores: `combo relevance`, `combo probe` (all
stores), `combo probe --select top-2 --by heldout` (relevance again, then the subset), `combo probe` on each
store alone and `combo probe --method linear` on each store: 3 + 2K runs, each opening the stores and
reading what it trains on and the test split again. `combo study` fits the same heads with the same seeds
from one read of the training rows and one pass over the test split.

Both are run here on the same synthetic stores (written through store_schema, float16, a ViT-S-like
geometry by default), with the same steps, seeds and adapter. Printed: the feature bytes read per split
(counted at the store reader, attributed to the split each row belongs to), the wall time of each, and
whether every head's predictions are equal sample by sample.

    python benchmarks/study_cost.py [--stores 3] [--layers 12] [--tokens 16] [--dim 192] [--train 1000]
                                    [--test 4000] [--steps 60] [--width 32] [--depth 1] [--threads 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from synthetic_store import synthetic_info


def write_stores(root: Path, args: argparse.Namespace) -> list[str]:
    """K stores of one task: store k carries the label in its first k+1 layers (k = 0 the least), noise elsewhere."""
    from store_schema import StoreLayout, StoreWriter, build_sample_table

    n_val = args.train // 5
    n = args.train + args.test
    labels = np.arange(n) % args.classes
    splits = ([("train800", "train800val200")] * (args.train - n_val) + [("val200", "train800val200")] * n_val
              + [("test",)] * args.test)
    table = build_sample_table(sample_ids=[f"task/{i:06d}.png" for i in range(n)], labels=labels.tolist(), splits=splits,
                               split_names=("train800", "val200", "train800val200", "test"))
    side = int(round(args.tokens ** 0.5))
    paths = []
    for k in range(args.stores):
        path = root / f"s{k}.zarr"
        info = synthetic_info(alias=f"s{k}", dataset="synthetic", grid=(side, side), layers=args.layers, dim=args.dim)
        directions = np.random.default_rng(99).standard_normal((args.classes, args.dim)).astype(np.float32)
        with StoreWriter(path, info, StoreLayout(rows_per_shard=64, rows_per_chunk=16, dtype="float16")) as writer:
            tw = writer.task("task", samples=table, num_layers=args.layers, num_tokens=side * side,
                             feature_dim=args.dim, num_prefix_tokens=0,
                             protocols={"dev": ("train800", "val200"), "final": ("train800val200", "test")},
                             classes=[str(c) for c in range(args.classes)])
            for b in tw.pending():
                rows = tw.blocks[b]
                rng = np.random.default_rng([k, b])
                x = rng.standard_normal((rows.stop - rows.start, args.layers, side * side, args.dim), dtype=np.float32)
                x[:, : k + 1] += 0.3 * (k + 1) * directions[labels[rows.start:rows.stop]][:, None, None, :]
                tw.write_block(b, x.astype(np.float16), None)
            tw.finalize()
        paths.append(str(path))
    return paths


class ReadCounter:
    """Feature bytes every TaskStore returns, per split of the rows asked for (patched into the reader)."""

    def __init__(self, test_rows: np.ndarray, num_samples: int):
        self.test = np.zeros(num_samples, dtype=bool)
        self.test[test_rows] = True
        self.bytes: dict[str, int] = defaultdict(int)

    def install(self):
        from store_schema.reader import TaskStore

        counter, original = self, TaskStore._count
        state = {"rows": None}
        read, read_encoded = TaskStore.read, TaskStore.read_encoded

        def remember(method):
            def wrapped(store, rows, *a, **kw):
                state["rows"] = store._rows(rows)
                return method(store, rows, *a, **kw)
            return wrapped

        def count(store, nbytes):
            rows = state["rows"]
            if rows is not None and rows.size:
                share = counter.test[rows].mean()
                counter.bytes["test"] += int(round(nbytes * share))
                counter.bytes["training rows"] += int(round(nbytes * (1 - share)))
            original(store, nbytes)

        TaskStore.read, TaskStore.read_encoded, TaskStore._count = remember(read), remember(read_encoded), count
        return lambda: setattr(TaskStore, "read", read) or setattr(TaskStore, "read_encoded", read_encoded) \
            or setattr(TaskStore, "_count", original)


def predictions(folder: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "predictions-task.parquet").to_pydict()
    return dict(zip(table["sample_id"], table["prediction"]))


def separate_commands(cfg, paths: list[str], out: Path) -> dict[str, Path]:
    """The study's heads as a user runs them today; returns head column -> the folder with its predictions."""
    from probe.relevance import parse_select, run_relevance, run_select
    from probe.run import run_probe

    names = [f"s{k}" for k in range(len(paths))]
    run_relevance(replace(cfg, out=str(out)), group_lambda=0.01)
    folders = {f"combo[{'+'.join(names)}]": run_probe(replace(cfg, out=str(out))).run_dir}
    folders["combo[top-2]"] = run_select(replace(cfg, out=str(out)), select=parse_select("top-2", by="heldout"),
                                         group_lambda=0.01).run_dir
    for k, path in enumerate(paths):
        folders[f"combo[{names[k]}]"] = run_probe(replace(cfg, stores=(path,), out=str(out))).run_dir
    for k, path in enumerate(paths):
        folders[f"linear[{names[k]}]"] = run_probe(replace(cfg, stores=(path,), method="linear", out=str(out))).run_dir
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16, help="patch tokens per layer (a square grid)")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=1000, help="train800val200 rows (a fifth of them val200)")
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from probe.run import ProbeConfig
    from probe.study import StudyConfig
    from probe.studyrun import run_study

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        paths = write_stores(tmp / "stores", args)
        written = time.perf_counter() - started
        side = int(round(args.tokens ** 0.5))
        cfg = ProbeConfig(stores=tuple(paths), dataset="synthetic", steps=args.steps, batch_size=64, lr=3e-3, seed=0,
                          grid=(side, side), width=args.width, depth=args.depth, num_heads=2, device="cpu",
                          out=str(tmp / "runs"))
        n = args.train + args.test
        row = args.layers * args.tokens * args.dim * 2
        counter = ReadCounter(np.arange(args.train, n), n)
        uninstall = counter.install()
        try:
            t = time.perf_counter()
            folders = separate_commands(cfg, paths, tmp / "separate")
            separate_s = time.perf_counter() - t
            separate_bytes = dict(counter.bytes)
            counter.bytes.clear()
            t = time.perf_counter()
            study = run_study(StudyConfig(probe=replace(cfg, out=str(tmp / "study"))))
            study_s = time.perf_counter() - t
            study_bytes = dict(counter.bytes)
        finally:
            uninstall()
        columns = {r["column"]: r for r in study.rows}
        equal = {c: predictions(study.run_dir / columns[c]["folder"]) == predictions(folders[c]) for c in folders}
    stored = {"training rows": args.stores * args.train * row, "test": args.stores * args.test * row}
    print(f"{args.stores} stores x ({args.train} train800val200 + {args.test} test rows) of {args.layers} layers x "
          f"{args.tokens} tokens x {args.dim} float16 ({args.stores * n * row / 1e9:.2f} GB, written in {written:.0f} s); "
          f"ComBo {args.width}x{args.depth}, {args.steps} steps of 64 per fit, torch threads {torch.get_num_threads()}")
    print(f"heads: {', '.join(r['head'] for r in study.rows)} (+ the relevance pass)")
    print(f"{'':24} {'separate commands':>20} {'combo study':>14} {'ratio':>7}")
    for split in ("training rows", "test"):
        a, b = separate_bytes.get(split, 0), study_bytes.get(split, 0)
        print(f"{split + ' read (GB)':24} {a / 1e9:20.3f} {b / 1e9:14.3f} {a / max(b, 1):7.2f}"
              f"   (stored {stored[split] / 1e9:.3f} GB: {a / stored[split]:.2f}x vs {b / stored[split]:.2f}x)")
    print(f"{'wall time (s)':24} {separate_s:20.1f} {study_s:14.1f} {separate_s / study_s:7.2f}")
    print(f"io.csv of the study: test {sum(r['bytes_read'] for r in study.io if r['split'] == 'test') / 1e9:.3f} GB read")
    print("predictions equal to the separate commands': "
          + ", ".join(f"{c} {'yes' if ok else 'NO'}" for c, ok in equal.items()))


if __name__ == "__main__":
    main()
