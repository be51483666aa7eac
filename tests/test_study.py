"""`combo study` (probe/study.py, probe/studyrun.py): the paper's per-task study in one call, each split of each store read once,
with the same answers as the separate commands."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import probe.study
import probe.studyrun
from combo.cli import app
from probe.relevance import relevance_warnings
from probe.report import read_csv
from probe.run import ProbeConfig, RunInterrupted, run_probe
from probe.runstate import read_state
from probe.study import StudyConfig
from probe.studyrun import run_study
from store_schema import StoreLayout
from storefactory import vtab_like_splits, write_store

SPLITS = (64, 32, 48)  # train800, val200, test
CLASSES, GRID = 4, (2, 2)
runner = CliRunner()


def make_store(root: Path, name: str, *, layers: int, signal: list[int], dim: int, seed: int, strength: float = 1.0,
               tasks: tuple[str, ...] = ("shapes",)) -> str:
    """N(0, 1) tokens; the listed layers carry a class direction of norm ~4 * strength."""
    n = sum(SPLITS)
    labels = np.arange(n) % CLASSES
    for t, task in enumerate(tasks):
        x = np.random.default_rng([seed, t]).standard_normal((n, layers, 4, dim)).astype(np.float32)
        directions = np.random.default_rng(123 + dim).standard_normal((CLASSES, dim)).astype(np.float32)
        for layer in signal:
            x[:, layer] += strength * directions[labels][:, None, :]
        write_store(root / f"{name}.zarr", tokens=x, labels=labels, splits=vtab_like_splits(*SPLITS), grid=GRID, alias=name,
                    task=task, layout=StoreLayout(rows_per_shard=16, rows_per_chunk=8, dtype="float32"))
    return str(root / f"{name}.zarr")


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> list[str]:
    """a: informative (2 layers, width 16); b: weakly so in its last of 3 layers; c: noise, width 24."""
    root = tmp_path_factory.mktemp("trio")
    return [make_store(root, "a", layers=2, signal=[0, 1], dim=16, seed=1),
            make_store(root, "b", layers=3, signal=[2], dim=16, seed=2, strength=0.5),
            make_store(root, "c", layers=2, signal=[], dim=24, seed=3)]


def probe_config(paths, out, **kw) -> ProbeConfig:
    args = dict(dataset="synthetic", steps=30, batch_size=32, lr=3e-3, seed=0, grid=GRID, width=16, depth=1,
                num_heads=2, device="cpu", out=str(out))
    return ProbeConfig(stores=tuple(str(p) for p in paths), **{**args, **kw})


@pytest.fixture(scope="module")
def study(trio, tmp_path_factory):
    return run_study(StudyConfig(probe=probe_config(trio, tmp_path_factory.mktemp("study-runs"))))


def predictions(folder: Path, task: str = "shapes") -> dict[str, int]:
    table = pq.read_table(folder / f"predictions-{task}.parquet").to_pydict()
    return dict(zip(table["sample_id"], table["prediction"]))


def test_the_study_folder_holds_every_head_side_by_side(study):
    rows = read_csv(study.run_dir / "study.csv")
    selected = "+".join(study.selection["shapes"])
    assert [r["head"] for r in rows] == ["combo[a+b+c]", f"combo[top-2: {selected}]", "combo[a]", "combo[b]", "combo[c]",
                                         "linear[a]", "linear[b]", "linear[c]"]
    assert [r["column"] for r in rows][:2] == ["combo[a+b+c]", "combo[top-2]"]
    assert {r["split"] for r in rows} == {"test"} and {r["n"] for r in rows} == {48}
    assert {r["train_split"] for r in rows} == {"train800val200"} and {r["n_train"] for r in rows} == {96}
    by_head = {r["column"]: r for r in rows}
    assert by_head["combo[a]"]["accuracy"] > 0.9 and by_head["combo[c]"]["accuracy"] < 0.6  # informative vs noise
    assert "c" not in study.selection["shapes"] and len(study.selection["shapes"]) == 2  # the noise store is left out
    for r in rows:  # every head's folder: its weights, its predictions on the same test samples, its metrics
        folder = study.run_dir / r["folder"]
        assert (folder / "adapter-shapes.safetensors").is_file()
        labels = pq.read_table(folder / "predictions-shapes.parquet").to_pydict()
        assert len(labels["sample_id"]) == 48
        assert np.mean(np.array(labels["prediction"]) == np.array(labels["label"])) == pytest.approx(r["accuracy"])
        assert read_csv(folder / "metrics.csv")[0]["accuracy"] == pytest.approx(r["accuracy"])
    relevance = read_csv(study.run_dir / "relevance.csv")
    assert [r["backbone"] for r in relevance] == ["a", "b", "c"] and all("heldout_drop" in r for r in relevance)
    assert read_csv(study.run_dir / "penalised_metrics.csv")[0]["split"] == "val200"  # relevance never sees test
    chosen = {r["backbone"]: r["selected"] for r in read_csv(study.run_dir / "selection.csv")}
    assert [b for b, kept in chosen.items() if kept] == study.selection["shapes"]
    doc = json.loads((study.run_dir / "config.json").read_text())
    assert doc["kind"] == "study" and doc["select"]["by"] == "heldout" and doc["backbones"] == ["a", "b", "c"]
    assert read_state(study.run_dir).complete and not (study.run_dir / "fits" / "shapes").exists()
    results = (study.run_dir / "results.md").read_text()
    assert "| task | group | split | n | combo[a+b+c] | combo[top-2] | combo[a] |" in results and "mean over tasks" in results


def test_each_split_of_each_store_is_read_once(study):
    """8 heads and the relevance pass (9 fits, plus 5 held-out repeats per store), yet every store's training
    rows and test rows are read exactly once: bytes read = the split's bytes as stored."""
    row_bytes = {"a": 2 * 4 * 16 * 4, "b": 3 * 4 * 16 * 4, "c": 2 * 4 * 24 * 4}  # layers x tokens x width x float32
    io = read_csv(study.run_dir / "io.csv")
    assert sorted((r["store"], r["split"]) for r in io) == sorted(
        (s, split) for s in "abc" for split in ("train800val200", "test"))
    for r in io:
        n = 96 if r["split"] == "train800val200" else 48
        assert r["bytes_stored"] == n * row_bytes[r["store"]], r
        assert r["bytes_read"] == r["bytes_stored"], r


