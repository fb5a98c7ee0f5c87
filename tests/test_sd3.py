"""SD3 / SD3.5 (an MMDiT: joint attention over image and text tokens) on tiny real pipelines.

The text sequence is SD3's (docs/models.md): 77 CLIP positions (BOS, words, EOS, padding; CLIP-L and
CLIP-G share them), then ``max_sequence_length`` T5 positions (words, ``</s>``, ``<pad>``), unmasked.
memattn reads the image→text block of each joint softmax: renormalised over the text (the record) and
its share of the joint softmax (``record.text_share``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CountScalarReads, generators
from diffusers.models.attention_processor import Attention

import memattn
from memattn.attention.tokens import TokenLayout
from memattn.detection import scores
from memattn.errors import LayoutError, UnsupportedModelError
from memattn.loading import load_pipeline
from memattn.testing import clip_tokenizer, t5_tokenizer, tiny_sd3_pipeline

PROMPTS = ["A photo of an astronaut riding a horse on Mars", "a dog", "Mothers influence on her young hippo!"]
GUIDANCE = 5.0


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def sd3(request):
    return request.param, tiny_sd3_pipeline(request.param, seed=5)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline("sd3", seed=6)


def generate(pipe, prompts, seeds, *, steps=3, guidance=GUIDANCE, per_prompt=1, **kwargs):
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators(seeds),
        num_images_per_prompt=per_prompt,
        output_type="np",
        **kwargs,
    ).images


def run(pipe, prompts, seeds, trace_kwargs=None, **kwargs):
    with memattn.trace(pipe, **(trace_kwargs or {})) as tr:
        images = generate(pipe, prompts, seeds, **kwargs)
    return tr.record, images


def clip_eos(prompt: str) -> int:
    return len(clip_tokenizer()(prompt)["input_ids"]) - 1


def t5_eos(prompt: str) -> int:
    return len(t5_tokenizer()(prompt)["input_ids"]) - 1


def test_tracing_does_not_change_the_images(sd3):
    _, pipe = sd3
    plain = generate(pipe, PROMPTS, [0, 1, 2])
    record, traced = run(pipe, PROMPTS, [0, 1, 2], trace_kwargs={"text_share": True})
    assert (plain == traced).all()  # the probe calls the same kernel on the same tensors: bit-identical
    assert record.n_steps == 3 and record.n_images == 3  # one step per transformer call (CFG batch)
    assert record.layer_names == ("transformer_blocks.0.attn", "transformer_blocks.1.attn")  # no attn2
    assert torch.isfinite(record.attention).all()
    torch.testing.assert_close(record.attention.sum(-1), torch.ones(3, 2, 3, 2), atol=1e-5, rtol=0)
    share = record.text_share_mean()
    assert share.shape == (3, 2, 3) and ((share > 0) & (share < 1)).all()
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"JointAttnProcessor2_0"}


def test_layouts_are_clip_then_t5(pipe):
    record, _ = run(pipe, PROMPTS, [0, 1, 2], steps=1)
    assert record.attention.shape[-1] == 77 + 256  # CLIP, then the call's max_sequence_length of T5
    for prompt, layout in zip(PROMPTS, record.layouts, strict=True):
        assert layout.has_bos and layout.context_length == 77 and layout.eos_index == clip_eos(prompt)
        assert layout.tail.context_length == 256 and layout.tail.eos_index == t5_eos(prompt)
        assert not layout.tail.has_bos and layout.width == 333
        assert layout.summary_positions == (
            *range(layout.eos_index, 77),
            *range(77 + layout.tail.eos_index, 333),
        )
        words = [layout.token(p) for p in layout.prompt_positions]
        assert words[: layout.eos_index - 1] == [
            t.replace("</w>", "") for t in clip_tokenizer().tokenize(prompt)
        ]
        assert words[layout.eos_index - 1 :] == t5_tokenizer().tokenize(prompt)
    short, _ = run(pipe, PROMPTS[:1], [0], steps=1, max_sequence_length=32)
    assert short.attention.shape[-1] == 77 + 32 and short.layouts[0].tail.context_length == 32


def test_prompt_3_and_negative_prompts_get_their_own_layouts(pipe):
    with memattn.trace(pipe, record_uncond=True) as tr:
        generate(pipe, ["a dog"], [0], steps=1, prompt_3=["a red dog on the moon"], negative_prompt="a cat")
    layout, negative = tr.record.layouts[0], tr.record.uncond_layouts[0]
    assert (layout.eos_index, layout.tail.eos_index) == (clip_eos("a dog"), t5_eos("a red dog on the moon"))
    assert (negative.eos_index, negative.tail.eos_index) == (clip_eos("a cat"), t5_eos("a cat"))


def test_recorded_attention_and_text_share_match_the_joint_softmax(sd3):
    """Recompute a joint layer by hand from its inputs: the full softmax over [image keys, text keys]
    with SD3's norms (``norm_k`` on image keys, ``norm_added_k`` on text keys; SD3.5's RMS qk-norm)."""
    kind, pipe = sd3
    module: Attention = dict(pipe.transformer.named_modules())["transformer_blocks.1.attn"]
    captured = {}

    def capture(mod, args, kwargs):
        captured.setdefault("hidden", kwargs["hidden_states"].detach().clone())
        captured.setdefault("context", kwargs["encoder_hidden_states"].detach().clone())

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        record, _ = run(pipe, PROMPTS[:2], [0, 1], steps=1, trace_kwargs={"text_share": True})
    finally:
        handle.remove()
    assert (module.norm_k is not None) == (kind == "sd3.5")

    def heads(x):
        return x.view(x.shape[0], -1, module.heads, x.shape[-1] // module.heads).transpose(1, 2)

    def norm(layer, x):
        return x if layer is None else layer(x)

    query = norm(module.norm_q, heads(module.to_q(captured["hidden"])))
    key = torch.cat(
        [
            norm(module.norm_k, heads(module.to_k(captured["hidden"]))),
            norm(module.norm_added_k, heads(module.add_k_proj(captured["context"]))),
        ],
        dim=2,
    )
    joint = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1)  # image queries only
    n_image = query.shape[2]
    text = joint[..., n_image:]
    cond = slice(2, 4)  # [uncond, cond]
    expected_share = text.sum(-1).mean(-1)[cond]
    expected = (text / text.sum(-1, keepdim=True)).mean(dim=2)[cond]
    torch.testing.assert_close(record.text_share[0, 1], expected_share.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(record.attention[0, 1], expected.detach(), atol=1e-5, rtol=1e-4)


def test_scores_on_sd3_records(pipe):
    record, _ = run(pipe, PROMPTS, [0, 1, 2], steps=4)
    d, e = memattn.score_d(record), memattn.score_e(record)
    assert d.shape == e.shape == (3,) and torch.isfinite(d).all() and torch.isfinite(e).all()
    mean = scores.mean_attention(record)
    for image, layout in enumerate(record.layouts):
        summary = mean[:, image, list(layout.summary_positions)]  # both EOS and both paddings
        torch.testing.assert_close(
            scores.summary_entropy_curve(record)[:, image],
            -(summary * summary.log()).sum(-1),
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(scores.summary_share(record)[image], summary[0].sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.bos_share(record), mean[0, :, 0])  # CLIP's BOS is position 0
    triggers = scores.trigger_tokens(record, k=3)
    assert all(t.position in record.layouts[0].prompt_positions for t in triggers[0])
    assert {t.token for t in triggers[1]} <= {"a", "dog"}


def test_each_image_row_matches_its_prompt_run_alone(pipe):
    prompts, seeds = PROMPTS[:2], [10, 11, 12, 13]
    share = {"text_share": True}
    batch, _ = run(pipe, prompts, seeds, share, per_prompt=2)
    assert batch.layouts[0] == batch.layouts[1] != batch.layouts[2] == batch.layouts[3]
    for image, seed in enumerate(seeds):
        alone, _ = run(pipe, [prompts[image // 2]], [seed], share)
        torch.testing.assert_close(batch.attention[:, :, image], alone.attention[:, :, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            batch.text_share[:, :, image], alone.text_share[:, :, 0], atol=1e-5, rtol=0
        )


def test_the_paper_edit_masks_both_paddings_and_scales_the_clip_bos(pipe):
    plain = generate(pipe, PROMPTS[:2], [0, 1])
    with memattn.mitigate(pipe), memattn.trace(pipe) as tr:
        edited = generate(pipe, PROMPTS[:2], [0, 1])
    assert np.abs(edited - plain).max() > 1e-3
    for image, layout in enumerate(tr.record.layouts):
        hidden = [p for p in layout.summary_positions if p not in layout.eos_positions]
        assert hidden and (tr.record.attention[:, :, image, :, hidden] == 0).all()
        visible = [0, *layout.prompt_positions, *layout.eos_positions]
        assert (tr.record.attention[:, :, image, :, visible] > 0).all()
    with memattn.mitigate(pipe, c=1.0, mask_padding=False):
        assert (generate(pipe, PROMPTS[:2], [0, 1]) == plain).all()  # a no-op edit keeps the kernel call
    bos_only = memattn.mitigate(pipe, c=2.0, mask_padding=False)
    with bos_only, memattn.trace(pipe) as tr_bos:
        generate(pipe, PROMPTS[:2], [0, 1], steps=1)
    untouched, _ = run(pipe, PROMPTS[:2], [0, 1], steps=1)
    assert (tr_bos.record.attention[0, :, :, :, 0] != untouched.attention[0, :, :, :, 0]).all()
    assert "encode_prompt" not in vars(pipe) and not pipe.transformer._forward_pre_hooks
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"JointAttnProcessor2_0"}


def test_detect_wen_bright_ending_and_the_guard_run_end_to_end(pipe):
    from memattn.detection.baselines import NoiseDifference, bright_ending
    from memattn.detection.step1 import score_step1

    rows = memattn.detect(pipe, PROMPTS, which=("d", "e"), steps=3, guidance_scale=GUIDANCE, progress=False)
    assert [row.prompt for row in rows] == PROMPTS
    assert all(np.isfinite(row.score_d) and np.isfinite(row.score_e) for row in rows)
    assert [row.n_tokens for row in rows] == [clip_eos(p) + 1 for p in PROMPTS]  # the CLIP sequence's
    step1 = score_step1(pipe, PROMPTS, seeds=[0, 1, 2], steps=3, guidance_scale=GUIDANCE, wen=True)
    assert step1.wen.shape == (3,) and np.isfinite(step1.wen).all()
    with (
        memattn.trace(pipe, map_steps=[-1], map_layers=[0, 1]) as tr,
        NoiseDifference(pipe, keep="full") as nd,
    ):
        generate(pipe, PROMPTS, [0, 1, 2], steps=3)
    assert tr.record.map_sizes[0] == (8, 8)  # 16×16 latents in 2×2 patches
    be = bright_ending(tr.record, nd, layers=(0, 1))
    assert be.shape == (3,) and np.isfinite(be).all()
    settings = dict(num_inference_steps=3, guidance_scale=GUIDANCE)
    e = memattn.Guard(pipe, threshold=0.0).score_prompts(PROMPTS, generator=generators([0, 1, 2]), **settings)
    for mode in ("continue", "restart"):
        guard = memattn.Guard(pipe, threshold=float(np.median(e)), mode=mode)
        out = guard(PROMPTS, generator=generators([0, 1, 2]), output_type="np", **settings)
        flagged = np.array([v.flagged for v in out.verdicts])
        assert flagged.tolist() == (e > np.median(e)).tolist()
        plain = generate(pipe, PROMPTS, [0, 1, 2])
        diff = np.abs(out.images - plain).reshape(3, -1).max(axis=1)
        assert (diff[~flagged] <= 1e-5).all() and (diff[flagged] > 1e-3).all()


def test_saved_pipeline_loads_scans_and_traces_the_same(pipe, tmp_path):
    pytest.importorskip("pyarrow")
    from memattn.scan import ScanSettings, read_results, scan

    pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "sd3"), progress_bar=False)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"
    first, images = run(pipe, PROMPTS[:2], [0, 1], steps=2)
    again, loaded_images = run(loaded, PROMPTS[:2], [0, 1], steps=2)
    assert (images == loaded_images).all() and again.layouts == first.layouts
    torch.testing.assert_close(again.attention, first.attention, atol=0, rtol=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dog\na photo of a cat\n")
    settings = ScanSettings(model=str(tmp_path / "sd3"), guidance_scale=GUIDANCE, steps=2, batch_size=2)
    summary = scan(prompts, tmp_path / "out", settings, progress=False)
    assert (summary.rows, summary.ok) == (2, 2)
    rows = read_results(tmp_path / "out").to_pylist()
    assert all(np.isfinite(row["score_e"]) and 0 < row["bos_share"] < 1 for row in rows)


def test_layouts_that_do_not_describe_the_call_are_errors(pipe):
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS[0], None, None)
    call = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        num_inference_steps=1,
        output_type="latent",
    )
    with pytest.raises(LayoutError, match=r"attends to 333 text tokens but the token layouts have 77"):
        with memattn.trace(pipe, lengths=[5]):
            pipe(**call)
    clip = TokenLayout(eos_index=4)
    layout = clip.with_tail(TokenLayout(eos_index=3, context_length=256, bos_index=None))
    with memattn.trace(pipe, layouts=[layout]) as tr:
        pipe(**call)
    assert tr.record.layouts == (layout,) and tr.record.n_steps == 1
    with pytest.raises(LayoutError, match=r"describes unmasked text only"):
        clip.with_tail(TokenLayout(eos_index=3, context_length=256, bos_index=None, attended=4))


def test_a_pipeline_without_t5_or_with_foreign_processors_is_refused():
    bare = tiny_sd3_pipeline("sd3", seed=1)
    bare.text_encoder_3 = None
    with pytest.raises(LayoutError, match=r"has no T5 encoder .*load the pipeline with its T5 encoder"):
        memattn.trace(bare).__enter__()
    assert {type(p).__name__ for p in bare.transformer.attn_processors.values()} == {"JointAttnProcessor2_0"}
    custom = tiny_sd3_pipeline("sd3", seed=1)
    custom.transformer.set_attn_processor(
        {name: _OtherProcessor() for name in custom.transformer.attn_processors}
    )
    with pytest.raises(UnsupportedModelError, match=r"no joint-attention layer .*_OtherProcessor"):
        memattn.trace(custom)


class _OtherProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        raise AssertionError("not called")


def test_probe_adds_no_host_synchronisation(pipe):
    def call():
        pipe(PROMPTS[:2], num_inference_steps=3, generator=generators([0, 1]), output_type="latent")

    with CountScalarReads() as plain:
        call()
    with memattn.trace(pipe) as tr, CountScalarReads() as traced:
        call()
    assert traced.count == plain.count and tr.record.n_steps == 3


def test_the_text_share_is_opt_in(pipe):
    record, _ = run(pipe, PROMPTS[:1], [0], steps=1)
    assert record.text_share is None
    with pytest.raises(Exception, match=r"no text share recorded"):
        record.text_share_mean()


def test_bench_detect_runs_on_a_saved_sd3(pipe, tmp_path):
    """`memattn bench detect` on SD3: every score, the BOS share among them (CLIP's BOS), finite."""
    import json

    from typer.testing import CliRunner

    from memattn.cli import app

    pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    (tmp_path / "memorized.txt").write_text("a red dog\na photo of a cat\n")
    (tmp_path / "clean.txt").write_text("a blue car\na house by the river\n")
    args = [
        "bench",
        "detect",
        "--model",
        str(tmp_path / "sd3"),
        "--memorized",
        str(tmp_path / "memorized.txt"),
    ]
    args += ["--clean", str(tmp_path / "clean.txt"), "--seeds", "1", "--steps", "3", "--scheduler", "model"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = {
        row["score"]: row for row in json.loads((tmp_path / "out" / "detect_bench.json").read_text())["table"]
    }
    assert {"score_d", "score_e", "e_layer0", "e_layer1", "bos_share", "wen_step1", "bright_ending"} <= set(
        table
    )
    assert all(0.0 <= row["auc"] <= 1.0 for row in table.values())


def test_the_dynamic_sink_scales_the_measured_top_non_word_recipient(pipe):
    """Recompute the first layer call by hand: the sink is the non-word position (BOS, EOS, padding of
    either sequence) with the most unedited attention, and only its logit is multiplied by C."""
    module: Attention = dict(pipe.transformer.named_modules())["transformer_blocks.0.attn"]
    captured = {}

    def capture(mod, args, kwargs):
        captured.setdefault("hidden", kwargs["hidden_states"].detach().clone())
        captured.setdefault("context", kwargs["encoder_hidden_states"].detach().clone())

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with memattn.mitigate(pipe, c=2.0, mask_padding=False, sink="dynamic"), memattn.trace(pipe) as tr:
            edited = generate(pipe, PROMPTS[:2], [0, 1], steps=1)
    finally:
        handle.remove()
    assert np.abs(edited - generate(pipe, PROMPTS[:2], [0, 1], steps=1)).max() > 1e-4

    def heads(x):
        return x.view(x.shape[0], -1, module.heads, x.shape[-1] // module.heads).transpose(1, 2)

    query = heads(module.to_q(captured["hidden"]))[2:]  # conditional rows
    key = heads(module.add_k_proj(captured["context"]))[2:]
    mass = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1).mean(dim=(1, 2))
    for image, layout in enumerate(tr.record.layouts):
        candidates = [p for p in range(layout.width) if p not in layout.prompt_positions]
        sink = candidates[int(mass[image, candidates].argmax())]
        scaled = key[image].clone()
        scaled[:, sink] *= 2.0
        expected = (query[image] @ scaled.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1).mean(dim=1)
        torch.testing.assert_close(tr.record.attention[0, 0, image], expected.detach(), atol=1e-5, rtol=1e-4)
