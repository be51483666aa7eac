"""Extraction on a dask.distributed cluster: whole shards per worker, one client that owns the store.

Each dask task runs the backbone over a run of consecutive pending shards of one task and writes
them into the store itself (`store_schema.ShardWriter`: each shard fsynced, then hashed), and
returns their journal entries. The client holds the store's lock, journals each entry as it
arrives and finalises the task, exactly as a single-process run does, so resume is unchanged:

- a worker killed mid-shard leaves a shard no journal line names; dask runs that task again on
  another worker (up to `distributed.scheduler.allowed-failures` deaths), and the shard written
  again has the same bytes (its rows, the same batches, the same model);
- a client killed mid-run leaves the journal; the same command, on a cluster or not, resumes it.

What the workers need: the dataset root at the same path as the client, the store at the same path
(one machine, or a shared file system) or at its URL (`--out s3://...`: each worker uploads its
shards itself, store_schema/staging.py), and the model's weights (the timm cache or `--weights`) on
their own disk. A worker that cannot load the weights fails the run with its own message.

Without `--device`, worker k of a cluster uses GPU k (mod the GPUs it sees) when there are GPUs.
The client (a `distributed.Client`) comes from combo/cluster.py: `--workers N` / `--scheduler ADDRESS`.
Its workers run `combo.worker_setup.KeepFreedMemory`, which undoes dask's malloc setting (25-45% of a
CPU forward); with a client of your own, `client.register_plugin(KeepFreedMemory())` does the same.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from store_schema import ShardWriter, TaskWriter
from store_schema.compact import PcaBasis

from .backbones import Backbone, load_backbone, pick_device
from .config import ExtractConfig
from .datasets import TaskPlan
from .forward import fit_training_pca
from .writebehind import write_behind

__all__ = ["ClusterRunner", "WorkerError", "shard_jobs"]


class WorkerError(RuntimeError):
    """A failure on a worker whose own exception type cannot carry the worker's name."""


# ------------------------------------------------------------------------------------------ on a worker

_BACKBONE: dict[str, tuple[Backbone, torch.device]] = {}  # one model per worker process, kept between tasks
# One job at a time per worker process: a worker with several threads would otherwise run two jobs on the one
# model at once (its block hooks would collect both). Torch uses the worker's threads inside each job instead.
_ONE_JOB = threading.Lock()


def _worker() -> tuple[str, int, int]:
    """Where this runs (for messages), its index among the cluster's workers (for picking a GPU) and its
    thread count (torch uses as many)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        name = str(worker.name)
        return f"dask worker {name} ({worker.address})", int(name) if name.isdigit() else 0, int(worker.state.nthreads)
    except (ImportError, ValueError):
        return "this process", 0, torch.get_num_threads()


def _worker_device(cfg: ExtractConfig, index: int) -> torch.device:
    """`--device` when given; else worker k takes GPU k (mod the GPUs it sees), or the CPU."""
    if cfg.device is not None or not torch.cuda.is_available():
        return pick_device(cfg.device)
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def _worker_backbone(cfg: ExtractConfig) -> tuple[Backbone, torch.device]:
    key = json.dumps([cfg.model, cfg.image_size, cfg.random_init, cfg.weights, cfg.seed, cfg.model_kwargs],
                     sort_keys=True, default=str)
    _, index, threads = _worker()
    # every job, in the thread that runs it: OpenMP's thread count is a per-thread setting, and a dask worker
    # runs its jobs on any of its threads (the first job's setting alone left later ones on 1 thread: +40% time)
    torch.set_num_threads(threads)
    if key not in _BACKBONE:
        _BACKBONE.clear()  # another run's model: free it first
        device = _worker_device(cfg, index)
        backbone = load_backbone(cfg.model, image_size=cfg.image_size, random_init=cfg.random_init,
                                 weights=cfg.weights, seed=cfg.seed, model_kwargs=cfg.model_kwargs,
                                 layers=cfg.layers)
        backbone.model.to(device)
        _BACKBONE[key] = (backbone, device)
    return _BACKBONE[key]


def _located(err: Exception) -> Exception:
    """`err` with the worker named in its message, of the same type where that type takes one message
    (so the client reports it as it would a local failure)."""
    text = f"on {_worker()[0]}: {err}"
    try:
        located = type(err)(text)
    except Exception:  # noqa: BLE001 - a type with another signature
        located = WorkerError(f"{type(err).__name__} {text}")
    return located


def write_shards(cfg: ExtractConfig, store: str, task: str, blocks: list[int], plan: TaskPlan) -> list[dict[str, Any]]:
    """Runs on a worker: the backbone over `blocks` of `task` (store row order `plan`), each shard written
    into the store at `store` (a folder, or a URL: then uploaded, see store_schema/staging.py); returns their
    journal entries for the client to record."""
    try:
        with _ONE_JOB:
            return _write_shards(cfg, store, task, blocks, plan)
    except Exception as err:  # noqa: BLE001 - re-raised, with the worker named
        raise _located(err) from None


def _write_shards(cfg: ExtractConfig, store: str, task: str, blocks: list[int], plan: TaskPlan) -> list[dict[str, Any]]:
    backbone, device = _worker_backbone(cfg)
    shards = ShardWriter.open(store, task, storage_options=cfg.storage_options)
    entries: list[dict[str, Any]] = []
    # writes behind the model as in one process; no DataLoader worker processes (a dask worker is a daemon
    # process, which may not have children)
    write_behind(cfg, backbone, plan, shards.blocks, blocks, np.dtype(shards.layout.dtype),
                 lambda shard: entries.append(shards.write(shard.block, shard.tokens, shard.prefix, skipped=shard.skipped)),
                 device=device, num_workers=0)
    return sorted(entries, key=lambda e: e["block"])


def fit_pca(cfg: ExtractConfig, plan: TaskPlan, components: int) -> tuple[PcaBasis | list[PcaBasis], dict[str, Any]]:
    """Runs on a worker: the PCA fit of `--compact pca:R` (extract.forward.fit_training_pca) on that worker's device."""
    try:
        with _ONE_JOB:
            backbone, device = _worker_backbone(cfg)
            return fit_training_pca(cfg, backbone, plan, components, device=device, progress=None, num_workers=0)
    except Exception as err:  # noqa: BLE001 - re-raised, with the worker named
        raise _located(err) from None