def test_study_heads_equal_the_standalone_probes(study, trio):
    """Same seed, same options: ComBo on all stores, ComBo on one store and the linear probe on another, each
    trained alone with `combo probe`, predict exactly what the study's heads predict."""
    rows = {r["column"]: r for r in read_csv(study.run_dir / "study.csv")}
    base = probe_config(trio, study.run_dir.parent / "alone")
    for column, cfg in (("combo[a+b+c]", base), ("combo[b]", replace(base, stores=(trio[1],))),
                        ("linear[c]", replace(base, stores=(trio[2],), method="linear"))):
        alone = run_probe(cfg)
        assert predictions(alone.run_dir) == predictions(study.run_dir / rows[column]["folder"]), column
        assert alone.metrics[0]["accuracy"] == rows[column]["accuracy"], column
        assert alone.metrics[0]["final_loss"] == pytest.approx(rows[column]["final_loss"], rel=0, abs=0), column


def test_a_streamed_study_still_reads_the_test_split_once(trio, tmp_path):
    """Training rows larger than --cache-budget are streamed by each fit (and said so), the test split still
    once; the answers equal the cached study's where the stream's order is the cached one's (one window)."""
    run = run_study(StudyConfig(probe=probe_config(trio, tmp_path, cache_budget=2**10), heads=("combo", "linear")))
    doc = json.loads((run.run_dir / "config.json").read_text())
    assert "does not fit --cache-budget" in doc["held"]["shapes"]
    io = read_csv(run.run_dir / "io.csv")
    assert all(r["bytes_read"] == r["bytes_stored"] for r in io if r["split"] == "test")
    assert all(r["bytes_read"] > r["bytes_stored"] for r in io if r["split"] != "test")  # each fit read its own


def test_the_warning_fires_whenever_the_measures_disagree():
    def rows(noise_low, signal_low):
        return [{"backbone": "noise", "rank": 1, "heldout_rank": 2, "importance_normalised": 0.7, "heldout_drop": -0.03,
                 "heldout_low": noise_low, "heldout_high": 0.04, "heldout_accuracy": 0.6, "heldout_chance": 0.25,
                 "heldout_n": 200, "heldout_split": "val200"},
                {"backbone": "signal", "rank": 2, "heldout_rank": 1, "importance_normalised": 0.3, "heldout_drop": 0.057,
                 "heldout_low": signal_low, "heldout_high": 0.121, "heldout_accuracy": 0.6, "heldout_chance": 0.25,
                 "heldout_n": 200, "heldout_split": "val200"}]

    [weak] = relevance_warnings("t", rows(-0.1, -0.007))  # the new user's case: +5.7 [-0.7, +12.1] vs -2.9
    assert "disagree on the top 1" in weak and "Neither difference is significant" in weak
    assert "--steps" in weak and "--init torch" in weak and "more data" in weak
    [strong] = relevance_warnings("t", rows(-0.1, 0.02))
    assert "The held-out difference is significant" in strong and "--by heldout" in strong
    agree = rows(-0.1, 0.02)
    agree[0]["heldout_rank"], agree[1]["heldout_rank"] = 1, 2
    assert relevance_warnings("t", agree) == []


