"""Scores: parity with an independent numpy implementation of METHOD.md, edge cases, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generators

import memattn
from memattn.attention.record import AttentionRecord
from memattn.attention.tokens import TokenLayout
from memattn.detection.scores import entropy, last_steps, layer_entropy_curves, token_mass
from memattn.errors import RecordError

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a dog", "hello " * 90]


@pytest.fixture(scope="module")
def sd1_record(sd1_pipe):
    """A real 10-step record: the last fifth is steps 8 and 9."""
    with memattn.trace(sd1_pipe) as tr:
        sd1_pipe(PROMPTS, num_inference_steps=10, generator=generators([0, 1, 2]), output_type="latent")
    return tr.record


def numpy_scores(attention: np.ndarray, lengths: list[int], e_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """METHOD.md §4/§6 written out independently: float64, explicit loops over the summary positions."""
    steps = attention.shape[0]
    per_layer = np.nanmean(attention.astype(np.float64), axis=3)  # [step, layer, image, token]

    def ent(dist: np.ndarray, start: int = 0) -> float:
        total = 0.0
        for value in dist[start:]:
            if value > 0:
                total -= value * np.log(value)
        return total

    count = max(1, int(steps * 0.2 + 0.5))
    late = range(steps - count, steps)
    d_scores, e_scores = [], []
    for image, length in enumerate(lengths):
        mean = per_layer[:, :, image].mean(axis=1)  # [step, token], all layers
        entropy_late = np.mean([ent(mean[t]) for t in late])
        summary_late = np.mean([ent(mean[t], length - 1) for t in late])
        d_scores.append(entropy_late + summary_late - ent(mean[0], length - 1))
        e_scores.append(ent(per_layer[0, e_layer, image]))
    return np.array(d_scores), np.array(e_scores)


def test_d_and_e_match_an_independent_numpy_implementation(sd1_record):
    lengths = [layout.n_tokens for layout in sd1_record.layouts]
    assert lengths == [12, 4, 77]
    d_ref, e_ref = numpy_scores(sd1_record.attention.numpy(), lengths, e_layer=3)
    np.testing.assert_allclose(memattn.score_d(sd1_record).numpy(), d_ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(memattn.score_e(sd1_record).numpy(), e_ref, atol=1e-6, rtol=0)


def test_e_layer_by_name_index_and_default_agree(sd1_record):
    by_default = memattn.score_e(sd1_record)
    by_index = memattn.score_e(sd1_record, 3)
    by_name = memattn.score_e(sd1_record, "down_blocks.1.attentions.1.transformer_blocks.0.attn2.processor")
    short = memattn.score_e(sd1_record, "down_blocks.1.attentions.1")
    assert (
        torch.equal(by_default, by_index) and torch.equal(by_index, by_name) and torch.equal(by_name, short)
    )
    assert not torch.equal(by_default, memattn.score_e(sd1_record, 0))


def test_unknown_layer_and_too_few_steps_are_clear_errors(sd1_record):
    with pytest.raises(
        RecordError, match="is not a cross-attention layer of this model; the layers are 0: down"
    ):
        memattn.score_e(sd1_record, "down_blocks.7.attentions.0")
    with pytest.raises(RecordError, match="ambiguous"):
        memattn.score_e(sd1_record, "down_blocks.1")
    with pytest.raises(RecordError, match="out of range"):
        memattn.score_e(sd1_record, 16)
    one_step = AttentionRecord(
        attention=sd1_record.attention[:1],
        layer_names=sd1_record.layer_names,
        heads=sd1_record.heads,
        timesteps=sd1_record.timesteps[:1],
        layouts=sd1_record.layouts,
    )
    with pytest.raises(RecordError, match="needs ≥ 2 steps"):
        memattn.score_d(one_step)
    assert torch.isfinite(memattn.score_e(one_step)).all()


def test_truncated_prompt_has_only_the_eos_as_summary_and_no_nan(sd1_record):
    layout = sd1_record.layouts[2]
    assert layout.truncated and layout.eos_index == 76 and len(layout.padding_span) == 0
    summary = memattn.summary_entropy_curve(sd1_record)[:, 2]
    p = memattn.detection.scores.mean_attention(sd1_record)[:, 2, 76]
    torch.testing.assert_close(summary, -p * torch.log(p))
    assert torch.isfinite(memattn.score_d(sd1_record)).all()


def test_entropy_is_safe_on_zeros_and_fp16():
    one_hot = torch.zeros(77, dtype=torch.float16)
    one_hot[0] = 1
    assert float(entropy(one_hot)) == 0.0
    uniform = torch.full((77,), 1 / 77)
    assert abs(float(entropy(uniform)) - np.log(77)) < 1e-5
    masked = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert entropy(masked).dtype == torch.float32 and abs(float(entropy(masked)) - np.log(2)) < 1e-6


def test_last_fifth_of_the_steps():
    assert last_steps(50) == range(40, 50)
    assert last_steps(25) == range(20, 25)
    assert last_steps(2) == range(1, 2)
    assert last_steps(3) == range(2, 3)


def synthetic_record(hot_token: int, steps: int = 3) -> AttentionRecord:
    """One image, 2 layers × 2 heads; BOS holds 60 %, one prompt token 30 %, the rest spread."""
    attention = torch.full((steps, 2, 1, 2, 77), 0.1 / 75)
    attention[..., 0] = 0.6
    attention[..., hot_token] = 0.3
    layout = TokenLayout(
        eos_index=5,
        tokens=("<|startoftext|>", "a</w>", "red</w>", "cube</w>", "now</w>") + ("<|endoftext|>",) * 72,
    )
    return AttentionRecord(attention, ("a.attn2", "b.attn2"), (2, 2), torch.arange(steps).float(), (layout,))


def test_trigger_tokens_skip_bos_and_summary_tokens():
    triggers = memattn.trigger_tokens(synthetic_record(hot_token=3), k=2)[0]
    assert triggers[0].token == "cube" and triggers[0].position == 3
    assert abs(triggers[0].share - 0.3) < 1e-6
    assert all(t.position in range(1, 5) for t in triggers)
    # Mass on a summary token (position 9) is not a trigger token.
    assert all(t.position != 9 for t in memattn.trigger_tokens(synthetic_record(hot_token=9), k=4)[0])
    assert token_mass(synthetic_record(hot_token=3))[0, 3] > 0.29
    assert memattn.trigger_tokens(synthetic_record(hot_token=3), k=0) == [[]]
    for bad in (-1, 1.5, True):
        with pytest.raises(memattn.MemattnError, match="k must be a non-negative integer"):
            memattn.trigger_tokens(synthetic_record(hot_token=3), k=bad)


def test_summary_term_of_d_sees_summary_attention():
    # Moving attention from a prompt token (3) to a summary token (9) raises the summary entropy term.
    prompt_hot, summary_hot = synthetic_record(3), synthetic_record(9)
    assert float(memattn.summary_entropy_curve(summary_hot)[0, 0]) > float(
        memattn.summary_entropy_curve(prompt_hot)[0, 0]
    )


def test_unequal_heads_are_averaged_per_layer(sd2_pipe):
    with memattn.trace(sd2_pipe) as tr:
        sd2_pipe(["a dog"], num_inference_steps=3, generator=generators([0]), output_type="latent")
    record = tr.record
    curves = layer_entropy_curves(record)
    assert curves.shape == (3, 16, 1) and torch.isfinite(curves).all()
    manual = torch.stack([record.attention[:, i, :, :h].mean(dim=2) for i, h in enumerate(record.heads)], 1)
    torch.testing.assert_close(record.head_mean(), manual)
    assert torch.isfinite(memattn.score_d(record)).all()
