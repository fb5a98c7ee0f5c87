"""Every per-image mitigation behind one name and one strength (``memattn generate --method``, sweeps).

``prepare(pipe, method, prompts, strength)`` returns the prompts to generate from and a context to
generate in; copies and alignment are still judged against the user's own prompts.

| method | strength (default) | what it does |
|---|---|---|
| ``none`` | – | plain generation |
| ``ren2024`` | C (1.25) | the paper's attention edit: padding masked, BOS logit × C (``memattn.mitigate``) |
| ``rta`` / ``rna`` | inserted words / numbers (4) | Somepalli et al. prompt augmentation |
| ``gni`` | λ (0.1) | Somepalli et al. Gaussian noise on the text embeddings |
| ``wen`` | target noise norm (3.0) | Wen et al. prompt-embedding optimisation at the first step |
| ``pad-replace`` | – | Kim & No fix 1: ``!`` padding, zeroed ``<eot>`` embedding |
| ``pad-mask`` | share of padding zeroed (0.7) | Kim & No fix 2 |
| ``stp`` | share of steps without guidance (0.5) | Jain et al. static transition point |
| ``opposite-guidance`` | opposite scale s (2.0), first 35 % of steps | Jain et al. opposite guidance |
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memattn import baselines
from memattn.attention.edit import PAPER_C
from memattn.embedding_opt import embedding_optimization
from memattn.errors import MemattnError
from memattn.guidance_schedule import guidance_schedule
from memattn.mitigation import mitigate

DEFAULT_STRENGTH: dict[str, float | None] = {
    "none": None,
    "ren2024": PAPER_C,
    "rta": 4,
    "rna": 4,
    "gni": 0.1,
    "wen": 3.0,
    "pad-replace": None,
    "pad-mask": 0.7,
    "stp": 0.5,
    "opposite-guidance": 2.0,
}
METHODS = tuple(DEFAULT_STRENGTH)
OPPOSITE_GUIDANCE_SHARE = 0.35  # Jain et al. switch at t = 650 of 1000


@dataclass
class Prepared:
    prompts: list[str]
    context: contextlib.AbstractContextManager


def _count(strength: float) -> int:
    if float(strength) != int(strength):
        raise MemattnError(f"rta/rna strength is a number of inserted items, got {strength}")
    return int(strength)


def prepare(
    pipe: Any,
    method: str,
    prompts: Sequence[str],
    strength: float | None = None,
    *,
    seed: int = 0,
    steps: int = 50,
) -> Prepared:
    """What to generate and the context to generate it in, for one batch of prompts."""
    if method not in DEFAULT_STRENGTH:
        raise MemattnError(f"unknown mitigation method {method!r}; choose one of {', '.join(METHODS)}")
    value = DEFAULT_STRENGTH[method] if strength is None else strength
    prompts = list(prompts)
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if method == "ren2024":
        context = mitigate(pipe, c=value)
    elif method in ("rta", "rna"):
        prompts = baselines.transform_prompts(pipe, prompts, method, _count(value), seed)
    elif method == "gni":
        context = baselines.embedding_noise(pipe, value, seed=seed)
    elif method == "wen":
        context = embedding_optimization(pipe, target_loss=value)
    elif method == "pad-replace":
        context = baselines.padding_replacement(pipe)
    elif method == "pad-mask":
        context = baselines.padding_masking(pipe, value, seed=seed)
    elif method == "stp":
        if not 0 <= value <= 1:
            raise MemattnError(f"stp strength is the share of steps without guidance, in [0, 1], got {value}")
        context = guidance_schedule(pipe, scale=0.0, steps=round(value * steps))
    elif method == "opposite-guidance":
        context = guidance_schedule(pipe, scale=-value, steps=round(OPPOSITE_GUIDANCE_SHARE * steps))
    return Prepared(prompts=prompts, context=context)
