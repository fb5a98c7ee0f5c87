"""Benchmark scripts must keep running (their numbers live in benchmarks/RESULTS.md, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "pixart-sigma", "sd3"])
def test_probe_overhead_quick_run(tmp_path, family):
    out = tmp_path / "probe.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "probe_overhead.py"), "--family", family, "--quick"]
    script += ["--text-share"] if family == "sd3" else []
    result = subprocess.run(
        [*script, "--json", str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr
    assert "probe overhead ratio" in result.stdout
    data = json.loads(out.read_text())
    assert data["max_abs_image_diff"] == 0.0
    tokens = {"sd1": 77, "pixart-sigma": 300, "sd3": 77 + 256}[family]
    assert data["record_shape"][-1] == tokens  # the encode call's length, not the tokenizer's 512
    per_token = {"sd1": 50 * 16 * 8, "pixart-sigma": 20 * 28 * 16, "sd3": 28 * 24 * 24}[family]
    share = per_token if family == "sd3" else 0  # joint attention: + one text share per step, layer, head
    assert data["real_record_bytes_per_image"] == 4 * (tokens * per_token + share)


@pytest.mark.slow
def test_mitigation_overhead_quick_run(tmp_path):
    out = tmp_path / "mitigation.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mitigation_overhead.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {"plain", "mitigate", "guard, clean", "guard, flagged", "guard, restart"}
    assert arms["plain"]["median_ratio_to_plain"] == 1.0


@pytest.mark.slow
def test_detect_cost_quick_run(tmp_path):
    out = tmp_path / "cost.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "detect_cost.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for model in ("testbed", "sd1_tiny"):
        arms = data[model]
        assert arms["step-1 (E, Wen, combined)"]["times_slower_than_step1"] == 1.0
        assert len(arms) == 4 and all(arm["prompts_per_second"] > 0 for arm in arms.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "pixart-alpha", "sd3"])
def test_real_model_check_on_a_saved_tiny_pipeline(tmp_path, family):
    """benchmarks/real_model_check.py (the real-weights check for a GPU) runs on a saved pipeline of each
    supported family: traced images equal plain ones, finite D/E, the family's own edit, restored."""
    from memattn.testing import tiny_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

    model = tmp_path / family
    build = {
        "sd1": tiny_pipeline,
        "pixart-alpha": lambda: tiny_pixart_pipeline("alpha"),
        "sd3": tiny_sd3_pipeline,
    }
    pipe = build[family]()
    pipe.save_pretrained(model, safe_serialization=True)
    out = tmp_path / "check.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "real_model_check.py"), "--model", str(model)]
    result = subprocess.run(
        [*script, "--device", "cpu", "--steps", "2", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["max_abs_trace_diff"] == 0.0 and data["scores_finite"] and data["restored"]
    bos = family != "pixart-alpha"  # SD3's text starts with CLIP's BOS
    assert data["edit"] == ({"c": 1.25} if bos else {"c": 1.0, "mask_eos": True})
    assert data["edit_mean_abs_change"] > 0
    assert data["record_shape"][-1] == {"sd1": 77, "pixart-alpha": 120, "sd3": 77 + 256}[family]
