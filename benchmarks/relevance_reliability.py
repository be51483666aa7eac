"""When can the paper's backbone ranking (s_k) be believed, and when the held-out drop? Ground-truth stores.

`combo relevance` (probe/relevance.py) trains ComBo once per task with loss = CE + lambda * sum_k s_k, where
s_k = ||Lambda weight slice of backbone k||_F (the paper's importance), on the dev protocol's training split
(train800), and measures beside it the held-out drop: the accuracy lost on val200 when backbone k's features
are shuffled across samples (95% interval). This benchmark builds stores whose usefulness is known by
construction, runs `run_relevance` over a matrix of settings and counts how often each measure names the right
store, and how often the run's warnings fire.

Stores (all hold the same samples, ids and labels: sklearn's bundled digits, 10 classes; written through
store_schema with `tests/storefactory.write_store`, VTAB-like splits: `n_train` train800 rows + 200 val200
rows; the 200 val200 rows are the same for every train size and the train rows of a smaller size are a
subset of those of a larger one):
  informative   features of a random-init timm `vit_tiny_patch16_224` (seed 0) at 32 px (2x2 token grid,
                D = 192, patch tokens), `--info-layers` blocks (default 2,5,8,11: 4 layers); extracted once
                with `extract.pipeline.extract(ExtractConfig(..., dataset="digits", random_init=True))`
  weak          a degraded copy of informative: one layer (the last of --info-layers), z-scored, plus
                N(0, `--weak-noise`^2) noise; every other layer replaced by N(0, 1) noise. It is a function of
                the informative features plus independent noise, so it can never carry more about the label
                than informative (data-processing inequality): informative is the truly most informative store
  useless       N(0, 1) noise of informative's shape (4 layers): independent of the labels
  informative1  the last informative layer alone (1 layer)
  useless8      N(0, 1) noise with `--trap-layers` (default 8) layers: the slice-size trap (its Lambda slice
                has 8x the entries of informative1's)
Combinations (`--combos`; "right" = the truly most informative store, in capitals):
  IU    INFORMATIVE + useless          IW    INFORMATIVE + weak           WU    WEAK + useless
  IWU   INFORMATIVE + weak + useless   trap  INFORMATIVE1 + useless8 (the layer-count trap)
each in the listed store order and reversed (`--orders fwd,rev`).

Per cell (combination x train size x lambda x init), over seeds and both orders, the table prints:
  runs       relevance runs in the cell
  sk@1       fraction of runs where s_k ranks the right store first
  sk_marg    mean of (s_k share of the right store - the largest s_k share of a wrong store); > 0 = right
  drop@1     fraction of runs where the held-out drop ranks the right store first
  drop_marg  mean of (right store's drop - largest wrong store's drop), accuracy points
  drop_ci    fraction of runs where the right store's drop interval is above 0 (low > 0) and every useless
             (pure-noise) store's interval contains 0 or is below it (low <= 0); a weak store, which does
             carry some information, is not constrained
  acc/chance mean held-out (val200) accuracy of the penalised probe / chance (most frequent class), %
  warn       fraction of runs with any warning, then (chance warnings / disagreement warnings) as counts
Then one summary line per measure over all runs, and how the warnings relate to s_k's mistakes.

Default (240 runs; fits ~25 min of wall time on 2 busy CPU cores; a small adapter, NOT the paper's):
    python benchmarks/relevance_reliability.py
  = --combos IU,IW,WU,IWU,trap --train-sizes 200,800 --lambdas 0.01,0.1 --inits timm,torch --seeds 0,1,2
    --orders fwd,rev --steps 300 --width 32 --depth 1 --heads 2 --batch-size 64 --lr 1e-3 --workers 2
Full matrix (paper adapter width 128, depth 6, 1,600 steps, 5 seeds, every train size / lambda / init;
900 runs, many CPU-hours; it was NOT run here):
    python benchmarks/relevance_reliability.py --train-sizes 200,800,1000 --lambdas 0.01,0.03,0.1 \\
        --inits timm,torch --seeds 0,1,2,3,4 --steps 1600 --width 128 --depth 6 --heads 2
Smoke test (< 2 min): --smoke (IU and trap, train 200, lambda 0.01, timm, one seed, 100 steps).
`--work DIR` keeps the extracted features and the stores (otherwise a temp dir, removed at the end).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_VAL = 200
GRID = (2, 2)
BACKBONE = "vit_tiny_patch16_224"
IMAGE_SIZE = 32
COMBOS: dict[str, tuple[list[str], str]] = {  # name -> (stores in forward order, the truly most informative)
    "IU": (["informative", "useless"], "informative"),
    "IW": (["informative", "weak"], "informative"),
    "WU": (["weak", "useless"], "weak"),
    "IWU": (["informative", "weak", "useless"], "informative"),
    "trap": (["informative1", "useless8"], "informative1"),
}
USELESS = {"useless", "useless8"}


def csv(text: str, kind=str) -> list:
    return [kind(v) for v in str(text).split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------- stores


def digits_features(work: Path, threads: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """[N, 12, 4, 192] float32 patch tokens of every digit, labels, sample ids (extracted once, cached in work)."""
    cache = work / "digits_vit.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["tokens"], z["labels"], [str(s) for s in z["ids"]]
    import torch

    from extract.pipeline import ExtractConfig, extract
    from store_schema import open_store

    torch.set_num_threads(threads)
    res = extract(ExtractConfig(model=BACKBONE, dataset="digits", image_size=IMAGE_SIZE, random_init=True, seed=0,
                                num_workers=0, out=str(work / "extracted"), rows_per_shard=64, dtype="float32"))
    task = open_store(res.store).task("digits")
    n = int(task.num_samples)
    tokens = np.asarray(task.read(np.arange(n)), dtype=np.float32)
    table = task.samples
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    ids = [str(s) for s in table.column("sample_id").to_pylist()]
    np.savez(cache, tokens=tokens, labels=labels, ids=np.asarray(ids))
    shutil.rmtree(work / "extracted", ignore_errors=True)
    return tokens, labels, ids


def zscore(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / (x.std() + 1e-8)).astype(np.float32)


def build_stores(work: Path, train_sizes: list[int], *, info_layers: list[int], trap_layers: int, weak_noise: float,
                 threads: int) -> dict[int, dict[str, Path]]:
    from store_schema import StoreLayout
    from tests.storefactory import vtab_like_splits, write_store

    tokens, labels, ids = digits_features(work, threads)
    n_all = tokens.shape[0]
    if max(train_sizes) + N_VAL > n_all:
        raise SystemExit(f"train size {max(train_sizes)} + {N_VAL} val > {n_all} digits")
    perm = np.random.default_rng(0).permutation(n_all)
    val, pool = perm[:N_VAL], perm[N_VAL:]
    info = tokens[:, info_layers]  # [N, L, T, D]
    rng = np.random.default_rng(1234)  # noise is a property of the store, fixed across train sizes and seeds
    weak = rng.standard_normal(info.shape).astype(np.float32)
    weak[:, -1] = zscore(info[:, -1]) + weak_noise * rng.standard_normal(info[:, -1].shape).astype(np.float32)
    full = {
        "informative": info,
        "weak": weak,
        "useless": rng.standard_normal(info.shape).astype(np.float32),
        "informative1": info[:, -1:],
        "useless8": rng.standard_normal((n_all, trap_layers, *info.shape[2:])).astype(np.float32),
    }
    layout = StoreLayout(rows_per_shard=128, rows_per_chunk=64, dtype="float32")
    out: dict[int, dict[str, Path]] = {}
    for n_train in train_sizes:
        rows = np.concatenate([pool[:n_train], val])
        out[n_train] = {}
        for name, x in full.items():
            path = work / f"n{n_train}" / f"{name}.zarr"
            if not (path / "zarr.json").exists() and not path.exists():
                write_store(path, tokens=np.ascontiguousarray(x[rows]), labels=labels[rows].tolist(),
                            splits=vtab_like_splits(n_train, N_VAL, 0), grid=GRID, task="digits", alias=name,
                            dataset="digits", sample_ids=[ids[i] for i in rows], num_classes=10, layout=layout)
            out[n_train][name] = path
    return out


# --------------------------------------------------------------------------------------------------- runs


def one_run(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from probe.relevance import run_relevance
    from probe.run import ProbeConfig

    torch.set_num_threads(job["threads"])
    names = job["stores"]
    out = tempfile.mkdtemp(prefix="rr-run-", dir=job["scratch"])
    started = time.perf_counter()
    try:
        cfg = ProbeConfig(stores=tuple(str(p) for p in job["paths"]), dataset="digits", steps=job["steps"],
                          batch_size=job["batch_size"], lr=job["lr"], seed=job["seed"], grid=GRID, width=job["width"],
                          depth=job["depth"], num_heads=job["heads"], init=job["init"], device="cpu", out=out)
        run = run_relevance(cfg, group_lambda=job["lambda"], heldout_repeats=job["repeats"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = {names[r["store_index"]]: r for r in run.importances}
    right = job["right"]
    wrong = [n for n in names if n != right]
    r = rows[right]
    return {
        **{k: job[k] for k in ("combo", "n_train", "lambda", "init", "seed", "order")},
        "sk_right": r["rank"] == 1,
        "sk_margin": r["importance_normalised"] - max(rows[n]["importance_normalised"] for n in wrong),
        "drop_right": r["heldout_rank"] == 1,
        "drop_margin": r["heldout_drop"] - max(rows[n]["heldout_drop"] for n in wrong),
        "drop_ci": r["heldout_low"] > 0 and all(rows[n]["heldout_low"] <= 0 for n in names if n in USELESS),
        "acc": run.metrics[0]["accuracy"],
        "chance": r["heldout_chance"],
        "warn_chance": sum("not clearly above chance" in w for w in run.warnings),
        "warn_disagree": sum("disagree" in w for w in run.warnings),
        "seconds": time.perf_counter() - started,
    }


def fmt_frac(values: list[bool]) -> str:
    return f"{sum(values)}/{len(values)}"


def table(results: list[dict[str, Any]], combos: list[str]) -> str:
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        cells[(r["combo"], r["n_train"], r["lambda"], r["init"])].append(r)
    head = ("| combo (right) | n_train | lambda | init | runs | sk@1 | sk_marg | drop@1 | drop_marg pts | drop_ci "
            "| acc % | chance % | warn (chance/disagree) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for key in sorted(cells, key=lambda k: (combos.index(k[0]), k[1], k[2], k[3])):
        rs = cells[key]
        combo, n_train, lam, init = key
        warned = [bool(r["warn_chance"] or r["warn_disagree"]) for r in rs]
        lines.append(
            f"| {combo} ({COMBOS[combo][1]}) | {n_train} | {lam:g} | {init} | {len(rs)} "
            f"| {fmt_frac([r['sk_right'] for r in rs])} | {np.mean([r['sk_margin'] for r in rs]):+.3f} "
            f"| {fmt_frac([r['drop_right'] for r in rs])} | {100 * np.mean([r['drop_margin'] for r in rs]):+.1f} "
            f"| {fmt_frac([r['drop_ci'] for r in rs])} | {100 * np.mean([r['acc'] for r in rs]):.1f} "
            f"| {100 * np.mean([r['chance'] for r in rs]):.1f} "
            f"| {fmt_frac(warned)} ({sum(r['warn_chance'] > 0 for r in rs)}/{sum(r['warn_disagree'] > 0 for r in rs)}) |"
        )
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    def frac(key, rs=results):
        v = [bool(r[key]) for r in rs]
        return f"{sum(v)}/{len(v)} ({100 * sum(v) / max(len(v), 1):.0f}%)"

    lines = [
        f"- s_k ranks the right store first: {frac('sk_right')}; mean margin {np.mean([r['sk_margin'] for r in results]):+.3f} (share)",
        f"- held-out drop ranks the right store first: {frac('drop_right')}; mean margin "
        f"{100 * np.mean([r['drop_margin'] for r in results]):+.1f} pts",
        f"- held-out intervals right (right store > 0, every noise store's contains/below 0): {frac('drop_ci')}",
    ]
    by_combo = defaultdict(list)
    for r in results:
        by_combo[r["combo"]].append(r)
    lines.append("- by combination, s_k@1 vs drop@1: " + "; ".join(
        f"{c} {sum(r['sk_right'] for r in rs)}/{len(rs)} vs {sum(r['drop_right'] for r in rs)}/{len(rs)}"
        for c, rs in by_combo.items()))
    by_size = defaultdict(list)
    for r in results:
        by_size[r["n_train"]].append(r)
    lines.append("- by train size, s_k@1 vs drop@1: " + "; ".join(
        f"n={n} {sum(r['sk_right'] for r in rs)}/{len(rs)} vs {sum(r['drop_right'] for r in rs)}/{len(rs)}"
        for n, rs in sorted(by_size.items())))
    wrong = [r for r in results if not r["sk_right"]]
    right = [r for r in results if r["sk_right"]]
    warned = lambda r: bool(r["warn_chance"] or r["warn_disagree"])  # noqa: E731
    lines.append(
        f"- warnings: fired in {sum(map(warned, results))}/{len(results)} runs "
        f"({sum(r['warn_chance'] > 0 for r in results)} chance, {sum(r['warn_disagree'] > 0 for r in results)} disagree); "
        f"in {sum(map(warned, wrong))}/{len(wrong)} runs where s_k was wrong "
        f"(disagree: {sum(r['warn_disagree'] > 0 for r in wrong)}), in {sum(map(warned, right))}/{len(right)} where it was right; "
        f"runs where s_k was wrong AND the drop was right: {sum(r['drop_right'] for r in wrong)}, of which warned "
        f"{sum(warned(r) for r in wrong if r['drop_right'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--combos", default="IU,IW,WU,IWU,trap")
    p.add_argument("--train-sizes", default="200,800", help="train800 rows used (200 / 800 / 1000)")
    p.add_argument("--lambdas", default="0.01,0.1", help="group-penalty lambdas (0.01 = paper)")
    p.add_argument("--inits", default="timm,torch", help="ComBo init: timm,torch")
    p.add_argument("--seeds", default="0,1,2", help="comma list, or a count (e.g. 5 = 0..4)")
    p.add_argument("--orders", default="fwd,rev")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5, help="held-out shuffles per backbone")
    p.add_argument("--info-layers", default="2,5,8,11", help="ViT blocks kept in the informative store")
    p.add_argument("--trap-layers", type=int, default=8, help="layers of the useless store in the trap")
    p.add_argument("--weak-noise", type=float, default=1.0, help="noise std added to the weak store's one layer")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (processes, 1 torch thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--work", default=None, help="keep features/stores here (default: a temp dir, removed)")
    p.add_argument("--smoke", action="store_true", help="IU,trap; n=200; lambda 0.01; timm; seed 0; 100 steps")
    a = p.parse_args(argv)
    if a.smoke:
        a.combos, a.train_sizes, a.lambdas, a.inits, a.seeds, a.steps = "IU,trap", "200", "0.01", "timm", "0", 100
    started = time.perf_counter()
    combos = csv(a.combos)
    for c in combos:
        if c not in COMBOS:
            raise SystemExit(f"--combos: unknown {c!r} (choose from {', '.join(COMBOS)})")
    seeds = list(range(int(a.seeds))) if a.seeds.strip().isdigit() and "," not in a.seeds and not a.smoke else csv(a.seeds, int)
    if a.smoke:
        seeds = [0]
    train_sizes, lambdas, inits, orders = csv(a.train_sizes, int), csv(a.lambdas, float), csv(a.inits), csv(a.orders)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    own_work = a.work is None
    work = Path(a.work or tempfile.mkdtemp(prefix="relevance-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stores = build_stores(work, train_sizes, info_layers=csv(a.info_layers, int), trap_layers=a.trap_layers,
                              weak_noise=a.weak_noise, threads=max(a.workers * a.threads, 1))
        prep = time.perf_counter() - started
        jobs = []
        for combo in combos:
            names, right = COMBOS[combo]
            for n_train in train_sizes:
                for lam in lambdas:
                    for init in inits:
                        for seed in seeds:
                            for order in orders:
                                ordered = names if order == "fwd" else names[::-1]
                                jobs.append({
                                    "combo": combo, "n_train": n_train, "lambda": lam, "init": init, "seed": seed,
                                    "order": order, "stores": ordered, "right": right,
                                    "paths": [str(stores[n_train][n]) for n in ordered], "steps": a.steps,
                                    "batch_size": a.batch_size, "lr": a.lr, "width": a.width, "depth": a.depth,
                                    "heads": a.heads, "repeats": a.repeats, "threads": a.threads,
                                    "scratch": str(work),
                                })
        print(f"# relevance reliability: {len(jobs)} runs ({prep:.0f} s to extract features and write stores)",
              file=sys.stderr, flush=True)
        results = []
        if a.workers <= 1:
            for i, job in enumerate(jobs):
                results.append(one_run(job))
                print(f"  {i + 1}/{len(jobs)} {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        else:
            with ProcessPoolExecutor(max_workers=a.workers) as pool:
                for i, res in enumerate(pool.map(one_run, jobs)):
                    results.append(res)
                    if (i + 1) % 10 == 0 or i + 1 == len(jobs):
                        print(f"  {i + 1}/{len(jobs)} {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    print("# Relevance reliability: s_k (paper) vs held-out drop, on ground-truth stores\n")
    print(f"Stores: digits ({IMAGE_SIZE} px random-init {BACKBONE}, blocks {a.info_layers}; weak = last block z-scored "
          f"+ N(0,{a.weak_noise:g}^2), other layers noise; useless = N(0,1); trap = 1 informative layer vs "
          f"{a.trap_layers} noise layers); val200 = {N_VAL} held-out samples. Probe: ComBo width {a.width}, depth "
          f"{a.depth}, {a.heads} heads, {a.steps} steps, batch {a.batch_size}, lr {a.lr:g}, CPU; {a.repeats} held-out "
          f"shuffles; seeds {','.join(map(str, seeds))}; orders {','.join(orders)}.\n")
    print(table(results, combos))
    print("\nSummary:\n" + summary(results))
    secs = [r["seconds"] for r in results]
    print(f"\nWall time: {wall:.0f} s ({wall / 60:.1f} min; {prep:.0f} s features+stores, {len(results)} runs, "
          f"mean {np.mean(secs):.1f} s per run, {a.workers} worker(s) x {a.threads} thread(s))")
    print(f"Command: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
