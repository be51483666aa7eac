"""Hierarchical models' layers: one array per token grid, or one array per layer? (issue 22, the layout choice)

A hierarchical backbone's stored layers have different grids and widths (ConvNeXt-T: 56x56x96 ... 7x7x768), so
they cannot share the one [N, L, T, D] `tokens` array a ViT store has. Two layouts keep every layer at its native
grid; this measures both with the store's own chunking (`store_schema.StoreLayout`: shards sized by bytes, one
inner chunk per layer and row block, zstd, crc32c), on random float16 features, in one run:

* **per grid**: one array per grid [N, L_g, T_g, D_g] (a ViT store is the one-grid case: its `tokens` array
  as it is today);
* **per layer**: one array per layer [N, T_l, D_l].

Geometries: ConvNeXt-T's 18 blocks (3 + 3 + 9 + 3 at 56/28/14/7) and its 4 stage outputs (what timm's
`forward_intermediates` gives, one layer per grid: the two layouts coincide there), and Hiera/SAM2-B+'s 24 blocks
(2 + 3 + 16 + 3). Reported: objects written, bytes on disk, write time, and three reads a probe does (every layer
of a random batch of rows; one layer of every row, as the atlas or a linear probe; every layer of every row in
order, as a streamed epoch), each the best of `--repeats` alternating runs, and the ratio per layer / per grid.

    python benchmarks/grid_layout.py [--rows 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from store_schema import StoreLayout

GEOMETRIES = {  # name: [(grid side, width, layers)] at 224 px
    "convnext_tiny blocks": [(56, 96, 3), (28, 192, 3), (14, 384, 9), (7, 768, 3)],
    "convnext_tiny stages": [(56, 96, 1), (28, 192, 1), (14, 384, 1), (7, 768, 1)],
    "sam2_hiera_b+ blocks": [(56, 112, 2), (28, 224, 3), (14, 448, 16), (7, 896, 3)],
}


def _arrays(geometry, layout: str) -> list[tuple[str, tuple[int, int, int], int]]:
    """(name, (L, T, D), first layer index) of every array of one layout."""
    out, first = [], 0
    for side, width, layers in geometry:
        if layout == "grid":
            out.append((f"tokens_{side}x{side}x{width}", (layers, side * side, width), first))
        else:
            out += [(f"tokens_l{first + i}", (1, side * side, width), first + i) for i in range(layers)]
        first += layers
    return out


def _write(root: Path, geometry, layout: str, data: dict[int, np.ndarray], n: int) -> tuple[float, int, int]:
    row_bytes = sum(side * side * width * layers * 2 for side, width, layers in geometry)
    store_layout = StoreLayout().for_rows(row_bytes)  # shards sized by the whole row's bytes, as a store's are
    group = zarr.open_group(str(root), mode="w")
    t = time.perf_counter()
    for name, (layers, tokens, width), first in _arrays(geometry, layout):
        kwargs = store_layout.array_kwargs((n, layers, tokens, width))
        array = group.create_array(name=name, **kwargs)
        array[...] = np.stack([data[first + i] for i in range(layers)], axis=1)
    seconds = time.perf_counter() - t
    files = [p for p in root.rglob("*") if p.is_file()]
    return seconds, len([p for p in files if p.name != "zarr.json"]), sum(p.stat().st_size for p in files)


def _reads(root: Path, geometry, layout: str, n: int, rng: np.random.Generator) -> dict[str, float]:
    group = zarr.open_group(str(root), mode="r")
    arrays = [(group[name], first, shape) for name, shape, first in _arrays(geometry, layout)]
    batch = np.sort(rng.choice(n, size=min(32, n), replace=False))
    middle = sum(layers for _, _, layers in geometry) // 2  # a layer of the third grid for every geometry here
    out = {}
    t = time.perf_counter()
    for array, _, _ in arrays:  # as combo's reader does: the shards the rows fall in, then the rows
        rows = (array.shards or array.chunks)[0]
        for shard in np.unique(batch // rows):
            lo = int(shard) * rows
            array[lo : min(lo + rows, n)][batch[(batch >= lo) & (batch < lo + rows)] - lo]
    out["batch, every layer"] = time.perf_counter() - t
    t = time.perf_counter()
    for array, first, (layers, _, _) in arrays:
        if first <= middle < first + layers:
            array[:, middle - first]
    out["one layer, every row"] = time.perf_counter() - t
    t = time.perf_counter()
    for array, _, _ in arrays:
        array[...]
    out["every row, every layer"] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="grid-layout-"))
    try:
        for name, geometry in GEOMETRIES.items():
            layers = sum(g[2] for g in geometry)
            data, k = {}, 0
            for side, width, count in geometry:
                for _ in range(count):
                    data[k] = rng.standard_normal((args.rows, side * side, width), dtype=np.float32).astype(np.float16)
                    k += 1
            raw = sum(a.nbytes for a in data.values())
            best: dict[str, dict[str, float]] = {"grid": {}, "layer": {}}
            shape: dict[str, tuple[int, int]] = {}
            for _ in range(args.repeats):
                for layout in ("grid", "layer"):  # alternating, so machine noise falls on both
                    root = tmp / layout
                    shutil.rmtree(root, ignore_errors=True)
                    seconds, objects, size = _write(root, geometry, layout, data, args.rows)
                    shape[layout] = (objects, size)
                    times = {"write": seconds, **_reads(root, geometry, layout, args.rows, rng)}
                    for key, value in times.items():
                        best[layout][key] = min(value, best[layout].get(key, float("inf")))
            print(f"\n{name}: {layers} layers, {args.rows} rows, {raw / args.rows / 2**20:.2f} MiB per row raw float16")
            print(f"  {'':24} {'per grid':>10} {'per layer':>10} {'layer/grid':>10}")
            print(f"  {'arrays':24} {len(_arrays(geometry, 'grid')):>10} {len(_arrays(geometry, 'layer')):>10}")
            print(f"  {'shard objects':24} {shape['grid'][0]:>10} {shape['layer'][0]:>10} "
                  f"{shape['layer'][0] / shape['grid'][0]:>10.2f}")
            print(f"  {'bytes on disk / raw':24} {shape['grid'][1] / raw:>10.3f} {shape['layer'][1] / raw:>10.3f} "
                  f"{shape['layer'][1] / shape['grid'][1]:>10.3f}")
            for key in best["grid"]:
                g, layer = best["grid"][key], best["layer"][key]
                print(f"  {key + ' s':24} {g:>10.3f} {layer:>10.3f} {layer / g:>10.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
