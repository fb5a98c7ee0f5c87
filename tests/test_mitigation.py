"""The paper's inference-time mitigation, batch-correct: logit edits, windows, nesting with trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import generators

import memattn
from memattn.attention.edit import AttentionEdit
from memattn.attention.tokens import TokenLayout
from memattn.errors import LayoutError, MemattnError

PROMPTS = ["a dog", "an old red barn in a snowy field at dusk", "portrait of a woman"]


def generate(pipe, prompts, seeds, *, steps=3, guidance=7.5, per_prompt=1, **kwargs):
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=per_prompt,
        generator=generators(seeds),
        output_type="np",
        **kwargs,
    ).images


def padding_mass(record) -> torch.Tensor:
    """``[step, layer, image]`` attention mass on the tokens after each image's first EOS."""
    mean = record.head_mean()
    return torch.stack(
        [mean[:, :, i, layout.eos_index + 1 :].sum(-1) for i, layout in enumerate(record.layouts)], dim=-1
    )


# ---- the edit itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0, -1.0, float("nan"), float("inf")])
def test_bad_c_is_a_clear_error(c):
    with pytest.raises(MemattnError, match="C must be a finite number > 0"):
        AttentionEdit(c=c)


def _logits(edit, q, k, cond_rows, layouts, rows_mask=None):
    """The logits the attention kernel sees under the edit: q·k'/√d + bias."""
    key, bias = edit.apply(k, cond_rows, layouts, rows_mask)
    logits = q @ key.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return logits if bias is None else logits + bias


def test_edit_masks_each_rows_padding_and_scales_its_bos_logit():
    torch.manual_seed(0)
    q, k = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 77, 8)
    layouts = [TokenLayout(eos_index=3), TokenLayout(eos_index=6)]
    plain = q @ k.transpose(-1, -2) / math.sqrt(8)
    edit = AttentionEdit(c=1.5)
    key, bias = edit.apply(k, slice(2, 4), layouts)
    assert bias.shape == (4, 1, 1, 77)  # broadcast over heads and queries: no per-query tensor
    logits = _logits(edit, q, k, slice(2, 4), layouts)
    assert logits.shape == (4, 2, 5, 77)
    torch.testing.assert_close(logits[:2], plain[:2])  # unconditional rows untouched by default
    for row, layout in zip((2, 3), layouts, strict=True):
        assert torch.isinf(logits[row, ..., layout.eos_index + 1 :]).all()
        assert torch.isfinite(logits[row, ..., : layout.eos_index + 1]).all()  # EOS stays visible
        torch.testing.assert_close(logits[row, ..., 0], 1.5 * plain[row, ..., 0])
        torch.testing.assert_close(
            logits[row, ..., 1 : layout.eos_index + 1], plain[row, ..., 1 : layout.eos_index + 1]
        )
    with_eos = _logits(AttentionEdit(c=1.0, mask_eos=True), q, k, slice(2, 4), layouts)
    assert torch.isinf(with_eos[2, ..., 3]).all()
    torch.testing.assert_close(with_eos[2, ..., 0], plain[2, ..., 0])
    uncond = _logits(AttentionEdit(mask_uncond=True), q, k, slice(2, 4), layouts)
    assert torch.isinf(uncond[0, ..., 4:]).all() and torch.isinf(uncond[1, ..., 7:]).all()
    only_second = _logits(edit, q, k, slice(2, 4), layouts, rows_mask=torch.tensor([False, True]))
    torch.testing.assert_close(only_second[2], plain[2])
    assert torch.isinf(only_second[3, ..., 7:]).all()
    torch.testing.assert_close(only_second[3, ..., 0], 1.5 * plain[3, ..., 0])
    bos_only_key, no_bias = AttentionEdit(c=2.0, mask_padding=False).apply(k, slice(2, 4), layouts)
    assert no_bias is None and torch.equal(bos_only_key[:2], k[:2])


