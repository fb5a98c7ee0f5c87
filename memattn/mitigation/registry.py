"""Every per-image mitigation behind one name and one strength (``memattn generate --method``, sweeps).

``prepare(pipe, method, prompts, strength)`` returns the prompts to generate from and a context to
generate in; copies and alignment are still judged against the user's own prompts. Each method is one
:class:`Method` entry in ``REGISTRY`` (name, how to build it, default strength and what it means,
whether it needs classifier-free guidance): adding a method is adding one entry.

| method | strength (default) | what it does |
|---|---|---|
| ``none`` | – | plain generation |
| ``ren2024`` | C (1.25) | the paper's attention edit: padding masked, BOS logit × C (``memattn.mitigate``) |
| ``dynamic-sink`` | C (1.25) | the same with the model's measured sink (top non-word recipient) × C |
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memattn.attention.edit import PAPER_C
from memattn.errors import MemattnError
from memattn.mitigation import prompt as baselines
from memattn.mitigation.cross_attention import mitigate
from memattn.mitigation.embedding_opt import embedding_optimization
from memattn.mitigation.guidance import guidance_schedule

OPPOSITE_GUIDANCE_SHARE = 0.35  # Jain et al. switch at t = 650 of 1000


@dataclass
class Prepared:
    prompts: list[str]
    context: contextlib.AbstractContextManager


# (pipe, prompts, strength, seed, steps) -> what to generate and the context to generate it in
Build = Callable[[Any, list[str], Any, int, int], Prepared]


@dataclass(frozen=True)
class Method:
    """One mitigation and everything the CLI, the benchmarks and the docs need to know about it."""

    name: str
    build: Build
    default_strength: float | None = None  # None: the method has no strength
    strength_meaning: str = ""  # what the one number means, for help texts and tables
    needs_cfg: bool = False  # reads or changes the unconditional branch: refused at guidance <= 1
    summary: str = ""

    def check(self, strength: float | None, guidance_scale: float | None = None) -> None:
        """Refuse settings the method cannot run with (call it before long work, e.g. loading a model)."""
        if self.needs_cfg and guidance_scale is not None and guidance_scale <= 1:
            raise MemattnError(
                f"{self.name} needs classifier-free guidance (guidance above 1), got "
                f"guidance {guidance_scale:g}"
            )
        if strength is not None and self.default_strength is None:
            raise MemattnError(f"{self.name} has no strength; drop --strength")

    def prepare(
        self,
        pipe: Any,
        prompts: Sequence[str],
        strength: float | None = None,
        *,
        seed: int = 0,
        steps: int = 50,
        guidance_scale: float | None = None,
    ) -> Prepared:
        self.check(strength, guidance_scale)
        value = self.default_strength if strength is None else strength
        return self.build(pipe, list(prompts), value, seed, steps)


def _plain(pipe: Any, prompts: list[str], value: Any, seed: int, steps: int) -> Prepared:
    return Prepared(prompts, contextlib.nullcontext())


def _count(strength: float) -> int:
    if float(strength) != int(strength):
        raise MemattnError(f"rta/rna strength is a number of inserted items, got {strength}")
    return int(strength)


def _augmented(kind: str) -> Build:
    def build(pipe: Any, prompts: list[str], value: Any, seed: int, steps: int) -> Prepared:
        return Prepared(
            baselines.transform_prompts(pipe, prompts, kind, _count(value), seed), contextlib.nullcontext()
        )

    return build


def _in_context(make: Callable[[Any, Any, int, int], contextlib.AbstractContextManager]) -> Build:
    """A method that leaves the prompts alone and generates inside a context."""

    def build(pipe: Any, prompts: list[str], value: Any, seed: int, steps: int) -> Prepared:
        return Prepared(prompts, make(pipe, value, seed, steps))

    return build


def _stp(pipe: Any, value: Any, seed: int, steps: int) -> contextlib.AbstractContextManager:
    if not 0 <= value <= 1:
        raise MemattnError(f"stp strength is the share of steps without guidance, in [0, 1], got {value}")
    return guidance_schedule(pipe, scale=0.0, first_steps=round(value * steps))


REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        Method("none", _plain, summary="plain generation"),
        Method(
            "ren2024",
            _in_context(lambda pipe, value, seed, steps: mitigate(pipe, c=value)),
            PAPER_C,
            "C, the BOS logit factor",
            summary="the paper's attention edit: padding masked, BOS logit x C (memattn.mitigate)",
        ),
        Method(
            "dynamic-sink",
            _in_context(lambda pipe, value, seed, steps: mitigate(pipe, c=value, sink="dynamic")),
            PAPER_C,
            "C, the sink's logit factor",
            summary="the paper's edit with the measured sink: padding masked, the top non-word "
            "recipient's logit x C (models without BOS: PixArt)",
        ),
        Method(
            "rta", _augmented("rta"), 4, "inserted words", summary="Somepalli et al.: random token addition"
        ),
        Method(
            "rna",
            _augmented("rna"),
            4,
            "inserted numbers",
            summary="Somepalli et al.: random number addition",
        ),
        Method(
            "gni",
            _in_context(lambda pipe, value, seed, steps: baselines.embedding_noise(pipe, value, seed=seed)),
            0.1,
            "lambda, the noise scale",
            summary="Somepalli et al.: Gaussian noise on the text embeddings",
        ),
        Method(
            "wen",
            _in_context(lambda pipe, value, seed, steps: embedding_optimization(pipe, target_loss=value)),
            3.0,
            "target noise norm",
            needs_cfg=True,
            summary="Wen et al.: prompt-embedding optimisation at the first step",
        ),
        Method(
            "pad-replace",
            _in_context(lambda pipe, value, seed, steps: baselines.padding_replacement(pipe)),
            summary="Kim & No fix 1: '!' padding, zeroed <eot> embedding",
        ),
        Method(
            "pad-mask",
            _in_context(lambda pipe, value, seed, steps: baselines.padding_masking(pipe, value, seed=seed)),
            0.7,
            "share of padding zeroed",
            summary="Kim & No fix 2",
        ),
        Method(
            "stp",
            _in_context(_stp),
            0.5,
            "share of steps without guidance",
            needs_cfg=True,
            summary="Jain et al.: static transition point",
        ),
        Method(
            "opposite-guidance",
            _in_context(
                lambda pipe, value, seed, steps: guidance_schedule(
                    pipe, scale=-value, first_steps=round(OPPOSITE_GUIDANCE_SHARE * steps)
                )
            ),
            2.0,
            "opposite scale s (first 35 % of steps)",
            needs_cfg=True,
            summary="Jain et al.: opposite guidance",
        ),
    )
}
METHODS = tuple(REGISTRY)
DEFAULT_STRENGTH: dict[str, float | None] = {name: m.default_strength for name, m in REGISTRY.items()}


def get(method: str) -> Method:
    """The registered method, or one line listing the known ones."""
    if method not in REGISTRY:
        raise MemattnError(f"unknown mitigation method {method!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[method]


def prepare(
    pipe: Any,
    method: str,
    prompts: Sequence[str],
    strength: float | None = None,
    *,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float | None = None,
) -> Prepared:
    """What to generate and the context to generate it in, for one batch of prompts."""
    return get(method).prepare(pipe, prompts, strength, seed=seed, steps=steps, guidance_scale=guidance_scale)
