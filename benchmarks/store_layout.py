"""Chunk shape and codec of the token arrays, measured the way the two readers read.

Prints, per layout: bytes on disk / raw float16 bytes, write MB/s, and read MB/s for
(a) the probe's pattern, a batch of consecutive images x all layers, and (b) a per-layer
study's pattern, one layer x all images. Features come from a random-init timm ViT over
natural-ish images (real network activations; pretrained ones compress similarly or better).

    python benchmarks/store_layout.py [--images 96] [--model vit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import timm
import zarr

from store_schema import StoreLayout

LAYOUTS = {
    "shard32/inner8x1L blosc-zstd1 bitshuf": StoreLayout(rows_per_shard=32, rows_per_chunk=8, layers_per_chunk=1, codec="blosc-zstd", clevel=1, shuffle="bitshuffle"),
    "shard32/inner8x1L blosc-zstd1": StoreLayout(rows_per_shard=32, rows_per_chunk=8, layers_per_chunk=1, codec="blosc-zstd", clevel=1),
    "shard32/inner8x1L blosc-lz4": StoreLayout(rows_per_shard=32, rows_per_chunk=8, layers_per_chunk=1, codec="blosc-lz4", clevel=5),
    "shard32/inner8x1L zstd1 (default)": StoreLayout(rows_per_shard=32, rows_per_chunk=8, layers_per_chunk=1, codec="zstd", clevel=1),
    "shard32/inner8x1L none": StoreLayout(rows_per_shard=32, rows_per_chunk=8, layers_per_chunk=1, codec="none"),
    "shard64/inner16x1L zstd1": StoreLayout(rows_per_shard=64, rows_per_chunk=16, layers_per_chunk=1, codec="zstd", clevel=1),
    "chunk32xL zstd1 (no shards)": StoreLayout(rows_per_shard=32, rows_per_chunk=32, layers_per_chunk=0, codec="zstd", clevel=1),
    "chunk8x1L zstd1 (no shards)": StoreLayout(rows_per_shard=8, rows_per_chunk=8, layers_per_chunk=1, codec="zstd", clevel=1),
}


def features(n: int, model_name: str) -> np.ndarray:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=224).eval()
    g = torch.Generator().manual_seed(0)
    # smooth random images (low-frequency noise upsampled) look more like photos than white noise
    low = torch.rand(n, 3, 14, 14, generator=g)
    images = torch.nn.functional.interpolate(low, size=224, mode="bicubic", align_corners=False)
    images = (images - 0.5) / 0.25
    outs: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, n, 16):
            x = model.patch_embed(images[i : i + 16])
            x = model._pos_embed(x)
            layers = []
            for blk in model.blocks:
                x = blk(x)
                layers.append(x[:, model.num_prefix_tokens :])
            outs.append(torch.stack(layers, 1).half().numpy())
    return np.concatenate(outs)


def bench(layout: StoreLayout, data: np.ndarray, workdir: Path) -> dict[str, float]:
    path = workdir / "a.zarr"
    shutil.rmtree(path, ignore_errors=True)
    array = zarr.create_array(zarr.storage.LocalStore(path), **layout.array_kwargs(data.shape))
    raw = data.nbytes
    t = time.perf_counter()
    for s in range(0, data.shape[0], layout.rows_per_shard):
        array[s : s + layout.rows_per_shard] = data[s : s + layout.rows_per_shard]
    write = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    array = zarr.open_array(zarr.storage.LocalStore(path, read_only=True), mode="r")
    t = time.perf_counter()
    for s in range(0, data.shape[0], 64):
        array[s : s + 64]
    batch = time.perf_counter() - t
    t = time.perf_counter()
    for layer in range(data.shape[1]):
        array[:, layer]
    per_layer = (time.perf_counter() - t) / data.shape[1]
    return {
        "ratio": size / raw,
        "write_MBps": raw / write / 1e6,
        "batch_read_MBps": raw / batch / 1e6,
        "layer_read_MBps": raw / data.shape[1] / per_layer / 1e6,
        "files": sum(1 for f in path.rglob("*") if f.is_file()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--model", default="vit_small_patch16_224")
    args = parser.parse_args()
    data = features(args.images, args.model)
    print(f"features {data.shape} float16, {data.nbytes / 1e6:.0f} MB raw")
    print(f"{'layout':38s} {'disk/raw':>8s} {'write MB/s':>10s} {'batch read MB/s':>15s} {'layer read MB/s':>15s} {'files':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            r = bench(layout, data, Path(tmp))
            print(f"{name:38s} {r['ratio']:8.3f} {r['write_MBps']:10.0f} {r['batch_read_MBps']:15.0f} {r['layer_read_MBps']:15.0f} {r['files']:6d}")


if __name__ == "__main__":
    main()
