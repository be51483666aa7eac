"""`combo probe` on a dask.distributed cluster (probe/fanout.py): the sequential run's results, task by task."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

from probe.run import ProbeConfig, TasksFailed, run_probe  # noqa: E402
from conftest import blas_threads_of_this_process  # noqa: E402
from storefactory import vtab_like_splits, write_store  # noqa: E402

TASKS = ("alpha", "beta", "gamma")


def make_store(path: Path, *, alias: str, signal: float, seed: int) -> Path:
    """Three learnable tasks (the label is a bright token whose position is the class), `signal` its brightness."""
    n_train, n_val, n_test = 24, 8, 16
    n = n_train + n_val + n_test
    for k, task in enumerate(TASKS):
        rng = np.random.default_rng(100 * seed + k)
        labels = np.random.default_rng(k).integers(0, 3, n)  # the same labels in every store
        tokens = rng.normal(size=(n, 2, 4, 8)).astype(np.float32)
        tokens[np.arange(n), :, labels] += signal
        write_store(path, tokens=tokens, labels=labels.tolist(), splits=vtab_like_splits(n_train, n_val, n_test),
                    grid=(2, 2), task=task, num_classes=3, alias=alias)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("stores") / "synthetic.zarr", alias="synthetic", signal=3.0, seed=0)


@pytest.fixture(scope="module")
def weak(tmp_path_factory) -> Path:
    """A second backbone whose features carry less of the answer (for relevance and atlas)."""
    return make_store(tmp_path_factory.mktemp("weak") / "weak.zarr", alias="weak", signal=0.5, seed=1)


@pytest.fixture(scope="module")
def client():
    with blas_threads_of_this_process(), distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        yield c


def config(store: Path, out: Path) -> ProbeConfig:
    return ProbeConfig(stores=(str(store),), dataset="synthetic", out=str(out), steps=25, batch_size=8, width=16, depth=1,
                       num_heads=2, cache="ram")


def test_three_task_probe_on_the_cluster_equals_the_sequential_run(store, client, tmp_path):
    sequential = run_probe(config(store, tmp_path / "seq"))  # this process: 1 torch thread (conftest), like the workers
    clustered = run_probe(config(store, tmp_path / "dask"), client=client)
    assert [m["task"] for m in clustered.metrics] == list(TASKS)  # the planned order, whatever finished first
    for a, b in zip(sequential.metrics, clustered.metrics):
        for key in ("task", "accuracy", "n", "final_loss", "split", "n_train", "steps", "cache"):
            assert a[key] == b[key], (key, a, b)
    for task in TASKS:
        seq_w = load_file(str(sequential.run_dir / f"adapter-{task}.safetensors"))
        par_w = load_file(str(clustered.run_dir / f"adapter-{task}.safetensors"))
        assert seq_w.keys() == par_w.keys()
        for name in seq_w:
            np.testing.assert_array_equal(seq_w[name], par_w[name], err_msg=f"{task}: {name}")
        assert pq.read_table(sequential.run_dir / f"predictions-{task}.parquet").equals(
            pq.read_table(clustered.run_dir / f"predictions-{task}.parquet"))
    state = json.loads((clustered.run_dir / "state.json").read_text())
    assert state["complete"] and all(v == "done" for v in state["tasks"].values())
    assert (clustered.run_dir / "results.md").exists()


def test_a_failed_task_is_named_and_the_others_finish(store, client, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    shard = damaged / "beta" / "tokens" / "c" / "0" / "0" / "0" / "0"  # the first shard of beta's tokens
    data = bytearray(shard.read_bytes())
    data[64] ^= 0x10  # one flipped bit: the chunk checksum fails when a worker reads it
    shard.write_bytes(bytes(data))
    with pytest.raises(TasksFailed) as err:
        run_probe(config(damaged, tmp_path / "runs"), client=client)
    message = str(err.value)
    assert message.startswith("1 of 3 task(s) failed on the cluster: beta (on dask worker ") and "--resume" in message
    run_dir = next((tmp_path / "runs").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    assert state["tasks"] == {"alpha": "done", "beta": "failed", "gamma": "done"} and not state["complete"]
    assert (run_dir / "adapter-alpha.safetensors").exists() and (run_dir / "adapter-gamma.safetensors").exists()


def _table(path: Path, drop: tuple[str, ...] = ("train_seconds", "seconds")) -> list[dict]:
    """A run table without its timing columns (the only ones a cluster run may change)."""
    import csv

    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def test_select_on_the_cluster_equals_the_sequential_run(store, weak, client, tmp_path):
    from probe.relevance import run_select

    cfg = replace(config(store, tmp_path / "seq"), stores=(str(store), str(weak)))
    sequential = run_select(cfg, select="top-1", group_lambda=0.01)
    clustered = run_select(replace(cfg, out=str(tmp_path / "dask")), select="top-1", group_lambda=0.01, client=client)
    assert clustered.chosen == sequential.chosen
    for name in ("relevance.csv", "layer_relevance.csv", "penalised_metrics.csv", "selection.csv", "metrics.csv",
                 "comparison.csv"):
        assert _table(clustered.run_dir / name) == _table(sequential.run_dir / name), name
    for task in TASKS:
        for prefix in ("", "penalised-"):
            a = load_file(str(sequential.run_dir / f"{prefix}adapter-{task}.safetensors"))
            b = load_file(str(clustered.run_dir / f"{prefix}adapter-{task}.safetensors"))
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{prefix}{task}: {name}")
    assert json.loads((clustered.run_dir / "state.json").read_text())["complete"]


def test_atlas_on_the_cluster_equals_the_sequential_run(store, weak, client, tmp_path):
    from probe.atlas import run_atlas

    kwargs = dict(dataset="synthetic", steps=20, batch_size=8, figures=False, poolings="mean")
    sequential = run_atlas([store, weak], out=tmp_path / "seq", **kwargs)
    clustered = run_atlas([store, weak], out=tmp_path / "dask", client=client, **kwargs)
    assert len(clustered.rows) == 2 * 2 * len(TASKS)  # 2 backbones x 2 layers x 3 tasks, mean pooling
    assert _table(clustered.run_dir / "atlas.csv") == _table(sequential.run_dir / "atlas.csv")
    assert _table(clustered.run_dir / "atlas_best.csv") == _table(sequential.run_dir / "atlas_best.csv")


def test_cluster_options_on_the_command_line(store, tmp_path):
    from typer.testing import CliRunner

    from combo.cli import app

    for command in (["probe"], ["relevance"], ["atlas"]):
        result = CliRunner().invoke(app, [*command, "--stores", str(store), "--dataset", "synthetic", "--workers", "2",
                                          "--scheduler", "tcp://127.0.0.1:9", "--out", str(tmp_path)])
        assert result.exit_code == 2 and "not both" in result.output, (command, result.output)
    assert not any(tmp_path.iterdir())


def test_probe_replace_keeps_config_picklable(store, tmp_path):
    import cloudpickle

    cfg = replace(config(store, tmp_path), tasks=("alpha",))
    assert cloudpickle.loads(cloudpickle.dumps(cfg)) == cfg


def test_study_on_the_cluster_equals_the_sequential_run(store, weak, client, tmp_path):
    """One dask task per task: its fits stay together on one worker (they share its held rows)."""
    from probe.study import StudyConfig
    from probe.studyrun import run_study

    cfg = replace(config(store, tmp_path / "seq"), stores=(str(store), str(weak)))
    sequential = run_study(StudyConfig(probe=cfg, select="top-1"))
    clustered = run_study(StudyConfig(probe=replace(cfg, out=str(tmp_path / "dask")), select="top-1"), client=client)
    assert clustered.selection == sequential.selection
    drop = ("seconds", "train_seconds")
    for name in ("study.csv", "relevance.csv", "selection.csv", "penalised_metrics.csv", "io.csv"):
        assert _table(clustered.run_dir / name, drop) == _table(sequential.run_dir / name, drop), name
    for row in _table(sequential.run_dir / "study.csv", drop):
        for task in TASKS:
            a = pq.read_table(sequential.run_dir / row["folder"] / f"predictions-{task}.parquet")
            assert a.equals(pq.read_table(clustered.run_dir / row["folder"] / f"predictions-{task}.parquet"))
    assert json.loads((clustered.run_dir / "state.json").read_text())["complete"]


def test_a_multi_grid_store_on_the_cluster_equals_the_sequential_run(client, tmp_path):
    """A hierarchical backbone (one part per grid group) next to a ViT: the workers realign the parts as this
    process does, so the fitted adapter (every grid's Lambda slices) and the predictions are the same."""
    from test_hierarchical_probe import TASK as GRID_TASK
    from test_hierarchical_probe import write_grid_store, write_vit_store

    pair = (write_grid_store(tmp_path / "hiera.zarr"), write_vit_store(tmp_path / "vit.zarr"))
    cfg = ProbeConfig(stores=tuple(str(p) for p in pair), dataset="synthetic", out=str(tmp_path / "seq"), steps=20,
                      batch_size=8, width=16, depth=1, num_heads=2, cache="ram")
    sequential = run_probe(cfg)
    clustered = run_probe(replace(cfg, out=str(tmp_path / "dask")), client=client)
    assert sequential.metrics[0]["accuracy"] == clustered.metrics[0]["accuracy"]
    a = load_file(str(sequential.run_dir / f"adapter-{GRID_TASK}.safetensors"))
    b = load_file(str(clustered.run_dir / f"adapter-{GRID_TASK}.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    model = json.loads((clustered.run_dir / "config.json").read_text())["tasks"][GRID_TASK]["model"]
    assert len(model["backbone_of_part"]) > 2 and model["backbone_of_part"][-1] == 1  # the grids, then the ViT
