"""What compact stores cost: a float16 store against its int8 / PCA-R / PCA+int8 copies, on clean features and
on the same features with injected "massive" channels and high-norm outlier tokens. One table, one run.

For each task (sklearn digits, and two generated tasks whose answer needs spatial detail, see
benchmarks/shapes_data.py: which quadrant a shape is in, how many bright shapes there are among grey ones) this script

1. extracts a float16 store with a small random-init timm ViT (``--model``, depth ``--depth``, ``--image-size``),
2. writes an *outlier* variant of it through `store_schema.StoreWriter` (same sample table and metadata):
   ``--massive-channels`` channels of every token, in every layer, multiplied by a factor drawn in
   [``--massive-low``, ``--massive-high``] (fixed per channel, as in real models), then ``--outlier-tokens``
   tokens per image (the same positions in every layer) rescaled to ``--outlier-norm`` x the median token norm
   of their (image, layer) map; the whole store is then scaled by a power of two if needed to keep
   |x| <= 60000 (exact in float16, and invisible to ComBo's per-map normalisation),
3. writes each compact copy with ``store_schema.compactor.compact_store(src, dst, CompactSpec.parse(fmt))``,
4. probes every store with ComBo (small adapter) for seeds 0..S-1: the same seed gives the same initial weights
   and the same batches on every store of a task (the compact copy keeps the row order), so differences are paired.

Columns (a compact row is always compared with the float16 store of the same task and features):
- ``disk/raw``: bytes on disk per image / raw float16 bytes per image, L x (T + P) x D x 2 (patch + prefix tokens).
- ``acc %``: the float16 store's test accuracy (mean over seeds); ``Δacc pts``: compact minus float16, paired by
  seed, mean ± std (ddof 1) [min, max] over seeds, in percentage points.
- ``agree %``: test predictions equal to the float16 run's of the same seed (mean over seeds).
- ``map err``: ||a - b|| / ||b|| of ComBo-normalised maps (probe.align.normalise_maps), a = compact store's
  decoded maps, b = float16 store's; mean over (image, layer) maps of up to ``--err-rows`` test images.
  ``err w/o top``: the same over the tokens left after dropping the ``--outlier-tokens`` largest-norm tokens of
  each float16 map (on the outlier features the high-norm tokens hold nearly all of a normalised map's energy,
  so the plain figure hides what happens to the ordinary tokens).
- ``steps/s ratio``: training steps/s of the compact store / float16 store, median over seeds of the paired
  ratios (the timing includes reading the split into the cache once; 2 shared cores: noisy).

    python benchmarks/compact_cost.py                       # ~40 min on 2 CPU cores (1500-step probes, 5 seeds)
    python benchmarks/compact_cost.py --quick               # ~2 min smoke test (2 seeds, 100 steps, small tests)
    python benchmarks/compact_cost.py --formats int8,pca:16 --tasks position --seeds 5 --workdir /tmp/cc
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FP16 = "fp16"
TASKS = ("digits", "position", "count")
DEFAULT_FORMATS = "int8,pca:32+int8,pca:64+int8"  # '+' joins the parts of one format (',' splits formats)
FP16_LIMIT = 60000.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _marker(dst: Path) -> Path:
    return dst.with_name(dst.name + ".done.json")


def _reuse(dst: Path, params: dict[str, Any]) -> bool:
    """True when `dst` was built by an earlier run with the same params (else it is removed)."""
    marker = _marker(dst)
    try:
        if dst.exists() and json.loads(marker.read_text()) == params:
            return True
    except (OSError, ValueError):
        pass
    shutil.rmtree(dst, ignore_errors=True)
    marker.unlink(missing_ok=True)
    return False


# ------------------------------------------------------------------------------------------ stage 1: stores


def extract_store(task: str, args: argparse.Namespace, work: Path) -> Path:
    from extract.pipeline import ExtractConfig, extract

    kwargs: dict[str, Any] = dict(
        model=args.model, out=str(work / "stores" / task), image_size=args.image_size, random_init=True,
        num_workers=0, batch_size=64, model_kwargs={"depth": args.depth}, seed=0,
    )
    if task == "digits":
        cfg = ExtractConfig(dataset="digits", **kwargs)
    else:
        from shapes_data import generate

        root = generate(work / "data", task=task, size=args.image_size, train=args.train, val=args.val,
                        test=args.test, seed=args.data_seed)
        cfg = ExtractConfig(dataset="folder", root=str(root), **kwargs)
    started = time.perf_counter()
    result = extract(cfg)
    log(f"[{task}] float16 store {result.store} ({time.perf_counter() - started:.0f} s)")
    return Path(result.store)


def _store_info(attrs: dict[str, Any]):
    from store_schema import BackboneInfo, FeatureInfo, Preprocessing, StoreInfo

    if hasattr(StoreInfo, "from_attrs"):
        return StoreInfo.from_attrs(attrs)
    bb, pre, feats = attrs["backbone"], attrs["preprocessing"], attrs["features"]
    return StoreInfo(
        backbone=BackboneInfo(**{k: bb.get(k) for k in ("alias", "timm_name", "pretrained_tag", "weights_source",
                                                         "weights_sha256", "seed", "model_kwargs")}),
        preprocessing=Preprocessing(image_size=pre["image_size"], mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                    interpolation=pre.get("interpolation", "bilinear"),
                                    resize=pre.get("resize", "square, no crop")),
        features=FeatureInfo(token_grid=tuple(feats["token_grid"]), num_prefix_tokens=feats["num_prefix_tokens"],
                             layers=tuple(feats["layers"]), feature_dim=feats["feature_dim"],
                             kind=feats.get("kind", FeatureInfo.kind)),
        dataset=attrs["dataset"]["name"],
    )


def inject_outliers(tokens: np.ndarray, prefix: np.ndarray | None, *, seed: int, channels: int, low: float,
                    high: float, outlier_tokens: int, outlier_norm: float) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """float32 copies of tokens [N, L, T, D] (and prefix [N, L, P, D]) with massive channels and outlier tokens."""
    rng = np.random.default_rng(seed)
    n, num_layers, t, d = tokens.shape
    x = tokens.astype(np.float32)
    p = None if prefix is None else prefix.astype(np.float32)
    chans = rng.choice(d, size=min(channels, d), replace=False)
    factors = rng.uniform(low, high, size=chans.size).astype(np.float32)
    x[..., chans] *= factors
    if p is not None:
        p[..., chans] *= factors
    k = min(outlier_tokens, t)
    if k:
        pos = np.argsort(rng.random((n, t)), axis=1)[:, :k]  # k distinct tokens per image, same in every layer
        norms = np.linalg.norm(x, axis=3)  # [N, L, T]
        median = np.median(norms, axis=2)  # [N, L]
        picked = np.take_along_axis(norms, np.broadcast_to(pos[:, None, :], (n, num_layers, k)), axis=2)
        scale = outlier_norm * median[..., None] / np.maximum(picked, 1e-12)  # [N, L, k]
        idx = (np.arange(n)[:, None, None], np.arange(num_layers)[None, :, None], pos[:, None, :])
        x[idx] *= scale[..., None]
    peak = max(float(np.abs(x).max()), 0.0 if p is None else float(np.abs(p).max()))
    shift = max(0, math.ceil(math.log2(peak / FP16_LIMIT))) if peak > FP16_LIMIT else 0
    if shift:
        x *= 2.0 ** -shift
        if p is not None:
            p *= 2.0 ** -shift
    # what the injection achieved, measured per (image, layer) map
    norms = np.linalg.norm(x, axis=3)
    tok_ratio = norms.max(axis=2) / np.median(norms, axis=2)
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=2))  # [N, L, D] channel RMS over tokens
    ch_ratio = np.sort(rms, axis=2)[..., -1] / np.median(rms, axis=2)
    stats = {"massive_channels": chans.tolist(), "factors": [round(float(f), 1) for f in factors],
             "outlier_tokens": k, "scaled_by": f"2^-{shift}", "max_abs": float(np.abs(x).max()),
             "token_norm_max/median": float(np.median(tok_ratio)), "channel_rms_max/median": float(np.median(ch_ratio))}
    return x, p, stats


def write_outlier_store(src: Path, dst: Path, args: argparse.Namespace, seed: int) -> tuple[Path, dict]:
    """A copy of `src` (every task) with injected massive channels and outlier tokens, written by StoreWriter."""
    from store_schema import StoreLayout, StoreWriter, open_store

    params = {"src": str(src), "seed": seed, "channels": args.massive_channels, "low": args.massive_low,
              "high": args.massive_high, "tokens": args.outlier_tokens, "norm": args.outlier_norm, "v": 1}
    stats_path = dst.with_name(dst.name + ".stats.json")
    if _reuse(dst, params) and stats_path.exists():
        return dst, json.loads(stats_path.read_text())
    store = open_store(src)
    layout = StoreLayout.from_attrs(store.attrs["storage"])
    info = _store_info(store.attrs)
    all_stats = {}
    with StoreWriter(dst, info, layout, overwrite=True) as writer:
        for name in store.tasks:
            task = store.task(name)
            tokens = task.read(slice(None))
            prefix = task.read(slice(None), prefix=True) if store.num_prefix_tokens else None
            x, p, stats = inject_outliers(tokens, prefix, seed=seed, channels=args.massive_channels,
                                          low=args.massive_low, high=args.massive_high,
                                          outlier_tokens=args.outlier_tokens, outlier_norm=args.outlier_norm)
            all_stats[name] = stats
            tw = writer.task(
                name, samples=task.samples, num_layers=store.num_layers,
                num_tokens=store.token_grid[0] * store.token_grid[1], feature_dim=store.feature_dim,
                num_prefix_tokens=store.num_prefix_tokens, protocols=task.protocols, classes=task.classes,
                group=task.attrs.get("group"), row_order=task.attrs.get("row_order"),
            )
            for block in tw.pending():
                rows = tw.blocks[block]
                tw.write_block(block, x[rows.start:rows.stop], None if p is None else p[rows.start:rows.stop])
            tw.finalize()
    stats_path.write_text(json.dumps(all_stats))
    _marker(dst).write_text(json.dumps(params))
    return dst, all_stats


def compact_copy(src: Path, dst: Path, fmt: str) -> tuple[Path | None, str]:
    """(compact store, '') or (None, why not). The compaction API may be missing or refuse a format."""
    params = {"src": str(src), "format": fmt, "v": 1}
    try:
        from store_schema.compact import CompactSpec
        from store_schema.compactor import compact_store
    except ImportError as err:
        return None, f"compaction API not importable ({err})"
    if _reuse(dst, params):
        return dst, ""
    started = time.perf_counter()
    try:
        compact_store(str(src), str(dst), CompactSpec.parse(fmt.replace("+", ",")))
    except Exception as err:  # noqa: BLE001 - a benchmark reports and goes on
        shutil.rmtree(dst, ignore_errors=True)
        return None, f"compact_store failed: {type(err).__name__}: {err}"
    _marker(dst).write_text(json.dumps(params))
    log(f"    {fmt}: {dst} ({time.perf_counter() - started:.1f} s)")
    return dst, ""


# ------------------------------------------------------------------------------------------ stage 2: measures


@dataclass
class Fit:
    accuracy: float
    predictions: np.ndarray
    steps_per_s: float


@dataclass
class Row:
    task: str
    features: str
    fmt: str
    disk_ratio: float | None = None
    fits: dict[int, Fit] = field(default_factory=dict)
    err: float | None = None
    err_rest: float | None = None
    note: str = ""


def probe(store: Path, seed: int, args: argparse.Namespace, work: Path) -> Fit:
    from probe.run import ProbeConfig, run_probe

    run = run_probe(ProbeConfig(
        stores=(str(store),), dataset="folder", protocol="final", steps=args.steps, batch_size=args.batch_size,
        seed=seed, device="cpu", out=str(work / "runs"), width=args.width, depth=args.adapter_depth,
        num_heads=args.heads, cache=args.cache, init=args.init,
    ))
    fit = run.fits[0]
    order = np.argsort(fit.eval_rows)  # predictions by store row, whatever order the evaluation read them in
    if not args.keep_runs:
        shutil.rmtree(run.run_dir, ignore_errors=True)
    m = fit.metrics
    return Fit(float(m["accuracy"]), np.asarray(fit.predictions)[order], args.steps / max(float(m["train_seconds"]), 1e-9))


def map_errors(store: Path, reference: Path, rows_wanted: int, drop_top: int) -> tuple[float, float]:
    """Mean over (image, layer) maps of ||a - b|| / ||b|| after ComBo's normalisation; and the same without the
    `drop_top` largest-norm tokens of each reference map."""
    import torch

    from probe.align import normalise_maps
    from store_schema import open_store

    ref_store, cmp_store = open_store(reference), open_store(store)
    errs, rest = [], []
    for name in ref_store.tasks:
        ref_task, cmp_task = ref_store.task(name), cmp_store.task(name)
        test = ref_task.rows("test")
        rows = test[np.linspace(0, test.size - 1, min(rows_wanted, test.size)).astype(np.int64)]
        b = normalise_maps(torch.from_numpy(np.asarray(ref_task.read(rows), dtype=np.float32)))
        # a compact store normalises with its stored (exact) per-map statistics, as the probe does
        a = torch.from_numpy(np.asarray(cmp_task.read(rows, normalised=True), dtype=np.float32)) \
            if cmp_task.compact is not None else normalise_maps(torch.from_numpy(np.asarray(cmp_task.read(rows), dtype=np.float32)))
        diff = a - b
        errs.append((diff.flatten(2).norm(dim=2) / b.flatten(2).norm(dim=2).clamp_min(1e-12)).flatten())
        keep = torch.ones(b.shape[:3], dtype=torch.bool)
        if drop_top:
            top = b.norm(dim=3).topk(min(drop_top, b.shape[2] - 1), dim=2).indices
            keep.scatter_(2, top, False)
        mask = keep[..., None].float()
        rest.append((((diff * mask).flatten(2).norm(dim=2)) / (b * mask).flatten(2).norm(dim=2).clamp_min(1e-12)).flatten())
    return float(torch.cat(errs).mean()), float(torch.cat(rest).mean())


# ------------------------------------------------------------------------------------------ sizes at ViT-B geometry

GEOMETRY_FORMATS = ("int8", "pca:128", "pca:128+int8", "pca:256", "pca:256+int8")


def geometry_sizes(args: argparse.Namespace, work: Path) -> str:
    """Bytes per image / raw float16 at the real geometry (ViT-B/16 at 224: 12 x (196 + 1) x 768), where the
    per-map overheads (scales, statistics, the full-size cls token) weigh what they will at full size: a
    random-init vit_base_patch16_224 over ``--geometry-images`` digits (bilinear to 224), clean and with the
    same injected outliers as above; PCA fitted on the first 3/4 of the images (the "train" split)."""
    import torch
    from sklearn.datasets import load_digits

    from extract.backbones import block_tokens, load_backbone
    from extract.pipeline import store_info
    from store_schema import StoreLayout, StoreWriter, build_sample_table

    n = args.geometry_images
    backbone = load_backbone("vit_base_patch16_224", image_size=224, random_init=True, seed=0)
    digits = load_digits()
    pixels = torch.from_numpy(digits.images[:n].astype(np.float32) / 16.0)[:, None].repeat(1, 3, 1, 1)
    pixels = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(backbone.mean)[:, None, None], torch.tensor(backbone.std)[:, None, None]
    patches, prefixes = [], []
    with torch.inference_mode():
        for lo in range(0, n, 8):
            patch, prefix = block_tokens(backbone, (pixels[lo:lo + 8] - mean) / std)
            patches.append(patch.half().numpy())
            prefixes.append(prefix.half().numpy())
    tokens, prefix = np.concatenate(patches), np.concatenate(prefixes)
    l, t, d, p = tokens.shape[1], tokens.shape[2], tokens.shape[3], prefix.shape[2]
    raw = l * (t + p) * d * 2
    train = (3 * n) // 4
    table = build_sample_table(sample_ids=[f"digits/{i:05d}" for i in range(n)], labels=digits.target[:n].tolist(),
                               splits=[("train",)] * train + [("test",)] * (n - train), split_names=["train", "test"])
    lines = [f"Sizes at ViT-B/16 geometry (L={l}, T={t}+{p}, D={d}; raw float16 {raw / 2**20:.2f} MiB/image; "
             f"{n} images, PCA fitted on {train}):", "",
             "| features | fp16 | " + " | ".join(GEOMETRY_FORMATS) + " |", "|---|" + "---|" * (len(GEOMETRY_FORMATS) + 1)]
    for features in args.features:
        x, pre = tokens, prefix
        if features == "outliers":
            x, pre, _ = inject_outliers(tokens, prefix, seed=1, channels=args.massive_channels, low=args.massive_low,
                                        high=args.massive_high, outlier_tokens=args.outlier_tokens,
                                        outlier_norm=args.outlier_norm)
        src = work / "geometry" / f"{features}.zarr"
        shutil.rmtree(src, ignore_errors=True)
        with StoreWriter(src, store_info(backbone, dataset="digits", root=None), StoreLayout()) as writer:
            tw = writer.task("digits", samples=table, num_layers=l, num_tokens=t, feature_dim=d, num_prefix_tokens=p,
                             protocols={"dev": ("train", "test"), "final": ("train", "test")},
                             classes=[str(c) for c in range(10)])
            for block in tw.pending():
                rows = tw.blocks[block]
                tw.write_block(block, x[rows.start:rows.stop], pre[rows.start:rows.stop])
            tw.finalize()
        cells = [f"{store_bytes(src) / n / raw:.3f}"]
        for fmt in GEOMETRY_FORMATS:
            path, why = compact_copy(src, work / "geometry" / f"{features}-{fmt.replace(':', '').replace('+', '-')}.zarr", fmt)
            cells.append(why or f"{store_bytes(path) / n / raw:.3f}")
        lines.append(f"| {features} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ table


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


def render(rows: list[Row], seeds: list[int]) -> str:
    head = ("| task | features | format | disk/raw | acc % (fp16) | Δacc pts: mean ± std [min, max] | agree % "
            "| map err | err w/o top | steps/s ratio |")
    lines = [head, "|" + "---|" * 10]
    base: dict[tuple[str, str], Row] = {(r.task, r.features): r for r in rows if r.fmt == FP16}
    for r in rows:
        ref = base.get((r.task, r.features))
        disk = "" if r.disk_ratio is None else f"{r.disk_ratio:.3f}"
        if r.note:
            lines.append(f"| {r.task} | {r.features} | {r.fmt} | {disk} | | skipped: {r.note} | | | | |")
            continue
        if r.fmt == FP16:
            accs = [r.fits[s].accuracy for s in seeds]
            spread = f"{100 * statistics.mean(accs):.1f} (seeds {100 * min(accs):.1f}..{100 * max(accs):.1f})"
            lines.append(f"| {r.task} | {r.features} | fp16 (baseline) | {disk} | {spread} | 0 | 100 | 0 | 0 | 1 |")
            continue
        paired = [s for s in seeds if s in r.fits and ref is not None and s in ref.fits]
        d = [r.fits[s].accuracy - ref.fits[s].accuracy for s in paired]
        agree = [float((r.fits[s].predictions == ref.fits[s].predictions).mean()) for s in paired]
        speed = [r.fits[s].steps_per_s / ref.fits[s].steps_per_s for s in paired]
        sd = statistics.stdev(d) if len(d) > 1 else float("nan")
        delta = f"{_pts(statistics.mean(d))} ± {100 * sd:.1f} [{_pts(min(d))}, {_pts(max(d))}]"
        acc = f"{100 * statistics.mean(r.fits[s].accuracy for s in paired):.1f}"
        err = "" if r.err is None else f"{r.err:.4f}"
        rest = "" if r.err_rest is None else f"{r.err_rest:.4f}"
        lines.append(f"| {r.task} | {r.features} | {r.fmt} | {disk} | {acc} | {delta} | "
                     f"{100 * statistics.mean(agree):.1f} | {err} | {rest} | {statistics.median(speed):.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test of the plumbing (~2-3 min): 2 seeds, 100 steps (accuracies near chance), "
                             "400/100/300 generated train/val/test images, formats int8,pca:16+int8")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument("--formats", default=None, help=f"comma list; '+' joins parts of one (default {DEFAULT_FORMATS})")
    parser.add_argument("--features", default="clean,outliers", help="clean, outliers or both")
    parser.add_argument("--seeds", type=int, default=None, help="probe seeds 0..S-1 (default 5; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="probe steps (default 1500; --quick 100)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="adapter width (the paper's 128 is slow on 2 cores)")
    parser.add_argument("--adapter-depth", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--init", default="torch", choices=("timm", "torch"),
                        help="ComBo's F/head init (default torch: it escapes the start plateau sooner, so a plateau "
                             "seed does not pass for a store's cost; timm: the authors', RESULTS.md)")
    parser.add_argument("--cache", default="auto", help="probe cache mode (auto = RAM on CPU)")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--depth", type=int, default=4, help="backbone blocks (= store layers)")
    parser.add_argument("--image-size", type=int, default=64, help="64 with patch 16 -> a 4x4 token grid")
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=None, help="generated tasks' test images (default 2000; --quick 300)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--massive-channels", type=int, default=3)
    parser.add_argument("--massive-low", type=float, default=100.0)
    parser.add_argument("--massive-high", type=float, default=300.0)
    parser.add_argument("--outlier-tokens", type=int, default=2, help="high-norm tokens per image")
    parser.add_argument("--outlier-norm", type=float, default=100.0, help="their norm / the map's median token norm")
    parser.add_argument("--err-rows", type=int, default=256, help="test images for the map error")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="data, stores and runs (default: a temp dir, removed)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the probe run folders")
    parser.add_argument("--geometry-images", type=int, default=64,
                        help="images for the sizes at ViT-B geometry (0: skip that table)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.steps = args.steps or (100 if args.quick else 1500)
    args.test = args.test or (300 if args.quick else 2000)
    if args.quick and args.train == 800:
        args.train, args.val = 400, 100
    args.formats = [f.strip() for f in (args.formats or ("int8,pca:16+int8" if args.quick else DEFAULT_FORMATS)).split(",")
                    if f.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.features = [f.strip() for f in args.features.split(",") if f.strip()]
    for t in args.tasks:
        if t not in TASKS:
            parser.error(f"--tasks: unknown task {t!r}")
    for f in args.features:
        if f not in ("clean", "outliers"):
            parser.error(f"--features: unknown {f!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="combo-compact-")) if temp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []
    geometry = ""
    try:
        if args.geometry_images:
            geometry = geometry_sizes(args, work)
            log(geometry)
        for task in args.tasks:
            clean = extract_store(task, args, work)
            from store_schema import open_store

            st = open_store(clean)
            raw = st.num_layers * (st.token_grid[0] * st.token_grid[1] + st.num_prefix_tokens) * st.feature_dim * 2
            n = sum(st.task(t).num_samples for t in st.tasks)
            test_n = sum(st.task(t).rows("test").size for t in st.tasks)
            notes.append(f"{task}: {n} images ({test_n} test), L={st.num_layers} layers, grid "
                         f"{st.token_grid[0]}x{st.token_grid[1]} + {st.num_prefix_tokens} prefix, D={st.feature_dim}; "
                         f"raw fp16 {raw} B/image")
            for features in args.features:
                if features == "clean":
                    base = clean
                else:
                    base, stats = write_outlier_store(clean, work / "stores" / task / "outliers.zarr", args, seed=1)
                    for name, s in stats.items():
                        notes.append(f"{task} outliers ({name}): channels {s['massive_channels']} x {s['factors']}, "
                                     f"{s['outlier_tokens']} tokens/image; per map (median): max/median token norm "
                                     f"{s['token_norm_max/median']:.0f}, max/median channel RMS "
                                     f"{s['channel_rms_max/median']:.0f}; max |x| {s['max_abs']:.0f} "
                                     f"(scaled by {s['scaled_by']})")
                stores: list[tuple[str, Path | None, str]] = [(FP16, base, "")]
                for fmt in args.formats:
                    dst = work / "stores" / task / f"{features}-{fmt.replace(':', '').replace('+', '-')}.zarr"
                    path, why = compact_copy(base, dst, fmt)
                    stores.append((fmt, path, why))
                    if why:
                        log(f"[{task}/{features}] {fmt}: skipped, {why}")
                for fmt, path, why in stores:
                    row = Row(task, features, fmt, note=why)
                    rows.append(row)
                    if path is None:
                        continue
                    row.disk_ratio = store_bytes(path) / n / raw
                    try:
                        for seed in seeds:
                            row.fits[seed] = probe(path, seed, args, work)
                        if fmt != FP16:
                            row.err, row.err_rest = map_errors(path, base, args.err_rows, args.outlier_tokens)
                    except Exception as err:  # noqa: BLE001 - report and go on
                        row.note = f"{type(err).__name__}: {err}"
                        log(f"[{task}/{features}] {fmt}: failed: {row.note}")
                        continue
                    accs = ", ".join(f"{100 * f.accuracy:.1f}" for f in row.fits.values())
                    log(f"[{task}/{features}] {fmt}: acc {accs} ({time.perf_counter() - started:.0f} s elapsed)")
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    import torch as _t

    print(f"## Compact store cost ({time.strftime('%Y-%m-%d')})\n")
    print("```\npython " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])])
          + "\n```\n")
    print(f"torch {_t.__version__}, {_t.get_num_threads()} thread(s); ComBo adapter width {args.width}, depth "
          f"{args.adapter_depth}, init {args.init}, {args.steps} steps, batch {args.batch_size}, protocol final (trainval -> test); "
          f"seeds {seeds[0]}..{seeds[-1]}; backbone {args.model} depth {args.depth}, random init, "
          f"{args.image_size} px\n")
    for note in notes:
        print(f"- {note}")
    print()
    print(render(rows, seeds))
    if geometry:
        print("\n" + geometry)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
