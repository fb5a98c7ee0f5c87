"""The probe on real (tiny) diffusers pipelines: what it records, where, and that it changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import CountScalarReads, generators
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import memattn
from memattn.attention.layers import cross_attention_layers
from memattn.attention.processor import CrossAttentionProbe
from memattn.errors import LayoutError, RecordError, UnsupportedModelError
from memattn.testing import sd1_unet

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a dog",
    "Mothers influence on her young hippo",
    "wow! a red cube!! on a blue floor",
]


def run(pipe, prompts, seeds, *, steps=3, guidance=7.5, per_prompt=1, **trace_kwargs):
    with memattn.trace(pipe, **trace_kwargs) as tr:
        out = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators(seeds),
            num_images_per_prompt=per_prompt,
            output_type="np",
        ).images
    return tr.record, out


def test_probes_only_cross_attention_and_restores_originals(sd1_pipe):
    before = dict(sd1_pipe.unet.attn_processors)
    with memattn.trace(sd1_pipe):
        during = sd1_pipe.unet.attn_processors
        for name, processor in during.items():
            if name.endswith("attn2.processor"):
                assert isinstance(processor, CrossAttentionProbe)
            else:
                assert processor is before[name]
                assert isinstance(processor, AttnProcessor2_0)
        assert "encode_prompt" in vars(sd1_pipe)
    after = sd1_pipe.unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert "encode_prompt" not in vars(sd1_pipe)
    assert not sd1_pipe.unet._forward_pre_hooks


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_restores_after_exception_inside_the_call(sd1_pipe, error):
    before = dict(sd1_pipe.unet.attn_processors)

    def explode(pipe, step, timestep, callback_kwargs):
        raise error("stop")

    with pytest.raises(error), memattn.trace(sd1_pipe):
        sd1_pipe("a dog", num_inference_steps=3, callback_on_step_end=explode, output_type="latent")
    after = sd1_pipe.unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert "encode_prompt" not in vars(sd1_pipe)
    assert not sd1_pipe.unet._forward_pre_hooks


@pytest.mark.parametrize("fixture", ["sd1_pipe", "sd2_pipe", "sdxl_pipe"])
def test_tracing_does_not_change_the_images(request, fixture):
    pipe = request.getfixturevalue(fixture)
    seeds = [0, 1, 2, 3]
    plain = pipe(
        PROMPTS, num_inference_steps=3, guidance_scale=7.5, generator=generators(seeds), output_type="np"
    ).images
    _, traced = run(pipe, PROMPTS, seeds)
    assert abs(plain - traced).max() <= 1e-5
    # The probe keeps diffusers' SDPA call for the output, so the images are in fact bit-identical.
    assert (plain == traced).all()


def test_record_shape_timesteps_and_layouts(sd1_pipe):
    record, _ = run(sd1_pipe, PROMPTS[:2], [0, 1, 2, 3], steps=4, per_prompt=2)
    assert record.attention.shape == (4, 16, 4, 8, 77)
    assert record.attention.dtype == torch.float32
    assert record.timesteps.tolist() == sd1_pipe.scheduler.timesteps.float().tolist()
    assert record.prompts == tuple(PROMPTS[:2])
    assert [layout.n_tokens for layout in record.layouts] == [12, 12, 4, 4]
    sums = record.attention.sum(dim=-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


def test_layers_are_in_forward_order_with_sd1_indexing(sd1_pipe):
    called: list[str] = []
    names = {module: name for name, module in sd1_pipe.unet.named_modules()}
    handles = [
        module.register_forward_pre_hook(lambda m, a: called.append(names[m]))
        for name, module in sd1_pipe.unet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        record, _ = run(sd1_pipe, ["a dog"], [0], steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert list(record.layer_names) == called
    assert len(record.layer_names) == 16
    assert record.layer_names[3] == "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert record.layer_names[6] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert record.default_e_layer() == 3


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("fixture", ["sd1_pipe", "sdxl_pipe"])
def test_each_image_row_matches_its_prompt_run_alone(request, fixture, guidance):
    """Prompts of different lengths × 2 images each: catches the official code's `[1::2]` class of bug."""
    pipe = request.getfixturevalue(fixture)
    prompts = PROMPTS[:3]
    seeds = [10, 11, 12, 13, 14, 15]
    batch, _ = run(pipe, prompts, seeds, guidance=guidance, per_prompt=2)
    assert batch.n_images == 6
    for image, seed in enumerate(seeds):
        alone, _ = run(pipe, [prompts[image // 2]], [seed], guidance=guidance)
        assert batch.layouts[image] == alone.layouts[0]
        torch.testing.assert_close(batch.attention[:, :, image], alone.attention[:, :, 0], atol=1e-5, rtol=0)


def test_conditional_and_unconditional_halves_are_not_swapped(sd1_pipe):
    # Same noise for every image: the unconditional rows (empty prompt) must then be identical across
    # prompts at step 0, while the conditional rows differ with the prompt.
    record, _ = run(sd1_pipe, PROMPTS, [7, 7, 7, 7], record_uncond=True)
    uncond, cond = record.uncond_attention[0], record.attention[0]
    for image in range(1, 4):
        torch.testing.assert_close(uncond[:, image], uncond[:, 0], atol=1e-6, rtol=0)
        assert (cond[:, image] - cond[:, 0]).abs().max() > 1e-3
    assert [layout.n_tokens for layout in record.uncond_layouts] == [2, 2, 2, 2]


def test_scores_alone_and_inside_a_mixed_batch_of_8_agree(sd1_pipe):
    prompts = PROMPTS + ["", "a cat sitting on a sofa in a sunny room", "x " * 90, "!!"]
    seeds = list(range(20, 28))
    batch, _ = run(sd1_pipe, prompts, seeds, steps=4)
    d_batch, e_batch = memattn.score_d(batch), memattn.score_e(batch)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone, _ = run(sd1_pipe, [prompt], [seed], steps=4)
        assert abs(float(memattn.score_d(alone)[0]) - float(d_batch[i])) <= 1e-5
        assert abs(float(memattn.score_e(alone)[0]) - float(e_batch[i])) <= 1e-5


def test_bf16_pipeline_records_float32():
    pipe = memattn.testing.tiny_pipeline("sd1", seed=3, dtype=torch.bfloat16)
    record, images = run(pipe, PROMPTS[:2], [0, 1], steps=2)
    assert record.attention.dtype == torch.float32
    assert torch.isfinite(record.attention).all()
    sums = record.attention.sum(dim=-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    assert torch.isfinite(memattn.score_d(record)).all()


def test_sd2_unequal_head_counts(sd2_pipe):
    record, _ = run(sd2_pipe, PROMPTS[:2], [0, 1])
    assert len(set(record.heads)) > 1
    narrow = record.heads.index(min(record.heads))
    assert torch.isnan(record.attention[:, narrow, :, min(record.heads) :]).all()
    mean = record.head_mean()
    assert torch.isfinite(mean).all()
    assert torch.allclose(mean.sum(-1), torch.ones_like(mean.sum(-1)), atol=1e-5)


def test_recorded_probabilities_match_diffusers_reference(sd1_pipe):
    """Recompute layer 3's attention with diffusers' own `get_attention_scores` from captured inputs."""
    unet = sd1_pipe.unet
    layer_name = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    module: Attention = dict(unet.named_modules())[layer_name]
    captured = {}

    def capture(mod, args, kwargs):
        captured.setdefault("hidden", args[0].detach().clone())
        captured.setdefault("context", kwargs["encoder_hidden_states"].detach().clone())

    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        record, _ = run(sd1_pipe, PROMPTS[:2], [0, 1], steps=1)
    finally:
        handle.remove()
    query = module.head_to_batch_dim(module.to_q(captured["hidden"]))
    key = module.head_to_batch_dim(module.to_k(captured["context"]))
    probs = module.get_attention_scores(query, key)  # (batch·heads, queries, tokens)
    batch = captured["hidden"].shape[0]
    reference = probs.view(batch, module.heads, -1, 77).mean(dim=2)[batch // 2 :]  # conditional half
    torch.testing.assert_close(record.attention[0, 3], reference.detach(), atol=1e-6, rtol=1e-5)


def test_bare_unet_training_style_use():
    torch.manual_seed(0)
    unet = sd1_unet()
    sample, context = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    with memattn.trace(unet, lengths=[5, 9, 77]) as tr:
        unet(sample, torch.tensor([10, 500, 900]), encoder_hidden_states=context)
        unet(sample, 20, encoder_hidden_states=context)
        record = tr.record
        assert record.attention.shape == (2, 16, 3, 8, 77)
        assert [layout.eos_index for layout in record.layouts] == [4, 8, 76]
        assert record.timesteps.tolist() == [10.0, 20.0]
        tr.reset()
        with pytest.raises(RecordError, match="nothing was recorded"):
            _ = tr.record
        unet(sample[:2], 5, encoder_hidden_states=context[:2])
        with pytest.raises(RecordError, match="reset"):
            unet(sample, 5, encoder_hidden_states=context)
    with pytest.raises(RecordError, match="even UNet batch"), memattn.trace(unet, cfg=True):
        unet(sample, 5, encoder_hidden_states=context)
    assert not any(isinstance(p, CrossAttentionProbe) for p in unet.attn_processors.values())


def test_prompt_embeds_need_lengths_for_layout_scores(sd1_pipe):
    ids = sd1_pipe.tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    embeds = sd1_pipe.text_encoder(ids)[0]
    kwargs = dict(prompt_embeds=embeds, num_inference_steps=2, output_type="latent")
    with memattn.trace(sd1_pipe) as tr:
        sd1_pipe(**kwargs)
    assert tr.record.layouts is None
    assert torch.isfinite(memattn.score_e(tr.record)).all()
    with pytest.raises(LayoutError, match="lengths="):
        memattn.score_d(tr.record)
    with memattn.trace(sd1_pipe, lengths=[4]) as tr:
        sd1_pipe(**kwargs)
    assert tr.record.layouts[0].eos_index == 3
    with pytest.raises(LayoutError, match="2 lengths given for 1"), memattn.trace(sd1_pipe, lengths=[4, 5]):
        sd1_pipe(**kwargs)


def test_attention_maps_for_selected_steps_and_layers(sd1_pipe):
    name = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    record, _ = run(sd1_pipe, PROMPTS[:2], [0, 1], map_steps=[0, 2], map_layers=[name, 6])
    assert set(record.maps) == {(0, 3), (2, 3), (0, 6), (2, 6)}
    attention_map = record.maps[(2, 3)]
    height, width = record.map_sizes[3]
    assert attention_map.shape == (2, 8, height * width, 77)
    assert (height, width) == (4, 4)  # 8×8 latents, one downsampling before down_blocks.1
    torch.testing.assert_close(attention_map.mean(dim=2), record.attention[2, 3], atol=1e-6, rtol=0)
    plain, _ = run(sd1_pipe, PROMPTS[:1], [0])
    assert plain.maps == {}


def test_several_calls_inside_one_trace(sd1_pipe):
    with memattn.trace(sd1_pipe) as tr:
        sd1_pipe("a dog", num_inference_steps=2, output_type="latent")
        sd1_pipe(["a cat", "a cow"], num_inference_steps=3, output_type="latent")
    assert [r.attention.shape[:3] for r in tr.records] == [(2, 16, 1), (3, 16, 2)]
    assert tr.record.prompts == ("a cat", "a cow")


def test_unknown_map_layer_is_a_clear_error(sd1_pipe):
    with pytest.raises(RecordError, match="is not a cross-attention layer of this model"):
        memattn.trace(sd1_pipe, map_layers=["down_blocks.9.attn2"])


def test_models_without_text_cross_attention_are_refused():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel, UNet2DModel

    plain = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(UnsupportedModelError, match="no text conditioning"):
        memattn.trace(plain)
    joint = FluxTransformer2DModel(  # SD3's joint attention is read (tests/test_sd3.py); Flux's not yet
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    with pytest.raises(UnsupportedModelError, match="jointly over image and text .*only in SD3/SD3.5 so far"):
        memattn.trace(joint)
    from diffusers import PixArtTransformer2DModel, SanaTransformer2DModel

    pixart = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        caption_channels=16,
    )
    sana = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    )
    # Sana: attn2 is there, but to Gemma text whose conventions are not described: refused, never misaligned
    with pytest.raises(UnsupportedModelError, match="no BOS token.*not supported yet"):
        memattn.trace(sana)
    with pytest.raises(UnsupportedModelError, match="no BOS token"):
        memattn.mitigate(sana)
    # PixArt (T5 text) is read: its attn2 layers in forward order (tests/test_pixart.py for the rest)
    assert [name for name, _ in cross_attention_layers(pixart)] == ["transformer_blocks.0.attn2"]
    added_kv = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=16,
        encoder_hid_dim=32,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
    )
    with pytest.raises(UnsupportedModelError, match="added-KV"):
        memattn.trace(added_kv)
    with pytest.raises(UnsupportedModelError, match="neither a diffusers pipeline"):
        memattn.trace(object())
    assert len(cross_attention_layers(sd1_unet())) == 16


def test_probe_adds_no_host_synchronisation(sd1_pipe):
    """`.item()`/`float(tensor)` dispatch `aten._local_scalar_dense`, a device→host sync on a GPU.

    The traced call must issue exactly as many as the plain call (the record is copied once, when read).
    """

    def call():
        sd1_pipe(PROMPTS[:2], num_inference_steps=3, generator=generators([0, 1]), output_type="latent")

    with CountScalarReads() as plain:
        call()
    with memattn.trace(sd1_pipe) as tr, CountScalarReads() as traced:
        call()
    assert traced.count == plain.count
    assert tr.record.n_steps == 3


def test_nested_trace_is_refused_and_a_user_wrapper_survives(sd1_pipe):
    before = dict(sd1_pipe.unet.attn_processors)
    seen = []
    original = sd1_pipe.encode_prompt

    def user_wrapper(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    sd1_pipe.encode_prompt = user_wrapper
    try:
        with memattn.trace(sd1_pipe) as tr:
            with pytest.raises(RecordError, match="nested traces are not supported"), memattn.trace(sd1_pipe):
                pass
            sd1_pipe("a dog", num_inference_steps=2, generator=generators([0]), output_type="latent")
        assert sd1_pipe.encode_prompt is user_wrapper and seen == [1]
        # The wrapper hides the real signature, yet prompt and CFG are found (bound to the class method).
        assert tr.record.n_images == 1 and tr.record.prompts == ("a dog",)
    finally:
        del sd1_pipe.encode_prompt
    assert all(sd1_pipe.unet.attn_processors[name] is before[name] for name in before)


def test_training_forward_keeps_no_graph_in_the_record():
    torch.manual_seed(0)
    unet = sd1_unet().train()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with memattn.trace(unet) as tr:
        loss = unet(sample, 10, encoder_hidden_states=context).sample.pow(2).mean()
        loss.backward()
        assert not tr.record.attention.requires_grad
    assert unet.conv_in.weight.grad is not None
