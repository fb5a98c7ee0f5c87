"""The mitigation methods behind ``--method``: Kim & No's padding fixes, Wen's embedding optimisation,
Jain's guidance schedules and the ``memattn.mitigation.registry`` registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generators

import memattn
from memattn.attention.tokens import tokenize_layouts
from memattn.errors import MemattnError
from memattn.mitigation.embedding_opt import embedding_optimization
from memattn.mitigation.guidance import guidance_schedule
from memattn.mitigation.prompt import padding_masking, padding_replacement
from memattn.mitigation.registry import DEFAULT_STRENGTH, prepare

PROMPTS = ["an old red barn in a snowy field at dusk", "a cat"]


def _encode(pipe, per_prompt=1):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, "cpu", per_prompt, True)


def _generate(pipe, steps=3, guidance=7.5, prompts=PROMPTS):
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators(list(range(len(prompts)))),
        output_type="np",
    ).images


def test_padding_replacement_pads_with_bang_and_zeroes_eot(sd1_pipe):
    cond, uncond = _encode(sd1_pipe)
    with padding_replacement(sd1_pipe):
        new_cond, new_uncond = _encode(sd1_pipe)
    assert "encode_prompt" not in vars(sd1_pipe)
    assert torch.equal(new_uncond, uncond)
    tokenizer = sd1_pipe.tokenizer
    for row, layout in enumerate(tokenize_layouts(tokenizer, PROMPTS)):
        eos = layout.eos_index
        assert torch.all(new_cond[row, eos] == 0)
        # BOS and the prompt words see only earlier tokens (causal encoder): unchanged
        torch.testing.assert_close(new_cond[row, :eos], cond[row, :eos])
        ids = tokenizer(PROMPTS[row], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids[0, eos + 1 :] = tokenizer.convert_tokens_to_ids("!")
        with torch.no_grad():
            expected = sd1_pipe.text_encoder(ids)[0][0]
        torch.testing.assert_close(new_cond[row, eos + 1 :], expected[eos + 1 :])
        assert not torch.allclose(new_cond[row, eos + 1 :], cond[row, eos + 1 :])


def test_padding_masking_zeroes_the_share_of_padding_per_image(sd1_pipe):
    cond, _ = _encode(sd1_pipe, per_prompt=2)
    with padding_masking(sd1_pipe, 0.7, seed=1):
        masked, _ = _encode(sd1_pipe, per_prompt=2)
    for row, layout in enumerate(tokenize_layouts(sd1_pipe.tokenizer, PROMPTS)):
        for image in (2 * row, 2 * row + 1):
            zero = (masked[image] == 0).all(dim=-1)
            n_pad = 77 - layout.eos_index - 1
            assert int(zero.sum()) == round(0.7 * n_pad)
            assert not zero[: layout.eos_index + 1].any()
            kept = ~zero
            torch.testing.assert_close(masked[image, kept], cond[image, kept])
        assert torch.equal(masked[2 * row], masked[2 * row + 1])
    with pytest.raises(MemattnError, match=r"in \[0, 1\]"):
        padding_masking(sd1_pipe, 1.5)


def test_wen_optimisation_lowers_the_noise_norm_and_hides_its_calls(sd1_pipe):
    plain = _generate(sd1_pipe)
    with embedding_optimization(sd1_pipe, target_loss=float("inf")) as log:
        untouched = _generate(sd1_pipe)
    assert np.array_equal(plain, untouched) and log.iterations == [[0, 0]]
    with embedding_optimization(sd1_pipe, target_loss=0.0, lr=0.05, iterations=3) as log:
        with memattn.trace(sd1_pipe) as tr:
            optimised = _generate(sd1_pipe)
    assert tr.record.n_steps == 3  # the optimisation's UNet calls are not recorded as steps
    assert log.iterations == [[3, 3]]
    assert all(f < i for f, i in zip(log.final[0], log.initial[0], strict=True))
    assert not np.allclose(plain, optimised)
    assert "encode_prompt" not in vars(sd1_pipe) and not sd1_pipe.unet._forward_pre_hooks
    with pytest.raises(MemattnError, match="classifier-free guidance"):
        with embedding_optimization(sd1_pipe):
            _generate(sd1_pipe, guidance=1.0)


def test_wen_optimisation_stops_each_image_at_the_target(sd1_pipe):
    with embedding_optimization(sd1_pipe, target_loss=0.0, iterations=1) as probe_log:
        _generate(sd1_pipe, steps=1)
    first, second = probe_log.initial[0]
    target = (first + second) / 2  # one image starts below the target, the other above it
    with embedding_optimization(sd1_pipe, target_loss=target, iterations=4) as log:
        _generate(sd1_pipe, steps=1)
    below = 0 if first < second else 1
    assert log.iterations[0][below] == 0 and log.iterations[0][1 - below] > 0


def test_guidance_schedule_matches_the_plain_and_unconditional_runs(sd1_pipe):
    plain = _generate(sd1_pipe)
    with guidance_schedule(sd1_pipe, scale=-2.0, first_steps=0):
        assert np.array_equal(_generate(sd1_pipe), plain)
    with guidance_schedule(sd1_pipe, scale=7.5, first_steps=3):
        np.testing.assert_allclose(_generate(sd1_pipe), plain, atol=1e-5)
    with guidance_schedule(sd1_pipe, scale=0.0, first_steps=3):
        unconditional = _generate(sd1_pipe)
    empty = _generate(sd1_pipe, guidance=1.0, prompts=["", ""])
    np.testing.assert_allclose(unconditional, empty, atol=1e-5)
    with guidance_schedule(sd1_pipe, scale=-2.0, first_steps=1):
        opposite = _generate(sd1_pipe)
    assert not np.allclose(opposite, plain) and not sd1_pipe.unet._forward_hooks


def test_prepare_knows_every_method_and_rejects_bad_strengths(sd1_pipe):
    for method in DEFAULT_STRENGTH:
        prepared = prepare(sd1_pipe, method, PROMPTS, steps=3)
        with prepared.context:
            images = _generate(sd1_pipe, prompts=prepared.prompts)
        assert np.isfinite(images).all(), method
        if method in ("rta", "rna"):
            assert prepared.prompts != PROMPTS
    with pytest.raises(MemattnError, match="unknown mitigation method 'nope'"):
        prepare(sd1_pipe, "nope", PROMPTS)
    with pytest.raises(MemattnError, match="number of inserted items"):
        prepare(sd1_pipe, "rta", PROMPTS, 2.5)
    with pytest.raises(MemattnError, match=r"in \[0, 1\]"):
        prepare(sd1_pipe, "stp", PROMPTS, 2.0)
    with pytest.raises(MemattnError, match="prompt=, not prompt_embeds"):
        with padding_masking(sd1_pipe):
            embeds, _ = _encode(sd1_pipe)
            sd1_pipe(prompt_embeds=embeds, num_inference_steps=1)


def test_the_registry_owns_each_methods_metadata():
    from memattn.mitigation.registry import METHODS, REGISTRY, get

    assert tuple(REGISTRY) == METHODS and len(METHODS) == 11
    for name, method in REGISTRY.items():
        assert method.name == name and method.summary
        assert (method.default_strength is None) == (method.strength_meaning == ""), name
        assert DEFAULT_STRENGTH[name] == method.default_strength
    assert {n for n, m in REGISTRY.items() if m.needs_cfg} == {"wen", "stp", "opposite-guidance"}
    with pytest.raises(MemattnError, match="stp needs classifier-free guidance"):
        get("stp").check(None, guidance_scale=1.0)
    with pytest.raises(MemattnError, match="pad-replace has no strength"):
        get("pad-replace").check(0.5)
    get("ren2024").check(2.0, guidance_scale=1.0)  # the attention edit needs no unconditional branch


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "stp", "--guidance", "1"], "stp needs classifier-free guidance"),
        (["--method", "pad-replace", "--strength", "0.5"], "pad-replace has no strength"),
        (["--method", "ren2024", "--c", "2", "--strength", "3"], "give --strength only"),
    ],
)
def test_generate_refuses_what_a_method_cannot_run_before_loading_the_model(tmp_path, args, message):
    from typer.testing import CliRunner

    from memattn.cli import app

    out = tmp_path / "images"
    model = tmp_path / "no-model-here"  # never loaded: the refusal comes first
    result = CliRunner().invoke(
        app, ["generate", "a cat", "--model", str(model), "--steps", "2", "--out", str(out), *args]
    )
    assert isinstance(result.exception, MemattnError) and message in str(result.exception), result.output
    assert not out.exists()