def test_the_study_selects_by_heldout_drop_and_warns(tmp_path):
    """The paper's s_k ranks a noise store with 8 layers above an informative one with 1; the study keeps
    the informative one (by held-out drop), says the two measures disagree, and --by norm reproduces the paper."""
    from test_relevance import heldout_store

    pair = (heldout_store(tmp_path / "noise.zarr", layers=8, signal=[], seed=1, alias="noise"),
            heldout_store(tmp_path / "signal.zarr", layers=1, signal=[0], seed=2, alias="signal"))
    base = ProbeConfig(stores=tuple(str(p) for p in pair), dataset="synthetic", steps=60, batch_size=32, lr=3e-3, seed=0,
                       grid=(2, 2), width=16, depth=1, num_heads=2, device="cpu", out=str(tmp_path / "runs"))
    run = run_study(StudyConfig(probe=base, select="top-1", heads=("select",)))
    assert run.selection == {"shapes": ["signal"]}
    assert any("disagree on the top 1" in w and "noise by s_k, signal by held-out drop" in w for w in run.warnings)
    paper = run_study(StudyConfig(probe=base, select="top-1", by="norm", heads=("select",)))
    assert paper.selection == {"shapes": ["noise"]}


def test_an_interrupted_study_resumes_without_retraining(study, trio, tmp_path, monkeypatch):
    cfg = StudyConfig(probe=probe_config(trio, tmp_path))
    real_train, real_relevance = probe.study.train_task, probe.study.relevance_of_task
    calls = {"train": 0, "relevance": 0}
    armed = [True]

    def train(*args, **kwargs):
        calls["train"] += 1
        if calls["train"] == 3 and armed[0]:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    def relevance(*args, **kwargs):
        calls["relevance"] += 1
        return real_relevance(*args, **kwargs)

    monkeypatch.setattr(probe.study, "train_task", train)
    monkeypatch.setattr(probe.study, "relevance_of_task", relevance)
    with pytest.raises(RunInterrupted) as stop:
        run_study(cfg)
    run_dir = stop.value.run_dir
    assert read_state(run_dir).tasks == {"shapes": "interrupted"} and not (run_dir / "study.csv").exists()
    saved = json.loads((run_dir / "fits" / "shapes" / "trained.json").read_text())
    assert sorted(saved) == ["combo:0+1", "combo:0+1+2", "relevance"]  # the fits trained before Ctrl-C
    calls.update(train=0, relevance=0)
    armed[0] = False
    resumed = run_study(cfg, resume=run_dir)
    assert calls == {"train": 6, "relevance": 0}  # 8 fits, 2 were trained before the interruption
    assert resumed.run_dir == run_dir and read_state(run_dir).complete
    for column in {r["column"]: r for r in read_csv(study.run_dir / "study.csv")}:
        folder = next(r["folder"] for r in read_csv(run_dir / "study.csv") if r["column"] == column)
        assert predictions(run_dir / folder) == predictions(study.run_dir / folder), column


def test_a_resumed_study_does_not_read_a_finished_task_again(tmp_path, monkeypatch):
    stores = [make_store(tmp_path, name, layers=2, signal=[0], dim=8, seed=k, tasks=("first", "second"))
              for k, name in enumerate(("x", "y"))]
    cfg = StudyConfig(probe=probe_config(stores, tmp_path / "runs", steps=10), heads=("combo", "linear"))
    real = probe.studyrun.study_task

    def interrupted(aligned, *args, **kwargs):
        if aligned.name == "second":
            raise KeyboardInterrupt
        return real(aligned, *args, **kwargs)

    monkeypatch.setattr(probe.studyrun, "study_task", interrupted)
    with pytest.raises(RunInterrupted) as stop:
        run_study(cfg)
    monkeypatch.setattr(probe.studyrun, "study_task", real)
    damaged = 0
    for path in stores:  # the finished task's features are damaged (sizes kept): a resume that read them would fail
        for shard in (Path(path) / "first" / "tokens" / "c").rglob("*"):
            if shard.is_file():
                data = bytearray(shard.read_bytes())
                for i in range(40, len(data) - 40, 97):
                    data[i] ^= 0xFF
                shard.write_bytes(bytes(data))
                damaged += 1
    assert damaged >= 2
    resumed = run_study(cfg, resume=stop.value.run_dir)
    assert resumed.resumed == 1 and sorted({r["task"] for r in resumed.rows}) == ["first", "second"]
    assert sorted((r["task"], r["store"], r["split"]) for r in resumed.io) == sorted(
        (t, s, split) for t in ("first", "second") for s in ("x", "y") for split in ("train800val200", "test"))


