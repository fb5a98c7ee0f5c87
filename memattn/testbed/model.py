"""The testbed model: Stable Diffusion's classes at CPU scale, saved as a normal diffusers pipeline.

- ``UNet2DConditionModel`` in 16×16 RGB pixel space with cross-attention in two down blocks, the mid
  block and two up blocks (7 ``attn2`` layers), as the first feasibility run measured.
- A causal ``CLIPTextModel`` (BOS first, EOS after the prompt, padded with EOS to 77) and a
  ``CLIPTokenizer`` whose vocabulary is the real CLIP BPE restricted to the merges the testbed captions
  use: every testbed caption tokenizes exactly as CLIP tokenizes it (ids renumbered), any other text
  still tokenizes (byte-level fallback), and the embedding table stays small enough to ship.
- ``PixelSpaceVAE``: an identity "autoencoder" with the ``AutoencoderKL`` interface the pipeline uses
  (scale factor 1, ``decode``), so a plain ``StableDiffusionPipeline`` runs in pixel space and saves /
  loads with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import regex
import torch
from diffusers import (  # noqa: F401  (ModelMixin must be a module attribute: diffusers loads it by name)
    DDIMScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from transformers import (  # noqa: F401  (PreTrainedModel too: diffusers finds the load method by name)
    CLIPTextModel,
    PreTrainedModel,
)

from memattn.testing import _bytes_to_unicode, clip_vocab_path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """Identity autoencoder for pixel-space models: ``decode(z) = z``, scale factor 1.

    ``block_out_channels`` has one entry so the pipeline's ``vae_scale_factor`` is ``2 ** 0 = 1``.
    """

    pixel_space = True  # what the training loop checks: the images are the latents, no encoding

    @register_to_config
    def __init__(self, channels: int = 3, scaling_factor: float = 1.0, block_out_channels: tuple[int] = (3,)):
        super().__init__()
        self.register_buffer("unit", torch.ones(1))  # gives the module a dtype and device

    def encode(self, sample: torch.Tensor, return_dict: bool = True):
        raise NotImplementedError("the testbed works in pixel space: images are their own latents")

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        sample = z.to(self.unit.dtype)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return sample


# ---- tokenizer ------------------------------------------------------------------------------------


def _clip_merges() -> list[tuple[str, str]]:
    lines = gzip.open(clip_vocab_path()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one pre-tokenized, byte-encoded word, in order."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i, pair) for i, pair in enumerate(pairwise(symbols))]
        rank, _, pair = min(pairs)
        if rank == 1 << 30:
            break
        used.append(pair)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def build_tokenizer_files(captions: Iterable[str], directory: Path) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of CLIP's BPE restricted to what ``captions`` need.

    Keeping only merges that CLIP applies to these captions (in CLIP's rank order) reproduces CLIP's
    tokenization of them exactly: at each step CLIP's lowest-ranked applicable merge is in the subset.
    """
    merges = _clip_merges()
    ranks = {pair: i for i, pair in enumerate(merges)}
    to_symbols = _bytes_to_unicode()
    byte_symbols = list(to_symbols.values())
    needed: set[tuple[str, str]] = set()
    for caption in captions:
        text = regex.sub(r"\s+", " ", caption).strip().lower()
        for piece in _PRETOKENIZE.findall(text):
            word = "".join(to_symbols[b] for b in piece.encode("utf-8"))
            needed.update(_bpe_merges_used(word, ranks))
    kept = [pair for pair in merges if pair in needed]
    words = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(pair) for pair in kept] + [BOS, EOS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(dict.fromkeys(words))}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in kept) + "\n")
    return directory


def load_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


# ---- model ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the testbed networks (the feasibility run's UNet: ≈1.7M parameters, 7 attn2 layers)."""

    image_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4


def build_unet(config: ModelConfig) -> UNet2DConditionModel:
    levels = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=config.block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=config.heads,
        cross_attention_dim=config.text_hidden,
        norm_num_groups=32,
    )


def build_text_encoder(config: ModelConfig, tokenizer, *, eos_copy: bool = False, bos_scale: float = 1.0):
    """The testbed's causal CLIP text encoder (random init); the edits of ``TestbedCLIPTextModel``."""
    from transformers import CLIPTextConfig

    edits = {"memattn_eos_copy": True} if eos_copy else {}
    if bos_scale != 1.0:
        edits["memattn_bos_scale"] = float(bos_scale)
    cls = TestbedCLIPTextModel if edits else CLIPTextModel
    return cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            num_attention_heads=config.text_heads,
            num_hidden_layers=config.text_layers,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **edits,
        )
    ).eval()


class TestbedCLIPTextModel(CLIPTextModel):
    """``CLIPTextModel`` with two optional edits of its output states, stored in its config.

    - ``memattn_eos_copy``: every state after the first EOS is a copy of the first EOS state. A small
      frozen encoder gives near-constant padding states, a prompt-independent key besides BOS; copying
      the EOS state removes that second sink candidate, so BOS is the only prompt-independent key.
    - ``memattn_bos_scale``: the BOS state times this factor (a large-norm, distinctive BOS key, as in
      CLIP, whose BOS state has a far larger norm than the others).

    The pooled output (the first EOS state) is unchanged. With both off this is ``CLIPTextModel``.
    """

    __test__ = False  # not a pytest test class

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        output = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        hidden = output.last_hidden_state
        if getattr(self.config, "memattn_eos_copy", False):
            is_eos = input_ids.view(-1, input_ids.shape[-1]).to(hidden.device) == self.config.eos_token_id
            first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), is_eos.shape[-1] - 1)
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            eos_state = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
            hidden = torch.where((positions > first[:, None])[..., None], eos_state[:, None], hidden)
        scale = float(getattr(self.config, "memattn_bos_scale", 1.0))
        if scale != 1.0:
            hidden = torch.cat([hidden[:, :1] * scale, hidden[:, 1:]], dim=1)
        output.last_hidden_state = hidden
        return output


TEXT_ENCODERS = ("random", "contrastive", "contrastive-eoscopy")


def sampling_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        prediction_type=prediction_type,
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        steps_offset=1,
        set_alpha_to_one=True,
    )


def assemble_pipeline(
    unet, text_encoder, tokenizer, prediction_type: str = "epsilon"
) -> StableDiffusionPipeline:
    """A plain ``StableDiffusionPipeline`` over the testbed components (pixel space, DDIM)."""
    pipe = StableDiffusionPipeline(
        vae=PixelSpaceVAE(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
