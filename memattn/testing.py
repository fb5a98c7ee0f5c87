"""Tiny Stable Diffusion pipelines built from configs in code, with the real classes.

They have random weights (so their scores mean nothing) but the same structure, tokenizers, padding
conventions and batch layouts as SD1.x, SD2.x and SDXL: every memattn code path runs on them here,
where real weights cannot be downloaded. The tokenizer is the real CLIP BPE vocabulary, read from the
file that ``open-clip-torch`` ships (installed with ``pip install --no-deps open-clip-torch``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from memattn.errors import MemattnError

Kind = Literal["sd1", "sd2", "sdxl"]
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_path() -> Path:
    """The OpenAI CLIP BPE file shipped by open_clip, found without importing open_clip (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / VOCAB_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MemattnError(
            f"the CLIP BPE vocabulary ({VOCAB_FILE}) was not found; install it with "
            "`pip install --no-deps open-clip-torch`"
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP table: byte value -> printable unicode symbol, in vocabulary id order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def cache_dir() -> Path:
    return Path(os.environ.get("MEMATTN_CACHE", Path.home() / ".cache" / "memattn"))


@lru_cache(maxsize=1)
def clip_tokenizer_dir() -> Path:
    """A ``vocab.json`` + ``merges.txt`` directory for ``CLIPTokenizer``, built once from the BPE file.

    Same construction as OpenAI's SimpleTokenizer: 48,894 merges, 49,408 ids (BOS 49406, EOS 49407).
    """
    target = cache_dir() / "clip-bpe"
    if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
        return target
    lines = gzip.open(clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        for name in ("merges.txt", "vocab.json"):
            os.replace(Path(tmp, name), target / name)
    return target


def clip_tokenizer(pad: Literal["eos", "!"] = "eos"):
    """The real CLIP tokenizer: SD1/CLIP-L pads with EOS, SD2/OpenCLIP-bigG with "!" (id 0)."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": "!"} if pad == "!" else {}
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=77, **extra)


def _text_encoder(pad_id: int, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_id,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(blocks: int = 2):
    """Tiny KL VAE; ``blocks`` sets the scale factor (2 blocks: 2×, 4 blocks: 8× as in the real ones)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16] + [16] * (blocks - 2),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()


def sd1_unet(
    sample_size: int = 8,
    channels: tuple[int, int, int, int] = (32, 32, 64, 64),
    heads: int | tuple[int, ...] = 8,
    cross_attention_dim: int = 32,
    **overrides,
):
    """SD1's UNet layout with fewer channels: 3 CrossAttn down blocks + 1 plain, mirrored up; 2 layers
    per block, 3 per up block: 16 cross-attention layers in SD1's order (index 3 = the paper's layer)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=heads,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_pipeline(
    kind: Kind = "sd1",
    *,
    seed: int = 0,
    sample_size: int = 8,
    channels: tuple[int, int, int, int] = (32, 32, 64, 64),
    dtype: torch.dtype = torch.float32,
    attention_gain: float = 4.0,
):
    """A diffusers pipeline of the given family with random weights.

    ``sd1``: SD1 UNet layout (16 attn2 layers, 8 heads), CLIP tokenizer padding with EOS, DDIM.
    ``sd2``: same layout with 2/4/8 heads (unequal, like SD2's 5/10/20), linear projections,
    upcast attention, tokenizer padding with "!", Euler with v-prediction.
    ``sdxl``: SDXL layout (plain first down block, 2 transformer layers in the second, text_time
    embedding), two text encoders whose states are concatenated on 77 shared positions.
    ``attention_gain`` scales the cross-attention query/key weights so that random attention is not
    almost uniform over the 77 tokens (which would make batch-layout bugs hard to see).
    """
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.manual_seed(seed)
    if kind == "sd1":
        unet = sd1_unet(sample_size, channels)
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(49407),
            tokenizer=clip_tokenizer("eos"),
            unet=unet,
            scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **betas),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif kind == "sd2":
        unet = sd1_unet(
            sample_size, channels, heads=(2, 4, 8, 8), use_linear_projection=True, upcast_attention=True
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(0),
            tokenizer=clip_tokenizer("!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler(prediction_type="v_prediction", steps_offset=1, **betas),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif kind == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=8,
        ).eval()
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(49407),
            text_encoder_2=_text_encoder(0, projection=True),
            tokenizer=clip_tokenizer("eos"),
            tokenizer_2=clip_tokenizer("!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler(steps_offset=1, **betas),
            force_zeros_for_empty_prompt=False,
        )
    else:
        raise MemattnError(f"unknown tiny pipeline kind {kind!r}; choose sd1, sd2 or sdxl")
    _sharpen_cross_attention(pipe.unet, attention_gain)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


@torch.no_grad()
def _sharpen_cross_attention(unet: torch.nn.Module, gain: float) -> None:
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.to_q.weight.mul_(gain)
            module.to_k.weight.mul_(gain)


# ---- PixArt-α / PixArt-Σ: a DiT denoiser reading T5 text through attn2 ---------------------------

PixArtKind = Literal["alpha", "sigma"]
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2: pad, EOS, unknown; no BOS
T5_WORDS = (
    "a an the of on in with and at to by from photo painting portrait picture image drawing close up "
    "dog cat horse astronaut man woman child bird car house tree river mountain city street beach sky "
    "red blue green yellow black white golden small large old young happy sad riding standing sitting "
    "running mars moon space forest night sunset morning winter summer oil canvas style art digital "
    "hippo mothers influence her young cube floor wow famous actor wearing hat dress"
).split()
PUNCTUATION = tuple(".,!?:;'\"-()")


@lru_cache(maxsize=1)
def t5_tokenizer():
    """A T5-convention tokenizer built in code: ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2, no BOS.

    Word-level over a small English vocabulary (unknown words become ``<unk>``), so every prompt has
    as many tokens as words and punctuation marks: enough to check layouts, masks and batch order.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*T5_SPECIALS, *T5_WORDS, *PUNCTUATION))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,  # T5's, as in the real tokenizer: the pipeline sets the encoded length
        padding_side="right",
    )


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_pixart_pipeline(kind: PixArtKind = "alpha", *, seed: int = 0, attention_gain: float = 4.0):
    """A PixArt-α (``alpha``) or PixArt-Σ (``sigma``) pipeline with random weights, from configs.

    The real classes: ``PixArtTransformer2DModel`` (2 blocks, 2 heads of 8, patch 2, learned sigma),
    a 2-layer ``T5EncoderModel``, a tiny 8× VAE and :func:`t5_tokenizer`. Latents are 32×32 (256 px):
    PixArt's smallest resolution bin, so the pipeline runs with its default ``use_resolution_binning``.
    α uses DDIM, Σ the DPM-Solver++ multistep scheduler (PixArt's default). ``attention_gain``
    sharpens the attn2 query/key weights as for the SD pipelines.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    if kind not in ("alpha", "sigma"):
        raise MemattnError(f"unknown tiny PixArt kind {kind!r}; choose alpha or sigma")
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        caption_channels=32,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    components = dict(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(len(tokenizer)),
        vae=_vae(blocks=4),
        transformer=transformer,
    )
    if kind == "alpha":
        pipe = PixArtAlphaPipeline(scheduler=DDIMScheduler(), **components)
    else:
        pipe = PixArtSigmaPipeline(scheduler=DPMSolverMultistepScheduler(), **components)
    _sharpen_cross_attention(pipe.transformer, attention_gain)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- SD3 / SD3.5: an MMDiT reading CLIP-L + CLIP-G + T5 text through joint attention ---------------

SD3Kind = Literal["sd3", "sd3.5"]


def tiny_sd3_pipeline(
    kind: SD3Kind = "sd3", *, seed: int = 0, attention_gain: float = 4.0, sample_size: int = 16
):
    """A Stable Diffusion 3 (``sd3``) or 3.5 (``sd3.5``) pipeline with random weights, from configs.

    The real classes: ``SD3Transformer2DModel`` (2 joint blocks, 2 heads of 8, patch 2; ``sd3.5`` adds
    SD3.5's RMS qk-norm and a dual-attention first block), two ``CLIPTextModelWithProjection`` on the real
    CLIP vocabulary (CLIP-L pads with EOS, CLIP-G with "!"), a 2-layer ``T5EncoderModel`` with
    :func:`t5_tokenizer`, a tiny 2× VAE and the flow-matching Euler scheduler. The text sequence is SD3's:
    77 CLIP positions, then ``max_sequence_length`` T5 positions (256 by default), with no mask.
    ``sample_size`` is the latent height and width (16: 64 image tokens; images are twice as large).
    ``attention_gain`` sharpens the joint attention's query/key weights (image and text side).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if kind not in ("sd3", "sd3.5"):
        raise MemattnError(f"unknown tiny SD3 kind {kind!r}; choose sd3 or sd3.5")
    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=max(16, sample_size // 2),
        dual_attention_layers=(0,) if kind == "sd3.5" else (),
        qk_norm="rms_norm" if kind == "sd3.5" else None,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_text_encoder(49407, projection=True),
        tokenizer=clip_tokenizer("eos"),
        text_encoder_2=_text_encoder(0, projection=True),
        tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=_t5_encoder(len(t5), d_model=64),
        tokenizer_3=t5,
    )
    with torch.no_grad():
        for name, module in pipe.transformer.named_modules():
            if name.endswith(".attn") and getattr(module, "add_k_proj", None) is not None:
                for projection in (module.to_q, module.to_k, module.add_q_proj, module.add_k_proj):
                    projection.weight.mul_(attention_gain)
    pipe.set_progress_bar_config(disable=True)
    return pipe
