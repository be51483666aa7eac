"""What each backbone alias costs: bytes per image (raw and on disk) and extraction speed against a bare forward.

For every alias in `extract.backbones.ALIASES` (the paper's eight and today's ten) at one image size (224),
random init, on a few generated images: the timm model, token grid, layers, width D and prefix tokens; bytes per
image as raw float16 (layers x (grid tokens + prefix tokens) x D x 2, summed over a hierarchical model's stages,
each on its own grid and width) and in the store on disk (`extract()`'s
`bytes_on_disk` / images) and their ratio; extraction img/s (`combo extract`'s task loop: decoding in DataLoader
workers, forward, cast, compression, writing, checksums; model build and dataset planning excluded); bare forward
img/s (`block_tokens` on batches already decoded and in memory, float16 tokens brought back to CPU); and
extract / bare forward, both measured in the same run (extract_overhead.py does this for one model).
Why: the issue asks "For every alias at 224 (CPU, random init, a few images): bytes per image, raw and on disk;
extraction img/s; extract over bare forward" — what a user pays in disk and time per backbone before choosing.

Random weights compress differently from trained ones, so the on-disk column is an estimate (an upper bound, more
or less), not a measurement of the real checkpoints' stores.

    python benchmarks/alias_cost.py [--aliases sam,clip,...] [--images 16] [--batch-size 8] [--image-size 224]
                                    [--device cpu] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from extract.backbones import ALIASES, load_backbone, pick_device
from extract.pipeline import ExtractConfig, extract
from extract_overhead import bare_forward, decode_batches, make_folder

COLUMNS = ("alias", "timm model", "grid", "layers", "D", "prefix", "raw MiB/img", "disk MiB/img", "disk/raw",
           "extract img/s", "bare img/s", "extract/bare")


def measure(alias: str, paths: list[Path], data: Path, stores: Path, args, device: torch.device) -> tuple:
    """One table row for `alias`: its shape, bytes per image raw and on disk, extraction and bare forward speed."""
    backbone = load_backbone(alias, image_size=args.image_size, random_init=True, seed=0)
    backbone.model.to(device)
    batches, _ = decode_batches(paths, backbone, args.batch_size, args.image_size)
    bare = bare_forward(backbone, batches, device)
    del batches
    cfg = ExtractConfig(model=alias, dataset="folder", root=str(data), out=str(stores / alias),
                        image_size=args.image_size, random_init=True, batch_size=args.batch_size,
                        num_workers=1, device=args.device)
    result = extract(cfg)
    shutil.rmtree(stores / alias, ignore_errors=True)  # only its size was wanted
    n = result.images
    loop = sum(t.seconds for t in result.tasks)
    h, w = backbone.token_grid
    shapes = list(backbone.layer_shapes.values())  # (h, w, D) per stored layer: one grid, or a hierarchical model's stages
    raw = sum((gh * gw + backbone.num_prefix_tokens) * d * 2 for gh, gw, d in shapes)
    disk = result.bytes_on_disk / n
    grid = f"{h}x{w}" if backbone.grids is None else f"{shapes[0][0]}x{shapes[0][1]} .. {h}x{w}"
    width = backbone.embed_dim if backbone.grids is None else f"{shapes[0][2]} .. {backbone.embed_dim}"
    row = (alias, backbone.spec.model_name, grid, backbone.num_layers, width,
           backbone.num_prefix_tokens, f"{raw / 2**20:.2f}", f"{disk / 2**20:.2f}", f"{disk / raw:.3f}",
           f"{n / loop:.2f}", f"{len(paths) / bare:.2f}", f"{loop / bare:.2f}")
    del backbone
    return row


def print_table(rows: list[tuple], markdown: bool) -> None:
    cells = [tuple(str(c) for c in r) for r in [COLUMNS, *rows]]
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
        for r in cells[1:]:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--aliases", default=",".join(ALIASES), help="comma-separated (default: all)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default=None)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    aliases = [a.strip() for a in args.aliases.split(",") if a.strip()]
    unknown = [a for a in aliases if a not in ALIASES]
    if unknown:
        parser.error(f"unknown aliases {unknown}; known: {', '.join(ALIASES)}")
    device = pick_device(args.device)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_folder(tmp / "data", args.images, 320)  # one image folder for every alias
        for alias in aliases:
            t = time.perf_counter()
            rows.append(measure(alias, paths, tmp / "data", tmp / "stores", args, device))
            print(f"{alias}: {time.perf_counter() - t:.1f} s", flush=True)
    print()
    print_table(rows, args.markdown)
    print()
    print(f"{args.images} generated images at {args.image_size} px, batch {args.batch_size}, random init; "
          "extract img/s is combo extract's task loop (model build and planning excluded), bare is block_tokens "
          "on in-memory batches")
    print("on-disk bytes are of random-init weights' tokens: compressibility depends on the weights, so take them "
          "as an upper-bound-ish estimate of a real checkpoint's store")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, device {device}; "
          f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
