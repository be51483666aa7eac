"""Interrupted and partial probe runs (issue 12): the run folder records its planned tasks and what finished,
Ctrl-C and a full disk leave a folder that says so, `--resume` (or the same command again) finishes it with the
results of an uninterrupted run, and report / predict / the results table never present a partial run as whole.

Stores are written straight through store_schema (three tasks named after VTAB tasks, so they get VTAB groups
and an overall mean), adapters are tiny (width 8, depth 1, 8 steps): each run takes well under a second.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

import probe.run
from combo.cli import app
from combo.cli_probe import results_table
from combo.predict import PredictError, load_trained
from countdata import count_tree
from extract.pipeline import ExtractConfig, extract
from probe.run import ProbeConfig, run_probe
from probe.runstate import read_state
from storefactory import MULTI_N as N
from storefactory import MULTI_TASKS as TASKS
from storefactory import write_multi_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_multi_store(tmp_path_factory.mktemp("partial") / "tinyvit" / "features.zarr")


def probe_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["probe", "--stores", str(store), "--steps", "8", "--batch-size", "8", "--width", "8", "--depth", "1",
            "--grid", "2", "--device", "cpu", "--threads", "1", "--out", str(out), *extra]


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def run_folder(output: str) -> Path:
    line = [x for x in output.splitlines() if x.startswith("run folder: ")][-1]
    return Path(line[len("run folder: "):].strip())


def only_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def interrupt_at(monkeypatch, n: int, error: BaseException, target: str = "fit_task") -> None:
    """Make the n-th call (1-based) of probe.run.<target> raise ``error``."""
    real, calls = getattr(probe.run, target), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(probe.run, target, wrapper)


def results(run_dir: Path) -> dict:
    """What must not depend on whether the run was interrupted: metrics (less timings), predictions, weights."""
    metrics = [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")}
               for r in pq.read_table(run_dir / "metrics.parquet").to_pylist()]
    out = {"metrics": metrics}
    for task in TASKS:
        out[f"pred-{task}"] = pq.read_table(run_dir / f"predictions-{task}.parquet").to_pydict()
        out[f"weights-{task}"] = {k: v.numpy().tobytes() for k, v in load_file(run_dir / f"adapter-{task}.safetensors").items()}
    return out


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    result = cli(*probe_args(store, out))
    assert result.exit_code == 0, result.output
    return results(run_folder(result.output))


# ------------------------------------------------------------------------------------------ interrupt, resume


def test_ctrl_c_leaves_a_partial_run_that_report_marks_and_resume_finishes(store, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, KeyboardInterrupt())
        result = cli(*probe_args(store, tmp_path))
    assert result.exit_code == 130, result.output
    run = only_folder(tmp_path)
    assert f"interrupted: 1 of 3 tasks finished in {run}; rerun the same command" in result.output
    assert f"--resume {run}" in result.output and "Traceback" not in result.output
    state = read_state(run)
    assert state.tasks == {"cifar": "done", "dtd": "interrupted", "eurosat": "pending"} and not state.complete
    assert json.loads((run / "state.json").read_text())["complete"] is False
    assert not (run / "results.md").exists()

    report = cli("report", run)
    assert report.exit_code == 0, report.output
    text = (run / "report.md").read_text()
    assert "partial: 1 of 3 planned tasks finished" in text and "no group or overall mean" in text
    assert "Overall" not in text and "| cifar |" in text

    result = cli(*probe_args(store, tmp_path / "elsewhere", "--resume", run))
    assert result.exit_code == 0, result.output
    assert run_folder(result.output) == run and read_state(run).complete
    assert set(read_state(run).tasks.values()) == {"done"}
    assert results(run) == reference
    assert "Overall" in (run / "results.md").read_text()
    assert cli("report", run).exit_code == 0 and "partial" not in (run / "report.md").read_text()
    finished = cli(*probe_args(store, tmp_path, "--resume", run))  # a finished run is never touched
    assert finished.exit_code == 2 and "that run is finished" in finished.output, finished.output
    assert results(run) == reference


def test_rerunning_the_same_command_resumes_the_newest_unfinished_run(store, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, KeyboardInterrupt())
        assert cli(*probe_args(store, tmp_path)).exit_code == 130
    run = only_folder(tmp_path)
    assert read_state(run).done == ["cifar", "dtd"]
    other = cli(*probe_args(store, tmp_path, "--seed", "7"))  # another config: a run of its own, finished
    assert other.exit_code == 0 and "resuming" not in other.output
    result = cli(*probe_args(store, tmp_path))
    assert result.exit_code == 0, result.output
    assert f"resuming {run}: 2 of 3 tasks done" in result.output
    assert run_folder(result.output) == run and results(run) == reference
    before = sorted(p.name for p in tmp_path.iterdir())
    again = cli(*probe_args(store, tmp_path))  # finished runs are never touched: a new folder
    assert again.exit_code == 0 and "resuming" not in again.output
    assert run_folder(again.output).name not in before and results(run) == reference


def test_resume_refuses_other_options_naming_them(store, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, KeyboardInterrupt())
        assert cli(*probe_args(store, tmp_path)).exit_code == 130
    run = only_folder(tmp_path)
    result = cli(*probe_args(store, tmp_path, "--steps", "9", "--resume", run))
    assert result.exit_code == 2, result.output
    assert "--steps (run: 8, now: 9)" in result.output and "Traceback" not in result.output
    assert read_state(run).done == ["cifar"]
    result = cli(*probe_args(store, tmp_path, "--resume", tmp_path / "nothing"))
    assert result.exit_code == 2 and "no such run folder" in result.output


def test_full_disk_during_a_task_is_one_line_and_the_state_says_what_finished(store, tmp_path, monkeypatch):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "adapter-dtd.safetensors"))
    interrupt_at(monkeypatch, 2, full, target="save_fit")
    result = cli(*probe_args(store, tmp_path))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'x' / 'adapter-dtd.safetensors'}: no space left on the device"]
    assert "Traceback" not in result.output
    state = read_state(only_folder(tmp_path))
    assert state.done == ["cifar"] and state.tasks["dtd"] == "failed" and not state.complete


# ------------------------------------------------------------------------------------------- partial marking


def test_results_table_of_a_partial_run_has_no_mean():
    rows = [{"task": "cifar", "group": "natural", "split": "test", "n": 8, "accuracy": 0.5}]
    console = Console(record=True, width=200)
    console.print(results_table(rows, title="t", vtab=True, partial="partial: 1 of 3 planned tasks finished"))
    text = console.export_text()
    assert "partial: 1 of 3 planned tasks finished" in text and "Overall" not in text
    console.print(results_table(rows, title="t", vtab=True))
    assert "Overall" in console.export_text()


def test_an_old_run_folder_without_state_counts_as_complete(store, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, KeyboardInterrupt())
        assert cli(*probe_args(store, tmp_path)).exit_code == 130
    run = only_folder(tmp_path)
    (run / "state.json").unlink()
    assert cli("report", run).exit_code == 0
    assert "partial" not in (run / "report.md").read_text() and "Overall" in (run / "report.md").read_text()


@pytest.fixture(scope="module")
def real_partial(tmp_path_factory) -> Path:
    """A real two-task store of a tiny random-init ViT, and a probe run interrupted in its second task."""
    root = tmp_path_factory.mktemp("predict-partial")
    for task in ("clevr_count", "dsprites_loc"):
        count_tree(root / "vtab", task, n_train=8, n_val=4, n_test=4)
    result = extract(ExtractConfig(model="vit_tiny_patch16_224", dataset="vtab", root=str(root / "vtab"),
                                   out=str(root / "stores"), image_size=32, random_init=True, seed=0, num_workers=0,
                                   batch_size=16))
    cfg = ProbeConfig(stores=(str(result.store),), steps=4, batch_size=8, width=8, depth=1, grid=(2, 2), device="cpu",
                      out=str(root / "runs"))
    real = probe.run.fit_task
    calls = []

    def stop_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    probe.run.fit_task = stop_second
    try:
        with pytest.raises(probe.run.RunInterrupted):
            run_probe(cfg)
    finally:
        probe.run.fit_task = real
    return only_folder(root / "runs"), root / "vtab"


def test_predict_on_a_partial_run_uses_finished_tasks_and_refuses_the_others(real_partial, tmp_path):
    run, vtab = real_partial
    assert read_state(run).done == ["clevr_count"]
    trained = load_trained(run)  # the one finished task is picked
    assert trained.task == "clevr_count" and trained.partial == "partial: 1 of 2 planned tasks finished"
    with pytest.raises(PredictError, match="task dsprites_loc did not finish in this run"):
        load_trained(run, "dsprites_loc")
    images = vtab / "clevr_count" / "images" / "test"
    result = cli("predict", "--probe", run, "--images", images, "--device", "cpu", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    assert "unfinished run (partial: 1 of 2 planned tasks finished)" in result.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 5
    result = cli("predict", "--probe", run, "--images", images, "--task", "dsprites_loc", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "task dsprites_loc did not finish in this run" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------- outputs checked first


def read_only(monkeypatch, folder: Path) -> None:
    """``os.access`` says ``folder`` cannot be written (tests run as root, for whom chmod changes nothing)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_predict_out_that_cannot_be_written_fails_before_any_backbone_loads(real_partial, tmp_path, monkeypatch):
    run, vtab = real_partial
    images = vtab / "clevr_count" / "images" / "test"

    def no_backbones(*args, **kwargs):
        raise AssertionError("a backbone was loaded")

    monkeypatch.setattr("combo.predict.rebuild_backbone", no_backbones)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")

    def refused(out, message):
        result = cli("predict", "--probe", run, "--images", images, "--device", "cpu", "--out", out)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output

    refused(tmp_path / "folder", "is a folder")
    refused(tmp_path / "file" / "p.csv", "is a file, not a folder")
    read_only(monkeypatch, tmp_path / "folder")  # as root, chmod cannot make a folder unwritable
    refused(tmp_path / "folder" / "p.csv", "is read-only or not writable")