def test_edit_validation():
    with pytest.raises(MemattnError, match="also set mask_padding"):
        AttentionEdit(mask_padding=False, mask_eos=True)
    with pytest.raises(MemattnError, match="valid steps are 0..2"):
        AttentionEdit(at_steps=(1, 5)).check_schedule(3)
    with pytest.raises(LayoutError, match="token layout"):
        AttentionEdit().apply(torch.zeros(1, 1, 77, 4), slice(0, 1), None)


# ---- on a pipeline ------------------------------------------------------------------------------


def test_mitigated_run_masks_padding_restores_processors_and_changes_images(sd1_pipe):
    before = dict(sd1_pipe.unet.attn_processors)
    plain = generate(sd1_pipe, PROMPTS, [1, 2, 3])
    with memattn.mitigate(sd1_pipe, c=1.25):
        with memattn.trace(sd1_pipe) as tr:
            mitigated = generate(sd1_pipe, PROMPTS, [1, 2, 3])
    assert dict(sd1_pipe.unet.attn_processors) == before
    assert padding_mass(tr.record).max() == 0.0
    assert np.abs(mitigated - plain).max() > 1e-3
    assert np.array_equal(generate(sd1_pipe, PROMPTS, [1, 2, 3]), plain)  # nothing left behind
    # Same result with the trace outside: the edit attaches to the trace's probes.
    with memattn.trace(sd1_pipe) as outer:
        with memattn.mitigate(sd1_pipe, c=1.25):
            inside = generate(sd1_pipe, PROMPTS, [1, 2, 3])
        after = generate(sd1_pipe, PROMPTS, [1, 2, 3])
    assert np.array_equal(inside, mitigated) and np.array_equal(after, plain)
    assert padding_mass(outer.records[0]).max() == 0.0 and padding_mass(outer.records[1]).min() > 0.0
    assert dict(sd1_pipe.unet.attn_processors) == before


