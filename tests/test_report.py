"""combo report: Markdown tables with the paper's group means and readable, non-blank PNG figures."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from combo.cli import app
from probe.report import ReportError, read_csv, render_report, run_kind

# three natural tasks (mean 70), one specialised (90): overall = mean of group means = 80, not the task mean 75
PROBE_METRICS = [
    {"task": "cifar", "group": "natural", "split": "test", "accuracy": 0.5, "n": 100},
    {"task": "dtd", "group": "natural", "split": "test", "accuracy": 0.7, "n": 100},
    {"task": "svhn", "group": "natural", "split": "test", "accuracy": 0.9, "n": 100},
    {"task": "eurosat", "group": "specialised", "split": "test", "accuracy": 0.9, "n": 100},
]


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def check_png(path, *, min_size=(300, 200)):
    """A real PNG, big enough to read, and not blank (many distinct colours, not all white)."""
    assert path.exists() and path.suffix == ".png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10
    non_white = (pixels.min(axis=-1) < 200).mean()
    assert non_white > 0.01, non_white
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def table_after(text: str, header: str) -> list[list[str]]:
    """Rows (as cell lists) of the Markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.fixture
def probe_run(tmp_path):
    folder = tmp_path / "probe-run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "probe", "method": "combo", "dataset": "vtab", "protocol": "final",
                                                    "stores": [{"backbone": {"alias": "dinov2"}}]}))
    write_csv(folder / "metrics.csv", PROBE_METRICS)
    return folder


def test_probe_report_table_and_group_means(probe_run):
    written = render_report(probe_run)
    assert written[0] == probe_run / "report.md" and all(p.exists() for p in written)
    text = (probe_run / "report.md").read_text()
    tasks = table_after(text, "| task | group |")
    assert len(tasks) == len(PROBE_METRICS)
    assert {r[0]: float(r[4]) for r in tasks} == {"cifar": 50.0, "dtd": 70.0, "svhn": 90.0, "eurosat": 90.0}
    means = table_after(text, "| Natural | Specialised | Structured | Overall |")
    assert means == [["70.0", "90.0", "-", "80.0"]]  # overall = (70 + 90) / 2, not the task mean 75
    assert "dinov2" in text
    pngs = [p for p in written if p.suffix == ".png"]
    assert [p.name for p in pngs] == ["accuracy.png"]
    for path in pngs:
        check_png(path)
        assert f"]({path.name})" in text  # linked from the report


@pytest.fixture
def relevance_run(tmp_path):
    folder = tmp_path / "relevance-run"
    folder.mkdir()
    names = ["sam", "clip", "dinov2"]
    (folder / "config.json").write_text(json.dumps({"kind": "relevance", "dataset": "vtab", "protocol": "dev",
                                                    "group_lambda": 0.01, "backbones": names}))
    rng = np.random.default_rng(0)
    rel, layers, metrics = [], [], []
    for task, group in (("dtd", "natural"), ("clevr_count", "structured")):
        s = rng.uniform(0.5, 2.0, size=3)
        order = np.argsort(-s)
        for k, name in enumerate(names):
            rel.append({"task": task, "backbone": name, "store_index": k, "importance": s[k],
                        "importance_normalised": s[k] / s.sum(), "rank": int(np.where(order == k)[0][0]) + 1})
            for pos in range(4):
                layers.append({"task": task, "backbone": name, "store_index": k, "layer": pos, "layer_position": pos,
                               "importance": rng.uniform(0.1, 1.0)})
        metrics.append({"task": task, "group": group, "split": "val200", "accuracy": rng.uniform(0.3, 0.9), "n": 200})
    write_csv(folder / "relevance.csv", rel)
    write_csv(folder / "layer_relevance.csv", layers)
    write_csv(folder / "metrics.csv", metrics)
    return folder, rel


def test_relevance_report(relevance_run):
    folder, rel = relevance_run
    written = render_report(folder)
    assert {p.name for p in written} == {"report.md", "relevance.png", "layer_relevance.png"}
    for path in written[1:]:
        check_png(path)
    text = (folder / "report.md").read_text()
    importance = table_after(text, "| task | sam | clip | dinov2 |")
    assert [r[0] for r in importance] == ["dtd", "clevr_count"]  # natural before structured
    first = {r["backbone"]: r for r in rel if r["task"] == "dtd"}
    assert importance[0][1] == f"{first['sam']['importance_normalised']:.3f} (#{first['sam']['rank']})"
    means = table_after(text, "| Natural | Specialised | Structured | Overall |")[0]
    assert means[1] == "-" and float(means[3]) == pytest.approx((float(means[0]) + float(means[2])) / 2, abs=0.051)


