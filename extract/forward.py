"""A task's images through the backbone, a batch at a time, and the PCA fit that streams them.

The forward pass one process runs (extract/pipeline.py) and a dask worker runs (extract/cluster.py):
images decoded in DataLoader workers, or on a background thread where there are none, then every
block's tokens in the store's dtype. The PCA fit of `--compact pca:R` is the same pass over the
training split, accumulated instead of written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from store_schema.compact import PcaBasis, PcaFit, fit_split, fitted_groups

from .backbones import Backbone, block_tokens, inference_context
from .config import ExtractConfig
from .datasets import TaskPlan
from .images import ImageDecodeError, PlanImages, collate_plan_images
from .order import row_order

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class Batch:
    """One batch of rows through the backbone, as the store's dtype; `bad`: index in batch -> decode error."""

    rows: list[int]
    patch: np.ndarray | list[np.ndarray]  # [B, L, T, D]; a multi-grid backbone: one [B, L_k, T_k, D_k] per group
    prefix: np.ndarray | None
    bad: dict[int, str]


T = TypeVar("T")
_END = object()


def one_ahead(items: Iterable[T]) -> Iterator[T]:
    """`items`, each produced on a background thread while the caller works on the one before: without
    DataLoader worker processes (--num-workers 0, or a dask worker, a daemon process that may have no
    children) image decoding, which releases the GIL, still overlaps the model. Same items, same order."""
    with ThreadPoolExecutor(1, thread_name_prefix="combo-decode") as pool:
        iterator = iter(items)
        future = pool.submit(next, iterator, _END)
        while True:
            item = future.result()
            if item is _END:
                return
            future = pool.submit(next, iterator, _END)
            yield item


def forward_batches(cfg: ExtractConfig, backbone: Backbone, plan: TaskPlan, rows: list[int], *, device: torch.device,
                    num_workers: int | None = None) -> Iterator[Batch]:
    """The images of `rows` (store row order) through the backbone, `cfg.batch_size` at a time. An image that
    cannot be decoded stops the run with its sample named, unless `cfg.skip_bad` (then it is in `bad`)."""
    dataset = PlanImages(plan, image_size=backbone.image_size, mean=backbone.mean, std=backbone.std)
    workers = cfg.num_workers if num_workers is None else num_workers
    loader = DataLoader(Subset(dataset, rows), batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_plan_images)
    torch_dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    for images, row_ids, errors in (loader if workers else one_ahead(loader)):
        row_ids = [int(r) for r in row_ids]
        bad = {i: str(e) for i, e in enumerate(errors) if e}
        if bad and not cfg.skip_bad:
            i = min(bad)
            raise ImageDecodeError(
                f"{bad[i]} (task {plan.task}, sample {plan.samples[row_ids[i]].sample_id}); "
                "fix or remove the file, or pass --skip-bad to record it and go on"
            )
        with inference_context(device):
            patch, prefix = block_tokens(backbone, images.to(device, non_blocking=True))
        tokens = ([t.to(torch_dtype).cpu().numpy() for t in patch] if isinstance(patch, list)
                  else patch.to(torch_dtype).cpu().numpy())
        yield Batch(row_ids, tokens, prefix.to(torch_dtype).cpu().numpy() if backbone.num_prefix_tokens else None, bad)


def fit_training_pca(cfg: ExtractConfig, backbone: Backbone, natural: TaskPlan, components: int, *,
                     device: torch.device, progress: ProgressFactory | None, num_workers: int | None = None
                     ) -> tuple[PcaBasis | list[PcaBasis], dict[str, Any]]:
    """PCA of the task's training split (store row order), streamed through the backbone into running
    covariances: memory L x D x D whatever the split's size, nothing written. The training images run
    through the backbone twice (here and when their shards are written), which costs that split's share of
    the extraction (5% for VTAB-1k) instead of keeping it at full size on disk.

    A multi-grid backbone fits one basis per grid group (each group is encoded on its own, format 2.3) and
    returns their list in grid order; the record's explained_variance lists every stored layer, in layer order."""
    plan = row_order(natural).plan
    split = fit_split(plan.protocols, list(plan.splits))
    rows = [i for i, s in enumerate(plan.samples) if split in s.splits]
    groups = [(g.num_layers, g.feature_dim) for g in backbone.grids] if backbone.grids else [
        (backbone.num_layers, backbone.embed_dim)]
    fits = [PcaFit(num_layers, dim) for num_layers, dim in groups]
    advance = progress(f"{plan.task} (PCA fit on {split})", len(rows)) if progress else None
    for batch in forward_batches(cfg, backbone, plan, rows, device=device, num_workers=num_workers):
        keep = np.setdiff1d(np.arange(len(batch.rows)), list(batch.bad))
        for fit, tokens in zip(fits, batch.patch if backbone.grids else [batch.patch]):
            fit.add(tokens[keep])  # fitted on the values a full-size store would hold
        if advance:
            advance(len(batch.rows))
    return fitted_groups(fits, components, split)
