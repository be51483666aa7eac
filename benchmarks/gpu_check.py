"""The GPU path in one command: extraction overhead, ComBo from `--cache device`, stream vs device, CPU vs GPU.

Four figures, each through the project's own code (nothing re-implemented):

1. Extraction: ViT-B/16 (timm ``vit_base_patch16_224``, random init, never a download) at 224 px on a generated
   VTAB-layout task (JPEGs: train800 + val200 + test). *Bare forward*: ``block_tokens`` inside
   ``inference_context`` (bf16 autocast on CUDA) on batches decoded beforehand and held in memory, the features
   brought back to the host as float16, as the store holds them. *With store writes*: ``extract.pipeline.extract``
   on the same images and batch size, writing a real zarr store (DataLoader decoding, the writer thread's
   compression, checksums, journal, finalize). The ratio is bare img/s / extraction img/s, the extraction timed
   over its image loop (``TaskResult.seconds``: the task opened, every image decoded, run and written, the task
   finalized); the whole ``extract()`` call (model build and dataset planning too) is printed beside it.
   Goal <= 1.05.
2. ComBo: the paper's adapter (``probe.run.ProbeConfig`` defaults: width 128, depth 6, 2 heads, batch 64,
   AdamW 1e-3, warm-up + cosine) trained 1,600 steps by ``probe.run.fit_task`` on that store's train800val200
   split with ``cache="device"``. Goal: the training (``train_steps``, loading the split onto the GPU included)
   <= 60 s; the fit with its evaluation on the test split is printed too, with the GPU memory peak and what
   ``--cache auto`` picks.
3. Stream vs device: steps/s of the same adapter fed by ``training_batches`` from a ``stream`` plan (budget a
   third of the split, so it really streams shuffle windows from the store) and from a ``device`` plan, after a
   few warm-up steps each; ratio stream / device (no goal in the issue; benchmarks/probe_stream.py holds
   stream / ram to >= 0.95).
4. CPU vs GPU: the same backbone's block outputs for a few images, on the CPU in float32 and on the GPU (bf16
   autocast), both through ComBo's per-map normalisation (``probe.align.normalise_maps``); the largest absolute
   difference of the normalised maps and the largest relative (Frobenius) error over layers, for the GPU's
   float32 output and for it cast to float16 as stored. Without a GPU the CPU's own bf16 autocast stands in, and
   the figures say so ("cpu-bf16 proxy").

Usage:

    python benchmarks/gpu_check.py [--json PATH] [--small] [--threads N] [--device cpu|cuda]

``--small`` is a CPU smoke run (a 2-block vit_tiny at 64 px, 80 images, 40 + 15 probe steps; well under a minute
on 2 cores): the goals are stated for the full run on a GPU and are printed, but not judged, there.
tests/test_gpu_check.py runs it.

On the GPU machine (python 3.12, torch, timm, typer, pyarrow, fsspec; no zarr, numcodecs, dask, jsonschema, and
no network): first, here, ``bash benchmarks/fetch_wheels.sh`` (downloads the missing wheels, ~12 MiB, into the
git-ignored .whl/), then run this with ``carry [".whl"]`` and ``timeout_s`` 480 (the check is sized to finish in
under 8 minutes on one H200; ``phase_seconds`` in the JSON says where the time went):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit; \
        set -o pipefail; python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

and copy the table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds extract/, probe/, store_schema/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

TASK = "clevr_count"  # a VTAB task name, so the store reads like a real one (group "structured")
GOAL_RATIO = 1.05
GOAL_SECONDS = 60.0


# ----------------------------------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict:
    if args.small:
        full = dict(model="vit_tiny_patch16_224", model_kwargs={"depth": 2}, image_size=64, source_size=80,
                    n_train=48, n_val=16, n_test=16, batch_size=16, steps=40, rate_steps=15, warmup_steps=3,
                    diff_images=4, rows_per_shard=8)  # small shards: the stream plan still reads several windows
    else:
        full = dict(model="vit_base_patch16_224", model_kwargs={}, image_size=224, source_size=256,
                    n_train=800, n_val=200, n_test=100, batch_size=32, steps=1600, rate_steps=100, warmup_steps=10,
                    diff_images=8, rows_per_shard=None)  # None: the default 32 MiB shards (9 ViT-B rows)
    for key in ("batch_size", "steps", "rate_steps"):
        value = getattr(args, key)
        if value is not None:
            full[key] = value
    full["num_workers"] = args.num_workers if args.num_workers is not None else (0 if args.small else None)
    return full


# ----------------------------------------------------------------------------------------------- data


def count_image(label: int, *, seed: int, size: int) -> Image.Image:
    """Faint noise plus label + 1 bright squares in random quadrants (a clevr_count-like task)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    half, pad = size // 2, max(1, size // 16)
    for quadrant in rng.permutation(4)[: int(label) + 1]:
        r, c = divmod(int(quadrant), 2)
        arr[r * half + pad : (r + 1) * half - pad, c * half + pad : (c + 1) * half - pad] = (255, 230, 200)
    return Image.fromarray(arr, mode="RGB")