def test_select_report_marks_the_chosen_backbones(relevance_run):
    folder, rel = relevance_run
    config = json.loads((folder / "config.json").read_text())
    config.update(kind="select", select={"text": "top-1", "top_k": 1, "threshold": None})
    (folder / "config.json").write_text(json.dumps(config))
    top = {r["task"]: r["backbone"] for r in rel if r["rank"] == 1}
    write_csv(folder / "selection.csv", [{"task": r["task"], "backbone": r["backbone"], "store_index": r["store_index"],
                                          "importance_normalised": r["importance_normalised"], "rank": r["rank"],
                                          "selected": r["rank"] == 1} for r in rel])
    (folder / "penalised_metrics.csv").write_text((folder / "metrics.csv").read_text())
    metrics = read_csv(folder / "metrics.csv")
    for m in metrics:
        m["accuracy"] = 0.95
        m["backbones"] = top[m["task"]]
    write_csv(folder / "metrics.csv", metrics)
    written = render_report(folder)
    assert {p.name for p in written} == {"report.md", "accuracy.png", "relevance.png", "layer_relevance.png"}
    for path in written[1:]:
        check_png(path)
    text = (folder / "report.md").read_text()
    chosen = table_after(text, "| task | selected |")
    assert {r[0]: r[1] for r in chosen} == top
    assert all(r[3] == "95.0" for r in chosen)
    assert text.count("**") == 2 * len(top)  # one bold (selected) cell per task


def test_atlas_report_one_figure_per_group(tmp_path):
    folder = tmp_path / "atlas-run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "atlas", "dataset": "vtab", "protocol": "dev", "backbones": ["clip", "sam"]}))
    rows = []
    for task, group, peak in (("dtd", "natural", 9), ("cifar", "natural", 11), ("kitti", "structured", 4)):
        for k, name in enumerate(["clip", "sam"]):
            for pooling in (("cls", "mean") if name == "clip" else ("mean",)):
                for layer in range(12):
                    acc = 0.9 - 0.05 * abs(layer - peak) - 0.1 * k
                    rows.append({"task": task, "group": group, "backbone": name, "store_index": k, "layer": layer,
                                 "layer_position": layer, "pooling": pooling, "accuracy": round(acc, 4), "split": "val200", "n": 200})
    write_csv(folder / "atlas.csv", rows)
    written = render_report(folder)
    assert {p.name for p in written} == {"report.md", "atlas-natural.png", "atlas-structured.png"}
    for path in written[1:]:
        check_png(path)
    text = (folder / "report.md").read_text()
    best = table_after(text, "| task | group | backbone | layer |")
    assert {r[0]: (r[2], int(r[3]), float(r[5])) for r in best} == {"dtd": ("clip", 9, 90.0), "cifar": ("clip", 11, 90.0),
                                                                       "kitti": ("clip", 4, 90.0)}
    summary = table_after(text, "| backbone | pooling | probe |")
    assert len(summary) == 3 * 2  # (clip cls, clip mean, sam mean) x (last layer, best layer)
    clip_best = next(r for r in summary if r[:3] == ["clip", "cls", "best layer"])
    assert clip_best[3:] == ["90.0", "-", "90.0", "90.0"]
    clip_last = next(r for r in summary if r[:3] == ["clip", "cls", "last layer"])
    # last layer (11): dtd 0.8, cifar 0.9 -> natural 85.0; kitti 0.55 -> 55.0; overall (85 + 55) / 2 = 70.0
    assert clip_last[3:] == ["85.0", "-", "55.0", "70.0"]


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="not a folder"):
        render_report(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="not a run folder"):
        render_report(empty)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"kind": "mystery"}))
    with pytest.raises(ReportError, match="mystery"):
        render_report(odd)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"kind": "relevance"}))
    with pytest.raises(ReportError, match="relevance.csv is missing"):
        render_report(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        render_report(broken)
    guessed = tmp_path / "guessed"
    guessed.mkdir()
    write_csv(guessed / "metrics.csv", PROBE_METRICS)
    assert run_kind(guessed) == "probe"


def test_cli_report(probe_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(probe_run)])
    assert result.exit_code == 0, result.output
    assert (probe_run / "report.md").exists() and (probe_run / "accuracy.png").exists()
    assert "report.md" in result.output and "eurosat" in result.output
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no run folder" in missing.output
    assert re.search(r"error", missing.output)


