"""A study's fits on dask.distributed workers: one dask task per task to train.

Each worker opens the stores itself (a path its file system sees, or a URL: nothing of the
client's is shipped but the configuration), aligns the task and trains it exactly as
`probe.run.fit_task` does in one process: the same seed, the same batches, the same torch thread
count as the cluster's workers have. What comes back is the trained model and its metrics; the
client writes the run folder, so the folder is the one a sequential run writes. A task that fails
is reported by name, and the others still finish.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from .run import ProbeConfig, TaskFit, fit_task
from .stores import AlignedTask, align_tasks, open_stores
from .train import pick_device

__all__ = ["aligned_task", "fit_job", "fit_tasks", "map_jobs", "on_worker", "slim"]

T = TypeVar("T")
# One job at a time per worker process: fits seed torch's global generator (a second fit in another thread of
# the same worker would draw from it too) and each uses all of the worker's threads.
_ONE_JOB = threading.Lock()
K = TypeVar("K")


def _worker() -> tuple[str, int, int]:
    """Where this runs (for messages), its index among the cluster's workers (for picking a GPU) and its
    thread count (torch uses as many, so a fit equals one run in one process with that many threads)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        name = str(worker.name)
        return f"dask worker {name} ({worker.address})", int(name) if name.isdigit() else 0, int(worker.state.nthreads)
    except (ImportError, ValueError):
        return "this process", 0, torch.get_num_threads()


def on_worker(job: Callable[..., T], args: tuple, kwargs: dict[str, Any], device: str | None = None) -> T:
    """Runs on a worker: ``job(*args, device=..., **kwargs)`` with torch on the worker's own thread count and
    device (``device``, else worker k takes GPU k when there are GPUs); a failure comes back as one sentence
    naming the worker."""
    where, index, threads = _worker()
    try:
        with _ONE_JOB:
            return _run(job, args, kwargs, device, index, threads)
    except Exception as err:  # noqa: BLE001 - sent back as one sentence naming the worker
        raise RuntimeError(f"on {where}: {err}") from None


def _run(job: Callable[..., T], args: tuple, kwargs: dict[str, Any], device: str | None, index: int, threads: int) -> T:
    torch.set_num_threads(threads)
    torch_device = pick_device(device)
    if torch_device.type == "cuda" and device is None:
        torch_device = torch.device(f"cuda:{index % torch.cuda.device_count()}")
    return job(*args, device=torch_device, **kwargs)


def map_jobs(client: Any, job: Callable[..., T], calls: Mapping[K, tuple[tuple, dict]], *, device: str | None = None
             ) -> Iterator[tuple[K, T | BaseException]]:
    """``job(*args, **kwargs)`` for every ``key: (args, kwargs)`` of ``calls`` on the cluster (one dask task each);
    yields (key, result) or (key, the worker's error) as each finishes. Leaving early cancels the rest."""
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = {client.submit(on_worker, job, args, kwargs, device, pure=False, key=f"combo-{job.__name__}-{i}-{token}"): key
               for i, (key, (args, kwargs)) in enumerate(calls.items())}
    try:
        for future in as_completed(list(futures), loop=client.loop):
            key = futures[future]
            try:
                yield key, future.result()
            except Exception as err:  # noqa: BLE001 - the caller reports it by its key
                yield key, err
    finally:
        client.cancel(list(futures))


def slim(fit: TaskFit) -> TaskFit:
    """A fit to send back: the model on the CPU; store handles and closures stay on the worker."""
    fit.model.to("cpu")
    fit.source = fit.prepare = None
    return fit


def aligned_task(cfg: ProbeConfig, task: str) -> AlignedTask:
    """The task as the worker reads it: its own handles on the stores `cfg` names (absolute paths or URLs)."""
    stores = open_stores(cfg.stores, store_root=cfg.store_root, dataset=cfg.dataset, storage_options=cfg.storage_options)
    return align_tasks(stores, task)


def fit_job(cfg: ProbeConfig, task: str, *, device: torch.device, group_lambda: float | None = None) -> TaskFit:
    """Train and evaluate one task (probe.run.fit_task) on a worker."""
    return slim(fit_task(aligned_task(cfg, task), cfg, device=device, group_lambda=group_lambda))


def fit_tasks(client: Any, cfg: ProbeConfig, tasks: Sequence[str]) -> Iterator[tuple[str, TaskFit | BaseException]]:
    """Train `tasks` on the cluster; yields (task, fit) or (task, the worker's error) as each finishes."""
    return map_jobs(client, fit_job, {task: ((cfg, task), {}) for task in tasks}, device=cfg.device)
