"""Extraction on a dask.distributed cluster (extract/cluster.py): the same store as one process, whatever dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from combo.cluster import ClusterConfig, ClusterError, open_client  # noqa: E402
from extract.cluster import shard_jobs  # noqa: E402
from extract.images import ImageDecodeError  # noqa: E402
from extract.pipeline import extract  # noqa: E402
from extractcase import MODEL, ROWS, SIZE, config, data_objects, reference, vtab  # noqa: E402,F401 - fixtures
from fakedata import make_vtab_tree  # noqa: E402
from store_schema import open_store, validate_store  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A running 2-process cluster, reached through --scheduler (a LocalCluster per test would cost its start)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as local, distributed.Client(local, set_as_default=False) as client:
        yield local, client


def test_shard_jobs_fill_whole_batches():
    blocks = [range(s, min(s + 3, 26)) for s in range(0, 26, 3)]  # 9 blocks of 3 rows (the last 2)
    # batch 8: 8 blocks of 3 rows are 3 whole batches; a gap in the pending blocks ends a job early
    assert shard_jobs(list(range(9)), blocks, batch_size=8) == [[0, 1, 2, 3, 4, 5, 6, 7], [8]]
    assert shard_jobs([0, 1, 2, 3, 5, 6], blocks, batch_size=8) == [[0, 1, 2, 3], [5, 6]]
    assert shard_jobs([0, 1, 2], blocks, batch_size=1) == [[0], [1], [2]]  # 3 whole batches each
    assert shard_jobs([0, 1, 2], blocks, batch_size=3) == [[0], [1], [2]]
    assert shard_jobs(list(range(9)), blocks, batch_size=64, max_batches=8) == [list(range(9))]  # all, < 1 batch
    # 18-row shards at batch 32 (vit_small, 32 MiB shards): 7 shards = 126 rows = 4 batches, the last nearly full
    shards = [range(s, s + 18) for s in range(0, 18 * 20, 18)]
    assert [len(j) for j in shard_jobs(list(range(20)), shards, batch_size=32)] == [7, 7, 6]
    # never more than max_batches batches in one job
    big = [range(s, s + 100) for s in range(0, 1000, 100)]
    assert [len(j) for j in shard_jobs(list(range(10)), big, batch_size=33, max_batches=8)] == [3, 3, 3, 1]
    assert shard_jobs([], blocks, batch_size=8) == []


def test_cluster_store_equals_single_process_store(vtab, reference, cluster, tmp_path):
    local, _ = cluster
    seen = []
    with open_client(ClusterConfig(scheduler=local.scheduler_address, announce=seen.append)) as client:
        result = extract(config(vtab, tmp_path), client=client)
    assert seen and "2 worker(s)" in seen[0]
    assert result.tasks[0].status == "extracted" and result.tasks[0].images == 95
    assert validate_store(result.store).ok
    assert data_objects(result.store) == data_objects(reference)  # every shard and the sample table, byte for byte
    assert not (result.store / "eurosat" / ".journal.jsonl").exists()


def test_compact_extraction_on_the_cluster_equals_one_process(vtab, cluster, tmp_path):
    """--compact pca:R,int8: the PCA fit runs on a worker too, and the encoded store is the same."""
    _, client = cluster
    single = extract(config(vtab, tmp_path / "single", compact="pca:16,int8"))
    clustered = extract(config(vtab, tmp_path / "dask", compact="pca:16,int8"), client=client)
    assert clustered.store.name == "vtab-pca16-int8.zarr" and validate_store(clustered.store).ok
    assert data_objects(clustered.store) == data_objects(single.store)


def test_hierarchical_extraction_on_the_cluster_equals_one_process(vtab, cluster, tmp_path):
    """A multi-grid store (ConvNeXt's 4 stages, one array per grid group), full size and --compact pca:R,int8 (one
    PCA basis per group, fitted on a worker): shards written by the workers, the same bytes as one process."""
    _, client = cluster
    hierarchical = dict(model="convnext_atto", image_size=64, model_kwargs=dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)))
    for compact in (None, "pca:4,int8"):
        single = extract(replace(config(vtab, tmp_path / f"single-{compact}", compact=compact), **hierarchical))
        clustered = extract(replace(config(vtab, tmp_path / f"dask-{compact}", compact=compact), **hierarchical),
                            client=client)
        assert open_store(clustered.store).multi_grid and validate_store(clustered.store).ok
        assert data_objects(clustered.store) == data_objects(single.store)


def test_a_worker_with_two_threads_runs_one_job_at_a_time(vtab, reference, tmp_path):
    """dask runs as many tasks at once as a worker has threads; they must not share the worker's one model."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                                  silence_logs=50) as local, distributed.Client(local, set_as_default=False) as client:
        result = extract(config(vtab, tmp_path), client=client)
    assert validate_store(result.store).ok
    assert data_objects(result.store) == data_objects(reference)


