"""The testbed model bundled in the package: loads as `--model testbed`, has its ground truth, reports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from memattn.errors import MemattnError
from memattn.loading import BUNDLED_TESTBED, load_pipeline, resolve_model
from memattn.testbed.bundle import MAX_BYTES, bundle
from memattn.testbed.data import GROUPS
from memattn.testbed.evaluate import dataset_for, load_manifest


def test_bundle_is_complete_small_and_safetensors_only():
    files = [p for p in BUNDLED_TESTBED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}
    manifest = load_manifest(BUNDLED_TESTBED)
    assert manifest["command"].startswith("memattn testbed train --out")
    assert manifest["attribute_classifier_held_out_accuracy"] > 0.95
    counts = {item["duplication"] for item in manifest["groups"]["memorized_matching"]}
    assert counts == {8, 32, 128}
    # The manifest's ground truth is the dataset its seed and config rebuild.
    dataset = dataset_for(BUNDLED_TESTBED)
    assert [i["caption"] for i in manifest["groups"]["never_seen"]] == [
        i.caption for i in dataset.group("never_seen")
    ]
    unet = load_file(BUNDLED_TESTBED / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(t.numel() for t in unet.values()) > 1_000_000


def test_testbed_name_resolves_to_the_bundle(tmp_path, monkeypatch):
    assert resolve_model("testbed") == BUNDLED_TESTBED
    assert resolve_model("some/model") == "some/model"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "testbed").mkdir()  # a local directory of that name wins
    assert resolve_model("testbed") == "testbed"


def test_bundle_refuses_foreign_files_and_oversize(tmp_path):
    source = tmp_path / "pipe"
    source.mkdir()
    with pytest.raises(MemattnError, match="not an exported testbed pipeline"):
        bundle(source, tmp_path / "out")
    (source / "model_index.json").write_text("{}")
    (source / "memattn_testbed.json").write_text("{}")
    (source / "unet.bin").write_bytes(b"pickle")
    with pytest.raises(MemattnError, match="not safetensors/JSON/text"):
        bundle(source, tmp_path / "out")
    (source / "unet.bin").unlink()
    (source / "big.safetensors").write_bytes(b"0" * 2000)
    with pytest.raises(MemattnError, match="bundle budget"):
        bundle(source, tmp_path / "out", max_bytes=1000)
    assert bundle(source, tmp_path / "out") > 2000 and (tmp_path / "out" / "big.safetensors").is_file()


def test_bundled_pipeline_loads_and_generates():
    pipe = load_pipeline("testbed")
    image = pipe(
        "a small red circle in the center on a gray background",
        num_inference_steps=3,
        guidance_scale=2.0,
        output_type="np",
    ).images
    assert image.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_cli_report_and_info_on_the_bundled_model(tmp_path):
    run = [sys.executable, "-m", "memattn", "testbed"]
    info = subprocess.run([*run, "info"], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "memorized_template" in info.stdout and "memattn testbed train" in info.stdout
    out = tmp_path / "report"
    report = subprocess.run(
        [*run, "report", "--per-group", "6", "--seeds", "1", "--steps", "10", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "TPR@1%FPR" in report.stdout and "memorized_matching" in report.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["groups"]) == list(GROUPS)
    assert (out / "report.html").is_file() and (out / "copies.png").is_file()
    bad = subprocess.run([*run, "report", "--guidance", "0.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr


@pytest.mark.parametrize(
    ("mitigation", "baseline"),
    [
        (None, None),
        ({"c": 1.25}, None),
        (None, {"method": "rta", "strength": 2}),
        (None, {"method": "gni", "strength": 0.5}),
        (None, {"method": "wen", "strength": 0.0}),
        (None, {"method": "pad-mask"}),
        (None, {"method": "opposite-guidance"}),
    ],
)
def test_evaluate_under_a_mitigation_or_baseline(mitigation, baseline):
    from memattn.testbed.evaluate import evaluate

    evaluation = evaluate(
        BUNDLED_TESTBED,
        per_group=2,
        steps=3,
        groups=("memorized_matching",),
        mitigation=mitigation,
        baseline=baseline,
        progress=False,
    )
    assert len(evaluation.rows) == 2 and evaluation.settings["baseline"] == baseline
    assert all(np.isfinite(row["detail_similarity"]) for row in evaluation.rows)
