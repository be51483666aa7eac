"""benchmarks/gpu_check.py --small on the CPU: every figure is printed, written to JSON, finite and positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_gpu_check_small_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a machine with a GPU
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--threads", "1", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for line in ("ratio bare / with writes", "ComBo 40 steps, cache ram: training", "probe steps/s, stream cache",
                 "ratio stream / ram", "normalised maps, max |diff|", "normalised maps, max rel. error",
                 "cpu-bf16 proxy (no GPU)", "goals are stated for the full run on a GPU"):
        assert line in text, f"{line!r} missing from the report:\n{text}"

    r = json.loads(out.read_text())
    assert r["small"] is True
    assert r["environment"]["device"] == "cpu" and r["environment"]["torch"]
    e = r["extraction"]
    assert e["model"] == "vit_tiny_patch16_224" and e["images"] == 80 and e["store_mib"] > 0
    for key in ("bare_images_per_s", "extract_images_per_s", "extract_call_images_per_s", "ratio", "ratio_whole_call"):
        assert _positive(e[key]), (key, e[key])
    # the ratio is what the two rates say it is
    assert math.isclose(e["ratio"], e["bare_images_per_s"] / e["extract_images_per_s"], rel_tol=1e-9)

    c = r["combo"]
    assert c["steps"] == 40 and c["cache"] == "ram" and c["auto_cache"] == "ram" and c["peak_gpu_gib"] is None
    for key in ("train_seconds", "fit_seconds", "final_loss"):
        assert _positive(c[key]), (key, c[key])
    assert c["fit_seconds"] >= c["train_seconds"]
    assert 0.0 <= c["accuracy"] <= 1.0 and c["n_eval"] == 16

    sv = r["stream_vs_device"]
    assert sv["device"]["mode"] == "ram" and sv["stream"]["mode"] == "stream"
    assert sv["stream"]["window_rows"] is not None and sv["stream"]["window_rows"] < 64  # it really streamed windows
    for mode in ("device", "stream"):
        assert _positive(sv[mode]["steps_per_s"]) and sv[mode]["steps"] == 15
    assert _positive(sv["ratio"])
    assert math.isclose(sv["ratio"], sv["stream"]["steps_per_s"] / sv["device"]["steps_per_s"], rel_tol=1e-9)

    d = r["cpu_vs_device"]
    assert d["compared"].startswith("cpu-bf16 proxy") and d["images"] == 4
    for kind in ("as_computed", "as_stored_float16"):
        figures = d[kind]
        for key in ("max_abs", "max_rel", "mean_abs"):
            assert _positive(figures[key]), (kind, key, figures[key])
        assert len(figures["per_layer_rel"]) == 2 and 0 <= figures["worst_layer"] < 2
        assert figures["max_rel"] < 0.2  # bf16 against fp32 after normalisation: percent-level, not garbage
    assert set(r["goals"]) == {"extract_ratio", "combo_train_seconds"}
    for goal in r["goals"].values():
        assert _positive(goal["value"]) and goal["met"] is None  # stated for the GPU run, not judged on --small
