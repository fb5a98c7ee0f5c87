"""The one step-1 scorer: every score memattn reads at the first UNet call, and the call that reads them.

Detection that must run before an image exists reads the first UNet call of a generation: the paper's E
(in one layer, or every layer), the BOS and summary shares, Wen et al.'s text-conditional noise norm
(needs classifier-free guidance) and the combined detector's features built from them. ``detect``,
``Guard``, ``calibrate``, ``scan`` and ``bench detect`` all read them through :class:`Step1`, so a score
means the same thing, and fails with the same message, everywhere.

- :func:`score_step1` runs a pipeline for one UNet call (the call ends after it) and returns a
  :class:`Step1`.
- A caller that needs the rest of the run (the guard, a full scan) records the first step itself and
  builds :class:`Step1` from that record and the step-1 noise norms.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from memattn.attention.record import AttentionRecord
from memattn.attention.trace import trace
from memattn.detection import scores
from memattn.errors import MemattnError

Step1Kind = Literal["e", "wen"]
STEP1_KINDS: tuple[str, ...] = ("e", "wen")


def check_kind(kind: str) -> str:
    if kind not in STEP1_KINDS:
        raise MemattnError(f"unknown step-1 score {kind!r}; choose from {', '.join(STEP1_KINDS)}")
    return kind


@dataclass
class Step1:
    """What the first UNet call says about each image of a batch.

    ``record`` may hold more steps (a full scan's); only its first step is read here. ``wen`` is Wen's
    step-1 norm per image, None when the call had no unconditional branch (guidance <= 1).
    """

    record: AttentionRecord
    wen: np.ndarray | None = None

    @property
    def n_images(self) -> int:
        return self.record.n_images

    def e(self, layer: int | str | None = None) -> np.ndarray:
        """The paper's E per image in ``layer`` (default: the paper's layer)."""
        return scores.score_e(self.record, layer).numpy().astype(np.float64)

    def score(self, kind: str, layer: int | str | None = None, *, finite: bool = True) -> np.ndarray:
        """The score a guard threshold applies to: ``"e"`` (in ``layer``) or ``"wen"``.

        ``finite`` refuses NaN/inf (a guard must not decide on one); a scan passes False and records it.
        """
        check_kind(kind)
        if kind == "e":
            values = self.e(layer)
        elif self.wen is None:
            raise MemattnError(
                "Wen's step-1 score needs classifier-free guidance (guidance above 1): it compares the "
                "conditional and unconditional noise predictions"
            )
        else:
            values = np.asarray(self.wen, dtype=np.float64)
        if finite and not np.isfinite(values).all():
            raise MemattnError("a step-1 score is NaN or infinite (fp16 overflow?); run the model in fp32")
        return values

    def features(self) -> tuple[np.ndarray, list[str]]:
        """``[image, feature]``: E per layer, BOS and summary shares, Wen's norm (when there is one)."""
        from memattn.detection.baselines import step1_features

        return step1_features(self.record, self.wen)

    def triggers(self, k: int = 3) -> list[list[scores.TriggerToken]]:
        return scores.trigger_tokens(self.record, k=k)


def stop_after_first_step(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
    """``callback_on_step_end`` that ends a diffusers pipeline call after its first UNet call."""
    pipe._interrupt = True
    return callback_kwargs


StepEnd = Callable[[Any, int, Any, dict], dict]


class FirstStepDone(Exception):
    """Raised by the step callback of a pipeline that cannot be interrupted (PixArt) after step 1."""


def step_end_kwargs(pipe: Any, callback: StepEnd) -> dict[str, Any]:
    """Pipeline arguments that call ``callback(pipe, step, timestep, tensors)`` after every step.

    Most diffusers pipelines take ``callback_on_step_end``; PixArt-α/Σ take only the older
    ``callback(step, timestep, latents)`` (with ``callback_steps``) and swallow an unknown
    ``callback_on_step_end`` in their ``**kwargs`` without calling it.
    """
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "callback_on_step_end" in parameters:
        return {"callback_on_step_end": callback}
    if "callback" in parameters:

        def legacy(step: int, timestep: Any, latents: torch.Tensor) -> None:
            callback(pipe, step, timestep, {"latents": latents})

        return {"callback": legacy, "callback_steps": 1}
    raise MemattnError(
        f"{type(pipe).__name__} takes no step callback (callback_on_step_end or callback); memattn cannot "
        "act after its first step"
    )


def interruptible(pipe: Any) -> bool:
    """Whether ``pipe`` stops on ``pipe._interrupt`` (pipelines with ``callback_on_step_end``)."""
    return "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters


def _raise_first_step_done(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
    raise FirstStepDone


def score_step1(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    steps: int,
    guidance_scale: float,
    wen: bool | None = None,
    **kwargs: Any,
) -> Step1:
    """One UNet call of ``pipe(prompts, ...)`` under a trace, and Wen's norm when there is CFG.

    ``steps`` is the run's step count (it sets the first timestep, which E depends on); ``wen`` None
    reads Wen's norm whenever ``guidance_scale > 1``. One CPU generator per image (``seeds`` or
    ``generators``), so an image's score does not depend on its batch.
    """
    from memattn.detection.baselines import NoiseDifference

    if (seeds is None) == (generators is None):
        raise MemattnError("score_step1: pass seeds= or generators=, one per prompt")
    if generators is None:
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    if len(generators) != len(prompts):
        raise MemattnError(f"score_step1: {len(generators)} generators for {len(prompts)} prompts")
    read_wen = guidance_scale > 1 if wen is None else wen
    noise = NoiseDifference(pipe, max_calls=1) if read_wen else None
    stop = stop_after_first_step if interruptible(pipe) else _raise_first_step_done
    with torch.no_grad(), trace(pipe) as tr, noise or nullcontext():
        try:
            pipe(
                list(prompts),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=list(generators),
                output_type="latent",
                **step_end_kwargs(pipe, stop),
                **kwargs,
            )
        except FirstStepDone:
            pass  # PixArt: no interrupt flag; its first step is all that is needed
    return Step1(tr.record, noise.wen(1) if noise is not None else None)


__all__ = [
    "STEP1_KINDS",
    "FirstStepDone",
    "Step1",
    "Step1Kind",
    "check_kind",
    "score_step1",
    "step_end_kwargs",
    "stop_after_first_step",
]
