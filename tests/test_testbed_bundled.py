"""The testbed models bundled in the package: `--model testbed` (v2) and `--model testbed-detail` (v1)
load, have their ground truth, report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import HANG_GUARD_S
from safetensors.torch import load_file

from memattn.errors import MemattnError
from memattn.loading import BUNDLED_TESTBED, BUNDLED_TESTBED_DETAIL, load_pipeline, resolve_model
from memattn.testbed.bundle import MAX_BYTES, MAX_TOTAL_BYTES, bundle, bundled_bytes
from memattn.testbed.manifest import dataset_for, load_manifest
from memattn.testbed.objects import GROUPS as OBJECT_GROUPS


@pytest.mark.parametrize(
    ("root", "command", "counts"),
    [
        (BUNDLED_TESTBED, "memattn testbed train --out", {128}),
        (BUNDLED_TESTBED_DETAIL, "memattn testbed train --out", {8, 32, 128}),
    ],
)
def test_bundle_is_complete_small_and_safetensors_only(root, command, counts):
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}
    manifest = load_manifest(root)
    assert manifest["command"].startswith(command)
    # v1: 1.000; v2 (small objects on busy backgrounds): 0.878 with every attribute right (RESULTS.md)
    assert manifest["attribute_classifier_held_out_accuracy"] > 0.85
    assert {item["duplication"] for item in manifest["groups"]["memorized_matching"]} == counts
    # The manifest's ground truth is the dataset its seed and config rebuild.
    dataset = dataset_for(root)
    assert [i["caption"] for i in manifest["groups"]["never_seen"]] == [
        i.caption for i in dataset.group("never_seen")
    ]
    unet = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(t.numel() for t in unet.values()) > 1_000_000


def test_both_bundles_fit_the_package_budget():
    assert bundled_bytes() <= MAX_TOTAL_BYTES


def test_v2_bundle_has_a_pretrained_eos_copy_encoder_and_a_sink_log():
    manifest = load_manifest(BUNDLED_TESTBED)
    assert manifest["config"]["data"]["scene"] == "object"
    assert manifest["config"]["text_encoder"] == "contrastive-eoscopy"
    pretraining = manifest["text_encoder_pretraining"]
    assert pretraining["retrieval_accuracy"] > 0.5  # in-batch text -> image, chance 1/256
    assert abs(pretraining["summary_state_cosine"]["eos"]) < 0.3  # prompt-specific summary states
    index = json.loads((BUNDLED_TESTBED / "model_index.json").read_text())
    assert index["text_encoder"] == ["memattn.testbed.model", "TestbedCLIPTextModel"]
    log = manifest["sink_log"]
    assert [entry["step"] for entry in log] == list(range(250, manifest["config"]["steps"] + 1, 250))
    layers = len(log[0]["layers"])
    for entry in log:
        for group in ("seen_once", "memorized"):
            shares = entry[group]
            assert len(shares["bos_share"]) == layers
            total = np.array(shares["bos_share"]) + shares["summary_share"] + shares["prompt_share"]
            assert np.allclose(total, 1.0, atol=2e-3)


def test_testbed_name_resolves_to_the_bundle(tmp_path, monkeypatch):
    assert resolve_model("testbed") == BUNDLED_TESTBED
    assert resolve_model("testbed-detail") == BUNDLED_TESTBED_DETAIL
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


@pytest.mark.parametrize("name", ["testbed", "testbed-detail"])
def test_bundled_pipeline_loads_and_generates(name):
    pipe = load_pipeline(name)
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
    info = subprocess.run([*run, "info"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert info.returncode == 0, info.stderr
    assert "memorized_matching" in info.stdout and "memattn testbed train" in info.stdout
    detail = subprocess.run(
        [*run, "info", "testbed-detail"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert detail.returncode == 0 and "memorized_template" in detail.stdout
    out = tmp_path / "report"
    report = subprocess.run(
        [*run, "report", "--per-group", "6", "--seeds", "1", "--steps", "10", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "TPR@1%FPR" in report.stdout and "memorized_matching" in report.stdout
    assert "mitigation {'c': 1.25}: copies of 128x prompts" in report.stdout
    assert "guard {'c': 1.25, 'mask_eos': True}: copies of 128x prompts" in report.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["guard"]) == {"settings", "plain", "guarded", "flagged_128", "flagged_clean"}
    assert 0.0 <= summary["guard"]["flagged_clean"] <= summary["guard"]["flagged_128"] <= 1.0
    assert list(summary["groups"]) == list(OBJECT_GROUPS)
    assert set(summary["mitigation"]) == {"settings", "plain", "mitigated"}
    assert summary["headline"]["best_step1_score"] in (
        "e_preregistered",
        "wen_step1",
        "minus_bos_share_step0",
        "summary_share_step0",
    )
    for name in ("report.html", "copies.png", "headline.png"):
        assert (out / name).is_file()
    html = (out / "report.html").read_text()
    assert html.index("headline.png") < html.index("Detection, best first") < html.index("<h2>Groups")
    bad = subprocess.run(
        [*run, "report", "--guidance", "0.5"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr
    no_layer = subprocess.run(
        [*run, "report", "--model", "testbed-detail", "--guard"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert no_layer.returncode == 2 and "no pre-registered E layer" in no_layer.stderr


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
    assert all(np.isfinite(row["copy_similarity"]) for row in evaluation.rows)
