"""Training-time filters: the threshold rules' math, the entropy keep-mask against a hand computation,
forward counts (entropy: no extra UNet call; noise norm: exactly one), caption augmentation, loss masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import memattn
from memattn.errors import MemattnError
from memattn.testing import clip_tokenizer, sd1_unet
from memattn.training.filters import (
    CaptionAugmenter,
    EntropyFilter,
    NoiseNormFilter,
    ThresholdRule,
    masked_loss,
    per_sample_mse,
)


def keep(rule: ThresholdRule, values, **kwargs) -> list[bool]:
    return rule.decide(torch.tensor(values, dtype=torch.float32), **kwargs).tolist()


def count_forwards(unet: torch.nn.Module) -> list[int]:
    calls = [0]
    unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---- threshold rules ---------------------------------------------------------------------------------


def test_fixed_rule_drops_the_chosen_tail_and_keeps_ineligible_samples():
    high = ThresholdRule("fixed", threshold=2.0, drop="high")
    assert keep(high, [1.0, 2.0, 3.0]) == [True, False, False]
    low = ThresholdRule("fixed", threshold=2.0, drop="low")
    assert keep(low, [1.0, 2.0, 3.0]) == [False, False, True]
    eligible = torch.tensor([True, True, False])
    assert keep(high, [1.0, 2.0, 3.0], eligible=eligible) == [True, False, True]


def test_zscore_per_batch_matches_median_and_mad_by_hand():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 30.0]
    rule = ThresholdRule("zscore", z=3.0, min_samples=5)
    median, mad = 5.0, 2.0  # |x - 5| = 4 3 2 1 0 1 2 3 25 -> median 2
    expected = [(v - median) / (1.4826 * mad) for v in values]
    z = rule.z_scores(torch.tensor(values))
    np.testing.assert_allclose(z, expected, rtol=1e-12)
    assert keep(rule, values) == [True] * 8 + [False]  # only 30 lies beyond +3 robust SDs
    assert keep(ThresholdRule("zscore", z=1.0, drop="low", min_samples=5), values) == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        True,  # (1-5)/2.97 = -1.35, (2-5)/2.97 = -1.01
    ]


def test_zscore_keeps_all_without_statistics():
    assert keep(ThresholdRule("zscore", z=0.1), [1.0] * 10 + [5.0]) == [True] * 11  # MAD 0
    assert keep(ThresholdRule("zscore", z=0.1, min_samples=8), [1.0, 2.0, 100.0]) == [True] * 3


def test_ineligible_samples_are_kept_and_left_out_of_the_statistics():
    rule = ThresholdRule("zscore", z=2.0, min_samples=4)
    values = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 100.0, 100.0, 100.0]
    eligible = torch.tensor([True] * 5 + [False] * 4)
    # Reference = first five: median 3, MAD 1 -> 100 is an outlier; the four ineligible 100s are kept.
    assert keep(rule, values, eligible=eligible) == [True] * 4 + [False] + [True] * 4


def test_running_window_per_timestep_bin_and_its_state():
    rule = ThresholdRule("zscore", z=2.0, window=6, timestep_bins=2, num_train_timesteps=1000, min_samples=4)
    low_t, high_t = torch.tensor([100] * 4), torch.tensor([900] * 4)
    keep(rule, [1.0, 2.0, 3.0, 4.0], timesteps=low_t)
    keep(rule, [10.0, 20.0, 30.0, 40.0], timesteps=high_t)
    assert rule.history == [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]
    # 25 is ordinary among the high-t scores and an outlier among the low-t ones.
    assert keep(rule, [25.0, 25.0], timesteps=torch.tensor([900, 100])) == [True, False]
    assert rule.history[0] == [1.0, 2.0, 3.0, 4.0, 25.0]  # the window holds the current batch too
    keep(rule, [5.0, 6.0], timesteps=torch.tensor([100, 100]))
    assert rule.history[0] == [2.0, 3.0, 4.0, 25.0, 5.0, 6.0]  # the oldest fell out of the window
    clone = ThresholdRule("zscore", z=2.0, window=6, timestep_bins=2, min_samples=4)
    clone.load_state_dict(rule.state_dict())
    probe = torch.tensor([3.0, 50.0, 7.0])
    t = torch.tensor([100, 900, 900])
    assert clone.decide(probe, t).tolist() == rule.decide(probe, t).tolist()
    with pytest.raises(MemattnError, match="timestep bins"):
        ThresholdRule("zscore", timestep_bins=3).load_state_dict(rule.state_dict())


def test_population_sets_the_statistics():
    rule = ThresholdRule("zscore", z=2.0, min_samples=4)
    population = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    assert keep(rule, [12.0, 30.0], population=population) == [True, False]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "fixed"}, "finite threshold"),
        ({"rule": "median"}, "unknown threshold rule"),
        ({"drop": "up"}, "'high' or 'low'"),
        ({"z": 0.0}, "z > 0"),
        ({"window": -1}, "window"),
    ],
)
def test_bad_rules_are_clear_errors(kwargs, message):
    with pytest.raises(MemattnError, match=message):
        ThresholdRule(**kwargs)


# ---- the entropy filter ------------------------------------------------------------------------------


def test_entropy_scores_and_keep_mask_match_a_hand_computation():
    torch.manual_seed(0)
    unet = sd1_unet().train()
    layer = unet.down_blocks[1].attentions[1].transformer_blocks[0].attn2  # record layer 3
    captured: dict[str, torch.Tensor] = {}
    layer.register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(hidden=args[0], context=kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    sample, context = torch.randn(6, 4, 8, 8), torch.randn(6, 77, 32)
    context[3:] *= 6.0  # sharper attention for half the batch: lower entropy
    timesteps = torch.tensor([10, 200, 400, 600, 800, 999])
    with memattn.trace(unet, cfg=False) as tr:
        unet(sample, timesteps, encoder_hidden_states=context).sample.pow(2).mean().backward()
        record = tr.record
    # By hand, layer 3: softmax(QK^T / sqrt(d)) per head, mean over queries, then heads, then entropy.
    with torch.no_grad():
        heads = layer.heads
        q = layer.to_q(captured["hidden"]).double()
        k = layer.to_k(captured["context"]).double()
        q = q.view(6, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(6, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1).mean(dim=2).mean(dim=1)
        by_hand = -(p * p.log()).sum(-1)
    filt = EntropyFilter("fixed", threshold=float(by_hand.median()), drop="high", layers=[3])
    torch.testing.assert_close(filt.scores(record).double(), by_hand, rtol=1e-5, atol=1e-5)
    assert filt.keep_mask(record).tolist() == (by_hand < by_hand.median()).tolist()
    assert by_hand[3:].max() < by_hand[:3].min()
    # All layers: head mean per layer, then layer mean, then entropy (numpy, from the record).
    attention = record.attention[0].double().numpy()  # [layer, image, head, token]
    mean = attention.mean(axis=2).mean(axis=0)
    np.testing.assert_allclose(
        EntropyFilter().scores(record).numpy(), -(mean * np.log(mean)).sum(-1), rtol=1e-5
    )
    per_layer = EntropyFilter().layer_scores(record)
    assert per_layer.shape == (6, 16)
    torch.testing.assert_close(per_layer[:, 3].double(), by_hand, rtol=1e-5, atol=1e-5)


def test_entropy_filter_needs_no_extra_unet_call():
    torch.manual_seed(0)
    unet = sd1_unet().train()
    calls = count_forwards(unet)
    filt = EntropyFilter("zscore", z=1.0, min_samples=4)
    with memattn.trace(unet, cfg=False) as tr:
        for step in range(3):
            tr.reset()
            sample = torch.randn(8, 4, 8, 8)
            prediction = unet(
                sample, torch.randint(0, 1000, (8,)), encoder_hidden_states=torch.randn(8, 77, 32)
            )
            kept = filt.keep_mask(tr.record)
            masked_loss(per_sample_mse(prediction.sample, sample), kept).backward()
            assert calls[0] == step + 1
    assert kept.dtype == torch.bool and kept.shape == (8,)


def test_noise_norm_filter_makes_exactly_one_extra_pass_and_matches_wen():
    torch.manual_seed(0)
    unet = sd1_unet().train()
    calls = count_forwards(unet)
    sample, context, uncond = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32), torch.randn(1, 77, 32)
    t = torch.tensor([1, 300, 600, 900])
    prediction = unet(sample, t, encoder_hidden_states=context).sample
    filt = NoiseNormFilter(unet, "fixed", threshold=0.0)
    norms = filt.scores(sample, t, prediction, uncond)
    assert calls[0] == 2
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=uncond.expand(4, -1, -1)).sample
    torch.testing.assert_close(norms, (prediction - reference).flatten(1).norm(dim=1), rtol=0, atol=0)
    assert not norms.requires_grad
    threshold = float(norms.median())
    kept = NoiseNormFilter(unet, "fixed", threshold=threshold).keep_mask(sample, t, prediction, uncond)
    assert kept.tolist() == (norms < threshold).tolist()  # Wen: drop when norm >= tau
    assert calls[0] == 4


def test_noise_norm_default_is_wens_threshold():
    rule = NoiseNormFilter(torch.nn.Identity()).rule
    assert rule.rule == "fixed" and rule.threshold == 2.0 and rule.drop == "high"


# ---- loss masking and caption augmentation -----------------------------------------------------------


def test_masked_loss_is_the_mean_of_kept_samples_and_dropped_samples_get_no_gradient():
    weights = torch.ones(3, requires_grad=True)
    per_sample = weights * torch.tensor([1.0, 2.0, 4.0])
    loss = masked_loss(per_sample, torch.tensor([True, False, True]))
    assert float(loss.detach()) == pytest.approx(2.5)
    loss.backward()
    assert weights.grad.tolist() == [0.5, 0.0, 2.0]
    nothing = masked_loss(per_sample, torch.zeros(3, dtype=torch.bool))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad
    prediction, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(
        per_sample_mse(prediction, target), ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    )


def test_caption_augmentation_is_seeded_and_inserts_the_tokens():
    tokenizer = clip_tokenizer()
    captions = [f"a red circle number {i} on a gray background" for i in range(200)]
    augmenter = CaptionAugmenter(tokenizer, prob=0.1, n_tokens=2, seed=0)
    out, changed = augmenter(captions, key=7)
    assert (out, changed) == augmenter(captions, key=7)
    assert out != augmenter(captions, key=8)[0]
    assert 5 <= sum(changed) <= 40  # ~20 of 200
    for before, after, flag in zip(captions, out, changed, strict=True):
        if flag:
            assert len(after.split()) >= len(before.split()) + 2 and after != before
        else:
            assert after == before
    everything, flags = CaptionAugmenter(tokenizer, prob=1.0, n_tokens=3)(["x y"], key=0)
    assert flags == [True] and len(everything[0].split()) >= 5
    assert CaptionAugmenter(tokenizer, prob=0.0)(captions, key=0)[0] == captions
    with pytest.raises(MemattnError, match="probability"):
        CaptionAugmenter(tokenizer, prob=1.5)