def write_vtab_task(root: Path, *, n_train: int, n_val: int, n_test: int, size: int) -> list[Path]:
    """<root>/<TASK>/{train800,val200,train800val200,test}.txt and JPEGs (train800val200 lists the same files)."""
    folder = root / TASK
    lists: dict[str, list[str]] = {}
    paths = []
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lists[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            label = i % 4
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            count_image(label, seed=zlib.crc32(f"{split}/{i}".encode()), size=size).save(folder / rel, quality=90)
            lists[split].append(f"{rel} {label}\n")
            paths.append(folder / rel)
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("".join(lines))
    return paths


# ----------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_batches(paths: list[Path], backbone, batch_size: int) -> list[torch.Tensor]:
    from extract.images import preprocess

    batches = []
    for s in range(0, len(paths), batch_size):
        imgs = []
        for p in paths[s : s + batch_size]:
            with Image.open(p) as im:
                imgs.append(preprocess(im.convert("RGB"), image_size=backbone.image_size, mean=backbone.mean,
                                       std=backbone.std))
        batches.append(torch.stack(imgs))
    return batches


def map_differences(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """ComBo-normalised maps of both ([B, L, T, D]): max |a - b| and ||a - b|| / ||a|| per layer."""
    from probe.align import normalise_maps

    a = normalise_maps(reference.float())
    b = normalise_maps(other.float())
    diff = (a - b).double()
    per_layer_abs = diff.abs().amax(dim=(0, 2, 3))
    per_layer_rel = diff.pow(2).sum(dim=(0, 2, 3)).sqrt() / a.double().pow(2).sum(dim=(0, 2, 3)).sqrt()
    worst = int(per_layer_rel.argmax())
    return {
        "max_abs": float(per_layer_abs.max()),
        "max_rel": float(per_layer_rel.max()),
        "mean_abs": float(diff.abs().mean()),
        "worst_layer": worst,
        "per_layer_max_abs": [round(float(v), 6) for v in per_layer_abs],
        "per_layer_rel": [round(float(v), 6) for v in per_layer_rel],
    }


# ----------------------------------------------------------------------------------------------- the parts


def cpu_vs_device(backbone, images: torch.Tensor, device: torch.device) -> dict:
    """Figure 4. The backbone is on the CPU when called and on `device` when it returns."""
    from extract.backbones import block_tokens, inference_context

    with inference_context("cpu"):
        ref, _ = block_tokens(backbone, images)  # float32 on the CPU
    if device.type == "cuda":
        backbone.model.to(device)
        with inference_context(device):  # bf16 autocast, as extraction runs
            other, _ = block_tokens(backbone, images.to(device))
        other = other.cpu()
        what = f"{device.type} bf16 autocast vs cpu fp32"
    else:  # no GPU: the CPU's own bf16 autocast shows the size of bf16's error
        with torch.inference_mode(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            other, _ = block_tokens(backbone, images)
        what = "cpu-bf16 proxy (no GPU): cpu bf16 autocast vs cpu fp32"
    return {"compared": what, "images": int(images.shape[0]), "as_computed": map_differences(ref, other),
            "as_stored_float16": map_differences(ref, other.to(torch.float16))}


def bare_forward(backbone, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for every batch through block_tokens, features back on the host as float16."""
    from extract.backbones import block_tokens, inference_context

    with inference_context(device):  # warm-up: kernels, cuBLAS handles, allocator
        block_tokens(backbone, batches[0].to(device))
    sync(device)
    started = time.perf_counter()
    for x in batches:
        with inference_context(device):
            patch, prefix = block_tokens(backbone, x.to(device, non_blocking=True))
        patch.to(torch.float16).cpu()
        if backbone.num_prefix_tokens:
            prefix.to(torch.float16).cpu()
    sync(device)
    return time.perf_counter() - started


def combo_fit(aligned, cfg, device: torch.device) -> dict:
    """Figure 2: `combo probe --cache device` on one task (fit_task: train, then evaluate)."""
    from probe.data import plan_cache
    from probe.run import fit_task, sources_for, task_splits

    _, _, train_rows, _ = task_splits(aligned, cfg)
    auto = plan_cache(sources_for(aligned, train_rows, "combo"), mode="auto", budget_bytes=cfg.cache_budget,
                      device=device, batch_size=cfg.batch_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    fit = fit_task(aligned, cfg, device=device)
    sync(device)
    wall = time.perf_counter() - started
    return {
        "steps": cfg.total_steps,
        "train_seconds": float(fit.history["seconds"]),
        "fit_seconds": wall,
        "cache": fit.metrics["cache"],
        "auto_cache": auto.mode,
        "accuracy": float(fit.metrics["accuracy"]),
        "n_eval": int(fit.metrics["n"]),
        "final_loss": float(fit.metrics["final_loss"]),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def steps_per_second(aligned, cfg, device: torch.device, mode: str, *, steps: int, warmup: int) -> dict:
    """Figure 3: train_steps fed by training_batches from one cache plan, after `warmup` steps."""
    from probe.data import plan_cache, training_batches
    from probe.run import model_and_prepare, sources_for, task_splits
    from probe.train import TrainConfig, set_seed, train_steps

    _, _, train_rows, _ = task_splits(aligned, cfg)
    source = sources_for(aligned, train_rows, "combo")
    split_bytes = source.n * source.row_bytes()
    budget = max(1, split_bytes // 3) if mode == "stream" else 2 * split_bytes
    plan = plan_cache(source, mode=mode, budget_bytes=budget, device=device, batch_size=cfg.batch_size)
    set_seed(cfg.seed)
    _, _, model, prepare = model_and_prepare(aligned, source, cfg)
    batches = training_batches(source, plan, batch_size=cfg.batch_size, seed=cfg.seed, device=device)
    try:
        next(batches)  # a cached plan reads the whole split here; a stream starts its reader thread
        train_steps(model, batches, TrainConfig(steps=warmup, batch_size=cfg.batch_size), device=device, prepare=prepare)
        sync(device)
        started = time.perf_counter()
        train_steps(model, batches, TrainConfig(steps=steps, batch_size=cfg.batch_size), device=device, prepare=prepare)
        sync(device)
        seconds = time.perf_counter() - started
    finally:
        batches.close()
    return {"mode": plan.mode, "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "window_rows": plan.window_rows, "split_mib": split_bytes / 2**20, "note": plan.note}


# ----------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import timm

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "cuda": torch.version.cuda, "device": str(device), "torch_threads": torch.get_num_threads()}
    try:
        import zarr

        env["zarr"] = zarr.__version__
    except ImportError:  # pragma: no cover - the store code would have failed already
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        env["device_name"] = cpu_name()
    return env


def run(args: argparse.Namespace) -> dict:
    from extract.backbones import load_backbone, pick_device
    from extract.pipeline import ExtractConfig, extract
    from probe.run import ProbeConfig
    from probe.stores import align_tasks, open_stores

    s = settings(args)
    device = pick_device(args.device)
    env = environment(device)
    print(f"gpu_check{' --small' if args.small else ''}: {env['device_name']} ({device}), torch {env['torch']} "
          f"(CUDA {env['cuda']}), timm {env['timm']}, python {env['python']}, {env['torch_threads']} torch threads",
          flush=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        t = time.perf_counter()
        paths = write_vtab_task(work / "vtab", n_train=s["n_train"], n_val=s["n_val"], n_test=s["n_test"],
                                size=s["source_size"])
        phases = {"write_images": time.perf_counter() - t}
        print(f"  wrote {len(paths)} JPEGs ({s['source_size']} px) in {time.perf_counter() - t:.1f} s", flush=True)

        # 4 (first, while the model is on the CPU), then 1: bare forward
        backbone = load_backbone(s["model"], image_size=s["image_size"], random_init=True, seed=0,
                                 model_kwargs=s["model_kwargs"])
        batches = decode_batches(paths, backbone, s["batch_size"])
        diff_images = torch.cat(batches)[: s["diff_images"]]
        t = time.perf_counter()
        diffs = cpu_vs_device(backbone, diff_images, device)
        phases["cpu_vs_device"] = time.perf_counter() - t
        print(f"  {diffs['compared']}: {phases['cpu_vs_device']:.1f} s", flush=True)
        backbone.model.to(device)
        bare = bare_forward(backbone, batches, device)
        n_images = sum(int(b.shape[0]) for b in batches)
        del backbone, batches
        phases["bare_forward"] = bare
        print(f"  bare forward: {n_images} images in {bare:.2f} s", flush=True)

        # 1: extraction through the pipeline, into a real store
        cfg = ExtractConfig(model=s["model"], dataset="vtab", root=str(work / "vtab"), tasks=(TASK,),
                            out=str(work / "stores"), image_size=s["image_size"], random_init=True, seed=0,
                            batch_size=s["batch_size"], device=str(device), model_kwargs=s["model_kwargs"] or None,
                            rows_per_shard=s["rows_per_shard"],
                            **({"num_workers": s["num_workers"]} if s["num_workers"] is not None else {}))
        fallback = None
        t = time.perf_counter()
        try:
            result = extract(cfg)
        except RuntimeError as err:
            if not cfg.num_workers:
                raise
            # e.g. DataLoader workers short of shared memory (/dev/shm) on a bare machine: say so, and still
            # measure the rest, decoding in the main process, into a fresh store
            fallback = f"{type(err).__name__}: {err}"[:500]
            print(f"  warning: extraction with {cfg.num_workers} decode workers failed ({fallback}); "
                  "again with --num-workers 0", flush=True)
            cfg = replace(cfg, num_workers=0, out=str(work / "stores-no-workers"))
            t = time.perf_counter()
            result = extract(cfg)
        whole = phases["extract"] = time.perf_counter() - t
        loop = sum(task.seconds for task in result.tasks)
        if result.images != n_images:
            raise RuntimeError(f"extraction ran {result.images} images, the bare forward {n_images}")
        print(f"  extraction: {result.images} images in {loop:.2f} s (whole call {whole:.2f} s), store "
              f"{result.bytes_on_disk / 2**20:.0f} MiB", flush=True)
        extraction = {
            "model": s["model"], "model_kwargs": s["model_kwargs"], "image_size": s["image_size"],
            "images": n_images, "batch_size": s["batch_size"], "num_workers": cfg.num_workers,
            "bare_seconds": bare, "bare_images_per_s": n_images / bare,
            "extract_seconds": loop, "extract_images_per_s": n_images / loop,
            "extract_call_seconds": whole, "extract_call_images_per_s": n_images / whole,
            "ratio": (n_images / bare) / (n_images / loop),
            "ratio_whole_call": (n_images / bare) / (n_images / whole),
            "store_mib": result.bytes_on_disk / 2**20, "workers_failed": fallback,
        }

        # 2 and 3: ComBo from the store
        aligned = align_tasks(open_stores([str(result.store)]), TASK)
        probe_cfg = ProbeConfig(stores=(str(result.store),), dataset="vtab", tasks=(TASK,), cache="device",
                                steps=s["steps"], device=str(device))
        t = time.perf_counter()
        combo = combo_fit(aligned, probe_cfg, device)
        phases["combo_fit"] = time.perf_counter() - t
        print(f"  ComBo {combo['steps']} steps ({combo['cache']} cache): train {combo['train_seconds']:.1f} s, fit "
              f"{combo['fit_seconds']:.1f} s", flush=True)
        rates = {mode: steps_per_second(aligned, probe_cfg, device, mode, steps=s["rate_steps"],
                                        warmup=s["warmup_steps"])
                 for mode in ("device", "stream")}
        phases["stream_vs_device"] = time.perf_counter() - t - phases["combo_fit"]
        del aligned

    stream = {"device": rates["device"], "stream": rates["stream"],
              "ratio": rates["stream"]["steps_per_s"] / rates["device"]["steps_per_s"]}
    goals = {
        "extract_ratio": {"value": extraction["ratio"], "goal": f"<= {GOAL_RATIO}",
                          "met": extraction["ratio"] <= GOAL_RATIO},
        "combo_train_seconds": {"value": combo["train_seconds"], "goal": f"<= {GOAL_SECONDS:g} s for 1600 steps",
                                "met": combo["train_seconds"] <= GOAL_SECONDS and combo["steps"] >= 1600
                                and combo["cache"] == "device"},
    }
    if args.small or device.type != "cuda":
        for goal in goals.values():
            goal["met"] = None  # stated for the full run on a GPU: not judged here
    return {"small": bool(args.small), "environment": env, "settings": s, "extraction": extraction,
            "combo": combo, "stream_vs_device": stream, "cpu_vs_device": diffs, "goals": goals,
            "phase_seconds": {k: round(v, 2) for k, v in phases.items()}}


def verdict(goal: dict) -> str:
    return "n/a (small/CPU run)" if goal["met"] is None else ("MET" if goal["met"] else "NOT MET")


def report(r: dict) -> str:
    e, c, sv, d, g = r["extraction"], r["combo"], r["stream_vs_device"], r["cpu_vs_device"], r["goals"]
    env = r["environment"]
    dev = sv["device"]
    rows = [
        ("extraction, bare forward", f"{e['bare_images_per_s']:.1f} img/s", "", ""),
        ("extraction with store writes (image loop)", f"{e['extract_images_per_s']:.1f} img/s", "", ""),
        ("extraction, whole extract() call", f"{e['extract_call_images_per_s']:.1f} img/s", "", ""),
        ("ratio bare / with writes", f"{e['ratio']:.3f}", f"<= {GOAL_RATIO}", verdict(g["extract_ratio"])),
        ("ratio bare / whole call", f"{e['ratio_whole_call']:.3f}", "", ""),
        (f"ComBo {c['steps']} steps, cache {c['cache']}: training", f"{c['train_seconds']:.1f} s",
         f"<= {GOAL_SECONDS:g} s", verdict(g["combo_train_seconds"])),
        ("  the fit with its evaluation", f"{c['fit_seconds']:.1f} s", "", ""),
        ("  accuracy (random-init features)", f"{100 * c['accuracy']:.1f}% of {c['n_eval']}", "", ""),
        ("  --cache auto picks", c["auto_cache"], "", ""),
        ("  GPU memory peak", "n/a (no GPU)" if c["peak_gpu_gib"] is None else f"{c['peak_gpu_gib']:.2f} GiB", "", ""),
        (f"probe steps/s, {dev['mode']} cache", f"{dev['steps_per_s']:.2f}", "", ""),
        (f"probe steps/s, stream cache (window {sv['stream']['window_rows'] or 'whole split'}"
         f"{' rows' if sv['stream']['window_rows'] else ''})",
         f"{sv['stream']['steps_per_s']:.2f}", "", ""),
        (f"ratio stream / {dev['mode']}", f"{sv['ratio']:.3f}", "(info)", ""),
        ("normalised maps, max |diff| (as computed)", f"{d['as_computed']['max_abs']:.4g}", "(info)", ""),
        ("normalised maps, max rel. error (as computed)",
         f"{d['as_computed']['max_rel']:.4g} (layer {d['as_computed']['worst_layer']})", "(info)", ""),
        ("normalised maps, max |diff| (stored float16)", f"{d['as_stored_float16']['max_abs']:.4g}", "(info)", ""),
        ("normalised maps, max rel. error (stored float16)", f"{d['as_stored_float16']['max_rel']:.4g}", "(info)", ""),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [
        "",
        f"== gpu_check{' --small' if r['small'] else ''}: {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"CUDA {env['cuda']}, timm {env['timm']}, zarr {env.get('zarr')}, python {env['python']}",
        f"   {e['model']} @ {e['image_size']} px{' ' + str(e['model_kwargs']) if e['model_kwargs'] else ''}, random init; "
        f"{e['images']} images, batch {e['batch_size']}, {e['num_workers']} decode workers; store {e['store_mib']:.0f} MiB",
        f"   CPU vs GPU: {d['compared']}, {d['images']} images, after ComBo's per-map normalisation",
    ]
    lines += [f"   {name:<{width}}  {value:>{vwidth}}  {goal:<12} {met}".rstrip() for name, value, goal, met in rows]
    if e.get("workers_failed"):
        lines.append(f"   note: extraction with decode workers failed ({e['workers_failed'][:200]}); measured with 0 workers")
    judged = [k for k, v in g.items() if v["met"] is not None]
    if judged:
        met = [k for k in judged if g[k]["met"]]
        lines.append(f"   goals met: {len(met)}/{len(judged)}" + (f"; not met: {', '.join(k for k in judged if k not in met)}"
                                                                     if len(met) < len(judged) else ""))
    else:
        lines.append("   goals are stated for the full run on a GPU; not judged on this run")
    return "\n".join(lines)


def finite_positive(r: dict) -> list[str]:
    """Names of the figures that are not finite and positive (a failed measurement)."""
    figures = {
        "extraction.bare_images_per_s": r["extraction"]["bare_images_per_s"],
        "extraction.extract_images_per_s": r["extraction"]["extract_images_per_s"],
        "extraction.ratio": r["extraction"]["ratio"],
        "combo.train_seconds": r["combo"]["train_seconds"],
        "combo.fit_seconds": r["combo"]["fit_seconds"],
        "stream_vs_device.device.steps_per_s": r["stream_vs_device"]["device"]["steps_per_s"],
        "stream_vs_device.stream.steps_per_s": r["stream_vs_device"]["stream"]["steps_per_s"],
        "stream_vs_device.ratio": r["stream_vs_device"]["ratio"],
        "cpu_vs_device.as_computed.max_rel": r["cpu_vs_device"]["as_computed"]["max_rel"],
        "cpu_vs_device.as_stored_float16.max_rel": r["cpu_vs_device"]["as_stored_float16"]["max_rel"],
    }
    return [k for k, v in figures.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny CPU smoke run (the test's)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=None, help="extraction batch (default 32; --small 16)")
    parser.add_argument("--steps", type=int, default=None, help="ComBo steps from the device cache (default 1600)")
    parser.add_argument("--rate-steps", type=int, default=None, help="timed steps per cache mode (default 100)")
    parser.add_argument("--num-workers", type=int, default=None, help="extraction decode workers (default: extract's)")
    parser.add_argument("--workdir", default=None, help="keep images and store here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    print(report(result))
    print(f"   total {result['seconds']:.0f} s")
    bad = finite_positive(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if bad:
        print(f"error: figures not finite and positive: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
