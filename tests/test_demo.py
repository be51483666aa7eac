"""`combo demo`: the whole pipeline offline on sklearn's digits with two random-init ViTs."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from combo.cli import app
from combo.demo import DemoConfig
from probe.results import read_metrics
from store_schema import open_store

runner = CliRunner()


def test_demo_extracts_probes_and_says_the_weights_are_random(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "150", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = result.output
    flat = " ".join(text.split())  # rich wraps long titles at the terminal width
    assert "RANDOMLY INITIALISED" in text and "RANDOM weights" in text
    assert "combo extract --model dinov2 --dataset vtab" in text and "--weights" in text  # how to use real weights
    assert "combo on vit_tiny_patch16_224 + deit_tiny_patch16_224" in flat and "linear on" in flat
    assert "150, batch 64" in flat  # the settings are printed
    stores = sorted((out / "stores").glob("*/digits.zarr"))
    assert [s.parent.name for s in stores] == ["deit_tiny_patch16_224", "vit_tiny_patch16_224"]
    assert [open_store(s).backbone["seed"] for s in stores] == [1, 0]  # one seed per backbone
    runs = {m: [line for line in text.splitlines() if line.startswith(f"run folder ({m}): ")] for m in ("combo", "linear")}
    accuracy = {}
    for method, lines in runs.items():
        folder = out / "runs" / lines[0].split("/runs/")[-1].strip()
        assert folder.is_dir() and (folder / "results.md").is_file()
        row = read_metrics(folder)[0]
        assert (row["task"], row["split"], row["n"]) == ("digits", "test", 797)
        accuracy[method] = row["accuracy"]
        assert f"{100 * row['accuracy']:.1f}" in text
    # random features still separate digits far above chance (10 %): the pipeline carries the signal
    assert accuracy["combo"] >= 0.5 and accuracy["linear"] >= 0.3, accuracy
    assert re.search(r"took \d+ s", text)


def test_demo_refuses_bad_settings_cleanly(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--image-size", "8"])
    assert result.exit_code == 2 and "--image-size 8" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--models", "not_a_model_at_all"])
    assert result.exit_code == 2 and "not_a_model_at_all" in result.output and "Traceback" not in result.output
    assert DemoConfig().describe()["adapter"].startswith("width 64, depth 2")
