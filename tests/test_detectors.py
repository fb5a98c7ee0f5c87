"""Baseline detectors (Wen, bright ending), step-1 features, the combined detector and bench detect."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, generators
from sklearn.metrics import roc_auc_score, roc_curve

import memattn
from memattn.bench.detect import analyse, collect, score_table, split_prompts
from memattn.detection.baselines import NoiseDifference, bright_ending, end_token_map, step1_features
from memattn.detection.combined import CombinedDetector
from memattn.detection.metrics import tpr_at_fpr
from memattn.errors import MemattnError, RecordError

PROMPTS = ["an old red barn in a snowy field at dusk", "a cat"]


def _run(pipe, steps=3, guidance=7.5, **trace_kwargs):
    with memattn.trace(pipe, **trace_kwargs) as tr, NoiseDifference(pipe, keep="full") as noise:
        pipe(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators([0, 1]),
            output_type="latent",
        )
    return tr.record, noise


def test_wen_norm_is_the_cfg_difference_of_the_unet_output(sd1_pipe):
    captured = []
    handle = sd1_pipe.unet.register_forward_hook(lambda m, a, o: captured.append(o[0].detach().clone()))
    try:
        record, noise = _run(sd1_pipe)
    finally:
        handle.remove()
    assert len(noise.norms) == len(captured) == 3
    for step, output in enumerate(captured):
        uncond, cond = output.chunk(2)
        expected = torch.linalg.vector_norm((cond - uncond).flatten(1), dim=1)
        torch.testing.assert_close(noise.norms[step], expected)
        torch.testing.assert_close(noise.differences[step], cond - uncond)
    np.testing.assert_allclose(noise.wen(2), torch.stack(noise.norms[:2]).mean(0).numpy(), rtol=1e-6)
    with pytest.raises(MemattnError, match="needs 4 recorded UNet calls"):
        noise.wen(4)
    with pytest.raises(MemattnError, match="classifier-free guidance"):
        _run(sd1_pipe, guidance=1.0)


def test_bright_ending_is_the_masked_norm_over_the_mean_mask(sd1_pipe):
    record, noise = _run(sd1_pipe, map_steps=[2], map_layers=[0, 1])
    mask = end_token_map(record)
    assert mask.shape == (2, *record.map_sizes[0])
    for image, layout in enumerate(record.layouts):  # by hand from the stored maps
        by_hand = torch.stack(
            [record.maps[(2, layer)][image, :, :, layout.eos_index].mean(0) for layer in (0, 1)]
        ).mean(0)
        torch.testing.assert_close(mask[image].flatten(), by_hand)
    value = bright_ending(record, noise)
    latent = noise.differences[0].shape[-2:]
    m = torch.nn.functional.interpolate(mask[:, None], size=latent, mode="bilinear")[:, 0]
    expected = torch.stack(
        [(d * m[:, None]).flatten(1).norm(dim=1) / m.flatten(1).mean(1) for d in noise.differences]
    ).mean(0)
    np.testing.assert_allclose(value, expected.numpy(), rtol=1e-5)
    bare, _ = _run(sd1_pipe)
    with pytest.raises(RecordError, match="map_steps"):
        end_token_map(bare)


def test_step1_features_name_every_layer_and_the_shares(sd1_pipe):
    record, noise = _run(sd1_pipe)
    x, names = step1_features(record, noise.wen(1))
    assert x.shape == (2, 16 + 3) and names[:2] == ["e_layer0", "e_layer1"] and names[-1] == "wen_step1"
    np.testing.assert_allclose(x[:, 3], memattn.score_e(record, 3).numpy(), rtol=1e-6)
    mean = memattn.detection.scores.mean_attention(record)[0]
    np.testing.assert_allclose(x[:, names.index("bos_share")], mean[:, 0].numpy(), rtol=1e-6)


def test_combined_detector_fits_saves_as_json_and_scores_like_sklearn(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(40), np.zeros(40)].astype(int)
    x = rng.normal(size=(80, 3)) + labels[:, None] * np.array([1.0, 0.0, -0.5])
    detector = CombinedDetector.fit(x, labels, ["a", "b", "c"], model="m")
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, labels)
    np.testing.assert_allclose(detector.score(x, ["a", "b", "c"]), reference.decision_function(x), rtol=1e-6)
    loaded = CombinedDetector.load(detector.save(tmp_path / "d.json"))
    assert loaded == detector and json.loads((tmp_path / "d.json").read_text())["model"] == "m"
    with pytest.raises(MemattnError, match="refit it"):
        loaded.score(x, ["a", "c", "b"])
    (tmp_path / "bad.json").write_bytes(b"\x80not json")
    with pytest.raises(MemattnError, match="not a memattn detector file"):
        CombinedDetector.load(tmp_path / "bad.json")
    with pytest.raises(MemattnError, match="memorized and non-memorized"):
        CombinedDetector.fit(x, np.ones(80), ["a", "b", "c"])


def test_score_table_matches_sklearn_and_splits_are_stratified():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(30), np.zeros(70)].astype(int)
    values = rng.normal(size=100) + labels
    (row,) = score_table({"s": values}, labels, n_boot=200)
    assert row["auc"] == pytest.approx(roc_auc_score(labels, values))
    assert row["tpr@1%fpr_nearest"] == tpr_at_fpr(labels, values, 0.01)
    fpr, tpr, _ = roc_curve(labels, values)
    assert row["tpr@5%fpr_interp"] == pytest.approx(np.interp(0.05, fpr, tpr))
    low, high = row["auc_ci95"]
    assert low < row["auc"] < high
    calibration = split_prompts(labels, seed=3)
    assert calibration[labels == 1].sum() == 15 and calibration[labels == 0].sum() == 35
    assert np.array_equal(calibration, split_prompts(labels, seed=3))


def test_collect_and_analyse_on_a_tiny_pipeline(sd1_pipe):
    prompts = [f"a photo of a {w}" for w in ("dog", "cat", "barn", "tree", "boat", "lamp", "road", "cup")]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    collected = collect(sd1_pipe, prompts, labels, seeds=2, steps=3, batch_size=5, progress=False)
    assert len(collected.rows) == 16 and collected.features.shape[0] == 16
    assert {row["seed"] for row in collected.rows if row["prompt_index"] == 1} == {1, 100_001}
    assert {row["seed"] for row in collected.rows if row["prompt_index"] == 5} == {1, 100_001}  # own file
    table, detector = analyse(collected, labels, steps=3, model="tiny")
    by_name = {row["score"]: row for row in table}
    assert {"score_d", "score_e", "wen_step1", "bright_ending", "combined", "e_layer15"} <= set(by_name)
    assert by_name["score_d"]["unet_calls_per_image"] == 3 and by_name["score_e"]["unet_calls_per_image"] == 1
    assert detector.model == "tiny" and detector.n_train == 8
    with pytest.raises(MemattnError, match="no unconditional branch"):
        collect(sd1_pipe, prompts, labels, guidance_scale=1.0)
    with pytest.raises(MemattnError, match="is empty"):
        collect(sd1_pipe, ["", "a"], [1, 0])


@pytest.mark.slow
def test_bench_detect_cli_on_the_testbed(tmp_path):
    run = [sys.executable, "-m", "memattn", "bench", "detect", "--out", str(tmp_path)]
    done = subprocess.run(
        [*run, "--seeds", "1", "--steps", "3", "--guidance", "2", "--per-group", "4"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "detect_bench.csv",
        "detect_bench.json",
        "detect_rows.jsonl",
        "roc.png",
        "memattn_detector.json",
    ):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "detect_bench.json").read_text())
    # testbed v2: 4 of its 128x items; 4 x (seen once, rare word, never seen)
    assert summary["memorized"] == 4 and summary["prompts"] == 16
    by_group = summary["by_negative_group"]
    assert set(by_group) <= {"seen_once", "rare_word_seen_once", "never_seen"} and by_group
    for table in by_group.values():
        assert {"score_d", "score_e", "wen_step1", "minus_bos_share", "combined"} <= set(table)
        assert all(0 <= entry["auc"] <= 1 for entry in table.values())
    bad = subprocess.run(
        [*run, "--model", str(tmp_path)], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert bad.returncode == 2 and "--memorized FILE and --clean FILE" in bad.stderr
