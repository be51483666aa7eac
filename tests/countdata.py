"""A VTAB-layout task whose label is the COUNT of bright squares (1..4 -> label 0..3), for probe tests.

Each square fills most of one quadrant, so at 32px with patch 16 every square is one token of a 2x2
grid; which quadrants are lit is random. The count is carried by every layer's token maps (and, in
sum, by their mean), so even a tiny adapter learns it in a hundred steps, unlike the position of a
single square, which a depth-1 adapter often fails to find in a few hundred steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

COUNT_CLASSES = 4


def count_image(label: int, *, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    half, pad = size // 2, max(1, size // 16)
    for quadrant in rng.permutation(4)[: int(label) + 1]:
        r, c = divmod(int(quadrant), 2)
        arr[r * half + pad : (r + 1) * half - pad, c * half + pad : (c + 1) * half - pad] = (255, 230, 200)
    return Image.fromarray(arr, mode="RGB")


def count_tree(root: str | Path, task: str = "clevr_count", *, n_train: int = 64, n_val: int = 32, n_test: int = 40,
               size: int = 32) -> dict[str, list[tuple[str, int]]]:
    """Write <root>/<task>/{train800,val200,train800val200,test}.txt and images; train800val200 lists the
    train800 and val200 files themselves (no copies). Returns {split: [(relative path, label)]}."""
    return image_tree(Path(root) / task, task, classes=COUNT_CLASSES,
                      make=lambda label, seed, px: count_image(label, seed=seed, size=px),
                      n_train=n_train, n_val=n_val, n_test=n_test, size=size)


def image_tree(folder: Path, task: str, *, classes: int, make: Callable[[int, int, int], Image.Image], n_train: int,
               n_val: int, n_test: int, size: int) -> dict[str, list[tuple[str, int]]]:
    """A VTAB-layout task folder of generated images: `make(label, seed, size)` draws each one, labels cycle
    0..classes-1 within each split, and the seed is a hash of task, split and index (the same tree on every
    machine). train800val200 lists the train800 and val200 files themselves (no copies)."""
    lists: dict[str, list[tuple[str, int]]] = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lists[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.png"
            label = i % classes
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            make(label, zlib.crc32(f"{task}/{split}/{i}".encode()), size).save(folder / rel)
            lists[split].append((rel, label))
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, items in lists.items():
        (folder / f"{split}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in items))
    return lists
