"""What the feature store saves: ComBo with the backbones inside every training step vs extract once + probe.

--mode study (the default): the paper's whole per-task study, `combo study`'s heads, K random-init backbones
(--backbones, seeds 0..K-1, the same architecture):

(a) "authors' way": every fit of the study runs its backbones inside every training step (decode + preprocess
    the batch, every block's tokens of each of the fit's backbones, no gradient, then the adapter step) and
    again for its evaluation: the relevance fit (ComBo on all K with the group penalty on train800, held-out
    drops on val200), then on train800val200 -> test ComBo on all K, ComBo on the selected top-k, ComBo on
    each backbone alone (1 backbone), the linear probe on each backbone (1 backbone, last layer). The val200
    features of the relevance fit are computed once and shuffled in memory for the held-out drops (kind to
    (a)). With --authors-steps < --steps each fit trains --authors-steps steps with the backbones in the loop
    and its training time is extrapolated linearly to --steps (its measured seconds per step); every
    evaluation is run in full.
(b) this project: `extract` runs each backbone once over every image into a store, then
    `probe.studyrun.run_study` (top-k by held-out drop; heads combo, select, single, linear).
Ideal store path: one extraction at pure backbone cost (the forward on in-memory images at batch 64, plus
(a)'s decode cost per image; nothing written) plus the adapter's own compute for every fit and evaluation of
the study, timed on in-memory float16 tensors of the same shapes (zero reading cost); each in-memory cost is
timed before (a) and after (b) and the faster kept (the machine is shared). CEILING = (a) / ideal;
measured / ceiling = ideal / (b).
Projection to the paper's protocol (1,600 steps x 64 per final fit on 1,000 training images, the relevance
fit 1,300 steps on 800 with held-out drops on 200, and --project-test test images) from those in-memory
costs per image (backbone) and per step / per evaluated image (adapter, per head kind), for (a) as for the
ideal; (b)'s store overheads enter as measured: extraction seconds per image and backbone, and the study's
wall over its in-memory adapter compute.

--mode probe: one ComBo probe (the earlier benchmark):
(a) every training step decodes and preprocesses its batch of images, runs the frozen backbone over it
    and then takes the adapter step; evaluation runs the backbone over the test images once more.
(b) `extract` once (train and test) into a store, then `run_probe` trains the same adapter for the same
    steps in the same sample order from the store and evaluates from it.

Same data (sklearn digits, written as a VTAB-layout folder), same backbones, same adapter, same steps.

    python benchmarks/store_savings.py [--mode study] [--backbones 3] [--model vit_small_patch16_224]
                                       [--image-size 112] [--train 256] [--test 128] [--steps 12]
                                       [--authors-steps 4] [--width 128] [--depth 6] [--threads 2]
    python benchmarks/store_savings.py --mode probe [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import sys
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


# ------------------------------------------------------------------------------------------------ study mode


def _fits(k: int, kept: list[int]) -> list[dict]:
    """The study's fits in `combo study`'s order, deduplicated as it does (top-k of k stores is ComBo on all):
    name, kind (what the adapter's shapes are), backbones, training split, penalised."""
    every = tuple(range(k))
    fits = [{"name": "relevance", "kind": f"combo-{k}+penalty", "keep": every, "split": "train800", "penalty": True}]
    fits.append({"name": f"combo[all {k}]", "kind": f"combo-{k}", "keep": every, "split": "train800val200"})
    if tuple(kept) != every:
        fits.append({"name": f"combo[top-{len(kept)}]", "kind": f"combo-{len(kept)}", "keep": tuple(kept),
                     "split": "train800val200"})
    fits += [{"name": f"combo[#{j}]", "kind": "combo-1", "keep": (j,), "split": "train800val200"} for j in every]
    fits += [{"name": f"linear[#{j}]", "kind": "linear-1", "keep": (j,), "split": "train800val200"} for j in every]
    for f in fits:
        f.setdefault("penalty", False)
        f["method"] = "linear" if f["kind"].startswith("linear") else "combo"
    return fits


def _head_model(method: str, n_backbones: int, *, layers: int, dim: int, grid: tuple[int, int], classes: int,
                args: argparse.Namespace):
    """The model and prepare `combo study` builds for a head (probe.run.model_and_prepare's choices)."""
    from probe.adapter import ComboAdapter, ComboConfig
    from probe.align import make_prepare
    from probe.linear import LinearProbe
    from probe.run import linear_prepare

    if method == "linear":
        return LinearProbe(dim * n_backbones, classes), linear_prepare([False] * n_backbones)
    cfg = ComboConfig(num_layers=layers * n_backbones, feature_dim=dim, num_tokens=grid[0] * grid[1],
                      num_classes=classes, width=args.width, depth=args.depth, num_heads=args.heads,
                      layers_per_backbone=(layers,) * n_backbones)
    return ComboAdapter(cfg), make_prepare([grid] * n_backbones, target=grid)


def _view(method: str, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    return [f[:, -1:].contiguous() for f in feats] if method == "linear" else feats


def _shuffled_drops(model, prepare, feats: list[torch.Tensor], labels: torch.Tensor, *, repeats: int, seed: int,
                    device: torch.device, method: str = "combo") -> tuple[float, list[float]]:
    """Held-out accuracy and, per backbone, its mean drop when its features are shuffled across samples."""
    from probe.train import evaluate

    def acc(fs):
        return evaluate(model, [(_view(method, fs), labels)], device=device, prepare=prepare)[0]

    base = acc(feats)
    rng = np.random.default_rng(seed)
    drops = []
    for k in range(len(feats)):
        shuffled = [acc([f[torch.from_numpy(rng.permutation(len(labels)))] if j == k else f
                         for j, f in enumerate(feats)]) for _ in range(repeats)]
        drops.append(base - float(np.mean(shuffled)))
    return base, drops


def authors_study(args: argparse.Namespace, data_root: Path, device: torch.device) -> dict:
    """(a): every fit of the study with its backbones run inside every step and every evaluation."""
    from extract.backbones import block_tokens, inference_context, load_backbone
    from extract.datasets import plan_dataset
    from extract.images import PlanImages
    from probe.relevance import DEFAULT_LAMBDA

    started = time.perf_counter()
    plan = plan_dataset("vtab", root=data_root, tasks=["digits"])[0]
    backbones = [load_backbone(args.model, image_size=args.image_size, random_init=True, seed=s)
                 for s in range(args.backbones)]
    for b in backbones:
        b.model.to(device)
    b0 = backbones[0]
    images = PlanImages(plan, image_size=b0.image_size, mean=b0.mean, std=b0.std)
    labels = np.array(plan.labels)
    rows = {split: np.array(plan.split_rows(split)) for split in ("train800", "val200", "train800val200", "test")}
    clock = {"decode_s": 0.0, "decoded": 0, "forward_s": 0.0, "forwarded": 0}
    layers, dim, grid = b0.num_layers, b0.embed_dim, tuple(b0.token_grid)
    classes = int(labels.max()) + 1

    def features(batch_rows: np.ndarray, keep) -> list[torch.Tensor]:
        """Decode the batch once (as a DataLoader would), then every backbone the fit reads, fp16 as stored."""
        t = time.perf_counter()
        x = torch.stack([images[int(r)][0] for r in batch_rows])
        clock["decode_s"] += time.perf_counter() - t
        clock["decoded"] += len(batch_rows)
        out = []
        for k in keep:
            t = time.perf_counter()
            with inference_context(device):
                patch, _ = block_tokens(backbones[k], x.to(device))
            clock["forward_s"] += time.perf_counter() - t
            clock["forwarded"] += len(batch_rows)
            out.append(patch.to(torch.float16).clone())
        return out

    def eval_features(split: str, keep) -> tuple[list[torch.Tensor], torch.Tensor]:
        parts = [features(rows[split][s:s + 256], keep) for s in range(0, rows[split].size, 256)]
        return [torch.cat([p[j] for p in parts]) for j in range(len(keep))], torch.from_numpy(labels[rows[split]])

    train_steps_n = min(args.authors_steps, args.steps)
    common = dict(layers=layers, dim=dim, grid=grid, classes=classes, device=device, lam=DEFAULT_LAMBDA)
    relevance = _fits(args.backbones, list(range(args.backbones)))[0]
    fits_out = [_authors_fit(relevance, args, rows, labels, features, eval_features, clock, train_steps_n, **common)]
    drops = fits_out[0]["drops"]  # top-k by held-out drop, ties in backbone order (as `combo study`)
    kept = sorted(int(j) for j in np.argsort(-np.asarray(drops), kind="stable")[: args.top_k])
    for fit in _fits(args.backbones, kept)[1:]:
        fits_out.append(_authors_fit(fit, args, rows, labels, features, eval_features, clock, train_steps_n, **common))
    wall = time.perf_counter() - started
    extrapolated = sum(f["train_s_full"] - f["train_s"] for f in fits_out)
    return {"wall_measured": wall, "wall": wall + extrapolated, "fits": fits_out, "kept": kept,
            "decode_s_per_image": clock["decode_s"] / max(1, clock["decoded"]),
            "forward_s_per_image": clock["forward_s"] / max(1, clock["forwarded"]),
            "images_forwarded": clock["forwarded"], "train_steps": train_steps_n,
            "layers": layers, "dim": dim, "grid": grid, "classes": classes}


def _authors_fit(fit: dict, args, rows, labels, features, eval_features, clock, steps: int, *, layers, dim, grid,
                 classes, device, lam) -> dict:
    from probe.train import TrainConfig, batch_indices, evaluate, set_seed, train_steps

    keep, method = fit["keep"], fit["method"]
    train_rows = rows[fit["split"]]
    set_seed(args.seed)
    model, prepare = _head_model(method, len(keep), layers=layers, dim=dim, grid=grid, classes=classes, args=args)

    def batches():
        for idx in batch_indices(train_rows.size, batch_size=args.batch_size, seed=args.seed):
            r = train_rows[idx]
            yield _view(method, features(r, keep)), torch.from_numpy(labels[r])

    bb0 = clock["decode_s"] + clock["forward_s"]
    history = train_steps(model, batches(), TrainConfig(steps=steps, batch_size=args.batch_size, seed=args.seed,
                                                        group_lambda=lam if fit["penalty"] else 0.0),
                          device=device, prepare=prepare)
    train_s = float(history["seconds"])
    train_bb = clock["decode_s"] + clock["forward_s"] - bb0
    t = time.perf_counter()
    out = dict(fit, train_s=train_s, train_s_full=train_s / steps * args.steps, steps_measured=steps,
               backbone_s_per_step=train_bb / steps, adapter_s_per_step=(train_s - train_bb) / steps)
    if fit["penalty"]:  # relevance: val200 features once, the held-out drops shuffled in memory
        feats, y = eval_features("val200", keep)
        acc, drops = _shuffled_drops(model, prepare, feats, y, repeats=args.heldout_repeats, seed=args.seed,
                                     device=device)
        out.update(accuracy=acc, drops=drops, eval_split="val200")
    else:
        feats, y = eval_features("test", keep)
        acc = evaluate(model, [(_view(method, feats), y)], device=device, prepare=prepare)[0]
        out.update(accuracy=acc, eval_split="test")
    out["eval_s"] = time.perf_counter() - t
    return out


def ideal_costs(args: argparse.Namespace, kinds: list[str], *, layers: int, dim: int, grid: tuple[int, int],
                classes: int, device: torch.device) -> dict[str, dict[str, float]]:
    """The adapter's own compute per head kind, from in-memory float16 tensors of the study's shapes: seconds
    per training step (batch --batch-size; 1 warm-up step not counted) and per evaluated image."""
    from probe.relevance import DEFAULT_LAMBDA
    from probe.train import TrainConfig, evaluate, set_seed, train_steps

    torch.manual_seed(0)
    t_tokens = grid[0] * grid[1]
    out = {}
    for kind in kinds:
        method = "linear" if kind.startswith("linear") else "combo"
        k = int(kind.split("-")[1].split("+")[0])
        penalty = kind.endswith("+penalty")
        stored = [torch.randn(args.batch_size, layers, t_tokens, dim).to(torch.float16) for _ in range(k)]
        feats = _view(method, stored)
        y = torch.randint(0, classes, (args.batch_size,))

        def batches():
            while True:
                yield feats, y

        set_seed(args.seed)
        model, prepare = _head_model(method, k, layers=layers, dim=dim, grid=grid, classes=classes, args=args)
        cfg = TrainConfig(steps=1, batch_size=args.batch_size, group_lambda=DEFAULT_LAMBDA if penalty else 0.0)
        train_steps(model, batches(), cfg, device=device, prepare=prepare)  # warm-up
        cfg = TrainConfig(steps=args.ideal_steps, batch_size=args.batch_size,
                          group_lambda=DEFAULT_LAMBDA if penalty else 0.0)
        step_s = train_steps(model, batches(), cfg, device=device, prepare=prepare)["seconds"] / args.ideal_steps
        n_eval = 2 * args.batch_size
        eval_in = [(_view(method, [torch.cat([s, s]) for s in stored]), torch.cat([y, y]))]
        evaluate(model, eval_in, device=device, prepare=prepare)  # warm-up
        t = time.perf_counter()
        evaluate(model, eval_in, device=device, prepare=prepare)
        out[kind] = {"step_s": step_s, "eval_s_per_image": (time.perf_counter() - t) / n_eval}
    return out


def backbone_forward_cost(backbone, args: argparse.Namespace, device: torch.device, *, batches: int = 2) -> float:
    """Seconds per image of one backbone's forward (every block's tokens, fp16 as stored) on in-memory images at
    extraction's batch size (64), one warm-up batch not counted: the ideal extraction's compute."""
    from extract.backbones import block_tokens, inference_context

    x = torch.randn(64, 3, args.image_size, args.image_size, device=device)
    with inference_context(device):
        block_tokens(backbone, x)[0].to(torch.float16)
        t = time.perf_counter()
        for _ in range(batches):
            block_tokens(backbone, x)[0].to(torch.float16)
    return (time.perf_counter() - t) / (batches * 64)


def store_study(args: argparse.Namespace, data_root: Path, out: Path, device: torch.device) -> dict:
    """(b): extract each backbone once (its own store), then run_study."""
    from extract.pipeline import ExtractConfig, extract
    from probe.run import ProbeConfig
    from probe.study import StudyConfig
    from probe.studyrun import run_study

    started = time.perf_counter()
    stores, images = [], 0
    for s in range(args.backbones):
        result = extract(ExtractConfig(model=args.model, dataset="vtab", root=str(data_root),
                                       out=str(out / f"stores-seed{s}"), image_size=args.image_size, random_init=True,
                                       seed=s, device=str(device), num_workers=args.workers, batch_size=64))
        stores.append(str(result.store))
        images += sum(t.images for t in result.tasks)
    t_extract = time.perf_counter() - started
    probe = ProbeConfig(stores=tuple(stores), dataset="vtab", steps=args.steps, batch_size=args.batch_size,
                        seed=args.seed, device=str(device), out=str(out / "runs"), width=args.width, depth=args.depth,
                        num_heads=args.heads)
    t = time.perf_counter()
    run = run_study(StudyConfig(probe=probe, select=f"top-{args.top_k}", by="heldout",
                                heads=("combo", "select", "single", "linear"), heldout_repeats=args.heldout_repeats))
    t_study = time.perf_counter() - t
    return {"wall": time.perf_counter() - started, "extract_s": t_extract, "study_s": t_study,
            "extract_s_per_image": t_extract / max(1, images), "images_extracted": images,
            "rows": run.rows, "io": run.io, "selection": run.selection}


def study_costs(fits: list[dict], ideal: dict, *, n_val: int, n_test: int, repeats: int, k: int) -> float:
    """The adapter's compute of a whole study (training and every evaluation) from per-kind costs."""
    total = 0.0
    for f in fits:
        c = ideal[f["kind"]]
        total += f["steps"] * c["step_s"]
        total += (1 + k * repeats) * n_val * c["eval_s_per_image"] if f["penalty"] else n_test * c["eval_s_per_image"]
    return total


def authors_time(fits: list[dict], ideal: dict, *, decode: float, forward: float, batch: int, n_val: int,
                 n_test: int, repeats: int, k: int) -> float:
    """(a) from per-image backbone costs (a batch decoded once, each of the fit's backbones run over it) and the
    adapter's per-kind costs: every step and every evaluation runs the fit's backbones."""
    total = study_costs(fits, ideal, n_val=n_val, n_test=n_test, repeats=repeats, k=k)
    for f in fits:
        per_image = decode + len(f["keep"]) * forward
        total += f["steps"] * batch * per_image + (n_val if f["penalty"] else n_test) * per_image
    return total


def run_study_mode(args: argparse.Namespace, device: torch.device) -> None:
    load0 = os.getloadavg()[0]
    k = args.backbones
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = write_digits_tree(tmp / "vtab", n_train=args.train, n_test=args.test)
        kinds = list(dict.fromkeys(f["kind"] for f in _fits(k, list(range(args.top_k)))))
        from extract.backbones import load_backbone

        b0 = load_backbone(args.model, image_size=args.image_size, random_init=True, seed=0)
        b0.model.to(device)
        shapes = dict(layers=b0.num_layers, dim=b0.embed_dim, grid=tuple(b0.token_grid), classes=10, device=device)
        # the ideal's costs, timed in memory before (a) and after (b) (the machine is shared): the faster is used
        ideal_runs = [ideal_costs(args, kinds, **shapes)]
        forward_runs = [backbone_forward_cost(b0, args, device)]
        a = authors_study(args, data_root, device)
        b = store_study(args, data_root, tmp, device)
        ideal_runs.append(ideal_costs(args, kinds, **shapes))
        forward_runs.append(backbone_forward_cost(b0, args, device))
        del b0
    ideal = {kind: {c: float(min(r[kind][c] for r in ideal_runs)) for c in ideal_runs[0][kind]} for kind in kinds}
    forward_ideal = min(forward_runs)
    load1 = os.getloadavg()[0]
    n_val = args.train // 8
    fits = [dict(f, steps=args.steps) for f in a["fits"]]
    dec, fwd_loop, fwd = a["decode_s_per_image"], a["forward_s_per_image"], forward_ideal
    n_images = args.train + args.test
    ideal_extract = n_images * (dec + k * fwd)
    ideal_adapter = study_costs(fits, ideal, n_val=n_val, n_test=args.test, repeats=args.heldout_repeats, k=k)
    ideal_total = ideal_extract + ideal_adapter
    measured, ceiling = a["wall"] / b["wall"], a["wall"] / ideal_total
    geo = f"{a['grid'][0]}x{a['grid'][1]} tokens, L={a['layers']}, D={a['dim']}"
    print(f"command: python benchmarks/store_savings.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{k} x {args.model} (random-init, seeds 0..{k - 1}) at {args.image_size}px ({geo}); ComBo "
          f"{args.width}x{args.depth}; {args.steps} steps x {args.batch_size} per fit; train800val200 {args.train} "
          f"images (train800 {args.train - n_val}, val200 {n_val}), test {args.test}; select top-{args.top_k} by held-out "
          f"drop ({args.heldout_repeats} repeats); device {device}, torch threads {torch.get_num_threads()}, "
          f"1-min load {load0:.1f} at start, {load1:.1f} at end")
    print(f"\nstudy fits ({len(fits)}): " + ", ".join(f"{f['name']} ({len(f['keep'])} backbone(s))" for f in fits))
    print("\n| fit | kind | (a) backbone s/step | (a) adapter s/step | in-memory adapter s/step (before, after) | "
          "in-memory eval ms/image | (a) eval s | (a) accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for f in a["fits"]:
        c = ideal[f["kind"]]
        runs = ", ".join(f"{r[f['kind']]['step_s']:.2f}" for r in ideal_runs)
        print(f"| {f['name']} | {f['kind']} | {f['backbone_s_per_step']:.2f} | {f['adapter_s_per_step']:.2f} | "
              f"{c['step_s']:.2f} ({runs}) | {1000 * c['eval_s_per_image']:.2f} | {f['eval_s']:.1f} | "
              f"{f['accuracy']:.3f} ({f['eval_split']}) |")
    trained = {(r["method"], r["stores"]): float(r["train_seconds"]) for r in b["rows"]}  # a fit, once
    in_memory = sum(f["steps"] * ideal[f["kind"]]["step_s"] for f in fits if not f["penalty"])
    print(f"(b) run_study: training of its {len(trained)} final fits {sum(trained.values()):.1f} s "
          f"(study.csv train_seconds; in memory {in_memory:.1f} s); the rest of its {b['study_s']:.1f} s is the relevance "
          f"pass, reading, the one test pass and the run folder")
    print(f"\nbackbone: forward {1000 * fwd:.1f} ms/image in memory at batch 64 (before, after: "
          f"{', '.join(f'{1000 * v:.1f}' for v in forward_runs)}; used for the ideal and both projections), "
          f"{1000 * fwd_loop:.1f} ms/image inside (a)'s loop ({a['images_forwarded']} image-forwards), decode + preprocess "
          f"{1000 * dec:.2f} ms/image (in (a)); extract (measured in (b), decode and writes included): "
          f"{1000 * b['extract_s_per_image']:.1f} ms per image and backbone ({b['images_extracted']} image-forwards)")
    extra = a["wall"] - a["wall_measured"]
    how = ("every step measured" if a["train_steps"] >= args.steps else
           f"each fit trained {a['train_steps']} of its {args.steps} steps with the backbones in the loop, its training "
           f"time extrapolated to {args.steps} steps from its measured s/step (+{extra:.1f} s); evaluations in full")
    print(f"\n(a) backbones inside every step and evaluation: {a['wall']:.1f} s ({how}; measured wall "
          f"{a['wall_measured']:.1f} s)")
    print(f"(b) extract + run_study:                         {b['wall']:.1f} s = extract {b['extract_s']:.1f} s + "
          f"study {b['study_s']:.1f} s")
    print(f"ideal store path: {ideal_total:.1f} s = one extraction at backbone cost {ideal_extract:.1f} s + the "
          f"adapter's in-memory compute for every fit and evaluation {ideal_adapter:.1f} s")
    accs = {r["head"]: r["accuracy"] for r in b["rows"]}
    print("(b) accuracies: " + ", ".join(f"{h} {v:.3f}" for h, v in accs.items())
          + f"; selection {b['selection']}; (a) selection {a['kept']}")
    by_split: dict[str, list[int]] = {}
    for r in b["io"]:
        v = by_split.setdefault(r["split"], [0, 0])
        v[0] += int(r["bytes_read"])
        v[1] += int(r.get("bytes_stored") or 0)
    print("(b) io.csv, bytes read (all stores): " + ", ".join(
        f"{s} {v[0] / 2**20:.1f} MiB" + (f" (stored {v[1] / 2**20:.1f} MiB)" if v[1] else "") for s, v in by_split.items()))
    print(f"\nmeasured (a) / (b) = {measured:.2f}; ceiling (a) / ideal = {ceiling:.2f}; measured / ceiling = "
          f"{measured / ceiling:.3f}  [ideal / (b); with the measured extraction (writes included) as the ideal's "
          f"extraction: ceiling {a['wall'] / (b['extract_s'] + ideal_adapter):.2f}, measured / ceiling "
          f"{(b['extract_s'] + ideal_adapter) / b['wall']:.3f}]")
    overhead = b["study_s"] / ideal_adapter_of_study(fits, ideal, n_val, args)
    print(f"store overheads carried into the projection: extraction {1000 * b['extract_s_per_image']:.1f} ms per "
          f"image and backbone; run_study wall / its in-memory adapter compute = {overhead:.3f}")
    print(f"\nprojected to the paper's protocol ({k} backbones; final fits 1,600 steps x 64 on 1,000 train800val200 "
          f"images, relevance 1,300 steps x 64 on 800 + held-out drops on 200; same heads; per-image and per-step "
          f"costs as measured above):")
    print("| test images | (a) h | (b) h | ideal h | (a) / (b) | ceiling | measured / ceiling |")
    print("|---|---|---|---|---|---|---|")
    for n_test in args.project_test:
        pfits = [dict(f, steps=1300 if f["penalty"] else 1600) for f in a["fits"]]
        ta = authors_time(pfits, ideal, decode=dec, forward=fwd, batch=64, n_val=200, n_test=n_test,
                          repeats=args.heldout_repeats, k=k)
        adapter = study_costs(pfits, ideal, n_val=200, n_test=n_test, repeats=args.heldout_repeats, k=k)
        ti = (1000 + n_test) * (dec + k * fwd) + adapter
        tb = k * (1000 + n_test) * b["extract_s_per_image"] + adapter * overhead
        print(f"| {n_test:,} | {ta / 3600:.2f} | {tb / 3600:.2f} | {ti / 3600:.2f} | {ta / tb:.2f} | {ta / ti:.2f} | "
              f"{ti / tb:.3f} |")
    print("(the per-step costs are this CPU's at batch 64; the ratios, not the hours, carry over)")


def ideal_adapter_of_study(fits: list[dict], ideal: dict, n_val: int, args: argparse.Namespace) -> float:
    """In-memory adapter compute of the study (b) ran: (b)'s own selection may differ from (a)'s, not its shapes
    when the backbones share an architecture."""
    return study_costs(fits, ideal, n_val=n_val, n_test=args.test, repeats=args.heldout_repeats, k=args.backbones)


# ------------------------------------------------------------------------------------------------------ main


def run_probe_mode(args: argparse.Namespace, device: torch.device) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("study", "probe"), default="study")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--backbones", type=int, default=3, help="study: K random-init backbones (seeds 0..K-1)")
    parser.add_argument("--image-size", type=int, default=112, help="112 -> 7x7 tokens (224 -> 14x14 as in the paper)")
    parser.add_argument("--train", type=int, default=256, help="train800val200 images (val200: 1/8 of them)")
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per fit (default: study 12, probe 40)")
    parser.add_argument("--authors-steps", type=int, default=4,
                        help="study: steps per fit run with the backbones in the loop in (a), extrapolated to --steps")
    parser.add_argument("--ideal-steps", type=int, default=3, help="study: in-memory adapter steps timed per head kind")
    parser.add_argument("--top-k", type=int, default=2, help="study: --select top-k")
    parser.add_argument("--heldout-repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--project-test", default="800,10000", help="study: test-split sizes of the projection")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding workers for extract")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.mode == "study" else 40)
    args.project_test = [int(v) for v in str(args.project_test).split(",") if v.strip()]
    if args.mode == "study" and not 1 <= args.top_k <= args.backbones:
        parser.error(f"--top-k {args.top_k}: choose 1..{args.backbones}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from probe.train import pick_device

    device = pick_device(args.device)
    if args.mode == "probe":
        run_probe_mode(args, device)
    else:
        run_study_mode(args, device)


if __name__ == "__main__":
    main()
