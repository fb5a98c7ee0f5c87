"""PixArt-α/Σ (a DiT reading T5 text through attn2) on tiny real pipelines: what memattn reads and edits.

T5 conventions (docs/models.md): no BOS, words, ``</s>``, ``<pad>`` up to the pipeline's
``max_sequence_length`` (120 for α, 300 for Σ), padding hidden by the pipeline's attention mask.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import CountScalarReads, generators
from diffusers.models.attention_processor import Attention

import memattn
from memattn.attention.processor import CrossAttentionProbe
from memattn.attention.tokens import TokenLayout
from memattn.detection import scores
from memattn.errors import LayoutError
from memattn.loading import load_pipeline
from memattn.testing import t5_tokenizer, tiny_pixart_pipeline

PROMPTS = ["A photo of an astronaut riding a horse on Mars", "a dog", "Mothers influence on her young hippo!"]
NO_BOS = (
    r"has no BOS token .*c=1\.25; use memattn\.mitigate\(pipe, c=1\.0, mask_padding=True, mask_eos=True\)"
)
ENCODED = {"alpha": 120, "sigma": 300}  # the pipelines' max_sequence_length defaults


@pytest.fixture(scope="module", params=["alpha", "sigma"])
def pixart(request):
    return request.param, tiny_pixart_pipeline(request.param, seed=5)


@pytest.fixture(scope="module")
def alpha():
    return tiny_pixart_pipeline("alpha", seed=6)


def generate(pipe, prompts, seeds, *, steps=3, guidance=4.5, per_prompt=1, **kwargs):
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators(seeds),
        num_images_per_prompt=per_prompt,
        output_type="np",
        **kwargs,
    ).images


def run(pipe, prompts, seeds, **kwargs):
    with memattn.trace(pipe) as tr:
        images = generate(pipe, prompts, seeds, **kwargs)
    return tr.record, images


def expected_eos(prompt: str) -> int:
    """Words and punctuation of the lowercased prompt (PixArt lowercases), then ``</s>``."""
    return len(t5_tokenizer()(prompt.lower())["input_ids"]) - 1


def test_tracing_does_not_change_the_images(pixart):
    _, pipe = pixart
    seeds = [0, 1, 2]
    plain = generate(pipe, PROMPTS, seeds)
    _, traced = run(pipe, PROMPTS, seeds)
    assert (plain == traced).all()  # the probe keeps AttnProcessor2_0's SDPA call, mask included


def test_records_follow_the_encode_call(pixart):
    kind, pipe = pixart
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        record, _ = run(pipe, PROMPTS, [0, 1, 2])
    finally:
        handle.remove()
    assert record.n_steps == len(calls) == 3  # one step per denoiser call
    assert record.layer_names == ("transformer_blocks.0.attn2", "transformer_blocks.1.attn2")
    assert torch.isfinite(record.attention).all()
    assert record.attention.shape[-1] == ENCODED[kind] != t5_tokenizer().model_max_length
    for image, (prompt, layout) in enumerate(zip(PROMPTS, record.layouts, strict=True)):
        assert layout.context_length == ENCODED[kind]
        assert layout.bos_index is None and not layout.has_bos
        assert layout.eos_index == expected_eos(prompt)
        assert layout.prompt_span == range(0, layout.eos_index)  # position 0 is the first word
        assert layout.token(layout.eos_index) == "</s>" and layout.token(layout.eos_index + 1) == "<pad>"
        assert layout.attended == layout.eos_index + 1 and layout.padding_masked
        rows = record.attention[:, :, image]  # [step, layer, head, token]
        attendable = rows[..., : layout.attended]
        torch.testing.assert_close(attendable.sum(-1), torch.ones_like(attendable.sum(-1)), atol=1e-5, rtol=0)
        assert (rows[..., layout.attended :] == 0).all()  # masked padding: recorded, exactly zero
        assert (attendable > 0).all()


def test_the_encoded_length_is_the_calls_own(alpha):
    long_prompt = " ".join(["red"] * 30)
    record, _ = run(alpha, ["a dog", long_prompt], [0, 1], steps=2, max_sequence_length=16)
    short, cut = record.layouts
    assert record.attention.shape[-1] == short.context_length == cut.context_length == 16
    assert not short.truncated and short.eos_index == 2
    assert cut.truncated and cut.eos_index == 15 and cut.attended == 16  # T5 keeps </s> when truncating


def test_recorded_probabilities_match_diffusers_reference(alpha):
    """Recompute layer 1 with diffusers' own `get_attention_scores`, the layer's own mask included."""
    module: Attention = dict(alpha.transformer.named_modules())["transformer_blocks.1.attn2"]
    captured = {}

    def capture(mod, args, kwargs):
        captured.setdefault("hidden", args[0].detach().clone())
        captured.setdefault("context", kwargs["encoder_hidden_states"].detach().clone())
        captured.setdefault("mask", kwargs["attention_mask"].detach().clone())

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        record, _ = run(alpha, PROMPTS[:2], [0, 1], steps=1)
    finally:
        handle.remove()
    batch, tokens = captured["context"].shape[:2]
    mask = module.prepare_attention_mask(captured["mask"], tokens, batch)
    query = module.head_to_batch_dim(module.to_q(captured["hidden"]))
    key = module.head_to_batch_dim(module.to_k(captured["context"]))
    probs = module.get_attention_scores(query, key, mask)  # (batch·heads, queries, tokens)
    reference = probs.view(batch, module.heads, -1, tokens).mean(dim=2)[batch // 2 :]  # conditional half
    torch.testing.assert_close(record.attention[0, 1], reference.detach(), atol=1e-6, rtol=1e-5)


def test_scores_on_t5_records(pixart):
    _, pipe = pixart
    record, _ = run(pipe, PROMPTS, [0, 1, 2], steps=4)
    d, e = memattn.score_d(record), memattn.score_e(record)
    assert d.shape == e.shape == (3,) and torch.isfinite(d).all() and torch.isfinite(e).all()
    mean = scores.mean_attention(record)  # [step, image, token]
    for image, layout in enumerate(record.layouts):
        p = mean[:, image, : layout.attended]
        own = -(p * p.log()).sum(-1)  # entropy over the attendable tokens (words + EOS) only
        torch.testing.assert_close(scores.entropy_curve(record)[:, image], own, atol=1e-5, rtol=0)
        eos = mean[:, image, layout.eos_index]  # the summary term: EOS alone (padding is masked)
        torch.testing.assert_close(
            scores.summary_entropy_curve(record)[:, image], -eos * eos.log(), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(scores.summary_share(record)[image], eos[0], atol=1e-6, rtol=0)
    triggers = scores.trigger_tokens(record, k=2)
    assert all(t.position in record.layouts[0].prompt_span for t in triggers[0])
    assert {t.token for t in triggers[1]} <= {"a", "dog"}  # position 0 is a word, never skipped as BOS


def test_bos_based_scores_are_refused_with_the_alternative(alpha):
    record, _ = run(alpha, PROMPTS[:2], [0, 1], steps=1)
    with pytest.raises(LayoutError, match=r"BOS share is not defined .*use the summary \(EOS\) share"):
        scores.bos_share(record)
    from memattn.detection.baselines import step1_features

    features, names = step1_features(record, None)  # no BOS: no bos_share column, never position 0's share
    assert names == ["e_layer0", "e_layer1", "summary_share"] and np.isfinite(features).all()


def test_scan_of_a_saved_pixart_writes_rows_without_a_bos_share(tmp_path):
    """`memattn scan` on PixArt-Σ: E and the summary share per prompt, bos_share null, and the
    too-long limit is the 300 positions the pipeline encodes (not T5's 512)."""
    pytest.importorskip("pyarrow")
    from memattn.scan import ScanSettings, read_results, scan

    model = tmp_path / "sigma"
    tiny_pixart_pipeline("sigma").save_pretrained(model, safe_serialization=True)
    long_prompt = " ".join(["dog"] * 305)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dog\na photo of a cat\n" + long_prompt + "\n")
    settings = ScanSettings(model=str(model), guidance_scale=4.5, steps=2, batch_size=3)
    summary = scan(prompts, tmp_path / "out", settings, progress=False)
    assert (summary.rows, summary.ok) == (3, 3)
    rows = read_results(tmp_path / "out").to_pylist()
    assert all(row["bos_share"] is None for row in rows)
    assert all(np.isfinite(row["score_e"]) and 0 < row["summary_share"] <= 1 for row in rows)
    assert [row["n_tokens"] for row in rows[:2]] == [4, 6]  # words + </s>, no BOS
    assert rows[2]["truncated"] and "over 300 tokens (306 with the special tokens)" in rows[2]["reason"]


def test_each_image_row_matches_its_prompt_run_alone(alpha):
    """Prompts of different lengths × 2 images each: every row keeps its own prompt's layout and mask."""
    prompts = PROMPTS[:2]
    seeds = [10, 11, 12, 13]
    batch, _ = run(alpha, prompts, seeds, per_prompt=2)
    assert batch.n_images == 4
    assert batch.layouts[0] == batch.layouts[1] != batch.layouts[2] == batch.layouts[3]
    for image, seed in enumerate(seeds):
        alone, _ = run(alpha, [prompts[image // 2]], [seed])
        assert batch.layouts[image] == alone.layouts[0]
        torch.testing.assert_close(batch.attention[:, :, image], alone.attention[:, :, 0], atol=1e-5, rtol=0)


def test_the_paper_edit_is_refused_without_a_bos(pixart):
    _, pipe = pixart
    with pytest.raises(LayoutError, match=NO_BOS):
        memattn.mitigate(pipe)  # C = 1.25 by default
    with pytest.raises(LayoutError, match=NO_BOS):
        memattn.mitigate(pipe, c=1.25, mask_eos=True)


def test_masking_the_eos_changes_the_output_and_restores_the_pipeline(alpha):
    before = dict(alpha.transformer.attn_processors)
    encode = alpha.encode_prompt
    seeds = [3, 4]
    plain = generate(alpha, PROMPTS[:2], seeds)
    with memattn.mitigate(alpha, c=1.0, mask_eos=True), memattn.trace(alpha) as tr:
        assert all(
            isinstance(p, CrossAttentionProbe)
            for name, p in alpha.transformer.attn_processors.items()
            if "attn2" in name
        )
        edited = generate(alpha, PROMPTS[:2], seeds)
    assert np.abs(edited - plain).max() > 1e-3
    for image, layout in enumerate(tr.record.layouts):  # the trace sees the edited attention
        rows = tr.record.attention[:, :, image]
        assert (rows[..., layout.eos_index :] == 0).all()
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), atol=1e-5, rtol=0)
    after = alpha.transformer.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert "encode_prompt" not in vars(alpha) and alpha.encode_prompt == encode
    assert not alpha.transformer._forward_pre_hooks
    assert (generate(alpha, PROMPTS[:2], seeds) == plain).all()


def test_masking_padding_alone_changes_nothing_on_pixart(alpha):
    """PixArt's own mask already hides the padding: the padding mask adds nothing the model attends to."""
    seeds = [3, 4]
    plain = generate(alpha, PROMPTS[:2], seeds)
    with memattn.mitigate(alpha, c=1.0, mask_padding=True):
        masked = generate(alpha, PROMPTS[:2], seeds)
    np.testing.assert_allclose(masked, plain, atol=1e-6, rtol=0)


def test_an_empty_prompt_cannot_lose_its_only_token(alpha):
    with pytest.raises(LayoutError, match="would attend to no text token"):
        with memattn.mitigate(alpha, c=1.0, mask_eos=True):
            generate(alpha, [""], [0], steps=1)


def test_layouts_that_do_not_describe_the_call_are_errors(alpha):
    transformer = alpha.transformer
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 32, 32)
    text = torch.randn(2, 10, 32)
    mask = torch.tensor([[1] * 4 + [0] * 6, [1] * 7 + [0] * 3])
    inputs = dict(
        encoder_hidden_states=text,
        timestep=torch.tensor([500, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    right = [TokenLayout(eos_index=3, context_length=10, bos_index=None, attended=4)]
    right.append(TokenLayout(eos_index=6, context_length=10, bos_index=None, attended=7))
    with torch.no_grad(), memattn.trace(transformer, layouts=right) as tr:
        transformer(latents, encoder_attention_mask=mask, **inputs)
    assert tr.record.layouts == tuple(right)
    wrong = [right[0], TokenLayout(eos_index=5, context_length=10, bos_index=None, attended=6)]
    with torch.no_grad(), memattn.trace(transformer, layouts=wrong) as tr:
        transformer(latents, encoder_attention_mask=mask, **inputs)
    with pytest.raises(
        LayoutError, match="image 1: the denoiser attends to 7 text positions, its token layout to 6"
    ):
        _ = tr.record
    with torch.no_grad(), memattn.trace(transformer, layouts=right) as tr:
        transformer(latents, **inputs)  # no mask: the padding the layouts call masked is attended
    with pytest.raises(LayoutError, match=r"images \[0, 1\] say the padding is masked"):
        _ = tr.record
    clip = [TokenLayout(eos_index=3), TokenLayout(eos_index=6)]  # 77 positions, the model has 10
    with pytest.raises(LayoutError, match="attends to 10 text tokens but the token layouts have 77"):
        with torch.no_grad(), memattn.trace(transformer, layouts=clip):
            transformer(latents, encoder_attention_mask=mask, **inputs)


def test_saved_pipeline_loads_and_traces_the_same(alpha, tmp_path):
    alpha.save_pretrained(tmp_path / "pixart", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "pixart"), progress_bar=False)
    assert type(loaded).__name__ == "PixArtAlphaPipeline"
    first, images = run(alpha, PROMPTS[:2], [0, 1], steps=2)
    again, loaded_images = run(loaded, PROMPTS[:2], [0, 1], steps=2)
    assert (images == loaded_images).all()
    assert again.layouts == first.layouts and again.layouts[0].context_length == ENCODED["alpha"]
    torch.testing.assert_close(again.attention, first.attention, atol=0, rtol=0)


def test_detect_runs_end_to_end(alpha):
    rows = memattn.detect(alpha, PROMPTS, which=("d", "e"), steps=3, guidance_scale=4.5, progress=False)
    assert [row.prompt for row in rows] == PROMPTS
    for row in rows:
        assert np.isfinite(row.score_d) and np.isfinite(row.score_e)
        assert row.n_tokens == expected_eos(row.prompt) + 1 and not row.truncated  # words + </s>
        words = set(row.prompt.lower().replace("!", " ! ").split())
        assert row.triggers and {token for token, _ in row.triggers} <= words
    e_only = memattn.detect(alpha, PROMPTS, which=("e",), steps=3, guidance_scale=4.5, progress=False)
    np.testing.assert_allclose([r.score_e for r in e_only], [r.score_e for r in rows], atol=1e-5, rtol=0)


def test_wen_step1_norm_reads_the_noise_half_of_a_learned_sigma_output(alpha):
    from memattn.detection.step1 import score_step1

    step1 = score_step1(alpha, PROMPTS, seeds=[0, 1, 2], steps=3, guidance_scale=4.5, wen=True)
    assert step1.wen.shape == (3,) and np.isfinite(step1.wen).all()
    outputs = []
    handle = alpha.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
    try:
        score_step1(alpha, PROMPTS, seeds=[0, 1, 2], steps=3, guidance_scale=4.5, wen=False)
    finally:
        handle.remove()
    assert len(outputs) == 1  # PixArt cannot be interrupted: the step callback stopped it after one call
    uncond, cond = outputs[0][:, :4].chunk(2)  # the pipeline keeps the first 4 of 8 channels as noise
    np.testing.assert_allclose(step1.wen, (cond - uncond).flatten(1).norm(dim=1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_guard_masks_the_eos_of_flagged_images_only(alpha, mode):
    with pytest.raises(LayoutError, match=r'has no BOS token .*use Guard\(pipe, mitigation=\{"c": 1\.0'):
        memattn.Guard(alpha, threshold=0.0)
    settings = dict(num_inference_steps=3, guidance_scale=4.5)
    probe = memattn.Guard(alpha, threshold=0.0, mitigation={"c": 1.0, "mask_eos": True})
    e = probe.score_prompts(PROMPTS[:2], generator=generators([0, 1]), **settings)
    assert e[0] != e[1]
    guard = memattn.Guard(
        alpha, threshold=float(e.mean()), mitigation={"c": 1.0, "mask_eos": True}, mode=mode
    )
    out = guard(PROMPTS[:2], generator=generators([0, 1]), output_type="np", **settings)
    flagged = np.array([v.flagged for v in out.verdicts])
    assert flagged.tolist() == (e > e.mean()).tolist()
    np.testing.assert_allclose([v.score for v in out.verdicts], e, atol=1e-6, rtol=0)
    plain = generate(alpha, PROMPTS[:2], [0, 1], steps=3)
    diff = np.abs(out.images - plain).reshape(2, -1).max(axis=1)
    assert (diff[~flagged] <= 1e-5).all() and (diff[flagged] > 1e-3).all()
    assert not alpha.transformer._forward_pre_hooks and "encode_prompt" not in vars(alpha)


def test_unconditional_rows_get_the_negative_prompts_layout(alpha):
    with memattn.trace(alpha, record_uncond=True) as tr:
        generate(alpha, PROMPTS[:2], [0, 1], steps=2)
    record = tr.record
    assert [layout.eos_index for layout in record.uncond_layouts] == [0, 0]  # "" is </s> alone
    assert all(layout.attended == 1 and not layout.has_bos for layout in record.uncond_layouts)
    torch.testing.assert_close(
        record.uncond_attention[..., 0], torch.ones_like(record.uncond_attention[..., 0]), atol=1e-6, rtol=0
    )


# ---- T5 layouts on their own ------------------------------------------------------------------------


def test_t5_layouts_are_found_from_the_tokenizer_and_checked():
    from memattn.attention.tokens import adds_bos, tokenize_layouts
    from memattn.testing import clip_tokenizer

    tok = t5_tokenizer()
    assert not adds_bos(tok) and adds_bos(clip_tokenizer())
    short, empty = tokenize_layouts(tok, ["a dog", ""], max_length=8, masked=True)
    assert (short.bos_index, short.eos_index, short.attended, short.context_length) == (None, 2, 3, 8)
    assert (empty.eos_index, empty.prompt_span, empty.n_tokens) == (0, range(0, 0), 1)
    (unmasked,) = tokenize_layouts(tok, ["a dog"], max_length=8)
    assert unmasked.attended is None and unmasked.attendable_span == range(8)
    with pytest.raises(LayoutError, match=r"EOS index 0 is outside 1\.\.76; a prompt needs at least BOS"):
        TokenLayout(eos_index=0)  # with a BOS an EOS at 0 is impossible
    with pytest.raises(LayoutError, match="must cover the EOS"):
        TokenLayout(eos_index=3, context_length=8, bos_index=None, attended=3)
    with pytest.raises(LayoutError, match="BOS sits at position 0 or nowhere"):
        TokenLayout(eos_index=3, bos_index=2)
    with pytest.raises(LayoutError, match="not ones followed by zeros.*padding_side='right'"):
        TokenLayout.from_ids([0, 0, 5, 1], 1, bos=False, attention_mask=[0, 0, 1, 1])
    with pytest.raises(LayoutError, match=r"no EOS \(id 1\) in 3 ids"):
        TokenLayout.from_ids([5, 6, 7], 1, bos=False)
    with pytest.raises(LayoutError, match="only CLIP layouts"):
        short.merged(short)


def test_the_encode_spec_is_read_from_the_call(alpha):
    from memattn.attention.patch import call_arguments
    from memattn.attention.tokens import encode_spec

    default = encode_spec(alpha, call_arguments(alpha, "encode_prompt", ("A Dog",), {}))
    assert (default.max_length, default.masked) == (120, True)
    assert default.prepare(["  A Dog "]) == ["a dog"]  # PixArt's own preprocessing: lowercase, strip
    given = encode_spec(alpha, call_arguments(alpha, "encode_prompt", ("a",), {"max_sequence_length": 7}))
    assert given.max_length == 7
    with pytest.raises(LayoutError, match="max_sequence_length must be a positive integer"):
        encode_spec(alpha, {"max_sequence_length": 0})


def test_prompt_embeds_take_their_layouts_from_the_attention_mask(alpha):
    seeds = [0, 1]
    by_text, images = run(alpha, PROMPTS[:2], seeds, steps=2)
    with torch.no_grad():
        embeds, mask, negative, negative_mask = alpha.encode_prompt(PROMPTS[:2], max_sequence_length=120)
    arguments = dict(
        negative_prompt=None,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
    )
    by_embeds, embed_images = run(alpha, None, seeds, steps=2, **arguments)
    assert (embed_images == images).all()
    for text, embed in zip(by_text.layouts, by_embeds.layouts, strict=True):
        assert (embed.eos_index, embed.attended, embed.bos_index) == (text.eos_index, text.attended, None)
    torch.testing.assert_close(by_embeds.attention, by_text.attention, atol=0, rtol=0)
    assert torch.isfinite(memattn.score_d(by_embeds)).all()


def test_probe_adds_no_host_synchronisation(alpha):
    """As for SD (tests/test_probe.py): the traced call reads no more device scalars than the plain one."""

    def call():
        alpha(PROMPTS[:2], num_inference_steps=3, generator=generators([0, 1]), output_type="latent")

    with CountScalarReads() as plain:
        call()
    with memattn.trace(alpha) as tr, CountScalarReads() as traced:
        call()
    assert traced.count == plain.count
    assert tr.record.n_steps == 3


def test_the_cli_detects_on_a_saved_pixart_and_refuses_the_bos_edit(tmp_path):
    import json

    from typer.testing import CliRunner

    from memattn.cli import app

    model = tmp_path / "sigma"
    tiny_pixart_pipeline("sigma", seed=7).save_pretrained(model)
    args = ["detect", "A dog on Mars", "a red cube", "--model", str(model), "--steps", "3", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["n_tokens"] for row in rows] == [5, 4]  # words + </s>, no BOS
    assert all(np.isfinite(row["score_d"]) and np.isfinite(row["score_e"]) for row in rows)
    refused = CliRunner().invoke(
        app, ["generate", "a dog", "--model", str(model), "--method", "ren2024", "--steps", "2"]
    )
    assert isinstance(refused.exception, LayoutError)  # the CLI's run_cli prints it as one line, exit 2
    assert re.match(r"PixArtSigmaPipeline " + NO_BOS, str(refused.exception))


def test_the_guard_keeps_a_users_step_callback_on_pixart(alpha):
    seen = []
    guard = memattn.Guard(alpha, threshold=1e9, mitigation={"c": 1.0, "mask_eos": True})
    out = guard(
        PROMPTS[:1],
        num_inference_steps=3,
        generator=generators([0]),
        output_type="np",
        callback=lambda step, timestep, latents: seen.append((step, tuple(latents.shape))),
        callback_steps=2,
    )
    assert [step for step, _ in seen] == [0, 2] and seen[0][1] == (1, 4, 32, 32)
    assert not out.verdicts[0].flagged


def test_bf16_pixart_records_float32_with_the_mask_applied():
    pipe = tiny_pixart_pipeline("alpha", seed=8).to(dtype=torch.bfloat16)
    record, _ = run(pipe, PROMPTS[:2], [0, 1], steps=2)
    assert record.attention.dtype == torch.float32 and torch.isfinite(record.attention).all()
    for image, layout in enumerate(record.layouts):
        rows = record.attention[:, :, image]
        assert (rows[..., layout.attended :] == 0).all()
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), atol=1e-4, rtol=0)
    assert torch.isfinite(memattn.score_d(record)).all()


def test_the_dynamic_sink_is_the_edit_with_c_on_pixart(alpha):
    """Without a BOS, `sink="dynamic"` multiplies the measured sink's logit: the only non-word position
    PixArt attends to is the EOS, so the first layer call's attention is the one with the EOS key x C."""
    module: Attention = dict(alpha.transformer.named_modules())["transformer_blocks.0.attn2"]
    captured = {}

    def capture(mod, args, kwargs):
        captured.setdefault("hidden", args[0].detach().clone())
        captured.setdefault("context", kwargs["encoder_hidden_states"].detach().clone())

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with memattn.mitigate(alpha, c=2.0, sink="dynamic"), memattn.trace(alpha) as tr:
            edited = generate(alpha, PROMPTS[:2], [0, 1], steps=1)
    finally:
        handle.remove()
    assert np.abs(edited - generate(alpha, PROMPTS[:2], [0, 1], steps=1)).max() > 1e-4
    query = module.head_to_batch_dim(module.to_q(captured["hidden"]))
    key = module.head_to_batch_dim(module.to_k(captured["context"]))
    batch = captured["context"].shape[0]
    query = query.view(batch, module.heads, *query.shape[1:])[batch // 2 :]
    key = key.view(batch, module.heads, *key.shape[1:])[batch // 2 :]
    for image, layout in enumerate(tr.record.layouts):
        visible = key[image, :, : layout.attended].clone()
        visible[:, layout.eos_index] *= 2.0
        expected = (query[image] @ visible.transpose(-1, -2) * module.scale).softmax(-1).mean(dim=1)
        torch.testing.assert_close(
            tr.record.attention[0, 0, image, :, : layout.attended], expected.detach(), atol=1e-5, rtol=1e-4
        )
    guard = memattn.Guard(alpha, threshold=0.0, mitigation={"sink": "dynamic"})  # c = 1.25 is accepted
    assert guard.edit.c == 1.25 and guard.edit.sink == "dynamic"


def test_dynamic_sink_settings_are_checked():
    from memattn.attention.edit import AttentionEdit
    from memattn.errors import MemattnError

    with pytest.raises(MemattnError, match=r"sink must be one of bos, dynamic, got 'top'"):
        AttentionEdit(sink="top")
    with pytest.raises(MemattnError, match=r"sink_k must be an integer >= 1, got 0"):
        AttentionEdit(sink="dynamic", sink_k=0)
    with pytest.raises(LayoutError, match=r"or memattn\.mitigate\(pipe, sink='dynamic'\) to multiply"):
        memattn.mitigate(tiny_pixart_pipeline("alpha"))
