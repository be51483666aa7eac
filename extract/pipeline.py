"""Stage 1 end to end: images -> frozen backbone -> every block's tokens -> a feature store.

The backbone is the expensive part, so everything else hides behind it: images are decoded
in DataLoader workers, and finished shards are compressed, written and checksummed by a
background thread while the next batches run through the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from store_schema import (
    BackboneInfo,
    FeatureInfo,
    Preprocessing,
    Skipped,
    StoreInfo,
    StoreLayout,
    StoreMismatchError,
    StoreWriter,
    TaskWriter,
    build_sample_table,
    default_store_root,
    store_path,
)

from .backbones import Backbone, block_tokens, inference_context, load_backbone, pick_device
from .datasets import TaskPlan, plan_dataset, vtab_group
from .images import ImageDecodeError, PlanImages, collate_plan_images
from .order import RowOrder, natural_order, row_order


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    dataset: str
    root: str | None = None
    tasks: tuple[str, ...] | None = None
    out: str = field(default_factory=default_store_root)
    image_size: int = 224
    random_init: bool = False
    weights: str | None = None
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    dtype: str = "float16"
    rows_per_shard: int | None = None  # None: sized by bytes (StoreLayout.shard_bytes)
    skip_bad: bool = False
    overwrite: bool = False
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    layout: StoreLayout | None = None
    model_kwargs: dict[str, Any] | None = None


@dataclass
class TaskResult:
    task: str
    images: int  # images run through the backbone in this call
    seconds: float
    status: str  # "extracted" | "resumed" | "already complete"
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class ExtractResult:
    store: Path
    tasks: list[TaskResult]
    bytes_on_disk: int
    seconds: float

    @property
    def images(self) -> int:
        return sum(t.images for t in self.tasks)


ProgressFactory = Callable[[str, int], Callable[[int], None]]


def store_info(backbone: Backbone, *, dataset: str, root: str | None) -> StoreInfo:
    """Provenance of a store written from `backbone`."""
    return StoreInfo(
        backbone=BackboneInfo(
            alias=backbone.spec.alias,
            timm_name=backbone.spec.timm_name,
            pretrained_tag=backbone.spec.pretrained_tag,
            weights_source=backbone.weights_source,
            weights_sha256=backbone.weights_sha256,
            seed=backbone.seed,
            model_kwargs=dict(backbone.model_kwargs) or None,  # recorded so `combo predict` can rebuild it
        ),
        preprocessing=Preprocessing(
            image_size=backbone.image_size,
            mean=tuple(backbone.mean),
            std=tuple(backbone.std),
            interpolation=backbone.interpolation,
        ),
        features=FeatureInfo(
            token_grid=tuple(backbone.token_grid),
            num_prefix_tokens=backbone.num_prefix_tokens,
            layers=tuple(range(backbone.num_layers)),
            feature_dim=backbone.embed_dim,
        ),
        dataset=dataset,
        dataset_root=str(Path(root).resolve()) if root else None,
    )


def extract(cfg: ExtractConfig, *, progress: ProgressFactory | None = None) -> ExtractResult:
    """Run `cfg.model` once over every image of `cfg.dataset` and write the store; resumable."""
    started = time.perf_counter()
    layout = cfg.layout or StoreLayout(dtype=cfg.dtype, rows_per_shard=cfg.rows_per_shard)
    device = pick_device(cfg.device)
    backbone = load_backbone(
        cfg.model,
        image_size=cfg.image_size,
        random_init=cfg.random_init,
        weights=cfg.weights,
        seed=cfg.seed,
        model_kwargs=cfg.model_kwargs,
    )
    backbone.model.to(device)
    plans = plan_dataset(cfg.dataset, root=cfg.root, tasks=list(cfg.tasks) if cfg.tasks else None, num_workers=cfg.num_workers)
    path = Path(store_path(cfg.out, backbone.spec.alias, cfg.dataset))
    results: list[TaskResult] = []
    with StoreWriter(path, store_info(backbone, dataset=cfg.dataset, root=cfg.root), layout, overwrite=cfg.overwrite) as writer:
        for plan in plans:
            results.append(_extract_task(cfg, writer, backbone, plan, device=device, progress=progress))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return ExtractResult(store=path, tasks=results, bytes_on_disk=size, seconds=time.perf_counter() - started)


def _sample_table(order: RowOrder):
    plan = order.plan
    return build_sample_table(
        sample_ids=[s.sample_id for s in plan.samples],
        labels=[s.label for s in plan.samples],
        splits=[s.splits for s in plan.samples],
        split_names=list(plan.splits),
        aliases=[s.aliases for s in plan.samples],
        source_index=order.source_index,
    )


def _task_writer(cfg: ExtractConfig, writer: StoreWriter, backbone: Backbone, plan: TaskPlan) -> tuple[TaskWriter, TaskPlan]:
    """Open (create or resume) the task; returns it with the plan in the store's row order (extract/order.py)."""
    order = row_order(plan)
    task_kwargs = dict(
        num_layers=backbone.num_layers,
        num_tokens=backbone.token_grid[0] * backbone.token_grid[1],
        feature_dim=backbone.embed_dim,
        num_prefix_tokens=backbone.num_prefix_tokens,
        protocols=plan.protocols,
        classes=plan.classes,
        group=vtab_group(plan.task) if plan.dataset == "vtab" else None,
        overwrite=cfg.overwrite,
    )
    try:
        task_writer = writer.task(plan.task, samples=_sample_table(order), row_order=order.attrs, **task_kwargs)
    except StoreMismatchError:
        # Begun by a combo that stored rows in natural order (no source_index column)? A finished
        # one is a valid store and stays as it is; an unfinished one must not be finished in another order.
        legacy = natural_order(plan)
        # raises the writer's own mismatch error when the dataset itself changed
        task_writer = writer.task(plan.task, samples=_sample_table(legacy), **task_kwargs)
        if not task_writer.complete:
            raise StoreMismatchError(
                f"task {plan.task!r} in {writer.path} was begun by an older combo, which stored the rows in the "
                "dataset's natural (e.g. class by class) order; this combo stores training rows shuffled "
                "(store_schema/README.md, 'Row order') and will not finish a task in a mix of both orders. "
                "Use --overwrite to extract it again"
            ) from None
        return task_writer, legacy.plan
    return task_writer, order.plan


