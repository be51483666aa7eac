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
    assert len(p["jobs"]) == 19 * 7
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
    assert len(_project("--trainings-per-task", "9")["jobs"]) == 19 * 9


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