def test_probe_out_a_file_or_unwritable_fails_before_stores_open(store, tmp_path, monkeypatch):
    def no_stores(*args, **kwargs):
        raise AssertionError("a store was opened")

    monkeypatch.setattr(probe.run, "open_stores", no_stores)
    (tmp_path / "file").write_text("")
    result = cli(*probe_args(store, tmp_path / "file"))
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "is a file, not a folder" in result.output
    read_only(monkeypatch, tmp_path)
    result = cli(*probe_args(store, tmp_path / "runs"))
    assert result.exit_code == 2 and "is not writable" in result.output, result.output


# ------------------------------------------------------------------------------------------ what is recorded


def test_a_store_given_as_a_path_records_its_own_dataset_and_backbone(store, tmp_path):
    result = cli(*probe_args(store, tmp_path, "--task", "cifar"))
    assert result.exit_code == 0, result.output
    assert "combo on tinyvit (synthetic, protocol final)" in result.output  # not "features (vtab, ...)"
    run = run_folder(result.output)
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "synthetic"
    assert (run / "results.md").read_text().startswith("# combo on tinyvit (synthetic, protocol final)")
    assert cli("report", run).exit_code == 0
    assert "dataset synthetic" in (run / "report.md").read_text()


def test_a_training_split_of_one_class_is_refused(tmp_path):
    y_one = np.where(np.arange(sum(N)) < N[0] + N[1], 1, np.arange(sum(N)) % 3)  # train800val200 all label 1
    y_new = np.where(np.arange(sum(N)) < N[0] + N[1], np.arange(sum(N)) % 2, 3)  # test holds an unseen class
    path = write_multi_store(tmp_path / "s.zarr", ("cifar", "dtd"), labels={"cifar": y_one, "dtd": y_new})
    base = dict(stores=(str(path),), steps=4, batch_size=8, width=8, depth=1, grid=(2, 2), device="cpu", out=str(tmp_path))
    with pytest.raises(ValueError, match=r"task cifar: the training split train800val200 holds one class \(label 1\); "
                                         "a classifier cannot be trained or measured on it"):
        run_probe(ProbeConfig(**base))
    assert not (tmp_path / "runs").exists() and not any(p.is_dir() and p.name != "s.zarr" for p in tmp_path.iterdir())
    run = run_probe(ProbeConfig(**base, tasks=("dtd",)))
    assert run.metrics[0]["accuracy"] == 0.0  # every test sample is of a class never trained on: allowed


