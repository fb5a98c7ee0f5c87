"""Run a pipeline on prompts under the probe and return the paper's scores per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from memattn.attention.trace import trace
from memattn.detection import scores
from memattn.detection.step1 import Step1, score_step1, step_end_kwargs
from memattn.errors import MemattnError
from memattn.quiet import pipeline_bar_off

SCORES = ("d", "e")


@dataclass
class Detection:
    """Scores of one prompt (one image, seed = base seed + prompt index, as the official code)."""

    prompt: str
    seed: int
    score_d: float | None
    score_e: float | None
    n_tokens: int
    truncated: bool
    triggers: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Reject what cannot be scored with a message naming the prompt."""
    checked = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise MemattnError(f"prompt {index} is {type(prompt).__name__}, not text")
        if not prompt.strip():
            raise MemattnError(
                f"prompt {index} is empty; give a caption (the empty prompt is the unconditional branch)"
            )
        checked.append(prompt)
    if not checked:
        raise MemattnError("no prompts given")
    return checked


def detect(
    pipe: Any,
    prompts: Sequence[str],
    *,
    which: Sequence[str] = SCORES,
    steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    layer: int | str | None = None,
    progress: bool = True,
) -> list[Detection]:
    """Score prompts. Only E requested: one UNet call per batch (the loop stops after step 0)."""
    prompts = check_prompts(prompts)
    unknown = set(which) - set(SCORES)
    if unknown or not which:
        raise MemattnError(f"unknown score(s) {sorted(unknown)}; choose from {', '.join(SCORES)}")
    if "d" in which and steps < 2:
        raise MemattnError(f"score D needs at least 2 denoising steps, got --steps {steps}")
    first_step_only = "d" not in which
    results: list[Detection] = []
    starts = range(0, len(prompts), batch_size)
    calls_per_batch = 1 if first_step_only else steps
    # One tick per UNet step (an E-only run makes one per batch), so a long D run shows it moves.
    bar = tqdm(total=len(starts) * calls_per_batch, desc="detect", unit="step", disable=not progress)

    def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        bar.update(1)
        return callback_kwargs

    with bar, pipeline_bar_off(pipe):
        for start in starts:
            batch = prompts[start : start + batch_size]
            seeds = [seed + start + i for i in range(len(batch))]
            if first_step_only:  # E: the one step-1 scorer, one UNet call
                record = score_step1(
                    pipe, batch, seeds=seeds, steps=steps, guidance_scale=guidance_scale, wen=False
                ).record
                bar.update(1)
            else:
                generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
                with trace(pipe) as tr:
                    pipe(
                        list(batch),
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        generator=generators,
                        output_type="latent",
                        **step_end_kwargs(pipe, on_step_end),
                    )
                record = tr.record
            results += _detections(record, batch, seeds, which, layer)
    return results


def _detections(
    record: Any, batch: Sequence[str], seeds: list[int], which: Sequence[str], layer: int | str | None
) -> list[Detection]:
    d = scores.score_d(record).tolist() if "d" in which else [None] * len(batch)
    e = Step1(record).e(layer).tolist() if "e" in which else [None] * len(batch)
    triggers = scores.trigger_tokens(record)
    return [
        Detection(
            prompt=prompt,
            seed=seeds[i],
            score_d=d[i],
            score_e=e[i],
            n_tokens=record.layouts[i].n_tokens,
            truncated=record.layouts[i].truncated,
            triggers=[(t.token, t.share) for t in triggers[i]],
        )
        for i, prompt in enumerate(batch)
    ]


__all__ = ["SCORES", "Detection", "check_prompts", "detect"]
