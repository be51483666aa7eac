"""What the authors' default grid saves: ComBo on a store of 64-pixel images (4x4 tokens), before and after.

Before this default, every probe resized each map to 14x14 (T = 196); the authors keep a lone backbone's
native grid (and use the smallest grid when several differ), so a 4x4 store now trains on T = 16 tokens.
Both settings train the paper's adapter (width 128, depth 6, batch 64) on the same cached store in one process,
alternating over ``--repeats`` rounds; the figure is steps/s default / steps/s 14x14 (medians), plus the
accuracy of each after ``--steps`` (same seed).

    python benchmarks/grid_default.py [--steps 60] [--repeats 3] [--threads 2] [--image-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="Folder for the store and runs (default: a temp dir).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from extract.pipeline import ExtractConfig, extract
    from probe.run import ProbeConfig, run_probe

    work = args.work or Path(tempfile.mkdtemp(prefix="combo-grid-"))
    started = time.perf_counter()
    store = extract(ExtractConfig(model="vit_tiny_patch16_224", dataset="digits", out=str(work / "stores"),
                                  image_size=args.image_size, random_init=True, num_workers=0, batch_size=64)).store
    print(f"store: {store} ({time.perf_counter() - started:.0f} s to extract)")

    results: dict[str, list[float]] = {"default": [], "14x14": []}
    accuracy: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, grid in (("default", None), ("14x14", (14, 14))):
            run = run_probe(ProbeConfig(stores=(str(store),), dataset="digits", steps=args.steps, grid=grid,
                                        device="cpu", out=str(work / "runs"), cache="ram"))
            m = run.metrics[0]
            results[name].append(args.steps / m["train_seconds"])
            accuracy[name] = m["accuracy"]
            tokens[name] = run.fits[0].model.cfg.num_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.steps} steps x {args.repeats} rounds")
    for name in results:
        print(f"  grid {name:8s} T = {tokens[name]:3d}: {statistics.median(results[name]):7.2f} steps/s "
              f"(rounds: {', '.join(f'{v:.2f}' for v in results[name])}); accuracy after {args.steps} steps "
              f"{accuracy[name]:.3f}")
    ratio = statistics.median(results["default"]) / statistics.median(results["14x14"])
    print(f"steps/s default grid / 14x14 = {ratio:.2f}")


if __name__ == "__main__":
    main()
