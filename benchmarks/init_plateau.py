"""The initialisation plateau: ComBo's accuracy after 300 / 800 / 1,600 steps with the authors' init
(`init="timm"`: trunc-normal 0.02 on every Linear of F and the head) and PyTorch's default Linear init
(`init="torch"`, `combo probe --init torch`), paired over seeds, on digits and generated spatial tasks.

Features: one random-init `vit_tiny_patch16_224` (backbone seed 0, the same for every run) at `--image-size`
64 px, i.e. a 4x4 token grid, every block stored; ComBo runs on the store's native grid (T = 16) unless
`--grid` says otherwise. Probe: the paper's adapter (width 128, depth 6, 2 heads, MLP 512), batch 64, AdamW
lr 1e-3, wd 1e-4, 10% warm-up then cosine, protocol `final` (train800val200 -> test), on the CPU. Each step
budget is its own run (the schedule depends on the total), and a seed is used by both inits (the same batch
order; the adapters' initial weights differ by construction).

Tasks (`--tasks`, comma-separated; default digits,position4,position16):
  digits      sklearn's bundled 8x8 digits, 10 classes, 1,000 train / 797 test (the VTAB-like splits)
  position4   one bright square (5/8 of a cell) in one of the 4 quadrants, label = quadrant, jittered inside
              it, on faint noise
  position9   the same on a 3x3 layout (9 classes; 21 px cells do not line up with the 16 px tokens)
  position16  the same on a 4x4 layout (16 classes): one cell per token at 64 px
  spot4       position4 with a 6 px spot (a fraction of one token)
  count4      1..4 bright squares on random quadrants, label = count - 1 (tests/countdata.py at 64 px)
Generated tasks are written in the VTAB-1k layout (train800 / val200 / test, train800val200 = train800 +
val200 listed again) with `--n-train` / `--n-val` / `--n-test` images (default 800 / 200 / 500).

For every task x steps it prints the mean test accuracy per init and the paired difference torch - timm
(mean, sample std, min, max over seeds), then how long each run sits at chance: the first step at which the
training cross-entropy, averaged over the previous 32 steps (2 epochs), falls below 0.8 ln K (chance is ln K).

    python benchmarks/init_plateau.py [--tasks digits,position4,position16] [--steps 300,800,1600]
                                      [--seeds 0,1,2] [--threads 1] [--grid G] [--work DIR] [--quick]

Cost: about 0.25-0.4 s a step on one busy CPU core (T = 16), so the default matrix (3 tasks x 2,700 steps x
2 inits x 3 seeds = 48,600 steps) is 3-5 CPU-hours; `--grid 14` costs 10-15x that. `--work DIR` keeps the
generated images, the stores and every finished run's result (JSON), so a rerun re-extracts nothing and trains
only the runs not yet done (`--fresh` retrains them; several processes with disjoint `--tasks`/`--steps` can
share one DIR); `--report-only` prints the tables from what DIR holds. `--quick` is a smoke test (digits +
position4 at 32 px, 10 / 20 steps, one seed, 64 / 16 / 40 generated images; about a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "vit_tiny_patch16_224"
INITS = ("timm", "torch")
TASKS = ("digits", "position4", "position9", "position16", "spot4", "count4")
GENERATOR_VERSION = 1  # bump when an image generator changes: cached trees and stores are keyed by it
PLATEAU_WINDOW = 32  # steps averaged (2 epochs of train800val200 at batch 64)
PLATEAU_FRACTION = 0.8  # "left chance": trailing mean CE < 0.8 ln K


# ------------------------------------------------------------------------------------------------ data


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)


def position_image(label: int, *, grid: int, seed: int, size: int = 64, side: int | None = None):
    """A bright square (`side` px, default 5/8 of a cell) in cell `label` of a grid x grid layout, jittered
    inside its cell, on faint noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = _noise(rng, size)
    cell = size // grid
    side = side or max(2, (cell * 5) // 8)
    r, c = divmod(int(label), grid)
    slack = cell - side
    y0 = r * cell + int(rng.integers(0, slack + 1))
    x0 = c * cell + int(rng.integers(0, slack + 1))
    arr[y0 : y0 + side, x0 : x0 + side] = (255, 230, 200)
    return Image.fromarray(arr, mode="RGB")


def count_image(label: int, *, seed: int, size: int = 64):
    sys.path.insert(0, str(ROOT / "tests"))
    from countdata import count_image as _count  # the probe tests' counting task, here at 64 px

    return _count(label, seed=seed, size=size)


GENERATED = {
    "position4": (4, lambda label, seed, size: position_image(label, grid=2, seed=seed, size=size)),
    "position9": (9, lambda label, seed, size: position_image(label, grid=3, seed=seed, size=size)),
    "position16": (16, lambda label, seed, size: position_image(label, grid=4, seed=seed, size=size)),
    "spot4": (4, lambda label, seed, size: position_image(label, grid=2, seed=seed, size=size, side=size // 10)),
    "count4": (4, lambda label, seed, size: count_image(label, seed=seed, size=size)),
}


def write_vtab_task(root: Path, task: str, *, n_train: int, n_val: int, n_test: int, size: int) -> None:
    """<root>/<task>/{train800,val200,train800val200,test}.txt + images; labels cycle 0..K-1 in each split.
    Written once: a finished tree has a `.done` marker."""
    folder = root / task
    if (folder / ".done").exists():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from countdata import image_tree  # the probe tests' tree writer

    k, make = GENERATED[task]
    image_tree(folder, task, classes=k, make=make, n_train=n_train, n_val=n_val, n_test=n_test, size=size)
    (folder / ".done").write_text("ok\n")


def build_store(work: Path, task: str, args: argparse.Namespace) -> tuple[Path, str, int, int]:
    """(store path, dataset kind, classes, test images); extracts only what the store lacks."""
    from extract.pipeline import ExtractConfig, extract

    if task == "digits":
        key = f"digits-{MODEL}-{args.image_size}px"
        cfg = ExtractConfig(model=MODEL, dataset="digits", out=str(work / "stores" / key), image_size=args.image_size,
                            random_init=True, seed=0, num_workers=0, batch_size=64, device="cpu")
        classes, n_test, dataset = 10, 797, "digits"
    else:
        sizes = f"{args.n_train}-{args.n_val}-{args.n_test}"
        key = f"{task}-v{GENERATOR_VERSION}-{sizes}-{MODEL}-{args.image_size}px"
        data = work / "data" / f"v{GENERATOR_VERSION}-{sizes}-{args.image_size}px"
        write_vtab_task(data, task, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, size=args.image_size)
        cfg = ExtractConfig(model=MODEL, dataset="vtab", root=str(data), tasks=(task,), out=str(work / "stores" / key),
                            image_size=args.image_size, random_init=True, seed=0, num_workers=0, batch_size=64,
                            device="cpu")
        classes, n_test, dataset = GENERATED[task][0], args.n_test, "vtab"
    started = time.perf_counter()
    result = extract(cfg)
    status = ", ".join(sorted({t.status for t in result.tasks}))
    print(f"  store {task:9s}: {result.store} ({status}, {time.perf_counter() - started:.1f} s)", flush=True)
    return result.store, dataset, classes, n_test


# ------------------------------------------------------------------------------------------------ runs


def plateau_exit(ce: list[float], classes: int) -> int | None:
    """First step (1-based, counting the window) whose trailing PLATEAU_WINDOW-step mean CE < 0.8 ln K."""
    values = np.asarray(ce, dtype=np.float64)
    if values.size < PLATEAU_WINDOW:
        return None
    means = np.convolve(values, np.ones(PLATEAU_WINDOW) / PLATEAU_WINDOW, mode="valid")
    below = np.nonzero(means < PLATEAU_FRACTION * math.log(classes))[0]
    return int(below[0]) + PLATEAU_WINDOW if below.size else None


def probe_once(store: Path, dataset: str, task: str, classes: int, *, steps: int, seed: int, init: str,
               work: Path, grid: int | None = None) -> dict:
    from probe.run import ProbeConfig, run_probe

    cfg = ProbeConfig(stores=(str(store),), dataset=dataset, tasks=(task,), protocol="final", steps=steps, seed=seed,
                      init=init, device="cpu", out=str(work / "runs"), cache="ram", grid=grid)
    run = run_probe(cfg)
    m, fit = run.metrics[0], run.fits[0]
    return {"task": task, "steps": steps, "seed": seed, "init": init, "accuracy": m["accuracy"], "n": m["n"],
            "n_train": m["n_train"], "grid": m.get("grid"), "final_loss": m["final_loss"],
            "train_seconds": m["train_seconds"], "plateau_exit": plateau_exit(fit.history["ce"], classes),
            "ce": [round(float(v), 4) for v in fit.history["ce"]], "run_dir": str(run.run_dir)}


def time_steps(store: Path, dataset: str, task: str, work: Path, steps: int = 50, grid: int | None = None) -> float:
    """Seconds per training step (the paper's adapter, this store), from one `steps`-step run."""
    from probe.run import ProbeConfig, run_probe

    run = run_probe(ProbeConfig(stores=(str(store),), dataset=dataset, tasks=(task,), steps=steps, seed=0,
                                device="cpu", out=str(work / "runs-timing"), cache="ram", grid=grid))
    return run.metrics[0]["train_seconds"] / steps


# ---------------------------------------------------------------------------------------------- report


def _fmt_steps(v: int | None) -> str:
    return "never" if v is None else str(v)


def report(results: list[dict], tasks: list[str], steps_list: list[int], seeds: list[int], info: dict) -> None:
    """Tables over the (task, steps) cells; a cell uses the seeds that have both inits (paired)."""
    by = {(r["task"], r["steps"], r["seed"], r["init"]): r for r in results}
    steps_sorted = sorted(steps_list)

    def paired(task: str, steps: int) -> list[int]:
        return [s for s in seeds if all((task, steps, s, i) in by for i in INITS)]

    print()
    print(f"Test accuracy, mean over paired seeds (of {','.join(map(str, seeds))}); diff = torch - timm per seed, "
          "in accuracy points")
    header = ("| task | classes (chance) | test n | steps | seeds | timm | torch | diff mean | diff std | diff min | "
              "diff max |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for task in tasks:
        k, n_test = info[task]
        for steps in steps_sorted:
            ss = paired(task, steps)
            if not ss:
                print(f"| {task} | {k} ({1 / k:.2f}) | {n_test} | {steps} | 0 | - | - | - | - | - | - |")
                continue
            timm = [by[task, steps, s, "timm"]["accuracy"] for s in ss]
            torch_ = [by[task, steps, s, "torch"]["accuracy"] for s in ss]
            diff = [100 * (b - a) for a, b in zip(timm, torch_)]
            std = f"{statistics.stdev(diff):.1f}" if len(diff) > 1 else "-"
            print(f"| {task} | {k} ({1 / k:.2f}) | {n_test} | {steps} | {len(ss)} | {statistics.mean(timm):.3f} | "
                  f"{statistics.mean(torch_):.3f} | {statistics.mean(diff):+.1f} | {std} | {min(diff):+.1f} | "
                  f"{max(diff):+.1f} |")
    print()
    print("Per seed, accuracy timm / torch:")
    for task in tasks:
        for steps in steps_sorted:
            cells = ", ".join(f"s{s} {by[task, steps, s, 'timm']['accuracy']:.3f}/{by[task, steps, s, 'torch']['accuracy']:.3f}"
                              for s in paired(task, steps))
            print(f"  {task:9s} {steps:5d}: {cells or '-'}")
    print()
    print(f"Steps at chance: first step whose trailing {PLATEAU_WINDOW}-step mean training CE < {PLATEAU_FRACTION} ln K, "
          "per seed ('never': not within the run)")
    print("| task | steps | timm | torch |")
    print("|---|---|---|---|")
    for task in tasks:
        for steps in steps_sorted:
            ss = paired(task, steps)
            cols = [" ".join(_fmt_steps(by[task, steps, s, init]["plateau_exit"]) for s in ss) or "-" for init in INITS]
            print(f"| {task} | {steps} | {cols[0]} | {cols[1]} |")
    print()
    final = max(steps_list)
    verdict = []
    for task in tasks:
        ss = paired(task, final)
        if ss:
            diff = [100 * (by[task, final, s, "torch"]["accuracy"] - by[task, final, s, "timm"]["accuracy"]) for s in ss]
            verdict.append((task, statistics.mean(diff), min(diff), len(ss)))
    if verdict:
        ok = all(d >= -1.0 for _, d, _, _ in verdict) and len(verdict) == len(tasks)
        print(f"At {final} steps, torch - timm (mean paired difference [worst seed], points): "
              + ", ".join(f"{t} {d:+.1f} [{w:+.1f}] (n={n})" for t, d, w, n in verdict)
              + f" -> torch is {'no worse than' if ok else 'NOT shown no worse than'} timm (mean >= -1 point) "
              + ("on every task" if len(verdict) == len(tasks) else "on the tasks measured"))


# ------------------------------------------------------------------------------------------------ main


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,position4,position16", help=f"comma-separated, of {','.join(TASKS)}")
    parser.add_argument("--steps", default="300,800,1600", help="step budgets, one run each")
    parser.add_argument("--seeds", default="0,1,2", help="probe seeds, each used by both inits")
    parser.add_argument("--n-train", type=int, default=800, help="generated tasks: train800 images")
    parser.add_argument("--n-val", type=int, default=200, help="generated tasks: val200 images")
    parser.add_argument("--n-test", type=int, default=500, help="generated tasks: test images")
    parser.add_argument("--image-size", type=int, default=64, help="backbone input size (64: a 4x4 token grid)")
    parser.add_argument("--grid", type=int, default=None, help="ComBo's token grid G (GxG); default: the store's "
                        "native grid (4x4 at 64 px). 14 is the grid of 224 px ViT-B/16 stores (T = 196: 10-15x the cost)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on 2 shared cores, 2 threads ran a "
                        "step 6x slower than 1)")
    parser.add_argument("--work", type=Path, default=None, help="cache folder for data, stores and results "
                        "(default: a new temp dir)")
    parser.add_argument("--timing-steps", type=int, default=50, help="steps of the timing run that prints the "
                        "cost estimate (0: none)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs whose results are cached in --work")
    parser.add_argument("--report-only", action="store_true", help="print the tables from the results cached in "
                        "--work (missing runs are left out), train nothing")
    parser.add_argument("--quick", action="store_true", help="smoke test: digits,position4 at 32 px (2x2 grid); "
                        "10,20 steps; seed 0; 64/16/40 generated images")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.seeds, args.image_size = "digits,position4", "10,20", "0", 32
        args.n_train, args.n_val, args.n_test = 64, 16, 40
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    steps_list, seeds = _ints(args.steps), _ints(args.seeds)

    import timm
    import torch

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="combo-plateau-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print("command: " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, Path.cwd())
                                                            if sys.executable.startswith(str(Path.cwd())) else
                                                            sys.executable, *sys.argv]))
    print(f"env: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s), nice {os.nice(0)}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; work dir {work}")
    print(f"model {MODEL} random-init (seed 0) at {args.image_size} px; adapter 128x6, 2 heads, batch 64, lr 1e-3; "
          f"protocol final; ComBo grid {f'{args.grid}x{args.grid} (--grid)' if args.grid else 'native (the store grid)'}; "
          f"generated splits {args.n_train}/{args.n_val}/{args.n_test} (train800/val200/test)")

    stores, info = {}, {}
    for task in tasks:
        store, dataset, k, n_test = build_store(work, task, args)
        stores[task] = (store, dataset, k)
        info[task] = (k, n_test)

    results_dir = work / "results"
    results_dir.mkdir(exist_ok=True)

    def key(task: str, steps: int, seed: int, init: str) -> Path:
        sizes = "digits" if task == "digits" else f"v{GENERATOR_VERSION}-{args.n_train}-{args.n_val}-{args.n_test}"
        grid = f"-grid{args.grid}" if args.grid else ""
        return results_dir / f"{task}-{sizes}-{MODEL}-{args.image_size}px{grid}-s{steps}-seed{seed}-{init}.json"

    # in --steps order, then seed, task, init: a run stopped early leaves whole paired step budgets behind
    todo = [(t, s, seed, init) for s in steps_list for seed in seeds for t in tasks for init in INITS]
    pending = [] if args.report_only else [j for j in todo if args.fresh or not key(*j).exists()]
    timing_steps = 10 if args.quick else args.timing_steps
    if pending and timing_steps > 0:
        per_step = time_steps(*stores[tasks[0]][:2], tasks[0], work, steps=timing_steps, grid=args.grid)
        total_steps = sum(s for _, s, _, _ in pending)
        print(f"timing: {per_step * 1000:.0f} ms/step ({tasks[0]}, {timing_steps} steps); {len(pending)} of {len(todo)} "
              f"runs to train, {total_steps} steps -> about {total_steps * per_step / 60:.0f} min of training",
              flush=True)

    results = []
    for n, job in enumerate(todo, 1):
        path = key(*job)
        if job in pending:
            task, steps, seed, init = job
            store, dataset, k = stores[task]
            r = probe_once(store, dataset, task, k, steps=steps, seed=seed, init=init, work=work, grid=args.grid)
            path.write_text(json.dumps(r))
            print(f"  [{n}/{len(todo)}] {task} steps {steps} seed {seed} {init}: acc {r['accuracy']:.3f}, "
                  f"left chance at step {_fmt_steps(r['plateau_exit'])}, {r['train_seconds']:.0f} s "
                  f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)", flush=True)
        if path.exists():
            results.append(json.loads(path.read_text()))
    report(results, tasks, steps_list, seeds, info)
    print(f"wall time {(time.perf_counter() - started) / 60:.1f} min ({len(pending)} runs trained, "
          f"{len(results) - len(pending)} read from {results_dir})")


if __name__ == "__main__":
    main()