def long_probe_run(tmp_path):
    """A probe run folder deep under a long path, with a bracketed task and backbone name."""
    folder = tmp_path / ("runs-[final]-" + "x" * 60) / "probe-[a]"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"kind": "probe", "method": "combo", "dataset": "vtab",
                                                    "protocol": "final", "stores": [{"backbone": {"alias": "dino[v2]"}}]}))
    write_csv(folder / "metrics.csv", [{**PROBE_METRICS[0], "task": "cifar[red]"}, *PROBE_METRICS[1:]])
    return folder


def test_cli_report_files_table_is_relative_and_the_folder_whole(tmp_path):
    """At 80 columns: the files table lists names relative to the run folder (every row alike, none broken),
    the folder is printed once, whole on one line, and bracketed task names are printed as they are."""
    folder = long_probe_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(folder)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"run folder: {folder}" in lines, result.output  # never hard-wrapped mid-name
    assert result.output.count(str(folder)) == 1
    rows = [line for line in lines if line.startswith("│") and (".png" in line or ".md" in line)]
    assert [line.split()[1] for line in rows] == ["report.md", "accuracy.png"], result.output
    assert all(len(line) <= 80 for line in lines if not line.startswith("run folder:"))
    assert "cifar[red]" in result.output


def test_cli_report_json(tmp_path):
    folder = long_probe_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(folder), "--json"], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["run_folder"] == str(folder) and doc["kind"] == "probe"
    assert [f["path"] for f in doc["files"]] == ["report.md", "accuracy.png"]
    assert all(f["bytes"] == (folder / f["path"]).stat().st_size for f in doc["files"])
    assert {r["task"]: r["accuracy"] for r in doc["summary"]}["cifar[red]"] == 0.5


def test_accuracy_figure_names_each_tasks_group():
    from probe.report import accuracy_figure

    fig = accuracy_figure({"combo": PROBE_METRICS}, title="t")
    ax = fig.axes[0]
    groups = {t.get_text(): t.get_position()[0] for t in ax.texts if t.get_gid() == "group-label"}
    assert set(groups) == {"Natural", "Specialised"}
    ticks = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert ticks["cifar"] == ticks["dtd"] == ticks["svhn"] != ticks["eurosat"]  # coloured per group
    assert groups["Natural"] == pytest.approx(1.0) and groups["Specialised"] == pytest.approx(3.0)  # over their tasks
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "group: Natural" in legend and "group: Specialised" in legend


def layer_rows(values):
    return [{"task": "dtd", "backbone": "clip", "store_index": 0, "layer": i, "layer_position": i, "importance": v,
             "heldout_drop": v / 100} for i, v in enumerate(values)]


def test_layer_heatmap_scale_starts_at_zero_or_says_so():
    from probe.report import colour_scale_label, layer_heatmap_figure

    fig = layer_heatmap_figure(layer_rows([1.42, 2.0, 3.5]))  # norms: the colour scale starts at 0
    image = fig.axes[0].images[0]
    assert image.get_clim()[0] == 0
    assert "not 0" not in fig.axes[1].get_ylabel()
    fig = layer_heatmap_figure(layer_rows([1.42, 2.0, 3.5]), value="heldout_drop")  # drops: their range, said
    image = fig.axes[0].images[0]
    assert image.get_clim()[0] == pytest.approx(1.42)
    assert "scale from 1.42, not 0" in fig.axes[1].get_ylabel()
    assert colour_scale_label("x", 0.0) == "x" and "not 0" in colour_scale_label("x", -2.5)


def test_relevance_warnings_print_bracketed_names_verbatim(capsys):
    from combo.cli_study import print_warnings

    print_warnings(["store [red]clip[/red] ranks task [b]dtd[/b] first; class [x] too"])
    err = capsys.readouterr().err
    assert "store [red]clip[/red] ranks task [b]dtd[/b] first; class [x] too" in " ".join(err.split())


def test_relevance_table_prints_bracketed_names_verbatim():
    from rich.console import Console

    from combo.cli_study import _relevance_table

    rows = [{"task": "dtd[1k]", "backbone": name, "importance_normalised": share, "rank": rank}
            for name, share, rank in (("clip[red]", 0.7, 1), ("sam", 0.3, 2))]
    table = _relevance_table(rows, {"dtd[1k]": {"accuracy": 0.5}}, None, ["clip[red]", "sam"], title="relevance [x]")
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "dtd[1k]" in text and "clip[red]" in text and "relevance [x]" in text
    assert "0.700 (#1)" in text
