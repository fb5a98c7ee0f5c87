"""The one step-1 scorer: detect, Guard, calibrate's scoring and a full run's first step agree."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generators

from memattn.attention.trace import trace
from memattn.detection.baselines import NoiseDifference
from memattn.detection.detect import detect
from memattn.detection.step1 import Step1, score_step1
from memattn.errors import MemattnError
from memattn.mitigation.guard import Guard

PROMPTS = ["a dog", "an old red barn in a snowy field at dusk", "a cat"]
SEEDS = [3, 4, 5]
STEPS = 4


def test_one_unet_call_and_every_caller_reads_the_same_scores(sd1_pipe):
    calls = []
    handle = sd1_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        step1 = score_step1(sd1_pipe, PROMPTS, seeds=SEEDS, steps=STEPS, guidance_scale=7.5)
    finally:
        handle.remove()
    assert calls == [1] and step1.record.n_steps == 1 and step1.wen.shape == (3,)
    e = step1.e()
    # detect --scores e (seed = base + index), the guard's scorer, and the first step of a full run
    detected = [
        r.score_e for r in detect(sd1_pipe, PROMPTS, which=("e",), steps=STEPS, seed=3, progress=False)
    ]
    guard_e = Guard(sd1_pipe, threshold=0.0).score_prompts(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=generators(SEEDS)
    )
    guard_wen = Guard(sd1_pipe, threshold=0.0, score="wen").score_prompts(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=generators(SEEDS)
    )
    with trace(sd1_pipe) as tr, NoiseDifference(sd1_pipe, max_calls=1) as noise:
        sd1_pipe(PROMPTS, num_inference_steps=STEPS, generator=generators(SEEDS), output_type="latent")
    full = Step1(tr.record, noise.wen(1))
    np.testing.assert_allclose(detected, e, rtol=0, atol=1e-6)
    np.testing.assert_allclose(guard_e, e, rtol=0, atol=1e-6)
    np.testing.assert_allclose(full.e(), e, rtol=0, atol=1e-6)
    np.testing.assert_allclose(guard_wen, step1.wen, rtol=1e-6)
    np.testing.assert_allclose(full.wen, step1.wen, rtol=1e-6)
    features, names = step1.features()
    np.testing.assert_allclose(features, full.features()[0], rtol=0, atol=1e-6)
    assert names[-1] == "wen_step1" and features.shape == (3, len(names))
    assert len(set(np.round(e, 6))) == 3  # three prompts, three scores: not a constant


def test_wen_without_guidance_and_unknown_kinds_are_one_clear_error(sd1_pipe):
    step1 = score_step1(sd1_pipe, PROMPTS[:1], seeds=[0], steps=STEPS, guidance_scale=1.0)
    assert step1.wen is None and np.isfinite(step1.score("e")).all()
    with pytest.raises(MemattnError, match="needs classifier-free guidance"):
        step1.score("wen")
    with pytest.raises(MemattnError, match="choose from e, wen"):
        step1.score("d")
    with pytest.raises(MemattnError, match="one per prompt"):
        score_step1(sd1_pipe, PROMPTS, steps=STEPS, guidance_scale=7.5)
    with pytest.raises(MemattnError, match="2 generators for 3 prompts"):
        score_step1(sd1_pipe, PROMPTS, generators=generators([0, 1]), steps=STEPS, guidance_scale=7.5)


def test_a_non_finite_score_is_refused(sd1_pipe):
    step1 = score_step1(sd1_pipe, PROMPTS[:2], seeds=[0, 1], steps=STEPS, guidance_scale=7.5)
    step1.wen = np.array([1.0, np.nan])
    with pytest.raises(MemattnError, match="NaN or infinite"):
        step1.score("wen")
    kept = step1.score("wen", finite=False)  # a scan records it (a NaN is never above a threshold)
    assert np.isnan(kept[1]) and not (kept > 0.5)[1]