def test_worker_killed_mid_run_ends_in_the_same_store(vtab, reference, cluster, tmp_path):
    local, client = cluster
    pids = client.run(os.getpid)  # worker address -> pid
    victim = next(iter(pids.values()))
    shards = tmp_path / MODEL / "vtab.zarr" / "eurosat" / "tokens" / "c"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = extract(config(vtab, tmp_path), client=client)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not (shards.exists() and any(shards.iterdir())) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert thread.is_alive(), f"the run ended before a worker could be killed: {outcome}"
    os.kill(victim, signal.SIGKILL)  # mid-run: its first shard is on disk, others are in flight or queued
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert victim not in client.run(os.getpid).values()  # the worker really died (its nanny started a new one)
    store = outcome["result"].store
    assert validate_store(store).ok
    assert data_objects(store) == data_objects(reference)


def test_a_worker_failure_is_reported_with_its_message(tmp_path, cluster):
    _, client = cluster
    root = tmp_path / "vtab"
    make_vtab_tree(root, {"eurosat": 2}, n_train=4, n_val=2, n_test=4, image_size=16, corrupt=[("test", 1)])
    with pytest.raises(ImageDecodeError) as err:
        extract(config(root, tmp_path / "out"), client=client)
    message = str(err.value)
    assert message.startswith("on dask worker ") and "task eurosat, sample" in message and "--skip-bad" in message


def test_a_worker_without_the_weights_fails_the_run_with_its_message(vtab, cluster, tmp_path):
    """The client loads the weights file, then it is gone before any worker loads it: the run stops with the
    worker's own error (naming the worker and the file), it does not hang."""
    import timm
    from safetensors.torch import save_file

    from extract.backbones import WeightsUnavailableError

    _, client = cluster
    weights = tmp_path / "tiny.safetensors"
    model = timm.create_model(MODEL, pretrained=False, img_size=SIZE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    def progress(task, total):  # called once the client has loaded the model, before any shard is sent out
        weights.unlink(missing_ok=True)
        return lambda n: None

    cfg = replace(config(vtab, tmp_path / "out"), random_init=False, weights=str(weights))
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        extract(cfg, client=client, progress=progress)
    assert time.monotonic() - started < 120
    message = str(err.value)
    assert message.startswith("on dask worker ") and "tiny.safetensors" in message, message


def test_unreachable_scheduler_fails_fast_and_writes_nothing(vtab, tmp_path):
    from combo.cli import app
    from typer.testing import CliRunner

    started = time.monotonic()
    with pytest.raises(ClusterError, match="--scheduler tcp://127.0.0.1:9: no dask scheduler could be reached"):
        with open_client(ClusterConfig(scheduler="tcp://127.0.0.1:9", connect_timeout=1)):
            pass
    assert time.monotonic() - started < 30
    result = CliRunner().invoke(app, ["extract", "--model", MODEL, "--random-init", "--dataset", "vtab", "--root", str(vtab),
                                      "--out", str(tmp_path), "--image-size", str(SIZE), "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "no dask scheduler could be reached" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / MODEL).exists()  # nothing written: the address is tried before the model loads


def test_workers_undo_dasks_malloc_setting(monkeypatch):
    """dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which costs a CPU forward 25-45%
    (benchmarks/RESULTS.md, scale_extract): every worker of open_client runs combo's plugin that undoes it."""
    from combo.worker_setup import keep_freed_memory

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory() is False  # nothing to undo
    with open_client(ClusterConfig(workers=1)) as client:
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        environ = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        undone = client.run(keep_freed_memory)
    assert [p for p in plugins.values() if "combo-keep-freed-memory" in p] == list(plugins.values())
    assert set(environ.values()) == {"65536"} and set(undone.values()) == {True}


def test_cluster_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        ClusterConfig(workers=2, scheduler="tcp://x:1")
    with pytest.raises(ValueError, match="--workers must be an integer >= 1"):
        ClusterConfig(workers=0)


KILL_CLIENT = """
import os, signal, sys, threading, time
journal = os.path.join(sys.argv[2], "{model}", "vtab.zarr", "eurosat", ".journal.jsonl")
def watch():
    while not (os.path.exists(journal) and open(journal).read().strip()):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)  # the client dies once a shard is journaled
threading.Thread(target=watch, daemon=True).start()
from combo.cli import main
sys.argv = ["combo", "extract", "--model", "{model}", "--random-init", "--dataset", "vtab", "--root", sys.argv[1],
            "--out", sys.argv[2], "--image-size", "{size}", "--batch-size", "8", "--rows-per-shard", "{rows}", "--workers", "2"]
main()
"""


def test_client_killed_then_the_same_command_resumes(vtab, reference, tmp_path):
    out = tmp_path / "out"
    script = KILL_CLIENT.format(model=MODEL, size=SIZE, rows=ROWS)
    proc = subprocess.run([sys.executable, "-c", script, str(vtab), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = out / MODEL / "vtab.zarr"
    assert not open_store(store).task("eurosat").complete
    journaled = (store / "eurosat" / ".journal.jsonl").read_text().splitlines()
    assert 1 <= len(journaled) < 12
    time.sleep(1.0)  # the killed client's worker processes notice their parent is gone and stop
    result = extract(config(vtab, out))  # the same store, resumed here (locally) from the client's journal
    assert result.tasks[0].status == "resumed" and result.tasks[0].images < 95
    assert validate_store(store).ok
    assert data_objects(store) == data_objects(reference)
