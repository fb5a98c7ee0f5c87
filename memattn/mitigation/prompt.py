"""Inference-time mitigation baselines that perturb the prompt or its text embeddings.

Somepalli et al. (NeurIPS 2023), as their code applies them (``--rand_aug_repeats 4``,
``--rand_noise_lam 0.1``):
- RTA (random token addition): insert ``n`` random vocabulary words at random positions of the prompt;
- RNA (random number addition): insert ``n`` random numbers at random positions;
- GNI (Gaussian noise injection): add ``λ·N(0, 1)`` to the conditional text-encoder output.
Kim & No (CVPR 2026), on the padding that repeats the end-of-text embedding in SD1:
- pad replacement (their fix 1): pad with ``!`` instead of ``<eot>`` and zero the ``<eot>`` embedding;
- pad masking (their fix 2): zero a fraction (0.7) of the padding embeddings (a seeded random subset).
Every perturbation is seeded, so a run is reproducible and the same prompt gets the same change.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from memattn.attention.patch import wrapping_encode_prompt
from memattn.errors import MemattnError

METHODS = ("rta", "rna", "gni")


def _check_count(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise MemattnError(f"the number of inserted items must be an integer >= 1, got {n!r}")


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Whole alphabetic words of a CLIP tokenizer's vocabulary (what RTA draws from)."""
    words = sorted(
        {
            token[:-4]
            for token in tokenizer.get_vocab()
            if token.endswith("</w>") and re.fullmatch(r"[a-z]{2,}</w>", token)
        }
    )
    if not words:
        raise MemattnError("the tokenizer has no whole-word entries to draw random tokens from")
    return words


def _insert(prompt: str, items: Sequence[str], rng: random.Random) -> str:
    words = prompt.split()
    for item in items:
        words.insert(rng.randint(0, len(words)), item)
    return " ".join(words)


def random_token_addition(prompt: str, words: Sequence[str], n: int = 4, seed: int = 0) -> str:
    _check_count(n)
    rng = random.Random(f"rta:{seed}:{prompt}")
    return _insert(prompt, [rng.choice(words) for _ in range(n)], rng)


def random_number_addition(prompt: str, n: int = 4, seed: int = 0) -> str:
    _check_count(n)
    rng = random.Random(f"rna:{seed}:{prompt}")
    return _insert(prompt, [str(rng.randint(0, 99999)) for _ in range(n)], rng)


# The conditional embeddings of one ``encode_prompt`` call -> their replacement.
EmbeddingEdit = Callable[[torch.Tensor, list[str], int], torch.Tensor]


def editing_embeddings(pipe: Any, edit: EmbeddingEdit) -> contextlib.AbstractContextManager:
    """Inside the block, ``pipe.encode_prompt`` returns ``edit(cond, prompts, images_per_prompt)``.

    Only the conditional embeddings change (the unconditional branch stays the empty prompt's), and
    the pipeline keeps its own prompts, so probes still read the real token layouts.
    """

    def hook(bound: dict[str, Any], result: tuple) -> tuple:
        prompt = bound.get("prompt")
        if prompt is None:
            raise MemattnError(
                "this mitigation edits the embeddings of prompts: pass prompt=, not prompt_embeds"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = int(bound.get("num_images_per_prompt") or 1)
        return (edit(result[0], prompts, per_prompt), *result[1:])

    return wrapping_encode_prompt(pipe, hook)


def embedding_noise(pipe: Any, lam: float = 0.1, seed: int = 0) -> contextlib.AbstractContextManager:
    """GNI: inside the block, ``pipe.encode_prompt`` adds ``lam·N(0, 1)`` to the conditional embeddings."""
    if not math.isfinite(lam) or lam < 0:
        raise MemattnError(f"GNI strength λ must be a finite number >= 0, got {lam}")
    generator = torch.Generator().manual_seed(seed)

    def add_noise(embeds: torch.Tensor, prompts: list[str], per_prompt: int) -> torch.Tensor:
        noise = torch.randn(embeds.shape, generator=generator).to(embeds.device, embeds.dtype)
        return embeds + lam * noise

    return editing_embeddings(pipe, add_noise)


def _eos_positions(pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
    from memattn.attention.tokens import tokenize_layouts

    tokenizer = pipe.tokenizer
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids, [layout.eos_index for layout in tokenize_layouts(tokenizer, prompts)]


def padding_replacement(pipe: Any) -> contextlib.AbstractContextManager:
    """Kim & No fix 1: re-encode with ``!`` as the padding token and zero the ``<eot>`` embedding."""
    bang = pipe.tokenizer.convert_tokens_to_ids("!")
    if bang is None or bang == pipe.tokenizer.unk_token_id:
        raise MemattnError("the tokenizer has no '!' token to pad with (Kim & No's padding replacement)")

    def replace(embeds: torch.Tensor, prompts: list[str], per_prompt: int) -> torch.Tensor:
        ids, eos = _eos_positions(pipe, prompts)
        for row, index in enumerate(eos):
            ids[row, index + 1 :] = bang
        encoder = pipe.text_encoder
        with torch.no_grad():
            new = encoder(ids.to(encoder.device))[0].to(embeds.device, embeds.dtype)
        new[torch.arange(len(eos)), torch.tensor(eos)] = 0.0
        return new.repeat_interleave(per_prompt, dim=0)

    return editing_embeddings(pipe, replace)


def padding_masking(pipe: Any, fraction: float = 0.7, seed: int = 0) -> contextlib.AbstractContextManager:
    """Kim & No fix 2: zero a seeded random ``fraction`` of each prompt's padding embeddings."""
    if not math.isfinite(fraction) or not 0 <= fraction <= 1:
        raise MemattnError(f"the share of padding embeddings to zero must lie in [0, 1], got {fraction}")

    def mask(embeds: torch.Tensor, prompts: list[str], per_prompt: int) -> torch.Tensor:
        _, eos = _eos_positions(pipe, prompts)
        embeds = embeds.clone()
        for row, index in enumerate(eos):
            padding = list(range(index + 1, embeds.shape[1]))
            rng = random.Random(f"padmask:{seed}:{prompts[row]}")
            zeroed = rng.sample(padding, round(fraction * len(padding)))
            rows = slice(row * per_prompt, (row + 1) * per_prompt)
            embeds[rows, zeroed] = 0.0
        return embeds

    return editing_embeddings(pipe, mask)


def transform_prompts(pipe: Any, prompts: Sequence[str], method: str, n: int = 4, seed: int = 0) -> list[str]:
    """RTA or RNA applied to each prompt (GNI leaves prompts alone: use ``embedding_noise``)."""
    if method not in METHODS:
        raise MemattnError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if method == "rta":
        words = vocabulary_words(pipe.tokenizer)
        return [random_token_addition(p, words, n, seed) for p in prompts]
    if method == "rna":
        return [random_number_addition(p, n, seed) for p in prompts]
    return list(prompts)
