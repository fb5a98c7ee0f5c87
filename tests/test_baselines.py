"""Somepalli et al.'s inference-time baselines: seeded prompt and embedding perturbations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generators

from memattn.errors import MemattnError
from memattn.mitigation.prompt import (
    embedding_noise,
    random_number_addition,
    random_token_addition,
    transform_prompts,
    vocabulary_words,
)

PROMPT = "an old red barn in a snowy field at dusk"


def test_rta_and_rna_insert_n_items_and_are_seeded(sd1_pipe):
    words = vocabulary_words(sd1_pipe.tokenizer)
    assert len(words) > 1000 and all(w.isalpha() for w in words)
    rta = random_token_addition(PROMPT, words, n=4, seed=0)
    assert len(rta.split()) == len(PROMPT.split()) + 4
    assert (
        rta == random_token_addition(PROMPT, words, n=4, seed=0) != random_token_addition(PROMPT, words, 4, 1)
    )
    rna = random_number_addition(PROMPT, n=3, seed=0)
    added = [w for w in rna.split() if w.isdigit()]
    assert len(added) == 3 and [w for w in rna.split() if not w.isdigit()] == PROMPT.split()
    assert transform_prompts(sd1_pipe, [PROMPT], "gni") == [PROMPT]
    with pytest.raises(MemattnError, match="unknown baseline 'nope'"):
        transform_prompts(sd1_pipe, [PROMPT], "nope")
    with pytest.raises(MemattnError, match=">= 1"):
        random_number_addition(PROMPT, n=0)


def test_gni_perturbs_only_the_conditional_embeddings_and_restores(sd1_pipe):
    with torch.no_grad():
        cond, uncond = sd1_pipe.encode_prompt([PROMPT], "cpu", 1, True)
        with embedding_noise(sd1_pipe, lam=0.5, seed=3):
            noisy_cond, noisy_uncond = sd1_pipe.encode_prompt([PROMPT], "cpu", 1, True)
    assert torch.equal(noisy_uncond, uncond)
    assert abs(float((noisy_cond - cond).std()) - 0.5) < 0.05
    assert "encode_prompt" not in vars(sd1_pipe)
    plain = sd1_pipe(PROMPT, num_inference_steps=2, generator=generators([0]), output_type="np").images
    with embedding_noise(sd1_pipe, lam=0.0):
        same = sd1_pipe(PROMPT, num_inference_steps=2, generator=generators([0]), output_type="np").images
    assert np.array_equal(plain, same)
    with pytest.raises(MemattnError, match="λ must be a finite number"):
        with embedding_noise(sd1_pipe, lam=float("nan")):
            pass
