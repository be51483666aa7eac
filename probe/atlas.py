"""The per-layer probing atlas (PAPER.md, "Baselines"; the paper's Figure 1 / Figure 5).

For every layer of every backbone: a linear probe on the cls token (prefix token 0, where the store keeps
prefix tokens; DINOv2-with-registers stores cls first, then the registers) and on the mean of the patch
tokens, and its accuracy on the protocol's evaluation split (train800 -> val200 for "dev").

Cost: one pass over each split of the store pools ALL layers at once into [N, L, D] per pooling (the token
array and, for cls, the small prefix array are each read once, every layer in the same read); the pooled
features then stay in memory (or on the GPU) and one ``MultiLayerLinearProbe`` holds a head per
(pooling, layer). Its loss is the sum of the heads' cross-entropies, so every head gets exactly the
gradient and the AdamW trajectory it would get alone, on the same batches: one training run for the
2 x L probes of a backbone, never one store read or one training run per layer.

Recipe (the paper gives none for these probes, so ComBo's is reused): AdamW lr 1e-3, weight decay 1e-4 on
the weights, batch 64, warm-up + cosine, the protocol's step count (1,300 dev / 1,600 final).
Each pooled vector is standardised over its channels per (image, layer) without parameters
(``normalise_maps`` with one token), as ComBo does for its maps: layers and backbones whose residual
streams differ in scale by orders of magnitude then train with one learning rate.

A hierarchical backbone's store holds one token array per (grid, width) group (format 2.3): each group
is pooled and probed on its own (one ``MultiLayerLinearProbe`` per group: its heads share a width), and
its rows name the backbone and the model's layer index, so the atlas reads as one backbone's layers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from store_schema import FeatureStore, is_url

from .align import normalise_maps
from .atlasbest import best_per_task
from .data import SplitSource, eval_batches
from .linear import MultiLayerLinearProbe
from .relevance import backbone_names
from .report import plot_atlas
from .results import VTAB_GROUPS, new_run_dir, sanitise_url, write_json, write_table
from .run import PROTOCOL_STEPS, TasksFailed, store_provenance, stores_dataset
from .stores import AlignedTask, align_tasks, open_stores
from .progress import RunProgress
from .runstate import DONE, new_state
from .train import TrainConfig, evaluate_layers, ordered_batches, pick_device, seeded_batches, set_seed, train_steps

__all__ = ["POOLINGS", "AtlasError", "AtlasRun", "best_per_task", "pool_split", "probe_layers", "run_atlas"]

POOLINGS = ("cls", "mean")
READ_BUDGET_BYTES = 256 * 2**20  # raw bytes held per read while pooling (a few reads are in flight)

Log = Callable[[str], None] | None


class AtlasError(ValueError):
    """Options that cannot produce an atlas (unknown pooling, no task, nothing to probe)."""


@dataclass
class AtlasRun:
    run_dir: Path
    rows: list[dict[str, Any]]  # atlas.csv
    best: list[dict[str, Any]]  # atlas_best.csv
    figures: list[Path]


def parse_poolings(poolings: Sequence[str] | str) -> tuple[str, ...]:
    items = [p.strip().lower() for p in (poolings.split(",") if isinstance(poolings, str) else poolings) if p.strip()]
    bad = [p for p in items if p not in POOLINGS]
    if bad or not items:
        raise AtlasError(f"--pooling {','.join(items) or '(empty)'}: choose from {', '.join(POOLINGS)}")
    return tuple(dict.fromkeys(items))


def _chunk_rows(source: SplitSource) -> int:
    """Rows per read: within the byte budget, in whole shards (a read that straddles shards would decompress
    the shards at its edges twice), at least one shard."""
    shard = source.task.reference.rows_per_shard
    rows = int(READ_BUDGET_BYTES // max(1, source.row_bytes()))
    return max(shard, rows // shard * shard)


def pool_split(store: FeatureStore, task: str, rows: np.ndarray, *, poolings: Sequence[str],
               device: torch.device, part: int = 0) -> dict[str, Tensor]:
    """{pooling: [n, L, D] float32 standardised features} for the given rows, all layers from one pass.

    "mean" reads the token array once (all layers per read) and averages the patch tokens (a compact store's
    encoded arrays, decoded on `device`); "cls" reads the prefix array once and keeps prefix token 0. A pooling the store cannot give (cls without prefix
    tokens) is left out of the result. ``part``: which (grid, width) group of a multi-grid store (L, D are its own).
    """
    return pool_group(_group_task(align_tasks([store], task), part), rows, poolings=poolings, device=device)


def _group_task(whole: AlignedTask, part: int) -> AlignedTask:
    """One store's task on one of its parts (a multi-grid store's grid group; the task itself otherwise)."""
    if not 0 <= part < len(whole.parts):
        raise AtlasError(f"task {whole.name} of {whole.stores[0].url}: no grid group {part} (it has {len(whole.parts)})")
    return AlignedTask(name=whole.name, parts=[whole.parts[part]], row_maps=[whole.row_maps[part]])


def pool_group(aligned: AlignedTask, rows: np.ndarray, *, poolings: Sequence[str], device: torch.device
               ) -> dict[str, Tensor]:
    """`pool_split` on a task already opened on one part (`_group_task`)."""
    group = aligned.reference.store
    out: dict[str, Tensor] = {}
    wanted = [p for p in poolings if p != "cls" or group.num_prefix_tokens > 0]
    for pooling in wanted:
        source = SplitSource(aligned, np.asarray(rows, dtype=np.int64), layers=None, prefix=pooling == "cls")
        pieces = []
        compact = source.compact_of(0)
        for parts, _ in eval_batches(source, batch_size=_chunk_rows(source)):
            if compact:  # decoded on the device; PCA codes are averaged before they are projected (linear)
                v = source.decoder.mean_tokens([p.to(device, non_blocking=True) for p in parts])[0]
            else:
                x = parts[0].to(device, non_blocking=True)
                v = x[:, :, 0, :].float() if pooling == "cls" else x.float().mean(dim=2)  # [b, L, D]
            pieces.append(normalise_maps(v[:, :, None, :])[:, :, 0, :])
        out[pooling] = torch.cat(pieces) if pieces else torch.zeros(0, group.num_layers, group.feature_dim, device=device)
    return out


def probe_layers(train: Tensor, train_labels: np.ndarray, evaluation: Tensor, eval_labels: np.ndarray, *,
                 num_classes: int, cfg: TrainConfig, device: torch.device,
                 progress: RunProgress | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Train H independent linear heads on [n, H, D] features together; accuracy per head on ``evaluation``."""
    set_seed(cfg.seed)
    model = MultiLayerLinearProbe(train.shape[1], train.shape[2], num_classes)
    y = torch.as_tensor(train_labels, dtype=torch.long, device=train.device)
    history = train_steps(model, seeded_batches(train, y, batch_size=cfg.batch_size, seed=cfg.seed), cfg, device=device,
                          progress=progress)
    y_eval = torch.as_tensor(eval_labels, dtype=torch.long, device=evaluation.device)
    accuracy, _, _ = evaluate_layers(model, ordered_batches(evaluation, y_eval, batch_size=1024), device=device)
    return np.asarray(accuracy, dtype=np.float64), history