def test_a_no_op_edit_is_bit_identical(sd1_pipe):
    plain = generate(sd1_pipe, PROMPTS, [4, 5, 6])
    with memattn.mitigate(sd1_pipe, c=1.0, mask_padding=False):
        assert np.array_equal(generate(sd1_pipe, PROMPTS, [4, 5, 6]), plain)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_each_image_matches_its_prompt_mitigated_alone(sd1_pipe, guidance):
    """Different prompt lengths x 2 images each, with and without CFG: the official code's [1::2] bug."""
    seeds = [10, 11, 12, 13, 14, 15]
    with memattn.mitigate(sd1_pipe, c=1.5, mask_uncond=True):
        batch = generate(sd1_pipe, PROMPTS, seeds, guidance=guidance, per_prompt=2)
        for image, seed in enumerate(seeds):
            alone = generate(sd1_pipe, [PROMPTS[image // 2]], [seed], guidance=guidance)
            np.testing.assert_allclose(batch[image], alone[0], atol=1e-5, rtol=0)


def test_bos_scaling_moves_attention_the_way_the_logit_sign_says(sd1_pipe):
    with memattn.trace(sd1_pipe) as tr:
        generate(sd1_pipe, PROMPTS[:1], [0], steps=1)
        with memattn.mitigate(sd1_pipe, c=2.0, mask_padding=False):
            generate(sd1_pipe, PROMPTS[:1], [0], steps=1)
    plain, scaled = (r.head_mean()[0, :, 0, 0] for r in tr.records)  # BOS share per layer
    assert not torch.equal(plain, scaled)
    # BOS x C with C > 1 raises BOS where its logit is mostly positive and lowers it where negative;
    # either way every layer's BOS share moves.
    assert ((scaled - plain).abs() > 1e-6).all()


def test_step_and_layer_windows(sd1_pipe):
    with memattn.trace(sd1_pipe) as tr:
        with memattn.mitigate(
            sd1_pipe, at_steps=[0], layers=[3, "mid_block.attentions.0.transformer_blocks.0.attn2"]
        ):
            generate(sd1_pipe, PROMPTS[:2], [0, 1], steps=3)
    mass = padding_mass(tr.record)  # [step, layer, image]
    edited = [3, 6]
    assert (mass[0, edited] == 0).all()
    assert (mass[0, [i for i in range(16) if i not in edited]] > 0).all()
    assert (mass[1:] > 0).all()
    with pytest.raises(MemattnError, match="valid steps are 0..2"):
        with memattn.mitigate(sd1_pipe, at_steps=range(2, 6)):
            generate(sd1_pipe, PROMPTS[:1], [0], steps=3)
    with pytest.raises(MemattnError, match="is not a cross-attention layer of this model"):
        memattn.mitigate(sd1_pipe, layers=["nope"])


def test_a_layer_means_the_same_in_mitigate_trace_and_scores(sd1_pipe):
    """Index, negative index, full name, ``.processor`` name and block name: one resolver for all."""
    from memattn.attention.layers import parse_layer
    from memattn.mitigation.cross_attention import Mitigation

    with memattn.trace(sd1_pipe) as tr:
        generate(sd1_pipe, PROMPTS[:1], [0], steps=1)
    record = tr.record
    name = record.layer_names[3]
    block = name.removesuffix(".transformer_blocks.0.attn2")
    forms = [3, 3 - record.n_layers, name, name + ".processor", block, parse_layer(" 3 "), parse_layer("-13")]
    for form in forms:
        assert Mitigation(sd1_pipe, AttentionEdit(c=1.25), layers=[form]).edit.layers == (3,), form
        assert record.layer_index(form) == 3, form
        assert torch.equal(memattn.score_e(record, form), memattn.score_e(record, 3)), form
    with memattn.trace(sd1_pipe, map_layers=[block, -1], map_steps=[0]) as tr:
        generate(sd1_pipe, PROMPTS[:1], [0], steps=1)
    assert {layer for _, layer in tr.record.maps} == {3, record.n_layers - 1}
    for bad in ("down_blocks.1", 16, True):
        with pytest.raises(MemattnError):
            memattn.mitigate(sd1_pipe, layers=[bad])
        with pytest.raises(MemattnError):
            record.layer_index(bad)


def test_prompt_embeds_need_lengths(sd1_pipe):
    embeds, negative = sd1_pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True)
    with pytest.raises(LayoutError, match="lengths="):
        with memattn.mitigate(sd1_pipe):
            generate(sd1_pipe, None, [0, 1], prompt_embeds=embeds, negative_prompt_embeds=negative)
    layouts = memattn.attention.tokens.tokenize_layouts(sd1_pipe.tokenizer, PROMPTS[:2])
    lengths = [layout.n_tokens for layout in layouts]
    with memattn.mitigate(sd1_pipe, lengths=lengths):
        from_embeds = generate(sd1_pipe, None, [0, 1], prompt_embeds=embeds, negative_prompt_embeds=negative)
        from_prompts = generate(sd1_pipe, PROMPTS[:2], [0, 1])
    np.testing.assert_allclose(from_embeds, from_prompts, atol=1e-6, rtol=0)


def test_nested_mitigations_are_refused_and_exceptions_restore(sd1_pipe):
    before = dict(sd1_pipe.unet.attn_processors)
    with memattn.mitigate(sd1_pipe):
        with pytest.raises(MemattnError, match="already mitigated"):
            with memattn.mitigate(sd1_pipe, c=2.0):
                pass
    with pytest.raises(KeyboardInterrupt):
        with memattn.mitigate(sd1_pipe):
            raise KeyboardInterrupt
    assert dict(sd1_pipe.unet.attn_processors) == before


def test_works_on_sd2_and_sdxl(sd2_pipe, sdxl_pipe):
    for pipe in (sd2_pipe, sdxl_pipe):
        with memattn.trace(pipe) as tr, memattn.mitigate(pipe):
            generate(pipe, PROMPTS[:2], [0, 1], steps=2)
        assert padding_mass(tr.record).max() == 0.0
