"""Connecting to dask.distributed for the commands that fan work out (`--workers N` / `--scheduler ADDRESS`).

The stages take a connected `distributed.Client` (extract/cluster.py: shards of an extraction;
probe/fanout.py: fits of a study); this module starts or reaches the cluster and says, in one
sentence, why it could not.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["ClusterConfig", "ClusterError", "client_for", "open_client", "scheduler_option", "workers_option"]


class ClusterError(RuntimeError):
    """A cluster that cannot be reached or has no workers, as one sentence."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the work runs: `workers` local processes, or the cluster behind `scheduler`."""

    workers: int | None = None
    scheduler: str | None = None
    threads_per_worker: int = 1
    connect_timeout: float = 10.0  # seconds to reach the scheduler and to see its first worker
    announce: Callable[[str], None] | None = None  # told the cluster's size and dashboard link

    def __post_init__(self) -> None:
        if (self.workers is None) == (self.scheduler is None):
            raise ValueError("give either --workers N (a local cluster) or --scheduler ADDRESS (a running one), not both")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"--workers must be an integer >= 1, got {self.workers!r}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads per worker must be >= 1, got {self.threads_per_worker!r}")


def _local_cluster(config: ClusterConfig) -> Any:
    from distributed import LocalCluster

    # a free port for the HTTP server (and the dashboard, which needs bokeh): another cluster may hold 8787
    kwargs: dict[str, Any] = dict(threads_per_worker=config.threads_per_worker, silence_logs=logging.ERROR,
                                  dashboard_address=":0")
    import torch

    if torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster  # one GPU per worker, pinned with CUDA_VISIBLE_DEVICES

            return LocalCUDACluster(n_workers=config.workers, **kwargs)
        except ImportError:
            pass
    return LocalCluster(n_workers=config.workers, processes=True, **kwargs)


def _dashboard_link(client: Any) -> str | None:
    if not importlib.util.find_spec("bokeh"):
        return None
    try:
        return str(client.dashboard_link)
    except Exception:  # noqa: BLE001 - a cluster without a dashboard
        return None


@contextmanager
def open_client(config: ClusterConfig) -> Iterator[Any]:
    """A connected `distributed.Client`: to the scheduler at `config.scheduler`, or to a `LocalCluster` of
    `config.workers` processes started here (closed again on exit). Waits for one worker at most
    `connect_timeout` seconds: a cluster without workers would otherwise hang the run."""
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError("--workers / --scheduler need dask.distributed: pip install distributed") from None
    cluster = None
    if config.scheduler is not None:
        try:
            client = Client(config.scheduler, timeout=f"{config.connect_timeout}s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as err:
            raise ClusterError(f"--scheduler {config.scheduler}: no dask scheduler could be reached there ({err}); "
                               "start one with `dask scheduler`, or use --workers N for a cluster on this machine") from None
    else:
        cluster = _local_cluster(config)
        client = Client(cluster, set_as_default=False)
    try:
        from .worker_setup import KeepFreedMemory

        client.register_plugin(KeepFreedMemory())  # dask's malloc setting costs a CPU forward 25-45%
        try:
            client.wait_for_workers(1, timeout=config.connect_timeout)
        except (TimeoutError, OSError):
            raise ClusterError(f"the dask cluster at {client.scheduler.address} has no workers after "
                               f"{config.connect_timeout:g} s; start some with `dask worker {client.scheduler.address}`") from None
        if config.announce is not None:
            workers = len(client.scheduler_info().get("workers", {}))
            link = _dashboard_link(client)
            config.announce(f"dask cluster: {workers} worker(s) at {client.scheduler.address}"
                            + (f", dashboard {link}" if link else ""))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def workers_option(what: str = "the work") -> Any:
    import typer

    return typer.Option(None, "--workers", min=1, help=f"Run {what} on a local dask cluster of N worker processes "
                        "(1 torch thread each; one GPU each when there are GPUs).")


def scheduler_option() -> Any:
    import typer

    return typer.Option(None, "--scheduler", help="Use the running dask cluster at this address (tcp://host:8786); "
                        "its workers must reach the same paths or URLs as this command.")


@contextmanager
def client_for(workers: int | None, scheduler: str | None, *, announce: Callable[[str], None] | None = None) -> Iterator[Any]:
    """The client of --workers / --scheduler, connected before anything expensive starts; None without either."""
    if workers is None and scheduler is None:
        yield None
        return
    with open_client(ClusterConfig(workers=workers, scheduler=scheduler, announce=announce)) as client:
        yield client
