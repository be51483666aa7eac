"""What the paper's 4-backbone VTAB-1k study costs on N GPUs: extraction hours, store size, training hours.

Issue 11 asks for the projection before anyone rents the GPUs. Sizes are exact from geometry (PAPER.md's
backbones at 224 px, VTAB.md's split sizes) times ratios measured in this repo (benchmarks/RESULTS.md).
Times come from per-image and per-step costs: measured here on the CPU (random-init ViT-B/16 forward, the
repo's own ComBo adapter through `probe.train.train_steps`), and for the GPU from ``--gpu-images-per-s`` /
``--gpu-steps-per-s`` when measured (benchmarks/gpu_check.py), else from labelled FLOP-based ESTIMATES.

Two ways to run the study's fits (the same fits, the same compute; they differ in what they read):
- separate commands (`combo probe`, `combo relevance`, `combo probe --select`, `--method linear`): one job per
  (task, fit); every job reads its stores' training split once and its evaluation split once, so a backbone's
  test split is read once per fit that uses it (4 backbones: combo on all 4, top-2, 4 alone = 10 full-store
  test reads per task, 2.5 per backbone, plus the linear probes' last layer); `combo relevance` streams
  val200 from the store once per held-out pass (1 + backbones x repeats);
- `combo study`: one job per task (probe/study.py); each split of each store is read once per task: the
  training rows (train800val200, which holds train800 and val200) once into RAM for every fit, the test
  split once for every head.

    python benchmarks/study_projection.py                      # ~35 s on 2 idle CPU cores (measures CPU costs)
    python benchmarks/study_projection.py --no-measure         # arithmetic only
    python benchmarks/study_projection.py --gpu-images-per-s 2500 --gpu-steps-per-s 60   # measured GPU figures
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# VTAB.md, "The 19 tasks": test images per task (its approximate sizes, summing to 387,904).
TEST_IMAGES = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150}
TRAINVAL = 1000  # train800 + val200; train800val200 is the same images, deduplicated by the store (VTAB.md)
TRAIN, VAL = 800, 200  # the relevance pass: PAPER.md's dev protocol (train800 -> val200)
RELEVANCE_STEPS = 1300  # PAPER.md: dev protocol steps (probe.run.PROTOCOL_STEPS["dev"])
HELDOUT_REPEATS = 5  # probe.heldout.HELDOUT_REPEATS: held-out passes per backbone of the relevance pass
ZSTD_RATIO = 0.920  # disk/raw of a float16 store, zstd-1 (RESULTS.md, store_layout / compact_cost)
FORMATS = {"fp16": ZSTD_RATIO, "int8": 0.497, "pca:256+int8": 0.175}  # RESULTS.md compact_cost, ViT-B geometry
VITB16_TIMM_GFLOPS = 17.6  # timm's published figure for vit_base_patch16_224 (multiply-accumulates)


@dataclass(frozen=True)
class Geo:
    """One backbone as the store sees it (PAPER.md: 224x224 input, all 12 blocks, D = 768)."""
    alias: str
    grid: int  # patch grid side at 224 px
    prefix: int  # cls + register tokens kept in the store (SAM, SigLIP: none)
    patch: int = 16
    layers: int = 12
    dim: int = 768
    extra_macs: float = 0.0  # work outside the blocks that forward_features runs (SAM's neck)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid + self.prefix

    def raw_bytes(self) -> int:
        """float16 bytes per image: layers x (patch + prefix tokens) x channels x 2."""
        return self.layers * self.tokens * self.dim * 2

    def read_bytes(self, method: str = "combo") -> int:
        """float16 bytes a fit reads per image (probe.run.sources_for): ComBo every layer's patch tokens, the
        linear probe (pool mean, the authors') the last layer's patch tokens."""
        return (1 if method == "linear" else self.layers) * self.grid * self.grid * self.dim * 2

    def macs(self) -> float:
        """Forward multiply-accumulates per image: patch embed + blocks (qkv, proj, MLP x4, attention)."""
        n, d = self.tokens, self.dim
        embed = self.grid ** 2 * 3 * self.patch ** 2 * d
        block = n * (4 * d * d + 2 * d * 4 * d) + 2 * n * n * d
        return embed + self.layers * block + self.extra_macs


# The paper's four (PAPER.md, results table): SAM, DFN-CLIP, SigLIP, DINOv2 (reg4, registers dropped only
# at probe time: the store keeps cls + 4 registers as prefix tokens).
BACKBONES = (Geo("sam", 14, 0, extra_macs=196 * (768 * 256 + 9 * 256 * 256)),
             Geo("dfn-clip", 14, 1), Geo("siglip", 14, 0), Geo("dinov2", 16, 5, patch=14))
REFERENCE = Geo("vit-b/16", 14, 1)  # timm vit_base_patch16_224: what gpu_check.py and the CPU run measure


def trainings(k: int) -> list[tuple[str, tuple[str, ...]]]:
    """Per task, the paper's study: ComBo on all four, the relevance run (group lasso), top-2 retrained, each
    backbone alone. k > 7 adds 4-backbone runs (e.g. seeds); k < 7 keeps the first k."""
    four = tuple(g.alias for g in BACKBONES)
    base = [("combo-4", four), ("relevance-4", four), ("top-2", ("dinov2", "siglip"))]
    base += [(f"{a} alone", (a,)) for a in four]
    return (base + [(f"combo-4 #{i}", four) for i in range(2, k - 5)])[:k]


def task_fits(k: int, linear: int) -> list[tuple[str, tuple[str, ...], str]]:
    """One task's fits as (name, backbones, kind): `trainings(k)` (kind "relevance" for the penalised pass, else
    "combo"), then the linear probe on each of the first ``linear`` backbones (kind "linear")."""
    fits = [(n, a, "relevance" if n.startswith("relevance") else "combo") for n, a in trainings(k)]
    return fits + [(f"linear {g.alias}", (g.alias,), "linear") for g in BACKBONES[:linear]]


def adapter_fwd_macs(geos: list[Geo], batch: int, width: int = 128, depth: int = 6) -> tuple[float, float]:
    """(Lambda, F) forward MACs of one ComBo step. One backbone keeps its grid, several align to 14x14."""
    t = geos[0].grid ** 2 if len(geos) == 1 else 196
    lam = batch * t * sum(g.layers * g.dim for g in geos) * width
    n = t + 1
    f = batch * depth * (n * (4 * width * width + 2 * width * 4 * width) + 2 * n * n * width)
    return lam, f


def step_flops(geos: list[Geo], batch: int) -> float:
    """FLOPs of one training step: Lambda x2 (forward + weight grad; its input is data), F x3; 2 per MAC."""
    lam, f = adapter_fwd_macs(geos, batch)
    return 2 * (2 * lam + 3 * f)


def makespan(durations: list[float], n: int) -> float:
    """Wall time of independent jobs on n GPUs, longest first onto the least-loaded GPU (what a dask
    scheduler does at best; within [sum/n, sum/n + max])."""
    loads = [0.0] * n
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def measure_cpu(quick: bool, threads: int) -> dict[str, float]:
    """Seconds per image of a random-init ViT-B/16 ``forward_features`` (what extraction runs) and
    seconds per ComBo step at the reference geometry (one ViT-B/16: L=12, T=196, D=768), on this CPU."""
    import timm
    import torch

    from probe.adapter import ComboAdapter, ComboConfig
    from probe.align import make_prepare
    from probe.train import TrainConfig, train_steps
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]  # the machine is shared: say how busy it was
    images, reps, depth = (1, 1, 1) if quick else (4, 3, 12)  # quick: 1 block, timed x12
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth).eval()
    x = torch.randn(images, 3, 224, 224)
    times = []
    with torch.inference_mode():
        model.forward_features(x)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model.forward_features(x)
            times.append((time.perf_counter() - t0) / images * 12 / depth)
    batch, steps = (2, 1) if quick else (64, 4)
    feats = torch.randn(batch, 12, 196, 768)
    labels = torch.randint(0, 10, (batch,))
    adapter = ComboAdapter(ComboConfig(num_layers=12, feature_dim=768, num_tokens=196, num_classes=10))

    def batches():
        while True:
            yield feats, labels
    prepare = make_prepare([(14, 14)])
    if not quick:
        train_steps(adapter, batches(), TrainConfig(steps=1, batch_size=batch), device="cpu", prepare=prepare)  # warm-up
    out = train_steps(adapter, batches(), TrainConfig(steps=steps, batch_size=batch), device="cpu", prepare=prepare)
    return {"image_s": sorted(times)[len(times) // 2], "step_s": out["seconds"] / steps * 64 / batch,
            "images": images, "steps": steps, "batch": batch, "load": load}


def project(args: argparse.Namespace, gpus: list[int]) -> dict:
    """Every figure of the report from the options; no measurement here, so tests can check the arithmetic."""
    n_images = TRAINVAL * len(TEST_IMAGES) + sum(TEST_IMAGES.values())
    peak = args.gpu_tflops * 1e12 * args.gpu_util
    write_bps, read_bps = args.write_gb_per_s * 1e9, args.read_gb_per_s * 1e9
    # extraction: seconds per image of each backbone on one GPU
    per_img = {}
    for g in BACKBONES:
        disk = g.raw_bytes() * ZSTD_RATIO
        if args.gpu_images_per_s:  # measured ViT-B/16 (with store writes): scale by the larger of FLOPs, bytes
            scale = max(g.macs() / REFERENCE.macs(), g.raw_bytes() / REFERENCE.raw_bytes())
            per_img[g.alias] = scale / args.gpu_images_per_s
        else:
            per_img[g.alias] = max(2 * g.macs() / peak, disk / write_bps)
    extract_s = sum(per_img.values()) * n_images
    # training: the same fits (and compute) both ways; what is read differs
    by_alias = {g.alias: g for g in BACKBONES}
    ref_flops = step_flops([REFERENCE], args.batch_size)

    def step_s(geos: list[Geo]) -> float:  # measured: scaled by FLOPs; estimate: fixed overhead + FLOPs at peak
        if args.gpu_steps_per_s:
            return step_flops(geos, args.batch_size) / ref_flops / args.gpu_steps_per_s
        return args.step_overhead_ms / 1e3 + step_flops(geos, args.batch_size) / peak

    def linear_step_s(geos: list[Geo]) -> float:  # Linear(D -> C): no FLOPs to speak of; the fixed overhead
        return args.step_overhead_ms / 1e3 + 2 * 3 * args.batch_size * sum(g.dim for g in geos) * 1000 / peak

    batches = lambda n: math.ceil(n / args.batch_size)  # noqa: E731
    fits = task_fits(args.trainings_per_task, args.linear_per_task)
    jobs, study_jobs, compute_s, read_s, study_read_s = [], [], 0.0, 0.0, 0.0
    reads = {"separate": {"train": 0.0, "val": 0.0, "test": 0.0}, "study": {"train": 0.0, "test": 0.0}}
    test_reads = {"full": 0, "last_layer": 0}  # per task, separate commands: full-store and last-layer test reads
    for task, n_test in TEST_IMAGES.items():
        task_compute, used = 0.0, set()
        for _, names, kind in fits:
            geos = [by_alias[a] for a in names]
            used.update(names)
            method = "linear" if kind == "linear" else "combo"
            img_bytes = sum(g.read_bytes(method) for g in geos)
            if kind == "relevance":  # dev protocol; every held-out pass streams val200 again
                step = step_s(geos)
                passes = 1 + len(geos) * args.heldout_repeats
                comp = args.relevance_steps * step + passes * batches(VAL) * step / 3
                got = {"train": TRAIN * img_bytes, "val": passes * VAL * img_bytes, "test": 0.0}
            else:
                step = linear_step_s(geos) if kind == "linear" else step_s(geos)
                comp = args.steps * step + batches(n_test) * step / 3  # eval: forward ~ 1/3 step
                got = {"train": TRAINVAL * img_bytes, "val": 0.0, "test": n_test * img_bytes}
                if task == next(iter(TEST_IMAGES)):
                    test_reads["last_layer" if kind == "linear" else "full"] += len(geos)
            read = sum(got.values()) * ZSTD_RATIO / read_bps
            jobs.append(comp + read)
            compute_s += comp
            read_s += read
            task_compute += comp
            for split, v in got.items():
                reads["separate"][split] += v
        # combo study: each used store's train800val200 rows once (all layers, into RAM), its test split once
        full = sum(by_alias[a].read_bytes() for a in used)
        got = {"train": TRAINVAL * full, "test": n_test * full}
        read = sum(got.values()) * ZSTD_RATIO / read_bps
        study_jobs.append(task_compute + read)
        study_read_s += read
        for split, v in got.items():
            reads["study"][split] += v
    raw_total = n_images * sum(g.raw_bytes() for g in BACKBONES)
    rows = [{"gpus": n, "extract_h": extract_s / n / 3600, "waves": math.ceil(len(jobs) / n),
             "train_h": makespan(jobs, n) / 3600, "total_h": (extract_s / n + makespan(jobs, n)) / 3600} for n in gpus]
    study_rows = [{"gpus": n, "extract_h": extract_s / n / 3600, "waves": math.ceil(len(study_jobs) / n),
                   "train_h": makespan(study_jobs, n) / 3600,
                   "total_h": (extract_s / n + makespan(study_jobs, n)) / 3600} for n in gpus]
    n_back = len(BACKBONES)
    study = {"jobs": study_jobs, "rows": study_rows, "compute_s": compute_s, "read_s": study_read_s,
             "reads": reads["study"], "gpu_h": (extract_s + sum(study_jobs)) / 3600,
             "train_gpu_h": sum(study_jobs) / 3600}
    return {"n_images": n_images, "per_img_s": per_img, "extract_s": extract_s, "jobs": jobs, "rows": rows,
            "raw_bytes": raw_total, "tb": {f: raw_total * q / 1e12 for f, q in FORMATS.items()},
            "compute_s": compute_s, "read_s": read_s, "ref_step_s": step_s([REFERENCE]),
            "reads": reads["separate"], "gpu_h": (extract_s + sum(jobs)) / 3600, "train_gpu_h": sum(jobs) / 3600,
            "study": study, "test_reads": test_reads,
            "test_reads_per_backbone": (test_reads["full"] + test_reads["last_layer"] / REFERENCE.layers) / n_back}


def report(args: argparse.Namespace, gpus: list[int], cpu: dict[str, float] | None) -> str:
    p = project(args, gpus)
    peak = args.gpu_tflops * 1e12 * args.gpu_util
    all_write = all(2 * g.macs() / peak < g.raw_bytes() * ZSTD_RATIO / (args.write_gb_per_s * 1e9) for g in BACKBONES)
    src_img = "measured (--gpu-images-per-s)" if args.gpu_images_per_s else "ESTIMATE"
    out = [f"Study: {len(BACKBONES)} backbones x {len(TEST_IMAGES)} VTAB-1k tasks; {p['n_images']:,} images per "
           f"backbone ({TRAINVAL:,} train800+val200 per task, train800val200 deduplicated; "
           f"{sum(TEST_IMAGES.values()):,} test, VTAB.md's per-task counts); all at 224 px (PAPER.md).", "",
           "| backbone | grid + prefix | raw fp16 MB/img | fwd GFLOPs/img | GPU img/s (" + src_img + ") | "
           + " | ".join(f"{f} TB" for f in FORMATS) + " |", "|---|---|---|---|---|" + "---|" * len(FORMATS)]
    for g in BACKBONES:
        tbs = " | ".join(f"{p['n_images'] * g.raw_bytes() * q / 1e12:.2f}" for q in FORMATS.values())
        out.append(f"| {g.alias} | {g.grid}x{g.grid} + {g.prefix} | {g.raw_bytes() / 1e6:.3f} | {2 * g.macs() / 1e9:.1f} "
                   f"| {1 / p['per_img_s'][g.alias]:,.0f} | {tbs} |")
    out.append("| **all four** | | {:.3f} | | | {} |".format(
        sum(g.raw_bytes() for g in BACKBONES) / 1e6, " | ".join(f"**{v:.2f}**" for v in p["tb"].values())))
    out += ["", "| GPUs | extraction h | training jobs | waves ceil(jobs/N) | training h | total h |",
            "|---|---|---|---|---|---|"]
    for r in p["rows"]:
        out.append(f"| {r['gpus']} | {r['extract_h']:.2f} | {len(p['jobs'])} | {r['waves']} | {r['train_h']:.2f} "
                   f"| {r['total_h']:.2f} |")
    st = p["study"]
    out += ["", f"Separate commands (one job per task and fit, {len(p['jobs'])} jobs) against `combo study` (one job per "
            f"task, {len(st['jobs'])} jobs: each split of each store read once per task); the same fits and compute:", "",
            "| GPUs | separate: training h | separate: total h | study: training h | study: total h | study waves |",
            "|---|---|---|---|---|---|"]
    for r, q in zip(p["rows"], st["rows"]):
        out.append(f"| {r['gpus']} | {r['train_h']:.2f} | {r['total_h']:.2f} | {q['train_h']:.2f} | {q['total_h']:.2f} "
                   f"| {q['waves']} |")
    tr, sr = p["reads"], st["reads"]
    tb = lambda v: v * ZSTD_RATIO / 1e12  # noqa: E731
    out += ["", f"The paper's {len(BACKBONES)}-backbone study in GPU-hours (extraction + every training job, any N): "
            f"separate commands **{p['gpu_h']:.2f}** (extraction {p['extract_s'] / 3600:.2f} + training "
            f"{p['train_gpu_h']:.2f}), `combo study` **{st['gpu_h']:.2f}** (training {st['train_gpu_h']:.2f}); "
            f"{p['gpu_h'] / st['gpu_h']:.2f}x fewer GPU-hours, training alone {p['train_gpu_h'] / st['train_gpu_h']:.2f}x.",
            f"- Store reads (disk TB): separate commands {tb(sum(tr.values())):.2f} = test {tb(tr['test']):.2f} + "
            f"train {tb(tr['train']):.2f} + relevance's val200 passes {tb(tr['val']):.2f}; study "
            f"{tb(sum(sr.values())):.2f} = test {tb(sr['test']):.2f} + train800val200 {tb(sr['train']):.2f} "
            f"({sum(tr.values()) / sum(sr.values()):.2f}x less). Reading is {p['read_s'] / 3600:.2f} of the "
            f"separate commands' {p['train_gpu_h']:.2f} training GPU-h and {st['read_s'] / 3600:.2f} of the study's.",
            f"- Per task, the separate commands read each backbone's test split {p['test_reads_per_backbone']:.2f} times "
            f"on average ({p['test_reads']['full']} full-store test reads for {len(BACKBONES)} backbones: ComBo on all, "
            f"top-2, each alone; plus {p['test_reads']['last_layer']} linear probes reading the last layer, "
            f"1/{REFERENCE.layers} of a store each); `combo study` reads it once (every head evaluated on each batch).",
            f"- With more GPUs than tasks ({len(TEST_IMAGES)}) a study job (all of a task's fits, one after another) "
            "is the unit of scheduling, so its largest task bounds the study's wall time: "
            + ", ".join(f"{r['gpus']} GPUs {r['train_h']:.2f} h (separate) vs {q['train_h']:.2f} h (study)"
                        for r, q in zip(p["rows"], st["rows"])) + ".",
            f"- The study holds a task's train800val200 rows of all {len(BACKBONES)} stores in RAM "
            f"({TRAINVAL * sum(g.read_bytes() for g in BACKBONES) / 2**30:.1f} GiB as float16; --cache-budget "
            "defaults to half the machine's RAM); below that each fit streams them and the train reads are "
            "the separate commands' again (the test split is still read once)."]
    names = ", ".join(n for n, _, _ in task_fits(args.trainings_per_task, args.linear_per_task))
    out += ["", "Assumptions:",
            f"- Store: every block's output, patch + prefix tokens, float16; TB = 1e12 B = images x bytes/image x "
            f"disk/raw ({', '.join(f'{f} {q}' for f, q in FORMATS.items())}: measured here at ViT-B/16 geometry, "
            "RESULTS.md store_layout / compact_cost; assumed to hold for DINOv2's 261 tokens).",
            f"- GFLOPs = 2 x multiply-accumulates, counted from the architecture (ViT-B/16: {REFERENCE.macs() / 1e9:.2f} "
            f"GMACs, timm's published {VITB16_TIMM_GFLOPS}); SAM at 224 px (PAPER.md) plus its neck.",
            (f"- GPU extraction: {args.gpu_images_per_s:g} img/s measured for ViT-B/16, scaled per backbone by the "
             "larger of its FLOPs and bytes ratio." if args.gpu_images_per_s else
             f"- GPU extraction ESTIMATE: min({args.gpu_util:.0%} of {args.gpu_tflops:g} TFLOPS dense bf16 (H200) / FLOPs, "
             f"--write-gb-per-s {args.write_gb_per_s:g} GB/s of compressed store per GPU / disk bytes); "
             f"{'every backbone is' if all_write else 'not every backbone is'} write-bound here (compute alone: {peak / (2 * REFERENCE.macs()):,.0f} img/s for ViT-B/16)."),
            f"- Fits per task ({args.trainings_per_task} ComBo + {args.linear_per_task} linear): {names}; {args.steps} "
            f"steps, batch {args.batch_size} (PAPER.md final protocol: train800val200 -> test), the relevance pass "
            f"{args.relevance_steps} steps on train800, measured on val200 {1 + len(BACKBONES) * args.heldout_repeats} "
            f"times (once, then each backbone shuffled x {args.heldout_repeats}); a linear step costs the fixed "
            "overhead.",
            (f"- GPU training: {args.gpu_steps_per_s:g} steps/s measured at one ViT-B/16 (L=12, T=196), scaled by step "
             "FLOPs." if args.gpu_steps_per_s else
             f"- GPU training ESTIMATE: step = {args.step_overhead_ms:g} ms (kernel launches, AdamW) + step FLOPs at "
             f"the same {args.gpu_util:.0%} of peak; {1 / p['ref_step_s']:.0f} steps/s at one ViT-B/16."),
            f"- A job reads (patch tokens; ComBo every layer, linear the last) at --read-gb-per-s "
            f"{args.read_gb_per_s:g} GB/s per GPU (ASSUMPTION; zstd decode + crc32c ran at 0.376 GB/s on this "
            "2-core CPU, RESULTS.md checksum_cost); evaluation forward = 1/3 of a step per batch.",
            f"- Training total (separate commands) {(p['compute_s'] + p['read_s']) / 3600:.2f} GPU-h, of which store reads "
            f"{p['read_s'] / 3600:.2f} h ({p['read_s'] / (p['compute_s'] + p['read_s']):.0%}); reading compact stores "
            "instead (same compute): " + ", ".join(f"{f} {(p['compute_s'] + p['read_s'] * q / ZSTD_RATIO) / 3600:.2f} GPU-h"
                                                   for f, q in list(FORMATS.items())[1:]) + ". Jobs are independent (one per dask task) and placed longest first; "
            "extraction is split by shards, so its hours scale as 1/N.",
            f"- Sensitivity: at this repo's single-writer rate on this CPU (0.111 GB/s, RESULTS.md store_layout) "
            f"extraction would take {p['raw_bytes'] * ZSTD_RATIO / 0.111e9 / 3600:.1f} GPU-h."]
    if cpu:
        ref = step_flops([REFERENCE], 64)
        by_alias = {g.alias: g for g in BACKBONES}
        train_days = len(TEST_IMAGES) * args.steps * cpu["step_s"] * sum(
            step_flops([by_alias[a] for a in names], 64) / ref for _, names in trainings(args.trainings_per_task)) / 86400
        cpu_days = cpu["image_s"] * p["n_images"] * sum(g.macs() for g in BACKBONES) / REFERENCE.macs() / 86400
        out.append(f"- Measured on this CPU ({args.threads} threads, random init, 1-min load average {cpu['load']:.1f} at start): ViT-B/16 forward "
                   f"{cpu['image_s']:.3f} s/image ({cpu['images']} images); ComBo step at one ViT-B/16 (batch 64) "
                   f"{cpu['step_s']:.2f} s (mean of {cpu['steps']} steps at batch {cpu['batch']}, scaled to 64). "
                   f"Here extraction alone would take {cpu_days:.0f} days, training {train_days:.0f} days.")
    else:
        out.append("- CPU measurement skipped (--no-measure).")
    out.append("- Reproduce: " + " ".join(["python benchmarks/study_projection.py", *args.argv]))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,4,8,32", help="comma list of GPU counts")
    parser.add_argument("--trainings-per-task", type=int, default=7, help="PAPER.md: 4 alone + 4 + relevance + top-2")
    parser.add_argument("--linear-per-task", type=int, default=4, help="linear probes per task (one per backbone)")
    parser.add_argument("--steps", type=int, default=1600, help="steps per final fit (PAPER.md: 1,600)")
    parser.add_argument("--relevance-steps", type=int, default=RELEVANCE_STEPS, help="relevance pass (PAPER.md dev: 1,300)")
    parser.add_argument("--heldout-repeats", type=int, default=HELDOUT_REPEATS, help="held-out passes per backbone")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-images-per-s", type=float, default=None,
                        help="measured ViT-B/16 extraction img/s with store writes (gpu_check.py); default: ESTIMATE")
    parser.add_argument("--gpu-steps-per-s", type=float, default=None,
                        help="measured ComBo steps/s at one ViT-B/16 (gpu_check.py); default: ESTIMATE")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H200 / H100 SXM)")
    parser.add_argument("--gpu-util", type=float, default=0.35, help="sustained share of the peak (assumption)")
    parser.add_argument("--write-gb-per-s", type=float, default=1.0, help="compressed store writes per GPU (assumption)")
    parser.add_argument("--read-gb-per-s", type=float, default=1.0, help="compressed store reads per GPU (assumption)")
    parser.add_argument("--step-overhead-ms", type=float, default=5.0, help="fixed GPU time per step (assumption)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny CPU measurement (1 image, 2 steps at batch 4)")
    parser.add_argument("--no-measure", action="store_true", help="skip the CPU measurement")
    return parser


def main(argv: list[str] | None = None) -> str:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    gpus = [int(v) for v in args.gpus.split(",") if v.strip()]
    if not gpus or min(gpus) < 1:
        parser.error("--gpus needs positive counts")
    cpu = None if args.no_measure else measure_cpu(args.quick, args.threads)
    text = report(args, gpus, cpu)
    print(text)
    return text


if __name__ == "__main__":
    main()
