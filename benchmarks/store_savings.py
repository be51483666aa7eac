"""What the feature store saves: ComBo with the backbone inside every training step vs extract once + probe.

(a) "authors' way": every training step decodes and preprocesses its batch of images, runs the frozen
    backbone over it (every block's tokens, no gradient) and then takes the adapter step; evaluation
    runs the backbone over the test images once more.
(b) this project: `extract` runs the backbone once over every image (train and test) into a store,
    then `run_probe` trains the same adapter for the same steps in the same sample order from the store
    and evaluates from it.

Same data (sklearn digits, written as a VTAB-layout folder), same backbone, same adapter, same steps.
Prints wall times, (a) / (b), and the ratio projected to the paper's protocol (1,600 steps on 1,000
training images, and 800 test images) from the measured per-image backbone cost and per-step adapter cost.

    python benchmarks/store_savings.py [--model vit_small_patch16_224] [--image-size 112] [--train 256]
                                       [--test 128] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_digits_tree(root: Path, *, n_train: int, n_test: int, size: int = 32) -> Path:
    """sklearn digits as <root>/digits/{train800,val200,train800val200,test}.txt + PNGs (val200: 1/8 of train)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    folder = root / "digits"
    n_val = n_train // 8
    parts = {"train800": range(0, n_train - n_val), "val200": range(n_train - n_val, n_train),
             "test": range(n_train, n_train + n_test)}
    lists: dict[str, list[str]] = {}
    for split, rows in parts.items():
        lists[split] = []
        for i in rows:
            rel = f"images/{split}/{i:05d}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = (images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(folder / rel)
            lists[split].append(f"{rel} {int(labels[i])}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def backbone_in_the_loop(args: argparse.Namespace, data_root: Path, device: torch.device) -> tuple[float, float, dict]:
    """(wall seconds, accuracy, cost parts) of ComBo with the frozen backbone run inside every step."""
    from extract.backbones import block_tokens, inference_context, load_backbone
    from extract.datasets import plan_dataset
    from extract.images import PlanImages
    from probe.adapter import ComboAdapter, ComboConfig
    from probe.align import make_prepare
    from probe.train import TrainConfig, batch_indices, evaluate, set_seed, train_steps

    started = time.perf_counter()
    plan = plan_dataset("vtab", root=data_root, tasks=["digits"])[0]
    backbone = load_backbone(args.model, image_size=args.image_size, random_init=True, seed=0)
    backbone.model.to(device)
    images = PlanImages(plan, image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    train_rows = np.array(plan.split_rows("train800val200"))
    test_rows = np.array(plan.split_rows("test"))
    labels = np.array(plan.labels)
    seconds_backbone = [0.0, 0]

    def features(rows: np.ndarray) -> torch.Tensor:
        x = torch.stack([images[int(r)][0] for r in rows])  # decode + resize + normalise, as a DataLoader would
        t = time.perf_counter()
        with inference_context(device):
            patch, _ = block_tokens(backbone, x.to(device))
        seconds_backbone[0] += time.perf_counter() - t
        seconds_backbone[1] += len(rows)
        return patch.to(torch.float16).clone()  # what the store would have held

    def train_batches():
        for idx in batch_indices(train_rows.size, batch_size=args.batch_size, seed=args.seed):
            rows = train_rows[idx]
            yield features(rows), torch.from_numpy(labels[rows])

    def test_batches():
        for s in range(0, test_rows.size, 256):
            rows = test_rows[s : s + 256]
            yield features(rows), torch.from_numpy(labels[rows])

    set_seed(args.seed)
    model = ComboAdapter(ComboConfig(num_layers=backbone.num_layers, feature_dim=backbone.embed_dim,
                                     num_tokens=backbone.token_grid[0] * backbone.token_grid[1], num_classes=10,
                                     layers_per_backbone=(backbone.num_layers,)))
    prepare = make_prepare([backbone.token_grid], target=backbone.token_grid)
    history = train_steps(model, train_batches(), TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed),
                          device=device, prepare=lambda f: prepare([f]))
    accuracy, _, _ = evaluate(model, test_batches(), device=device, prepare=lambda f: prepare([f]))
    wall = time.perf_counter() - started
    per_image = seconds_backbone[0] / max(1, seconds_backbone[1])
    adapter_step = (history["seconds"] - per_image * args.steps * args.batch_size) / args.steps
    return wall, accuracy, {"backbone_s_per_image": per_image, "adapter_s_per_step": adapter_step}


def store_then_probe(args: argparse.Namespace, data_root: Path, out: Path, device: torch.device) -> tuple[float, float, float, float]:
    from extract.pipeline import ExtractConfig, extract
    from probe.run import ProbeConfig, run_probe

    started = time.perf_counter()
    result = extract(ExtractConfig(model=args.model, dataset="vtab", root=str(data_root), out=str(out / "stores"),
                                   image_size=args.image_size, random_init=True, seed=0, device=str(device),
                                   num_workers=args.workers, batch_size=64))
    t_extract = time.perf_counter() - started
    from store_schema import open_store

    grid = open_store(result.store).token_grid
    run = run_probe(ProbeConfig(stores=(str(result.store),), dataset="vtab", steps=args.steps,
                                batch_size=args.batch_size, seed=args.seed, grid=grid, device=str(device),
                                out=str(out / "runs")))
    wall = time.perf_counter() - started
    return wall, t_extract, wall - t_extract, run.metrics[0]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=112, help="112 -> 7x7 tokens (224 -> 14x14 as in the paper)")
    parser.add_argument("--train", type=int, default=256, help="train800val200 images")
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding workers for extract")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from probe.train import pick_device

    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = write_digits_tree(tmp / "vtab", n_train=args.train, n_test=args.test)
        loop_wall, loop_acc, parts = backbone_in_the_loop(args, data_root, device)
        store_wall, t_extract, t_probe, store_acc = store_then_probe(args, data_root, tmp, device)
    epochs = args.steps * args.batch_size / args.train
    print(f"{args.model} (random-init) at {args.image_size}px, ComBo 128x6, {args.steps} steps of {args.batch_size} "
          f"on {args.train} images ({epochs:.1f} epochs), test {args.test}; device {device}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"(a) backbone inside every step: {loop_wall:.1f} s (accuracy {loop_acc:.3f})")
    print(f"(b) extract + probe:            {store_wall:.1f} s = extract {t_extract:.1f} s + probe {t_probe:.1f} s "
          f"(accuracy {store_acc:.3f})")
    print(f"(a) / (b) = {loop_wall / store_wall:.2f}")
    bb, step = parts["backbone_s_per_image"], max(parts["adapter_s_per_step"], 1e-9)
    n_train, n_test, steps = 1000, 800, 1600
    projected = (steps * (args.batch_size * bb + step) + n_test * bb) / ((n_train + n_test) * bb + steps * step)
    print(f"measured: backbone {1000 * bb:.2f} ms/image, adapter {1000 * step:.1f} ms/step; projected to the paper's "
          f"protocol (1,600 steps x 64 on 1,000 images + 800 test images), one task, one probe: (a) / (b) = "
          f"{projected:.1f}; every further probe of the same store (other seed, method, backbone subset) costs "
          f"(b) only its probe part")


if __name__ == "__main__":
    main()
