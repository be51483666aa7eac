"""Thread oversubscription: probing and extraction with and without a competing busy process.

`combo` used to leave torch at its default (one thread per core, OpenMP threads spinning at every barrier).
With another busy process on the same cores a spinning thread waits for a sibling the scheduler has parked,
and a step gets several times slower. Since issue 12 every command calls `clikit.configure_threads`
($OMP_NUM_THREADS, else the CPUs other processes are not keeping busy, sampled for 0.2 s, at least 1;
OpenMP's wait policy is left alone: OMP_WAIT_POLICY=passive made the idle probe row 18.1 s against
13.9 s in one run). This benchmark runs the same work in fresh subprocesses under both policies, first
on an idle machine, then with one busy-looping competitor, and prints old/new time ratios measured in
the same run (> 1: the new policy is faster).

    python benchmarks/threads.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def work(kind: str, policy: str, steps: int) -> dict:
    """One measurement inside a fresh interpreter (so OpenMP reads the environment before torch starts)."""
    threads = None
    if policy == "new":
        from combo.clikit import configure_threads

        threads = configure_threads(None)
    import torch

    threads = threads or torch.get_num_threads()
    if kind == "probe":
        from probe.adapter import ComboAdapter, ComboConfig
        from probe.train import TrainConfig, seeded_batches, train_steps

        torch.manual_seed(0)
        # the paper's adapter (width 128, depth 6, 2 heads) on 12 layers of a 7x7 grid of 384-d tokens
        x = torch.randn(256, 12, 49, 384)
        y = torch.randint(0, 10, (256,))
        model = ComboAdapter(ComboConfig(num_layers=12, feature_dim=384, num_tokens=49, num_classes=10))
        started = time.perf_counter()
        train_steps(model, seeded_batches(x, y, batch_size=64, seed=0), TrainConfig(steps=steps, batch_size=64),
                    device="cpu")
        seconds = time.perf_counter() - started
    else:
        from extract.pipeline import ExtractConfig, extract

        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = extract(ExtractConfig(model="vit_tiny_patch16_224", dataset="digits", out=tmp, image_size=64,
                                           random_init=True, batch_size=64, overwrite=True))
            seconds = time.perf_counter() - started
            assert result.images > 0
    return {"seconds": seconds, "threads": threads}


def measure(kind: str, policy: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, __file__, "--worker", kind, policy, "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "POLICY"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(*args.worker, steps=args.steps)))
        return
    from combo.clikit import busy_cpus

    print(f"CPUs: {os.cpu_count()}; busy at start: {busy_cpus(1.0):.2f} CPUs")
    rows = []
    competitor = None
    try:
        for contended in (False, True):
            if contended:
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1.0)
                print(f"competitor started; busy: {busy_cpus(1.0):.2f} CPUs")
            for kind in ("probe", "extract"):
                old, new = measure(kind, "old", args), measure(kind, "new", args)
                rows.append((kind, contended, old, new))
                print(f"{kind:8s} {'1 busy process' if contended else 'idle':15s} old {old['seconds']:7.2f} s "
                      f"({old['threads']} threads)  new {new['seconds']:7.2f} s ({new['threads']} threads)  "
                      f"old/new {old['seconds'] / new['seconds']:.2f}", flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
    print("\nold/new time ratio (> 1: configure_threads is faster)")
    for kind, contended, old, new in rows:
        print(f"  {kind:8s} {'with a competing process' if contended else 'idle machine':25s} {old['seconds'] / new['seconds']:.2f}")


if __name__ == "__main__":
    main()
