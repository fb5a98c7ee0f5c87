"""The testbed model: CLIP tokenization kept, a plain StableDiffusionPipeline in pixel space, probe-ready."""

from __future__ import annotations

import pytest
import torch

import memattn
from memattn.loading import load_pipeline
from memattn.testbed import build_dataset
from memattn.testbed.model import (
    ModelConfig,
    PixelSpaceVAE,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer_files,
    build_unet,
    load_tokenizer,
)
from memattn.testing import clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    captions = [item.caption for item in build_dataset(0).items]
    return load_tokenizer(build_tokenizer_files(captions, tmp_path_factory.mktemp("tok")))


def test_every_testbed_caption_tokenizes_as_clip_does(tokenizer):
    full = clip_tokenizer()
    captions = [item.caption for item in build_dataset(0).items]
    assert all(tokenizer.tokenize(c) == full.tokenize(c) for c in captions)
    assert len(tokenizer) < 1500  # small embedding table, shippable
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[4] == tokenizer.eos_token_id
    assert ids[5:] == [tokenizer.eos_token_id] * 72  # SD1 convention: padded with EOS
    # Text outside the testbed vocabulary still tokenizes (byte-level fallback), never to <unk>.
    ids = tokenizer("zorblat ünïcode 42!").input_ids  # CLIP's unk token is EOS: none inside the prompt
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids[1:-1]


def test_pipeline_saves_loads_and_generates_identically(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig()
    pipe = assemble_pipeline(build_unet(config), build_text_encoder(config, tokenizer), tokenizer)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin"))
    loaded = load_pipeline(str(tmp_path))
    assert isinstance(loaded.vae, PixelSpaceVAE) and loaded.vae_scale_factor == 1

    def generate(p):
        return p(
            ["a red circle"],
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    first, second = generate(pipe).images, generate(loaded).images
    assert first.shape == (1, 16, 16, 3)
    assert (first == second).all()
    with memattn.trace(loaded) as tr:
        generate(loaded)
    assert tr.record.n_layers == 7
    assert tr.record.layer_names[tr.record.default_e_layer()].startswith("down_blocks.1.")
