"""Jobs on dask.distributed workers: one dask task per call, each on the worker's own device and threads.

A job is a module-level function (so dask pickles it by name) that opens the stores itself on the worker
(a path its file system sees, or a URL: nothing of the client's is shipped but the configuration), and
trains exactly as one process does: the same seed, the same batches, the same torch thread count as the
cluster's workers have. The jobs live with what they run (`probe.run.fit_job`, `probe.relevance.relevance_job`,
`probe.study.study_job`, `probe.atlas.atlas_job`); this module knows none of them. What comes back is the
job's result (a trained model and its metrics); the client writes the run folder, so the folder is the one a
sequential run writes. A job that fails is reported by its key, and the others still finish.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from .train import pick_device

__all__ = ["map_jobs", "on_worker"]

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
