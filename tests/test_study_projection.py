"""benchmarks/study_projection.py: the arithmetic a projection can get wrong (sizes, 1/N, waves, scheduling)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import study_projection as sp  # noqa: E402


def _project(*argv: str) -> dict:
    return sp.project(sp.build_parser().parse_args(["--no-measure", *argv]), [1, 4, 8, 32])


def test_geometry_and_flops():
    assert sp.REFERENCE.raw_bytes() == 12 * (196 + 1) * 768 * 2
    assert {g.alias: g.raw_bytes() for g in sp.BACKBONES} == {
        "sam": 12 * 196 * 768 * 2, "dfn-clip": 12 * 197 * 768 * 2, "siglip": 12 * 196 * 768 * 2,
        "dinov2": 12 * (256 + 5) * 768 * 2}
    assert sp.REFERENCE.macs() / 1e9 == pytest.approx(sp.VITB16_TIMM_GFLOPS, rel=0.01)  # timm counts MACs
    assert sum(sp.TEST_IMAGES.values()) == 387_904 and len(sp.TEST_IMAGES) == 19


def test_store_size_is_images_times_bytes():
    p = _project()
    assert p["n_images"] == 19 * 1000 + 387_904
    per_image = sum(g.raw_bytes() for g in sp.BACKBONES)
    for fmt, ratio in sp.FORMATS.items():
        assert p["tb"][fmt] == pytest.approx(p["n_images"] * per_image * ratio / 1e12)
    assert p["tb"]["fp16"] > p["tb"]["int8"] > p["tb"]["pca:256+int8"]


def test_extraction_scales_as_one_over_n_and_waves_are_ceil():
    p = _project()
    base = p["rows"][0]["extract_h"]
    assert len(p["jobs"]) == 19 * (7 + 4)  # 7 ComBo fits + 4 linear probes per task, one job each
    for r in p["rows"]:
        assert r["extract_h"] * r["gpus"] == pytest.approx(base)
        assert r["waves"] == math.ceil(len(p["jobs"]) / r["gpus"])
        total, longest = sum(p["jobs"]) / 3600, max(p["jobs"]) / 3600
        assert max(total / r["gpus"], longest) - 1e-9 <= r["train_h"] <= total / r["gpus"] + longest
        assert r["total_h"] == pytest.approx(r["extract_h"] + r["train_h"])
    assert p["rows"][0]["train_h"] == pytest.approx(sum(p["jobs"]) / 3600)


def test_makespan_and_trainings():
    assert sp.makespan([2.0, 3.0, 4.0, 3.0], 2) == 6.0  # longest first: 4+2, 3+3
    assert sp.makespan([5.0, 1.0], 4) == 5.0
    assert [len(sp.trainings(k)) for k in (1, 3, 7, 9)] == [1, 3, 7, 9]
    assert len(_project("--trainings-per-task", "9")["jobs"]) == 19 * (9 + 4)
    assert len(_project("--trainings-per-task", "9", "--linear-per-task", "0")["jobs"]) == 19 * 9
    fits = sp.task_fits(7, 4)
    assert [kind for _, _, kind in fits] == ["combo", "relevance"] + ["combo"] * 5 + ["linear"] * 4
    assert [names for _, names, kind in fits if kind == "linear"] == [("sam",), ("dfn-clip",), ("siglip",), ("dinov2",)]


def test_measured_gpu_figures_replace_the_estimates():
    p = _project("--gpu-images-per-s", "1000", "--gpu-steps-per-s", "50")
    assert p["per_img_s"]["dfn-clip"] == pytest.approx(1 / 1000)  # same geometry as the measured ViT-B/16
    assert p["per_img_s"]["dinov2"] > 1 / 1000
    assert p["ref_step_s"] == pytest.approx(1 / 50)
    est = _project()
    assert est["extract_s"] == pytest.approx(sum(est["per_img_s"].values()) * est["n_images"])


def test_main_prints_tables_and_measures(capsys):
    text = sp.main(["--quick", "--gpus", "1,8"])
    assert "| 1 |" in text and "| 8 |" in text and "ESTIMATE" in text
    assert "Measured on this CPU" in text and "Reproduce: python benchmarks/study_projection.py --quick" in text
    assert capsys.readouterr().out.strip() == text.strip()


def _bytes(*aliases: str, method: str = "combo") -> int:
    by = {g.alias: g for g in sp.BACKBONES}
    return sum(by[a].read_bytes(method) for a in aliases)


ALL = ("sam", "dfn-clip", "siglip", "dinov2")


def test_read_bytes_are_patch_tokens():
    assert sp.REFERENCE.read_bytes() == 12 * 196 * 768 * 2  # ComBo reads no prefix tokens
    assert {g.alias: g.read_bytes("linear") for g in sp.BACKBONES} == {
        "sam": 196 * 768 * 2, "dfn-clip": 196 * 768 * 2, "siglip": 196 * 768 * 2, "dinov2": 256 * 768 * 2}


def test_separate_commands_read_each_test_split_per_fit():
    p = _project()
    assert p["test_reads"] == {"full": 10, "last_layer": 4}  # all 4 + top-2 + 4 alone; 4 linear probes
    assert p["test_reads_per_backbone"] == pytest.approx((10 + 4 / 12) / 4)  # 2.58
    n_test = sum(sp.TEST_IMAGES.values())
    per_task_test = 2 * _bytes(*ALL) + _bytes("dinov2", "siglip") + _bytes(*ALL, method="linear")
    assert p["reads"]["test"] == pytest.approx(n_test * per_task_test)  # the relevance pass reads no test split
    # relevance: train800 once and val200 once per held-out pass (1 + 4 backbones x 5 repeats)
    assert p["reads"]["val"] == pytest.approx(19 * 21 * 200 * _bytes(*ALL))
    train = 800 * _bytes(*ALL) + 1000 * (2 * _bytes(*ALL) + _bytes("dinov2", "siglip") + _bytes(*ALL, method="linear"))
    assert p["reads"]["train"] == pytest.approx(19 * train)
    assert p["read_s"] == pytest.approx(sum(p["reads"].values()) * sp.ZSTD_RATIO / 1e9)


def test_study_reads_each_split_of_each_store_once_per_task():
    p = _project()
    st = p["study"]
    assert st["reads"]["test"] == pytest.approx(sum(sp.TEST_IMAGES.values()) * _bytes(*ALL))
    assert st["reads"]["train"] == pytest.approx(19 * 1000 * _bytes(*ALL))  # train800val200 holds train800 + val200
    assert p["reads"]["test"] / st["reads"]["test"] == pytest.approx(
        (2 * _bytes(*ALL) + _bytes("dinov2", "siglip") + _bytes(*ALL, method="linear")) / _bytes(*ALL))
    assert len(st["jobs"]) == 19  # one job per task
    # same fits, same compute: the study's jobs are the separate jobs' compute plus one read per split
    assert st["compute_s"] == p["compute_s"]
    assert sum(st["jobs"]) == pytest.approx(p["compute_s"] + st["read_s"])
    assert st["read_s"] == pytest.approx(sum(st["reads"].values()) * sp.ZSTD_RATIO / 1e9)
    assert st["gpu_h"] == pytest.approx((p["extract_s"] + sum(st["jobs"])) / 3600)
    assert p["gpu_h"] == pytest.approx((p["extract_s"] + sum(p["jobs"])) / 3600)
    assert p["gpu_h"] - st["gpu_h"] == pytest.approx((p["read_s"] - st["read_s"]) / 3600)
    assert st["gpu_h"] < p["gpu_h"]
    # with more GPUs than tasks, the largest task's study job bounds it
    assert st["rows"][-1]["train_h"] == pytest.approx(max(st["jobs"]) / 3600)
    assert st["rows"][0]["train_h"] == pytest.approx(sum(st["jobs"]) / 3600)


def test_reads_are_the_whole_difference():
    fast = _project("--read-gb-per-s", "1e12")
    assert fast["gpu_h"] == pytest.approx(fast["study"]["gpu_h"], rel=1e-6)
    slow, base = _project("--read-gb-per-s", "0.5"), _project()
    assert slow["gpu_h"] - slow["study"]["gpu_h"] == pytest.approx(2 * (base["gpu_h"] - base["study"]["gpu_h"]))
    # ComBo on all four alone: one test read per backbone either way
    one = _project("--trainings-per-task", "1", "--linear-per-task", "0")
    assert one["reads"]["test"] == pytest.approx(one["study"]["reads"]["test"])
    assert one["test_reads_per_backbone"] == 1.0


def test_relevance_uses_the_dev_protocol():
    two = _project("--trainings-per-task", "2", "--linear-per-task", "0", "--step-overhead-ms", "0")
    one = _project("--trainings-per-task", "1", "--linear-per-task", "0", "--step-overhead-ms", "0")
    assert two["reads"]["test"] == pytest.approx(one["reads"]["test"])  # relevance adds no test read
    step = one["ref_step_s"]
    assert step > 0
    shorter = _project("--trainings-per-task", "2", "--linear-per-task", "0", "--step-overhead-ms", "0",
                       "--relevance-steps", "300")
    # 1,000 fewer relevance steps at the four backbones' step cost, in each of 19 tasks
    geos = list(sp.BACKBONES)
    four = sp.step_flops(geos, 64) / (989e12 * 0.35)
    assert two["compute_s"] - shorter["compute_s"] == pytest.approx(19 * 1000 * four)


def test_report_prints_before_and_after():
    text = sp.main(["--no-measure", "--gpus", "1,32"])
    p = _project()
    assert f"separate commands **{p['gpu_h']:.2f}**" in text and f"`combo study` **{p['study']['gpu_h']:.2f}**" in text
    assert "each backbone's test split 2.58 times" in text
    assert f"| 32 | {p['rows'][-1]['train_h']:.2f} |" in text
