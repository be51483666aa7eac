"""A study's fits on dask.distributed workers: one dask task per task to train.

Each worker opens the stores itself (a path its file system sees, or a URL: nothing of the
client's is shipped but the configuration), aligns the task and trains it exactly as
`probe.run.fit_task` does in one process: the same seed, the same batches, the same torch thread
count as the cluster's workers have. What comes back is the trained model and its metrics; the
client writes the run folder, so the folder is the one a sequential run writes. A task that fails
is reported by name, and the others still finish.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .run import ProbeConfig, TaskFit, fit_task
from .stores import align_tasks, open_stores
from .train import pick_device

__all__ = ["fit_remote", "fit_tasks"]


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


def fit_remote(cfg: ProbeConfig, task: str) -> TaskFit:
    """Runs on a worker: open the stores, align `task`, train and evaluate it; the fit without its data handles."""
    where, index, threads = _worker()
    try:
        torch.set_num_threads(threads)
        device = pick_device(cfg.device)
        if device.type == "cuda" and cfg.device is None:
            device = torch.device(f"cuda:{index % torch.cuda.device_count()}")  # worker k takes GPU k
        stores = open_stores(cfg.stores, store_root=cfg.store_root, dataset=cfg.dataset,
                             storage_options=cfg.storage_options)
        fit = fit_task(align_tasks(stores, task), cfg, device=device)
    except Exception as err:  # noqa: BLE001 - sent back as one sentence naming the worker
        raise RuntimeError(f"on {where}: {err}") from None
    fit.model.to("cpu")
    fit.source = fit.prepare = None  # store handles and closures stay on the worker
    return fit


def fit_tasks(client: Any, cfg: ProbeConfig, tasks: Sequence[str]) -> Iterator[tuple[str, TaskFit | BaseException]]:
    """Train `tasks` on the cluster; yields (task, fit) or (task, the worker's error) as each finishes."""
    from distributed import as_completed

    futures = {client.submit(fit_remote, cfg, task, pure=False, key=f"combo-fit-{task}-{id(tasks)}"): task
               for task in tasks}
    try:
        for future in as_completed(list(futures), loop=client.loop):
            task = futures[future]
            try:
                yield task, future.result()
            except Exception as err:  # noqa: BLE001 - the caller reports it by task name
                yield task, err
    finally:
        client.cancel(list(futures))