def test_study_options_are_checked_before_anything_runs(trio, tmp_path):
    with pytest.raises(ValueError, match="--heads"):
        StudyConfig(probe=probe_config(trio, tmp_path), heads=("combo", "lasso"))
    with pytest.raises(ValueError, match="--select"):
        StudyConfig(probe=probe_config(trio, tmp_path), select="best-two")
    with pytest.raises(ValueError, match="--by"):
        StudyConfig(probe=probe_config(trio, tmp_path), by="vibes")
    with pytest.raises(ValueError, match="top-4"):
        run_study(StudyConfig(probe=probe_config(trio, tmp_path), select="top-4"))
    assert not list(tmp_path.iterdir())  # nothing was written


def test_cli_study_prints_the_heads_and_the_bytes_read(trio, tmp_path):
    args = ["study", "--stores", ",".join(trio), "--dataset", "synthetic", "--steps", "20", "--batch-size", "32",
            "--lr", "3e-3", "--grid", "2x2", "--device", "cpu", "--out", str(tmp_path), "--width", "16", "--depth", "1",
            "--attention-heads", "2", "--seed", "0", "--heads", "combo,select,linear"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "linear[a]" in flat and "linear[c]" in flat and "mean over" in flat and "selected" in flat
    assert "train800val200: read" in flat and "test: read" in flat and "(1.00x)" in flat
    run_dir = next(tmp_path.iterdir())
    assert [r["column"] for r in read_csv(run_dir / "study.csv")] == [
        "combo[a+b+c]", "combo[top-2]", "linear[a]", "linear[b]", "linear[c]"]
    bad = runner.invoke(app, args[:-1] + ["combo,lasso"])
    assert bad.exit_code == 2 and "--heads" in bad.output


def test_report_of_a_study_run(study):
    """`combo report RUN`: console tables, report.md with the heads side by side and the paired comparisons
    (top-k vs all, all vs the best single store, ComBo vs linear on each store), and --json for scripts."""
    import json as json_lib

    result = runner.invoke(app, ["report", str(study.run_dir)])
    assert result.exit_code == 0, result.output
    report = (study.run_dir / "report.md").read_text()
    rows = {r["column"]: r for r in read_csv(study.run_dir / "study.csv")}
    header = "| task | group | split | n | " + " | ".join(rows) + " |"
    assert header in report
    assert "| shapes |  | test | 48 | " + " | ".join(f"{100 * r['accuracy']:.1f}" for r in rows.values()) + " |" in report
    for text in ("top-2 vs all", "all vs best single", "combo vs linear on a", "combo vs linear on c", "## Bytes read"):
        assert text in report, text
    doc = json_lib.loads(runner.invoke(app, ["report", str(study.run_dir), "--json"]).output)
    assert doc["kind"] == "study" and doc["complete"] and len(doc["summary"]) == 8
    assert {c["comparison"] for c in doc["comparisons"]} >= {"top-2 vs all", "all vs best single"}
    assert doc["io"]["test"]["bytes_read"] == doc["io"]["test"]["bytes_stored"] > 0
    versus = next(c for c in doc["comparisons"] if c["comparison"] == "combo vs linear on a")
    assert versus["diff"] == pytest.approx(rows["combo[a]"]["accuracy"] - rows["linear[a]"]["accuracy"])
    assert versus["low"] <= versus["diff"] <= versus["high"]


def test_a_one_store_study_has_no_selection_and_no_duplicate_heads(trio, tmp_path):
    run = run_study(StudyConfig(probe=probe_config(trio[:1], tmp_path)))
    assert [r["head"] for r in run.rows] == ["combo[a]", "linear[a]"]
    assert not (run.run_dir / "relevance.csv").exists() or not read_csv(run.run_dir / "relevance.csv")
    assert all(r["bytes_read"] == r["bytes_stored"] for r in run.io)
    result = runner.invoke(app, ["report", str(run.run_dir)])
    assert result.exit_code == 0, result.output
    report = (run.run_dir / "report.md").read_text()
    assert "| combo[a] | linear[a] |" in report and "Backbone relevance" not in report and "combo vs linear on a" in report
