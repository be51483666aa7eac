"""Progress a user can see (probe, relevance, atlas, demo) and deliberate CPU thread counts."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from combo import clikit
from combo.cli import app
from combo.progress import LineProgress
from storefactory import vtab_like_splits, write_store
from store_schema import StoreLayout

runner = CliRunner()
SMALL = ["--width", "8", "--depth", "1", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def two_task_stores(tmp_path_factory):
    """Two backbones x two tasks (one layer, 2x2 grid), labels cycling over three classes."""
    root = tmp_path_factory.mktemp("progress")
    rng = np.random.default_rng(0)
    paths = []
    for alias in ("alpha", "beta"):
        path = root / f"{alias}.zarr"
        for task in ("first", "second"):
            n = 32
            write_store(path, tokens=rng.standard_normal((n, 1, 4, 4)).astype(np.float32), labels=np.arange(n) % 3,
                        splits=vtab_like_splits(16, 8, 8), grid=(2, 2), task=task, alias=alias, num_classes=3,
                        layout=StoreLayout(rows_per_shard=8, rows_per_chunk=4, dtype="float32"))
        paths.append(str(path))
    return paths


def _step_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"step \d+/\d+ \(\d+%\)", line)]


def test_probe_piped_prints_task_i_of_n_step_loss_rate_and_eta(two_task_stores, tmp_path):
    result = runner.invoke(app, ["probe", "--stores", ",".join(two_task_stores), "--steps", "40",
                                 "--out", str(tmp_path), *SMALL])
    assert result.exit_code == 0, result.output
    lines = _step_lines(result.output)
    # a line every 10% of each of the two fits (not every step: 40 steps would be 80 lines), then "done"
    assert len([x for x in lines if x.startswith("[1/2] first")]) == 9, lines
    assert len([x for x in lines if x.startswith("[2/2] second")]) == 9, lines
    first = lines[0]
    assert re.match(r"\[1/2\] first: step 4/40 \(10%\), loss \d+\.\d{4}, [\d.]+ steps/s, ETA \d+s \(run \d+s\)", first), first
    assert re.search(r"\[2/2\] second: done in \d+s, [\d.]+% on 8 test", result.output)
    assert "\x1b[" not in result.output  # no cursor movement or colour codes when piped


def test_relevance_and_atlas_show_progress_per_fit(two_task_stores, tmp_path):
    result = runner.invoke(app, ["relevance", "--stores", ",".join(two_task_stores), "--steps", "20", "--select", "top-1",
                                 "--out", str(tmp_path), *SMALL])
    assert result.exit_code == 0, result.output
    # the penalised pass and the retraining: two fits per task
    assert re.search(r"\[1/4\] first: penalised: done", result.output), result.output
    assert re.search(r"\[4/4\] second: retrain on (alpha|beta): done", result.output), result.output
    result = runner.invoke(app, ["atlas", "--stores", ",".join(two_task_stores), "--steps", "20", "--pooling", "mean",
                                 "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for i, label in enumerate(["first: alpha", "first: beta", "second: alpha", "second: beta"], start=1):
        assert f"[{i}/4] {label}: done in" in result.output, result.output


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_rate_and_eta_cover_the_rest_of_the_run(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr("combo.progress.time.perf_counter", clock)
    out = io.StringIO()
    progress = LineProgress(out, every_percent=25)
    progress.plan(3)
    progress.start("cifar", steps=100)
    for done in range(1, 101):
        clock.now += 0.5  # 2 steps/s
        progress.step(done, loss=1.0 / done)
    progress.finish("cifar", summary="50.0% on 200 test")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] cifar: training, 100 steps"
    assert lines[1] == "[1/3] cifar: step 25/100 (25%), loss 0.0400, 2.0 steps/s, ETA 38s (run 2m18s)"  # 75 + 2 x 100 steps left at 2 steps/s
    assert len(lines) == 5 and lines[-1] == "[1/3] cifar: done in 50s, 50.0% on 200 test"


def test_threads_option_sets_torch_threads_and_is_checked(monkeypatch):
    before = torch.get_num_threads()
    try:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            monkeypatch.delenv(var, raising=False)
        assert clikit.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert clikit.os.environ["OMP_NUM_THREADS"] == "1"  # DataLoader workers and subprocesses inherit it
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            clikit.configure_threads(0)
        result = runner.invoke(app, ["probe", "--stores", "x", "--threads", "0"])
        assert result.exit_code == 2 and "--threads" in result.output
    finally:
        torch.set_num_threads(before)


def test_default_threads_honours_omp_and_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(clikit, "available_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert clikit.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    busy = {"cpus": 0.1}
    monkeypatch.setattr(clikit, "busy_cpus", lambda: busy["cpus"])
    assert clikit.default_threads() == 8
    busy["cpus"] = 2.6  # ~3 cores kept busy by other processes
    assert clikit.default_threads() == 5
    busy["cpus"] = 30.0
    assert clikit.default_threads() == 1


def test_busy_cpus_sees_a_competing_process():
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert clikit.busy_cpus(0.5) >= 0.7  # one whole core taken by the spinner
    finally:
        spinner.kill()


def test_demo_refuses_zero_steps_before_extracting(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d").exists()  # nothing was extracted


@pytest.mark.parametrize("command, option", [("probe", "--steps"), ("probe", "--batch-size"), ("relevance", "--steps"),
                                             ("atlas", "--batch-size"), ("predict", "--batch-size"),
                                             ("extract", "--batch-size"), ("demo", "--steps")])
def test_ranges_are_shown_and_enforced(command, option):
    import click

    assert "x>=1" in click.unstyle(runner.invoke(app, [command, "--help"], terminal_width=200).output)
    args = {"probe": ["--stores", "x"], "relevance": ["--stores", "x"], "atlas": ["--stores", "x"],
            "predict": ["--probe", "x", "--images", "y"], "extract": ["--model", "x"], "demo": []}[command]
    result = runner.invoke(app, [command, *args, option, "0"])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in click.unstyle(result.output), result.output