@pytest.mark.parametrize("command", ["relevance", "atlas"])
def test_interrupted_relevance_and_atlas_runs_are_reported_as_partial(store, tmp_path, monkeypatch, command):
    """Relevance and atlas runs cannot be resumed yet, but an interrupted one must never look finished."""
    import probe.atlas
    import probe.relevance

    calls = {"n": 0}
    if command == "relevance":
        real = probe.relevance.fit_task

        def fit_then_stop(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(probe.relevance, "fit_task", fit_then_stop)
        other = write_multi_store(tmp_path / "stores" / "other" / "features.zarr", alias="other")
        args = ["relevance", "--stores", f"{store},{other}", "--steps", "8", "--batch-size", "8", "--width", "8",
                "--depth", "1", "--device", "cpu", "--out", tmp_path / "runs"]
    else:
        real = probe.atlas._atlas_one

        def one_then_stop(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(probe.atlas, "_atlas_one", one_then_stop)
        args = ["atlas", "--stores", str(store), "--steps", "8", "--pooling", "mean", "--device", "cpu",
                "--out", tmp_path / "runs"]
    result = cli(*args)
    assert result.exit_code == 130, result.output
    (run,) = list((tmp_path / "runs").iterdir())
    state = read_state(run)
    assert state is not None and state.partial and state.done == ["cifar"], state
    result = cli("report", run)
    assert result.exit_code == 0, result.output
    assert "partial: 1 of 3 planned tasks finished" in " ".join(result.output.split())
    report = (run / "report.md").read_text()
    assert "partial: 1 of 3 planned tasks finished" in report and "Overall" not in report
    monkeypatch.undo()
    done = cli(*args)  # the same command again runs every task and says nothing is partial
    assert done.exit_code == 0, done.output
    (finished,) = [p for p in (tmp_path / "runs").iterdir() if p != run]
    assert not read_state(finished).partial and "partial" not in cli("report", finished).output