# ------------------------------------------------------------------------------------------ on the client


def shard_jobs(pending: list[int], blocks: list[range], batch_size: int, *, max_batches: int = 8) -> list[list[int]]:
    """Pending blocks grouped into dask tasks: runs of consecutive blocks, each closed at the first block
    boundary where its rows fill whole batches but for 5% (or at `max_batches` batches). A job's rows are
    cut into batches of their own, so a job of two 18-row shards at batch 32 would run a batch of 4
    beside one of 32; seven such shards run 4 batches, the last one nearly full."""
    jobs: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for block in pending:
        if current and current[-1] != block - 1:
            jobs.append(current)
            current, rows = [], 0
        current.append(block)
        rows += len(blocks[block])
        batches = rows / batch_size
        if rows >= batch_size and (math.ceil(batches) - batches <= 0.05 * batches or batches >= max_batches):
            jobs.append(current)
            current, rows = [], 0
    if current:
        jobs.append(current)
    return jobs


class ClusterRunner:
    """The client's side: submits shard jobs to a dask.distributed `client`, journals what comes back,
    reports the first failure (combo/cluster.py connects the client)."""

    def __init__(self, client: Any):
        self.client = client

    def run_blocks(self, cfg: ExtractConfig, task_writer: TaskWriter, plan: TaskPlan, pending: list[int], *,
                   advance: Callable[[int], None] | None = None) -> int:
        """Extract `pending` blocks of `task_writer`'s task on the cluster; returns the images run."""
        from distributed import as_completed

        jobs = shard_jobs(pending, task_writer.blocks, cfg.batch_size)
        if not jobs:
            return 0
        shared = self.client.scatter(plan, broadcast=False, hash=False)
        remote = task_writer.store.remote
        store = remote.url if remote is not None else str(task_writer.store.path)
        futures = [self.client.submit(write_shards, cfg, store, plan.task, job, shared,
                                      pure=False, key=f"combo-shards-{plan.task}-{job[0]}-{os.getpid()}-{id(jobs)}")
                   for job in jobs]
        images = 0
        try:
            for future in as_completed(futures, loop=self.client.loop):
                for entry in future.result():  # the worker's own error, if it failed
                    task_writer.record(entry)
                    rows = len(task_writer.blocks[int(entry["block"])])
                    images += rows
                    if advance:
                        advance(rows)
        except BaseException:
            self.client.cancel(futures)
            raise
        return images

    def fit_pca(self, cfg: ExtractConfig, plan: TaskPlan, components: int) -> tuple[PcaBasis | list[PcaBasis], dict[str, Any]]:
        future = self.client.submit(fit_pca, cfg, plan, components, pure=False)
        return future.result()
