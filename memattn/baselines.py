"""Inference-time mitigation baselines of Somepalli et al. (NeurIPS 2023), as their code applies them.

- RTA (random token addition): insert ``n`` random vocabulary words at random positions of the prompt;
- RNA (random number addition): insert ``n`` random numbers at random positions;
- GNI (Gaussian noise injection): add ``λ·N(0, 1)`` to the conditional text-encoder output.
Defaults follow the official inference code (``--rand_aug_repeats 4``, ``--rand_noise_lam 0.1``).
Every perturbation is seeded, so a run is reproducible and the same prompt gets the same change.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

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


@contextlib.contextmanager
def embedding_noise(pipe: Any, lam: float = 0.1, seed: int = 0) -> Iterator[None]:
    """GNI: inside the block, ``pipe.encode_prompt`` adds ``lam·N(0, 1)`` to the conditional embeddings."""
    if not math.isfinite(lam) or lam < 0:
        raise MemattnError(f"GNI strength λ must be a finite number >= 0, got {lam}")
    original = pipe.encode_prompt
    had_own = "encode_prompt" in vars(pipe)
    generator = torch.Generator().manual_seed(seed)

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        embeds = result[0]
        noise = torch.randn(embeds.shape, generator=generator).to(embeds.device, embeds.dtype)
        return (embeds + lam * noise, *result[1:])

    pipe.encode_prompt = encode_prompt
    try:
        yield
    finally:
        if had_own:
            pipe.encode_prompt = original
        else:
            del pipe.encode_prompt


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