class _BlockBuffer:
    """Collects one shard's rows from batches that need not align with shard boundaries."""

    def __init__(self, rows: range, tokens_shape: tuple[int, ...], prefix_shape: tuple[int, ...] | None, dtype: np.dtype):
        self.rows = rows
        self.tokens = np.zeros((len(rows), *tokens_shape), dtype=dtype)
        self.prefix = np.zeros((len(rows), *prefix_shape), dtype=dtype) if prefix_shape else None
        self.filled = 0
        self.skipped: list[Skipped] = []

    @property
    def full(self) -> bool:
        return self.filled == len(self.rows)


def _extract_task(
    cfg: ExtractConfig,
    writer: StoreWriter,
    backbone: Backbone,
    plan: TaskPlan,
    *,
    device: torch.device,
    progress: ProgressFactory | None,
) -> TaskResult:
    started = time.perf_counter()
    task_writer, plan = _task_writer(cfg, writer, backbone, plan)  # plan: samples in store row order
    if task_writer.complete:
        return TaskResult(plan.task, 0, 0.0, "already complete", [task_writer.skipped[r] for r in sorted(task_writer.skipped)])
    pending = task_writer.pending()
    status = "resumed" if len(pending) < len(task_writer.blocks) else "extracted"
    rows = [r for b in pending for r in task_writer.blocks[b]]
    block_of_row = {r: b for b in pending for r in task_writer.blocks[b]}
    dataset = PlanImages(plan, image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    loader = DataLoader(
        Subset(dataset, rows),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_plan_images,
    )
    num_tokens = backbone.token_grid[0] * backbone.token_grid[1]
    tokens_shape = (backbone.num_layers, num_tokens, backbone.embed_dim)
    prefix_shape = (backbone.num_layers, backbone.num_prefix_tokens, backbone.embed_dim) if backbone.num_prefix_tokens else None
    np_dtype = np.dtype(task_writer.store.layout.dtype)
    torch_dtype = torch.float16 if np_dtype == np.float16 else torch.float32
    buffers: dict[int, _BlockBuffer] = {}
    writes: list[Future[None]] = []
    advance = progress(plan.task, len(rows)) if progress else None
    done_images = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="combo-writer") as pool:
        try:
            for images, row_ids, errors in loader:
                row_ids = [int(r) for r in row_ids]
                bad = [(i, e) for i, e in enumerate(errors) if e]
                if bad and not cfg.skip_bad:
                    i, err = bad[0]
                    raise ImageDecodeError(
                        f"{err} (task {plan.task}, sample {plan.samples[row_ids[i]].sample_id}); "
                        "fix or remove the file, or pass --skip-bad to record it and go on"
                    )
                with inference_context(device):
                    patch, prefix = block_tokens(backbone, images.to(device, non_blocking=True))
                patch_np = patch.to(torch_dtype).cpu().numpy()
                prefix_np = prefix.to(torch_dtype).cpu().numpy() if prefix_shape else None
                bad_rows = {i for i, _ in bad}
                for i, row in enumerate(row_ids):
                    block = block_of_row[row]
                    buf = buffers.get(block)
                    if buf is None:
                        buf = buffers[block] = _BlockBuffer(task_writer.blocks[block], tokens_shape, prefix_shape, np_dtype)
                    k = row - buf.rows.start
                    if i in bad_rows:
                        buf.skipped.append(Skipped(row=row, sample_id=plan.samples[row].sample_id, error=str(errors[i])))
                    else:
                        buf.tokens[k] = patch_np[i]
                        if prefix_np is not None:
                            buf.prefix[k] = prefix_np[i]
                    buf.filled += 1
                    if buf.full:
                        del buffers[block]
                        writes.append(pool.submit(task_writer.write_block, block, buf.tokens, buf.prefix, skipped=buf.skipped))
                # Bound memory: at most two shards in flight behind the model.
                while len(writes) > 2:
                    writes.pop(0).result()
                done_images += len(row_ids)
                if advance:
                    advance(len(row_ids))
        finally:
            # Whatever happened, shards already handed to the writer are finished and journaled.
            for fut in writes:
                fut.result()
    task_writer.finalize()
    skipped = [task_writer.skipped[r] for r in sorted(task_writer.skipped)]
    return TaskResult(plan.task, done_images, time.perf_counter() - started, status, skipped)
