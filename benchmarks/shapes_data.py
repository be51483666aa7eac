"""Generated image tasks whose answer needs spatial detail, written as `combo extract --dataset folder` trees.

Two tasks, each a folder ``<out>/<task>/{train,val,test}/<class>/<id>.png`` (the image-folder layout
extract/datasets/folder.py reads with explicit splits; the store's task is then called ``default``):

- ``position``: one shape (square, disc or triangle; random colour and size) lies wholly inside one
  quadrant of the image; the label is the quadrant (4 classes: tl, tr, bl, br). Half the images also
  carry a smaller grey distractor shape elsewhere, so "where is the bright thing" alone is not the answer.
- ``count``: 1 to 8 bright shapes plus 0 to 3 dimmer grey distractors, each in its own cell of a 4 x 4
  layout (a cell is size/4 wide: one token at 64 px with patch 16), filling 55-85% of the cell's side at a
  random offset; the label is how many bright shapes (8 classes, 1..8). Version 1 (1 to 4 shapes of 6-12 px
  anywhere) straddled tokens, and a 4x4-token ComBo probe had not learnt it after 1,500 steps (58-71% over
  seeds), so differences between stores were the optimiser's noise; cells without distractors were learnt
  perfectly (100%), which hides any difference too. With distractors a float16 probe reaches ~95%
  (benchmarks/RESULTS.md, compact_cost).

Every image is a pure function of (seed, task, split, index): the same arguments write the same bytes.
Small RGB PNGs (default 64 x 64) on faint per-image noise; numpy + PIL only (~1-2 ms per image).

    python benchmarks/shapes_data.py --out /tmp/shapes [--size 64] [--train 800 --val 200 --test 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("position", "count")
SPLITS = ("train", "val", "test")
QUADRANTS = ("tl", "tr", "bl", "br")  # label k = QUADRANTS[k]: sorted folder names would reorder them, so the
# folders are named "0-tl", "1-tr", ... (plan_folder sorts class folders by name: label == leading digit)
_MARKER = "shapes.json"


def _rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode()), index])


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(0, 40, size=3)
    noise = rng.integers(0, 50, size=(size, size, 3))
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8), mode="RGB")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    c = rng.integers(120, 256, size=3)
    c[rng.integers(0, 3)] = 255  # always one bright channel: the shape stands out of the noise
    return tuple(int(v) for v in c)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == 0:
        draw.rectangle(box, fill=fill)
    elif kind == 1:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def position_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    label = int(rng.integers(0, 4))
    half = size // 2
    side = int(rng.integers(max(3, size // 8), max(4, size // 4) + 1))
    qy, qx = divmod(label, 2)
    x0 = qx * half + int(rng.integers(0, half - side + 1))
    y0 = qy * half + int(rng.integers(0, half - side + 1))
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    if rng.random() < 0.5:  # a dimmer, smaller distractor in another quadrant
        other = int((label + rng.integers(1, 4)) % 4)
        oy, ox = divmod(other, 2)
        s2 = max(2, side // 2)
        dx = ox * half + int(rng.integers(0, half - s2 + 1))
        dy = oy * half + int(rng.integers(0, half - s2 + 1))
        grey = int(rng.integers(70, 110))
        _draw_shape(draw, int(rng.integers(0, 3)), (dx, dy, dx + s2 - 1, dy + s2 - 1), (grey, grey, grey))
    _draw_shape(draw, int(rng.integers(0, 3)), box, _colour(rng))
    return img, label


def count_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, 9))
    distractors = int(rng.integers(0, 4))
    cell = size // 4
    for i, c in enumerate(rng.choice(16, size=n + distractors, replace=False)):
        cy, cx = divmod(int(c), 4)
        side = int(rng.integers(max(2, round(0.55 * cell)), max(3, round(0.85 * cell)) + 1))
        x0 = cx * cell + int(rng.integers(0, cell - side + 1))
        y0 = cy * cell + int(rng.integers(0, cell - side + 1))
        grey = int(rng.integers(70, 110))
        fill = _colour(rng) if i < n else (grey, grey, grey)
        _draw_shape(draw, int(rng.integers(0, 3)), (x0, y0, x0 + side - 1, y0 + side - 1), fill)
    return img, n - 1


MAKERS = {"position": position_image, "count": count_image}
CLASS_NAMES = {"position": [f"{k}-{q}" for k, q in enumerate(QUADRANTS)], "count": [str(k) for k in range(1, 9)]}


def generate(out: str | Path, *, task: str, size: int = 64, train: int = 800, val: int = 200, test: int = 2000,
             seed: int = 0) -> Path:
    """Write one task's folder tree under ``out/task`` (reused as it is when the marker says the same
    arguments wrote it) and return its root, the ``--root`` of ``combo extract --dataset folder``."""
    if task not in MAKERS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    root = Path(out) / task
    params = {"task": task, "size": size, "train": train, "val": val, "test": test, "seed": seed,
              "version": 2 if task == "count" else 1}
    marker = root / _MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == params:
                return root
        except ValueError:
            pass
    if root.exists():
        shutil.rmtree(root)
    names = CLASS_NAMES[task]
    for split in SPLITS:
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for split, count in zip(SPLITS, (train, val, test)):
        for i in range(count):
            img, label = MAKERS[task](_rng(seed, task, split, i), size)
            img.save(root / split / names[label] / f"{split}-{i:05d}.png", format="PNG", compress_level=1)
    marker.write_text(json.dumps(params))  # last: a killed run leaves no marker and is redone
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for task in args.tasks.split(","):
        started = time.perf_counter()
        root = generate(args.out, task=task, size=args.size, train=args.train, val=args.val, test=args.test,
                        seed=args.seed)
        counts = {s: sum(1 for _ in (root / s).rglob("*.png")) for s in SPLITS}
        print(f"{task}: {root} {counts} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
