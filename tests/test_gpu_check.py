"""benchmarks/gpu_check.sh must keep running: CI exercises its CPU path (CUDA skipped, reduced UNet)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env=os.environ | {"PYTHON": sys.executable},  # the interpreter running the tests
    )
    assert result.returncode == 0, result.stderr
    assert "CUDA SKIPPED" in result.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["cuda_skipped"] is True
    assert data["config"]["cross_attention_layers"] == 16
    arms = data["arms"]
    assert set(arms) == {"plain", "probe", "mitigate"}
    assert arms["plain"]["median_ratio_to_plain"] == 1.0
    for row in arms.values():
        ratio = row["median_ratio_to_plain"]
        assert math.isfinite(ratio) and ratio > 0
        assert row["peak_memory_mib"] is None and row["peak_memory_ratio_to_plain"] is None
    assert data["peak_memory_ratio_probe_to_plain"] is None
    assert data["max_abs_diff_probe_vs_plain"] <= 1e-5
    # The mitigation edits the conditional rows only (CFG batch [uncond, cond]).
    assert data["max_abs_diff_mitigate_vs_plain"] > 0
    assert data["max_abs_diff_mitigate_vs_plain_uncond_rows"] <= 1e-5
    calls, images = data["config"]["calls"], data["config"]["images"]
    assert data["record_shape"] == [calls, 16, images, 8, 77] and data["record_finite"]
