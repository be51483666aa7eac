"""The study report: heads as columns with the paper's group means, paired bootstrap comparisons whose
differences are known exactly (predictions built with known correctness), bytes read, partial runs, the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from combo.cli import app
from probe.report import ReportError, render_report, run_kind
from probe.results import write_table
from probe.runstate import new_state
from probe.studyreport import (comparisons, paired_bootstrap, paired_bootstrap_tasks, render_study_report,
                               study_summary)

NAMES = ["a", "b", "c"]
N = 100  # samples per task
GROUPS = {"cifar": "natural", "dtd": "natural", "eurosat": "specialised"}
# task -> column -> accuracy (select keeps b+c everywhere)
ACC = {
    "cifar": {"combo[a+b+c]": 0.80, "combo[top-2]": 0.86, "combo[a]": 0.60, "combo[b]": 0.70, "combo[c]": 0.50,
              "linear[a]": 0.55, "linear[b]": 0.65, "linear[c]": 0.40},
    "dtd": {"combo[a+b+c]": 0.70, "combo[top-2]": 0.70, "combo[a]": 0.50, "combo[b]": 0.65, "combo[c]": 0.60,
            "linear[a]": 0.45, "linear[b]": 0.60, "linear[c]": 0.50},
    "eurosat": {"combo[a+b+c]": 0.90, "combo[top-2]": 0.95, "combo[a]": 0.80, "combo[b]": 0.85, "combo[c]": 0.88,
                "linear[a]": 0.75, "linear[b]": 0.80, "linear[c]": 0.90},
}
COLUMNS = list(ACC["cifar"])
IO = [("train800val200", 1000, 4000), ("test", 3000, 12000)]  # bytes read, stored per task and store


def head_of(column: str) -> dict:
    stores = column[column.index("[") + 1:-1]
    if column == "combo[top-2]":
        return {"head": "combo[top-2: b+c]", "family": "select", "method": "combo", "stores": "b+c", "folder": "heads/combo-top-2"}
    family = "linear" if column.startswith("linear") else ("combo" if "+" in stores else "single")
    return {"head": column, "family": family, "method": "linear" if family == "linear" else "combo", "stores": stores,
            "folder": "heads/" + column.replace("[", "-").replace("]", "").replace("+", "-")}


def write_predictions(path, accuracy: float, *, reverse: bool = False) -> None:
    """N samples, the first round(accuracy * N) predicted right (so accuracy differences are exact)."""
    labels = np.arange(N) % 5
    right = np.arange(N) < round(accuracy * N)
    rows = {"row": np.arange(N), "sample_id": 1000 + np.arange(N), "label": labels,
            "prediction": np.where(right, labels, (labels + 1) % 5)}
    if reverse:  # another order: comparisons must match samples by sample_id, not position
        rows = {k: v[::-1] for k, v in rows.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_study(folder, *, complete: bool = True, dataset: str = "vtab", tasks=tuple(ACC)):
    folder.mkdir(parents=True)
    config = {"kind": "study", "backbones": NAMES, "dataset": dataset, "protocol": "final", "relevance_protocol": "dev",
              "group_lambda": 0.01, "select": {"text": "top-2", "by": "heldout", "top_k": 2, "threshold": None},
              "heads": ["combo", "select", "single", "linear"], "selection": {t: ["b", "c"] for t in tasks},
              "warnings": ["task dtd: the ranking of [b] and c is within noise"],
              "tasks": {t: {"classes": list("vwxyz"), "grids": [[2, 2]] * 3} for t in tasks}, "steps": 20, "seed": 42}
    (folder / "config.json").write_text(json.dumps(config))
    state = new_state(list(tasks), options={})
    for t in tasks[: len(tasks) if complete else 2]:
        state.tasks[t] = "done"
    state.complete = complete
    state.save(folder)
    rows, rel, sel, io = [], [], [], []
    for t in tasks:
        for i, column in enumerate(COLUMNS):
            head = head_of(column)
            rows.append({"task": t, "group": GROUPS[t] if dataset == "vtab" else "", **head, "column": column,
                         "grid": "2x2", "split": "test", "n": N, "accuracy": ACC[t][column], "train_split": "train800val200",
                         "n_train": 1000, "steps": 20, "final_loss": 0.1, "train_seconds": 1.0, "seconds": 1.5})
            write_predictions(folder / head["folder"] / f"predictions-{t}.parquet", ACC[t][column], reverse=i % 2 == 1)
        shares = {"a": 0.2, "b": 0.5, "c": 0.3}
        for k, name in enumerate(NAMES):
            rank = {"b": 1, "c": 2, "a": 3}[name]
            rel.append({"task": t, "backbone": name, "store_index": k, "importance": shares[name] * 3,
                        "importance_normalised": shares[name], "rank": rank, "group_lambda": 0.01,
                        "heldout_drop": shares[name] / 10, "heldout_low": shares[name] / 20, "heldout_high": shares[name] / 5,
                        "heldout_rank": rank, "heldout_normalised": shares[name], "heldout_split": "val200"})
            sel.append({"task": t, "backbone": name, "store_index": k, "importance_normalised": shares[name], "rank": rank,
                        "heldout_drop": shares[name] / 10, "heldout_rank": rank, "by": "heldout", "selected": name != "a"})
            for split, read, stored in IO:
                io.append({"task": t, "store": name, "split": split, "bytes_read": read, "bytes_stored": stored})
    write_table(rows, folder / "study")
    write_csv(folder / "relevance.csv", rel)
    write_csv(folder / "selection.csv", sel)
    write_csv(folder / "layer_relevance.csv", [{"task": t, "backbone": n, "store_index": k, "layer": 0, "layer_position": 0,
                                                "importance": 1.0} for t in tasks for k, n in enumerate(NAMES)])
    write_csv(folder / "penalised_metrics.csv", [{"task": t, "group": GROUPS[t], "split": "val200", "accuracy": 0.5, "n": 200}
                                                 for t in tasks])
    write_csv(folder / "io.csv", io)
    return folder


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path / "study-run")


def table_after(text: str, header: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[start].strip("|").split("|")], rows


# ------------------------------------------------------------------------------------------------ bootstrap


def test_paired_bootstrap_contains_the_difference_and_shrinks_with_n():
    widths = []
    for n in (100, 1000, 10000):
        a = (np.arange(n) < 0.7 * n).astype(float)  # 70% right
        b = (np.arange(n) < 0.6 * n).astype(float)  # 60% right, the same samples plus none
        diff, low, high = paired_bootstrap(a, b, seed=1)
        assert diff == pytest.approx(0.1)
        assert low < 0.1 < high
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2] > 0  # ~ 1/sqrt(n)
    # the paired interval of a 10-point difference at n = 1000: sqrt(0.1 * 0.9 / 1000) * 1.96 * 2 = 0.037
    assert widths[1] == pytest.approx(0.037, abs=0.006)


def test_paired_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(3)
    a, b = rng.random(500) < 0.7, rng.random(500) < 0.55
    diff, low, high = paired_bootstrap(a, b, resamples=4000, seed=0)
    d = a.astype(float) - b
    naive = np.percentile(d[rng.integers(0, d.size, size=(4000, d.size))].mean(axis=1), [2.5, 97.5])
    assert diff == pytest.approx(d.mean())
    assert (low, high) == pytest.approx(tuple(naive), abs=0.01)


def test_paired_bootstrap_identical_heads_have_a_zero_width_interval():
    a = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(a, a[:3])


def test_paired_bootstrap_over_tasks_averages_the_task_differences():
    one = ((np.arange(100) < 80).astype(float), (np.arange(100) < 70).astype(float))  # +0.10
    two = ((np.arange(400) < 200).astype(float), (np.arange(400) < 220).astype(float))  # -0.05
    diff, low, high = paired_bootstrap_tasks([one, two], seed=0)
    assert diff == pytest.approx(0.025)  # the mean of the task means, not the pooled samples' (-0.02)
    assert low < 0.025 < high
    single = paired_bootstrap(*one, seed=0)
    assert high - low < single[2] - single[1]  # two tasks average out some noise
    assert paired_bootstrap_tasks([(one[0], one[0])]) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ comparisons


def test_comparisons_equal_the_exact_accuracy_differences(study):
    rows = comparisons(study)
    by = {(r["task"], r["comparison"]): r for r in rows}
    expected = {}
    for t, acc in ACC.items():
        best = max(("combo[a]", "combo[b]", "combo[c]"), key=acc.__getitem__)
        expected[(t, "top-2 vs all")] = ("combo[top-2: b+c]", "combo[a+b+c]", acc["combo[top-2]"], acc["combo[a+b+c]"])
        expected[(t, "all vs best single")] = ("combo[a+b+c]", best, acc["combo[a+b+c]"], acc[best])
        for x in NAMES:
            expected[(t, f"combo vs linear on {x}")] = (f"combo[{x}]", f"linear[{x}]", acc[f"combo[{x}]"], acc[f"linear[{x}]"])
    per_task = {k: v for k, v in by.items() if k[0] != "mean over tasks"}
    assert set(per_task) == set(expected)
    for key, (head_a, head_b, acc_a, acc_b) in expected.items():
        r = by[key]
        assert (r["head_a"], r["head_b"], r["n"]) == (head_a, head_b, N), key
        assert r["accuracy_a"] == pytest.approx(acc_a) and r["accuracy_b"] == pytest.approx(acc_b)
        assert r["diff"] == pytest.approx(acc_a - acc_b), key
        assert r["low"] <= r["diff"] + 1e-12 and r["diff"] <= r["high"] + 1e-12
    assert by[("dtd", "top-2 vs all")]["low"] == by[("dtd", "top-2 vs all")]["high"] == 0  # same correct samples
    mean = by[("mean over tasks", "all vs best single")]
    assert mean["diff"] == pytest.approx(np.mean([0.80 - 0.70, 0.70 - 0.65, 0.90 - 0.88]))
    assert mean["n"] == 3 * N and mean["head_b"] == "best single (per task)"
    top = by[("mean over tasks", "top-2 vs all")]
    assert top["diff"] == pytest.approx((0.06 + 0.0 + 0.05) / 3) and top["low"] < top["diff"] < top["high"]
    assert (top["head_a"], top["head_b"]) == ("combo[top-2]", "combo[a+b+c]")


def test_comparisons_skip_absent_heads(tmp_path):
    folder = make_study(tmp_path / "s")
    rows = [r for r in csv.DictReader(open(folder / "study.csv")) if r["family"] not in ("select", "linear")]
    write_table(rows, folder / "study")
    names = {r["comparison"] for r in comparisons(folder)}
    assert names == {"all vs best single"}


# ------------------------------------------------------------------------------------------------ report


def test_study_report_heads_as_columns_with_group_means(study):
    written = render_study_report(study)
    assert [p.name for p in written] == ["report.md", "accuracy.png", "relevance.png", "heldout.png"]
    for path in written[1:]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
            assert np.asarray(image.convert("RGB")).std() > 10
    text = (study / "report.md").read_text()
    header, rows = table_after(text, "| task | group | split | n |")
    assert header[4:] == COLUMNS
    cells = {r[0]: r for r in rows}
    assert [r[0] for r in rows] == ["cifar", "dtd", "eurosat", "Natural", "Specialised", "Overall"]
    for t in ACC:
        assert [float(c) for c in cells[t][4:]] == pytest.approx([100 * ACC[t][c] for c in COLUMNS])
        assert cells[t][3] == str(N)
    assert cells["Natural"][4:6] == ["75.0", "78.0"]
    assert cells["Overall"][4:6] == ["82.5", "86.5"]  # mean of the group means, not of the tasks (80.0, 83.7)
    _, compared = table_after(text, "| task | comparison |")
    row = next(r for r in compared if r[:2] == ["cifar", "all vs best single"])
    assert row[2:7] == ["combo[a+b+c]", "combo[b]", "80.0", "70.0", "+10.0"]
    assert any(r[0] == "mean over tasks" for r in compared)
    assert "picked per task on the test split" in text
    _, io = table_after(text, "| split | bytes read |")
    assert {r[0]: (r[1], r[2], r[3]) for r in io} == {
        "train800val200": ("9,000 (8.8 KiB)", "36,000 (35.2 KiB)", "0.25"),
        "test": ("27,000 (26.4 KiB)", "108,000 (105.5 KiB)", "0.25")}
    _, relevance = table_after(text, "| task | a | b | c |")
    assert relevance[0][0] == "cifar" and relevance[0][2].startswith("**0.500 (#1)") and not relevance[0][1].startswith("**")
    _, selection = table_after(text, "| task | kept backbones | by |")
    assert selection == [[t, "b, c", "heldout"] for t in ACC]
    assert "- task dtd: the ranking of [b] and c is within noise" in text


def test_study_report_without_vtab_groups_has_a_mean_over_tasks(tmp_path):
    folder = make_study(tmp_path / "digits", dataset="digits")
    render_study_report(folder)
    _, rows = table_after((folder / "report.md").read_text(), "| task | group | split | n |")
    assert [r[0] for r in rows][-1] == "mean over tasks"
    assert rows[-1][4] == f"{100 * np.mean([ACC[t]['combo[a+b+c]'] for t in ACC]):.1f}" == "80.0"
    assert not any(r[0] == "Overall" for r in rows)


def test_partial_study_says_so_and_computes_no_mean(tmp_path):
    folder = make_study(tmp_path / "partial", complete=False)
    render_study_report(folder)
    text = (folder / "report.md").read_text()
    assert text.splitlines()[2].startswith("**partial: 2 of 3 planned tasks finished**")
    _, rows = table_after(text, "| task | group | split | n |")
    assert [r[0] for r in rows] == ["cifar", "dtd", "eurosat"]
    assert "mean over tasks" not in {r["task"] for r in comparisons(folder)}
    assert "mean over tasks" not in text


def test_study_kind_is_recognised_and_render_report_points_elsewhere(study, tmp_path):
    assert run_kind(study) == "study"
    with pytest.raises(ReportError, match="render_study_report"):
        render_report(study)
    (study / "config.json").write_text(json.dumps({}))  # guessed from study.csv
    assert run_kind(study) == "study"


def test_missing_predictions_are_named(study):
    (study / "heads" / "linear-a" / "predictions-dtd.parquet").unlink()
    with pytest.raises(ReportError, match="predictions-dtd.parquet is missing"):
        comparisons(study)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_report_prints_the_study(study):
    result = CliRunner().invoke(app, ["report", str(study)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert (study / "report.md").exists()
    header = next(line for line in result.output.splitlines() if "combo[a+b+c]" in line and "task" in line)
    assert all(c in header for c in ("combo[top-2]", "linear[c]"))
    overall = next(line for line in result.output.splitlines() if "Overall" in line)
    assert "82.5" in overall and "86.5" in overall
    assert "top-2 vs all" in result.output and "+10.0" in result.output
    assert "27,000" in result.output and "report.md" in result.output


def test_cli_report_json_for_a_study(study):
    result = CliRunner().invoke(app, ["report", str(study), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["kind"] == "study" and doc["complete"] is True and doc["state"] == "complete"
    assert doc["files"][0]["path"] == "report.md"
    assert len(doc["summary"]) == len(ACC) * len(COLUMNS)
    first = doc["summary"][0]
    assert {k: first[k] for k in ("task", "head", "stores", "split", "n", "accuracy")} == {
        "task": "cifar", "head": "combo[a+b+c]", "stores": "a+b+c", "split": "test", "n": N, "accuracy": 0.8}
    diffs = {(c["task"], c["comparison"]): c["diff"] for c in doc["comparisons"]}
    assert diffs[("eurosat", "combo vs linear on c")] == pytest.approx(0.88 - 0.90)
    assert doc["io"] == {"train800val200": {"bytes_read": 9000, "bytes_stored": 36000},
                         "test": {"bytes_read": 27000, "bytes_stored": 108000}}
    assert doc == {**doc, **{k: v for k, v in study_summary(study).items() if k in ("comparisons", "io")}}


def test_cli_report_study_fits_80_columns_with_whole_numbers(study):
    result = CliRunner().invoke(app, ["report", str(study)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines if not line.startswith("run folder:")), result.output
    overall = next(line for line in lines if line.startswith("│ Overall"))
    assert [c.strip() for c in overall.strip("│").split("│")][2:] == ["82.5", "86.5", "67.5", "76.2", "71.5", "62.5", "71.2", "67.5"]


def test_one_store_study_compares_combo_with_linear_only(tmp_path):
    """One store: the combo and single families are the same head, combo[a]; no relevance, no selection."""
    folder = make_study(tmp_path / "one")
    rows = [r for r in csv.DictReader(open(folder / "study.csv")) if r["column"] in ("combo[a]", "linear[a]")]
    rows += [{**r, "family": "combo"} for r in rows if r["column"] == "combo[a]"]
    write_table(rows, folder / "study")
    for name in ("relevance.csv", "selection.csv"):
        (folder / name).unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "backbones": ["a"], "selection": {}}))
    assert {r["comparison"] for r in comparisons(folder)} == {"combo vs linear on a"}
    written = render_study_report(folder)
    assert [p.name for p in written] == ["report.md", "accuracy.png"]
    header, rows = table_after((folder / "report.md").read_text(), "| task | group | split | n |")
    assert header[4:] == ["combo[a]", "linear[a]"] and rows[-1][:1] + rows[-1][4:] == ["Overall", "67.5", "62.5"]