def run_atlas(
    stores: Sequence[str | Path],
    *,
    dataset: str = "vtab",
    tasks: Sequence[str] | None = None,
    protocol: str = "dev",
    poolings: Sequence[str] | str = POOLINGS,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 42,
    device: str | None = None,
    out: str | Path = "runs",
    store_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    figures: bool = True,
    log: Log = None,
    run_dir: Path | None = None,
    progress: RunProgress | None = None,
    client: Any = None,
) -> AtlasRun:
    """Per-layer linear probes of every backbone in ``stores`` on every task; writes a run folder (kind "atlas")
    with atlas.csv (task, backbone, layer, pooling, accuracy, ...), atlas_best.csv and a PNG per task group.

    A store without a requested task is skipped for that task (named in the log); a task in no store is an
    error. ``steps`` None = the protocol's (1,300 dev, 1,600 final). ``client`` (a connected
    `distributed.Client`) probes each (task, backbone) on its workers (probe/fanout.py); the folder is the same.
    """
    poolings = parse_poolings(poolings)
    if protocol not in PROTOCOL_STEPS:
        raise AtlasError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOL_STEPS)}")
    stores = [str(s) for s in stores]
    if not stores:
        raise AtlasError("--stores: give at least one store")
    total_steps = int(steps or PROTOCOL_STEPS[protocol])
    cfg = TrainConfig(steps=total_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
    torch_device = pick_device(device)
    opened = open_stores(stores, store_root=store_root, dataset=dataset, storage_options=storage_options)
    names = backbone_names(opened)
    task_list = _task_list(opened, tasks)
    run_dir = run_dir or new_run_dir(out, "atlas-" + "+".join(names))
    doc = {
        "kind": "atlas", "stores": [store_provenance(s) for s in opened], "store_refs": [sanitise_url(str(r)) for r in stores],
        "backbones": names, "dataset": stores_dataset(opened), "tasks": task_list, "protocol": protocol, "poolings": list(poolings),
        "steps": total_steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
        "device": str(torch_device), "feature_normalisation": "per (image, layer) over channels, no parameters",
    }
    write_json(run_dir / "config.json", doc)
    rows: list[dict[str, Any]] = []
    state = new_state(list(task_list), options={})  # an interrupted atlas must not look finished
    state.save(run_dir)
    if progress:
        progress.plan(sum(task in store.tasks for task in task_list for store in opened))
    calls: dict[tuple[str, int], tuple[tuple, dict]] = {}
    for task in task_list:
        for k, (store, name) in enumerate(zip(opened, names)):
            if task not in store.tasks:
                if log:
                    log(f"{task}: {name} has no such task, skipped")
                continue
            calls[(task, k)] = ((name, k, task), dict(poolings=poolings, protocol=protocol, cfg=cfg))
    if client is None:
        for task in task_list:
            for (t, k), (args, kwargs) in calls.items():
                if t == task:
                    rows += _atlas_one(opened[k], *args, device=torch_device, log=log, progress=progress, **kwargs)
                    write_table(rows, run_dir / "atlas")  # rewritten as it goes: a crash keeps what finished
            state.tasks[task] = DONE
            state.save(run_dir)
    else:
        rows = _atlas_on_cluster(client, opened, calls, task_list, run_dir=run_dir, state=state, device=device,
                                 progress=progress, storage_options=storage_options)
    if not rows:
        raise AtlasError("nothing was probed: no store holds the requested tasks with the requested poolings")
    best = best_per_task(rows)
    write_table(best, run_dir / "atlas_best")
    paths: list[Path] = []
    if figures:
        paths = plot_atlas(rows, run_dir)
    state.complete = True
    state.save(run_dir)
    return AtlasRun(run_dir=run_dir, rows=rows, best=best, figures=paths)


def atlas_job(url: str, storage_options: dict[str, Any] | None, *args: Any, device: torch.device,
              **kwargs: Any) -> list[dict[str, Any]]:
    """`_atlas_one` on a dask worker, which opens the store itself."""
    store = open_stores([url], storage_options=storage_options)[0]
    return _atlas_one(store, *args, device=device, log=None, progress=None, **kwargs)


def _atlas_on_cluster(client: Any, opened: Sequence[FeatureStore], calls: dict[tuple[str, int], tuple[tuple, dict]],
                      task_list: Sequence[str], *, run_dir: Path, state: Any, device: str | None,
                      progress: RunProgress | None, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every (task, backbone) probe on the cluster; rows in the sequential run's order, a failure named after the
    others finish."""
    from .fanout import map_jobs

    urls = [s.url if is_url(s.url) else os.path.abspath(s.url) for s in opened]
    remote = {key: ((urls[key[1]], storage_options, *args), kwargs) for key, (args, kwargs) in calls.items()}
    done: dict[tuple[str, int], list[dict[str, Any]]] = {}
    failures: list[str] = []
    for key, outcome in map_jobs(client, atlas_job, remote, device=device):
        task, k = key
        label = f"{task}: {calls[key][0][0]}"
        if isinstance(outcome, BaseException):
            failures.append(f"{label} ({outcome})")
            continue
        done[key] = outcome
        if progress:
            progress.start(label, steps=calls[key][1]["cfg"].steps)
            best = max(outcome, key=lambda r: r["accuracy"]) if outcome else None
            progress.finish(label, summary=f"best layer {best['layer']} ({best['pooling']}) {100 * best['accuracy']:.1f}%"
                            if best else "skipped (no cls token)")
        rows = [r for key2 in calls if key2 in done for r in done[key2]]  # the sequential order
        write_table(rows, run_dir / "atlas")
        for t in task_list:
            if all(key2 in done for key2 in calls if key2[0] == t) and state.tasks.get(t) != DONE:
                state.tasks[t] = DONE
                state.save(run_dir)
    if failures:
        raise TasksFailed(f"{len(failures)} of {len(calls)} probe(s) failed on the cluster: {'; '.join(failures)}. "
                          f"The others finished in {run_dir}; rerun the command to probe them again")
    return [r for key in calls for r in done[key]]


class _Offset(RunProgress):
    """A progress that adds the steps of a backbone's earlier groups (each group trains on its own)."""

    def __init__(self, inner: RunProgress, offset: int):
        self.inner, self.offset = inner, offset

    def step(self, done: int, *, loss: float) -> None:
        self.inner.step(self.offset + done, loss=loss)


def _task_list(stores: Sequence[FeatureStore], wanted: Sequence[str] | None) -> list[str]:
    held = list(dict.fromkeys(t for s in stores for t in s.tasks))
    if wanted:
        missing = [t for t in wanted if t not in held]
        if missing:
            raise AtlasError(f"--task {', '.join(missing)}: in none of the stores; they hold {', '.join(held) or 'nothing'}")
        return list(dict.fromkeys(wanted))
    if not held:
        raise AtlasError("the stores hold no task")
    return held


def _atlas_one(store: FeatureStore, name: str, index: int, task: str, *, poolings: Sequence[str], protocol: str,
               cfg: TrainConfig, device: torch.device, log: Log,
               progress: RunProgress | None = None) -> list[dict[str, Any]]:
    part = store.task(task)
    part.require_complete()
    if protocol not in part.protocols:
        raise AtlasError(f"task {task} of {store.url}: no protocol {protocol!r} (it has {', '.join(part.protocols) or 'none'})")
    train_split, eval_split = part.protocols[protocol]
    train_rows, eval_rows = part.rows(train_split), part.rows(eval_split)
    if train_rows.size == 0 or eval_rows.size == 0:
        raise AtlasError(f"task {task} of {store.url}: split {train_split!r} or {eval_split!r} has no samples")
    usable = [p for p in poolings if p != "cls" or store.num_prefix_tokens > 0]
    label = f"{task}: {name}"
    if not usable:
        if log:
            log(f"{task}: {name} stores no cls token and only cls pooling was asked for, skipped")
        if progress:  # planned, so it must be accounted for
            progress.start(label, steps=0)
            progress.finish(label, summary="skipped (no cls token)")
        return []
    if log and len(usable) < len(poolings):
        log(f"{task}: {name} stores no cls token; mean pooling only")
    labels = part.labels
    num_classes = max(len(part.classes), int(labels.max()) + 1)
    group = part.attrs.get("group") or VTAB_GROUPS.get(task)
    whole = align_tasks([store], task)  # opened once: a multi-grid store's (grid, width) groups, else the task
    groups = len(whole.parts)
    if progress:
        progress.start(label, steps=cfg.steps * groups)
    rows: list[dict[str, Any]] = []
    probes, train_seconds, read_seconds, position = 0, 0.0, 0.0, 0
    for g in range(groups):
        read_started = time.perf_counter()
        one = _group_task(whole, g)
        train = pool_group(one, train_rows, poolings=usable, device=device)
        evaluation = pool_group(one, eval_rows, poolings=usable, device=device)
        read_seconds += time.perf_counter() - read_started
        num_layers = int(train[usable[0]].shape[1])
        # heads ordered (pooling, layer): one probe for every layer of every pooling
        x_train = torch.cat([train[p] for p in usable], dim=1)
        x_eval = torch.cat([evaluation[p] for p in usable], dim=1)
        steps_before = _Offset(progress, g * cfg.steps) if progress else None
        accuracy, history = probe_layers(x_train, labels[train_rows], x_eval, labels[eval_rows], num_classes=num_classes,
                                         cfg=cfg, device=device, progress=steps_before)
        grid_store = one.reference.store
        layer_ids = [int(i) for i in (grid_store.features.get("layers") or range(num_layers))]
        grid = "x".join(str(v) for v in grid_store.token_grid)
        for p_index, pooling in enumerate(usable):
            for pos in range(num_layers):
                rows.append({
                    "task": task, "group": group, "backbone": name, "store_index": index, "layer": layer_ids[pos],
                    "layer_position": position + pos, "pooling": pooling,
                    "accuracy": float(accuracy[p_index * num_layers + pos]),
                    "split": eval_split, "n": int(eval_rows.size), "train_split": train_split, "n_train": int(train_rows.size),
                    "steps": cfg.steps, "final_loss_per_head": float(history["loss"][-1]) / len(accuracy),
                    "grid": grid, "feature_dim": int(x_train.shape[2]),
                })
        position += num_layers
        probes += len(accuracy)
        train_seconds += float(history["seconds"])
    rows.sort(key=lambda r: (usable.index(r["pooling"]), r["layer_position"]))
    num_layers = position
    top = max(rows, key=lambda r: r["accuracy"])
    if progress:
        progress.finish(label, summary=f"best layer {top['layer']} ({top['pooling']}) {100 * top['accuracy']:.1f}%")
    if log:
        log(f"{task}: {name}: {probes} probes ({', '.join(usable)} x {num_layers} layers) in "
            f"{read_seconds:.1f} s read + {train_seconds:.1f} s train; best layer {top['layer']} "
            f"({top['pooling']}) {100 * top['accuracy']:.1f}%")
    return rows
