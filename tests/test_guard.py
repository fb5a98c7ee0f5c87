"""The generation guard: step-1 scores, calibrated thresholds, continue/restart, clean images untouched."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generators

import memattn
from memattn.errors import MemattnError
from memattn.loading import load_pipeline
from memattn.mitigation.guard import CALIBRATION_FILE, Calibration, Guard, threshold_at_fpr

PROMPTS = ["a dog", "an old red barn in a snowy field at dusk"]
STEPS = 4


def plain(pipe, prompts=PROMPTS, seeds=(1, 2), **kwargs):
    return pipe(
        prompts, num_inference_steps=STEPS, generator=generators(list(seeds)), output_type="np", **kwargs
    ).images


def guarded(guard, prompts=PROMPTS, seeds=(1, 2), **kwargs):
    return guard(
        prompts, num_inference_steps=STEPS, generator=generators(list(seeds)), output_type="np", **kwargs
    )


def test_threshold_at_fpr_flags_at_most_that_share():
    scores = np.arange(100, dtype=float)
    threshold = threshold_at_fpr(scores, 0.05)
    assert (scores > threshold).sum() == 5
    assert (scores > threshold_at_fpr(scores, 0.0)).sum() == 0
    with pytest.raises(MemattnError, match="--fpr"):
        threshold_at_fpr(scores, 1.5)


def test_no_threshold_is_refused_with_the_calibrate_command(sd1_pipe):
    with pytest.raises(MemattnError, match="memattn calibrate --model"):
        Guard(sd1_pipe)


def test_clean_batch_is_bit_identical_to_the_unguarded_pipeline(sd1_pipe):
    before = dict(sd1_pipe.unet.attn_processors)
    out = guarded(Guard(sd1_pipe, threshold=1e9))
    assert np.array_equal(out.images, plain(sd1_pipe))
    assert [v.flagged for v in out.verdicts] == [False, False]
    assert all(np.isfinite(v.score) and v.trigger_tokens for v in out.verdicts)
    assert dict(sd1_pipe.unet.attn_processors) == before


@pytest.mark.parametrize(("threshold", "mode"), [(-1e9, "continue"), (-1e9, "restart"), (1e9, "continue")])
def test_a_guard_inside_mitigate_leaves_the_outer_mitigation_on(sd1_pipe, threshold, mode):
    """Inside ``mitigate`` every row is already mitigated: the guard reports, adds nothing, and the
    images after it are still mitigated (it used to switch the outer edit off for the rest of the block)."""
    with memattn.mitigate(sd1_pipe):
        reference = plain(sd1_pipe)
        out = guarded(Guard(sd1_pipe, threshold=threshold, mode=mode))
        after = plain(sd1_pipe)
    np.testing.assert_allclose(out.images, reference, atol=1e-6, rtol=0)
    assert np.array_equal(after, reference)
    assert np.abs(reference - plain(sd1_pipe)).max() > 1e-3  # the mitigation changes these images


def test_continue_mode_equals_mitigating_from_step_two(sd1_pipe):
    out = guarded(Guard(sd1_pipe, threshold=-1e9, mode="continue"))
    with memattn.mitigate(sd1_pipe, at_steps=range(1, STEPS)):
        reference = plain(sd1_pipe)
    np.testing.assert_allclose(out.images, reference, atol=1e-6, rtol=0)
    assert all(v.flagged and v.mitigated and v.mode == "continue" for v in out.verdicts)
    assert np.abs(out.images - plain(sd1_pipe)).max() > 1e-3


def test_restart_mode_equals_mitigating_every_step_from_the_same_noise(sd1_pipe):
    out = guarded(Guard(sd1_pipe, threshold=-1e9, mode="restart"))
    with memattn.mitigate(sd1_pipe):
        reference = plain(sd1_pipe)
    np.testing.assert_allclose(out.images, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_only_flagged_images_change(sd1_pipe, mode):
    scores = [v.score for v in guarded(Guard(sd1_pipe, threshold=1e9)).verdicts]
    threshold = float(np.mean(scores))  # flags exactly the higher-scoring prompt
    out = guarded(
        Guard(sd1_pipe, threshold=threshold, mode=mode), num_images_per_prompt=2, seeds=(1, 2, 3, 4)
    )
    unguarded = plain(sd1_pipe, num_images_per_prompt=2, seeds=(1, 2, 3, 4))
    flagged = np.array([v.flagged for v in out.verdicts])
    assert flagged.tolist() == [s > threshold for s in scores for _ in range(2)]
    diff = np.abs(out.images - unguarded).reshape(4, -1).max(axis=1)
    assert (diff[~flagged] <= 1e-5).all() and (diff[flagged] > 1e-3).all()


def test_wen_score_needs_guidance_and_calibration_loads_from_the_model_dir(sd1_pipe, tmp_path):
    with pytest.raises(MemattnError, match="need classifier-free guidance"):
        guarded(Guard(sd1_pipe, threshold=0.0, score="wen"), guidance_scale=1.0)
    out = guarded(Guard(sd1_pipe, threshold=1e9, score="wen"))
    assert all(v.score > 0 for v in out.verdicts)
    sd1_pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path))
    Calibration(score="wen", threshold=-1.0, fpr=0.01, n_clean=10).save(tmp_path / CALIBRATION_FILE)
    guard = Guard(loaded)
    assert (guard.score, guard.threshold) == ("wen", -1.0)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(MemattnError, match="unreadable"):
        Guard(loaded)


def test_a_calibrated_guard_refuses_other_settings_naming_both_values(sd1_pipe, tmp_path):
    """The threshold holds only where it was measured: step count (E is read at the first step's
    timestep), guidance (Wen), scheduler, resolution and dtype are checked on every call."""
    from memattn.mitigation.guard import call_settings

    settings = call_settings(sd1_pipe, {"num_inference_steps": STEPS, "guidance_scale": 7.5})
    side = sd1_pipe.unet.config.sample_size * sd1_pipe.vae_scale_factor
    assert settings == {
        "steps": STEPS,
        "guidance_scale": 7.5,
        "scheduler": type(sd1_pipe.scheduler).__name__,
        "resolution": [side, side],
        "dtype": "float32",
    }
    path = tmp_path / "guard.json"
    Calibration(score="e", threshold=1e9, fpr=0.01, n_clean=100, **settings).save(path)
    guard = Guard(sd1_pipe, calibration=path)
    assert not any(v.flagged for v in guarded(guard).verdicts)  # the calibrated settings: runs
    with pytest.raises(MemattnError, match=f"measured at steps {STEPS}, this run uses 2: run with --steps"):
        guard(PROMPTS, num_inference_steps=2)
    with pytest.raises(MemattnError, match="measured at guidance_scale 7.5, this run uses 3"):
        guarded(guard, guidance_scale=3.0)
    with pytest.raises(MemattnError, match=f"resolution \\[{side}, {side}\\], this run uses \\[{2 * side}"):
        guarded(guard, height=2 * side, width=2 * side)
    Calibration(score="e", threshold=1e9, fpr=0.01, n_clean=100).save(path)
    with pytest.raises(MemattnError, match="does not record its step count"):
        guarded(Guard(sd1_pipe, calibration=path))


def test_bad_settings(sd1_pipe):
    with pytest.raises(MemattnError, match="'continue' or 'restart'"):
        Guard(sd1_pipe, threshold=0.0, mode="later")
    with pytest.raises(MemattnError, match="C must be"):
        Guard(sd1_pipe, threshold=0.0, mitigation={"c": 0})
    with pytest.raises(MemattnError, match="without steps"):
        Guard(sd1_pipe, threshold=0.0, mitigation={"steps": (1,)})
