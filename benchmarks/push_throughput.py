"""Push / pull throughput of `combo store push|pull` against an S3 server on loopback (moto).

Writes a store of about --size-mb of float16 features (random normal values: they barely compress,
like real activations), starts a moto S3 server on 127.0.0.1, pushes the store to it, pulls it
back to local disk, and prints MB/s for each (copy time only; the final checksum pass is timed
separately). A local-to-local copy is the reference for what the copy code itself costs.

    python benchmarks/push_throughput.py                 # ~200 MB, < 1 min
    python benchmarks/push_throughput.py --size-mb 1000 --workers 16
    python benchmarks/push_throughput.py --probe-steps 40 # also: probe steps/s from S3 vs local disk

`--probe-steps` trains a ComBo adapter in streaming mode (`--cache stream`, small budget, so the
features are read from the store while training, prefetched in a background thread) once from
the local store and once straight from the S3 server, and prints remote/local steps per second.

Moto is a Python server (run in its own process here): absolute figures are far below a real
object store; the ratios and the effect of --workers are what carry over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from store_schema import (  # noqa: E402
    BackboneInfo,
    FeatureInfo,
    Preprocessing,
    StoreInfo,
    StoreLayout,
    StoreWriter,
    build_sample_table,
    copy_store,
    validate_store,
)

LAYERS, GRID, DIM = 12, (7, 7), 256


def write_store(path: Path, *, size_mb: float, seed: int = 0) -> tuple[int, float]:
    """A one-task store of ~size_mb MB of float16 tokens; returns (images, seconds)."""
    per_image = LAYERS * GRID[0] * GRID[1] * DIM * 2
    n = max(32, int(size_mb * 1e6 / per_image))
    info = StoreInfo(
        backbone=BackboneInfo("bench", "synthetic", None, "random-init", None, seed),
        preprocessing=Preprocessing(224, (0.5,) * 3, (0.5,) * 3),
        features=FeatureInfo(GRID, 0, tuple(range(LAYERS)), DIM),
        dataset="bench",
    )
    splits = [("train800",)] * (n // 2) + [("test",)] * (n - n // 2)
    table = build_sample_table(sample_ids=[f"img{i:06d}.png" for i in range(n)], labels=[i % 10 for i in range(n)],
                               splits=splits, split_names=["train800", "test"])
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    with StoreWriter(path, info, StoreLayout()) as writer:
        task = writer.task("bench", samples=table, num_layers=LAYERS, num_tokens=GRID[0] * GRID[1], feature_dim=DIM,
                           num_prefix_tokens=0, protocols={"final": ("train800", "test")}, classes=[str(c) for c in range(10)])
        for block in task.pending():
            rows = task.blocks[block]
            data = rng.standard_normal((len(rows), LAYERS, GRID[0] * GRID[1], DIM), dtype=np.float32)
            task.write_block(block, data)
        task.finalize()
    return n, time.perf_counter() - started


def probe_steps_per_s(store: str, options: dict | None, args: argparse.Namespace, out: Path) -> float:
    """Training steps per second of a streaming probe run (reads overlap training via prefetch)."""
    from probe.run import ProbeConfig, run_probe

    cfg = ProbeConfig(stores=(store,), tasks=("bench",), protocol="final", steps=args.probe_steps, batch_size=args.batch_size,
                      grid=GRID, device=args.device, out=str(out), storage_options=options, cache="stream",
                      cache_budget=int(args.stream_budget_mb * 2**20), eval_batch_size=args.batch_size)
    fit = run_probe(cfg).fits[0]
    return args.probe_steps / float(fit.history["seconds"])  # training only (the first window's read included)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--probe-steps", type=int, default=0, help="also time a streaming probe run (0: skip)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-budget-mb", type=float, default=64.0, help="probe cache budget: small = streaming")
    args = parser.parse_args()

    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(name, value)
    from servers import moto_subprocess  # tests/servers.py: the tests' loopback server, in its own process

    work = Path(tempfile.mkdtemp(prefix="combo-push-bench-"))
    try:
        source = work / "stores" / "bench" / "bench.zarr"
        n, seconds = write_store(source, size_mb=args.size_mb)
        stored = sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) / 1e6
        print(f"store: {n} images x {LAYERS} layers x {GRID[0] * GRID[1]} tokens x {DIM} float16 = {stored:.0f} MB stored "
              f"(written in {seconds:.1f} s)")

        local = copy_store(str(source), str(work / "copy.zarr"), verify="none", workers=args.workers)
        print(f"local -> local copy: {local.mb_per_s:7.1f} MB/s  ({local.copied} objects)")

        with moto_subprocess() as s3:
            s3.make_bucket("bench")
            url = "s3://bench/stores/bench/bench.zarr"
            push = copy_store(str(source), url, storage_options=s3.options, verify="none", workers=args.workers)
            print(f"push  local -> S3:   {push.mb_per_s:7.1f} MB/s  ({push.copied} objects, {push.seconds:.1f} s)")
            started = time.perf_counter()
            report = validate_store(url, storage_options=s3.options, checksums="all")
            print(f"verify on S3 (all checksums): {time.perf_counter() - started:.1f} s, valid={report.ok}")
            again = copy_store(str(source), url, storage_options=s3.options, verify="none", workers=args.workers)
            print(f"push again (resume, nothing to copy): {again.seconds:.1f} s, copied {again.copied}")
            pull = copy_store(url, str(work / "pulled"), storage_options=s3.options, verify="none", workers=args.workers)
            print(f"pull  S3 -> local:   {pull.mb_per_s:7.1f} MB/s  ({pull.copied} objects, {pull.seconds:.1f} s)")
            if args.probe_steps:
                local_rate = probe_steps_per_s(str(source), None, args, work / "runs-local")
                remote_rate = probe_steps_per_s(url, s3.options, args, work / "runs-s3")
                print(f"probe (stream, {args.probe_steps} steps, batch {args.batch_size}, {args.device}): "
                      f"local {local_rate:.2f} steps/s, S3 {remote_rate:.2f} steps/s, "
                      f"ratio S3/local = {remote_rate / local_rate:.2f}")
        print(f"push / local-copy throughput ratio: {push.mb_per_s / local.mb_per_s:.2f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
