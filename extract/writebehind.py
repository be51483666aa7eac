"""Finished shards written behind the model: batches assembled into whole shards, each handed to a
background thread (compress, write, hash, journal) while the next batches run through the backbone.

Shared by one process (extract/pipeline.py) and a dask worker (extract/cluster.py), which differ only
in where a finished shard goes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from store_schema import Skipped

from .backbones import Backbone
from .config import ExtractConfig
from .datasets import TaskPlan
from .forward import Batch, forward_batches


@dataclass
class Shard:
    """One block's rows, ready for `ShardWriter.write`."""

    block: int
    tokens: np.ndarray | list[np.ndarray]  # [rows, L, T, D]; a multi-grid backbone: one [rows, L_k, T_k, D_k] per group
    prefix: np.ndarray | None
    skipped: list[Skipped]


class ShardAssembler:
    """Collects rows from batches, which need not align with shard boundaries, into whole shards."""

    def __init__(self, blocks: list[range], pending: list[int], backbone: Backbone, plan: TaskPlan, dtype: np.dtype):
        self.blocks, self.plan, self.dtype = blocks, plan, dtype
        self.block_of_row = {r: b for b in pending for r in blocks[b]}
        num_tokens = backbone.token_grid[0] * backbone.token_grid[1]
        self.grids = backbone.grids is not None
        self.tokens_shapes = ([(g.num_layers, g.num_tokens, g.feature_dim) for g in backbone.grids] if self.grids
                              else [(backbone.num_layers, num_tokens, backbone.embed_dim)])
        self.prefix_shape = ((backbone.num_layers, backbone.num_prefix_tokens, backbone.embed_dim)
                             if backbone.num_prefix_tokens else None)
        self.open: dict[int, tuple[Shard, list[int]]] = {}  # block -> (shard, [rows filled])

    def rows(self) -> list[int]:
        return sorted(self.block_of_row)

    def add(self, batch: Batch) -> list[Shard]:
        """Place a batch's rows; returns the shards it completed."""
        finished = []
        for i, row in enumerate(batch.rows):
            block = self.block_of_row[row]
            if block not in self.open:
                n = len(self.blocks[block])
                tokens = [np.zeros((n, *shape), self.dtype) for shape in self.tokens_shapes]
                shard = Shard(block, tokens if self.grids else tokens[0],
                              np.zeros((n, *self.prefix_shape), self.dtype) if self.prefix_shape else None, [])
                self.open[block] = (shard, [0])
            shard, filled = self.open[block]
            k = row - self.blocks[block].start
            if i in batch.bad:
                shard.skipped.append(Skipped(row=row, sample_id=self.plan.samples[row].sample_id, error=batch.bad[i]))
            elif self.grids:
                for held, got in zip(shard.tokens, batch.patch):
                    held[k] = got[i]
            else:
                shard.tokens[k] = batch.patch[i]
                if shard.prefix is not None:
                    shard.prefix[k] = batch.prefix[i]
            filled[0] += 1
            if filled[0] == len(self.blocks[block]):
                del self.open[block]
                finished.append(shard)
        return finished


def write_behind(cfg: ExtractConfig, backbone: Backbone, plan: TaskPlan, blocks: list[range], pending: list[int],
                 dtype: np.dtype, write: Callable[[Shard], Any], *, device: torch.device,
                 advance: Callable[[int], None] | None = None, num_workers: int | None = None) -> int:
    """Run `pending` blocks through the backbone; each finished shard goes to `write` (compress, write, hash,
    journal) on a background thread while the next batches run through the model, at most two shards
    behind it. Returns the images run. Used by extract/pipeline.py and by a dask worker (extract/cluster.py)."""
    assembler = ShardAssembler(blocks, pending, backbone, plan, dtype)
    writes: list[Future[Any]] = []
    done_images = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="combo-writer") as pool:
        try:
            for batch in forward_batches(cfg, backbone, plan, assembler.rows(), device=device, num_workers=num_workers):
                for shard in assembler.add(batch):
                    writes.append(pool.submit(write, shard))
                # Bound memory: at most two shards in flight behind the model.
                while len(writes) > 2:
                    writes.pop(0).result()
                done_images += len(batch.rows)
                if advance:
                    advance(len(batch.rows))
        except BaseException:
            # Whatever happened, shards already handed to the writer are finished (and journaled).
            for fut in writes:
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - the first failure is the one to report
                    pass
            raise
        else:
            for fut in writes:
                fut.result()
    return done_images
