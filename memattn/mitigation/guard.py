"""The generation guard: score every image at the first denoising step, mitigate only the flagged ones.

``Guard(pipe)(prompts, ...)`` runs the pipeline with memattn's probes. After the first UNet call it
computes a step-1 score per image (the paper's E, or Wen et al.'s text-conditional noise norm, both
free from the call the pipeline makes anyway) and compares it with a calibrated threshold:

- ``mode="continue"``: flagged images get the attention edit from the second step on, in the same run;
- ``mode="restart"``: the run finishes unedited, then flagged images are generated again from the same
  initial noise with the edit on every step.

Images that are not flagged come out of the same kernels as an unguarded run (bit-identical when no
image in the batch is flagged). Each image gets a :class:`Verdict`. Thresholds come from
``memattn calibrate`` (a small JSON next to the model); without one the guard refuses to guess.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from memattn.attention.edit import PAPER_C, AttentionEdit, EditListener, check_sink
from memattn.attention.layers import parse_layer
from memattn.attention.patch import patched
from memattn.attention.recorder import Recorder
from memattn.attention.session import AttentionSession
from memattn.detection.baselines import NoiseDifference
from memattn.detection.step1 import Step1, check_kind, score_step1, step_end_kwargs
from memattn.errors import MemattnError
from memattn.mitigation.cross_attention import Mitigation

CALIBRATION_FILE = "memattn_guard.json"
# Named edits of flagged rows (benchmarks and ``bench mitigate --guard``): the paper's, and the paper's
# with the EOS masked as well (the strongest attention edit measured on the testbed).
GUARD_EDITS: dict[str, dict[str, Any]] = {
    "paper": {"c": PAPER_C},
    "eos": {"c": PAPER_C, "mask_eos": True},
}
Score = Literal["e", "wen"]


@dataclass(frozen=True)
class Calibration:
    """A threshold and how it was obtained (written by ``memattn calibrate``)."""

    score: str
    threshold: float
    fpr: float
    n_clean: int
    layer: str | None = None
    guidance_scale: float | None = None
    model: str | None = None
    steps: int | None = None  # E is read at the first step's timestep, which the step count sets
    scheduler: str | None = None
    resolution: list[int] | None = None
    dtype: str | None = None
    empirical_fpr: float | None = None

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise MemattnError(
                f"guard calibration {path} is unreadable ({error}); run memattn calibrate again"
            ) from None


_SETTING_OPTIONS = {
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "scheduler": "the same scheduler",
    "resolution": "--height/--width",
    "dtype": "--dtype",
}


def check_calibrated_settings(stored: dict[str, Any], actual: dict[str, Any], source: str) -> None:
    """Refuse a score computed under other settings than its calibration (one line naming both values).

    A setting the calibration does not record is not compared, except the step count: a file without it
    predates memattn recording it, and E moves with the step count (the first step's timestep).
    """
    if stored.get("steps") is None and actual.get("steps") is not None:
        raise MemattnError(
            f"the calibration {source} does not record its step count (written by an older memattn); "
            "run `memattn calibrate` again"
        )
    for name, option in _SETTING_OPTIONS.items():
        want, have = stored.get(name), actual.get(name)
        if want is None or have is None:
            continue
        same = (
            float(want) == float(have)
            if name == "guidance_scale"
            else list(np.atleast_1d(want)) == list(np.atleast_1d(have))
        )
        if not same:
            raise MemattnError(
                f"the calibration {source} was measured at {name} {want}, this run uses {have}: "
                f"run with {option} {want} or calibrate again at {have}"
                if option.startswith("--")
                else f"the calibration {source} was measured with {name} {want}, this run uses {have}: "
                f"use {option} or calibrate again"
            )


def call_settings(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings a pipeline call runs at that a calibrated score depends on (defaults included)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(type(pipe).__call__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }

    def get(name: str) -> Any:
        value = kwargs.get(name)
        return defaults.get(name) if value is None else value

    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)  # the denoiser
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    default_side = int(size) * int(scale) if isinstance(size, int) and scale else None
    height, width = get("height") or default_side, get("width") or default_side
    return {
        "steps": get("num_inference_steps"),
        "guidance_scale": get("guidance_scale"),
        "scheduler": type(pipe.scheduler).__name__ if getattr(pipe, "scheduler", None) is not None else None,
        "resolution": [int(height), int(width)] if height and width else None,
        "dtype": str(unet.dtype).removeprefix("torch.") if unet is not None else None,
    }


def calibration_path(pipe: Any) -> Path | None:
    """``memattn_guard.json`` in the directory the pipeline was loaded from, if there is one."""
    config = getattr(pipe, "config", None)
    source = getattr(config, "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    if source and Path(source).is_dir():
        return Path(source) / CALIBRATION_FILE
    return None


def min_clean_prompts(fpr: float) -> int:
    """Clean prompts a threshold at ``fpr`` needs: ``ceil(1 / fpr)``, so that at least one clean score
    may lie above it (with fewer, the threshold is the highest clean score itself); 1 at ``fpr`` 0."""
    return 1 if fpr <= 0 else int(np.ceil(1 / fpr - 1e-9))


def threshold_at_fpr(clean_scores: Sequence[float], fpr: float) -> float:
    """The smallest threshold that flags at most ``fpr`` of the clean scores (flag: score > threshold)."""
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    if not len(scores) or not np.isfinite(scores).all():
        raise MemattnError("calibration needs at least one finite clean score")
    if not 0 <= fpr < 1:
        raise MemattnError(f"--fpr must be in [0, 1), got {fpr}")
    allowed = int(np.floor(fpr * len(scores)))
    return float(scores[min(allowed, len(scores) - 1)])


@dataclass
class Verdict:
    """What the guard decided for one image."""

    prompt: str
    score: float
    threshold: float
    flagged: bool
    mitigated: bool
    mode: str
    trigger_tokens: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GuardOutput:
    images: Any
    verdicts: list[Verdict]


class Guard:
    """``guard = Guard(pipe); out = guard(prompts, num_inference_steps=50)``; see the module docstring."""

    def __init__(
        self,
        pipe: Any,
        *,
        threshold: float | None = None,
        score: Score = "e",
        layer: int | str | None = None,
        mitigation: dict[str, Any] | None = None,
        mode: Literal["continue", "restart"] = "continue",
        calibration: Path | None = None,
    ) -> None:
        if mode not in ("continue", "restart"):
            raise MemattnError(f"guard mode must be 'continue' or 'restart', got {mode!r}")
        check_kind(score)
        self.pipe = pipe
        self.mode = mode
        if {"steps", "at_steps"} & set(mitigation or {}):
            raise MemattnError("the guard decides the steps itself; give mitigation settings without steps")
        self.edit = AttentionEdit(**{"c": PAPER_C, **(mitigation or {})})
        alternative = 'Guard(pipe, mitigation={"c": 1.0, "mask_eos": True})'
        check_sink(self.edit, pipe, alternative, dynamic='Guard(pipe, mitigation={"sink": "dynamic"})')
        if threshold is None:
            path = calibration or calibration_path(pipe)
            if path is None or not Path(path).is_file():
                raise MemattnError(
                    "the guard has no threshold: run `memattn calibrate --model PATH --clean CLEAN_PROMPTS "
                    "--fpr 0.01` (writes memattn_guard.json next to the model), or pass threshold= "
                    "(CLI: --threshold)"
                )
            loaded = Calibration.load(Path(path))
            threshold, score = loaded.threshold, loaded.score  # type: ignore[assignment]
            layer = parse_layer(loaded.layer) if layer is None and loaded.layer is not None else layer
            self.calibration: tuple[Calibration, str] | None = (loaded, str(path))
        else:
            self.calibration = None
        self.threshold = float(threshold)
        self.score = score
        self.layer = layer

    # ---- one call -----------------------------------------------------------------------------
    def score_prompts(
        self, prompts: list[str], *, generator: Sequence[torch.Generator], **kwargs: Any
    ) -> np.ndarray:
        """The guard's step-1 score per prompt, nothing flagged or edited (one UNet call per batch).

        ``kwargs`` are pipeline arguments; the step count and guidance default to the pipeline's.
        """
        settings = call_settings(self.pipe, kwargs)
        if self.calibration is not None:
            loaded, source = self.calibration
            check_calibrated_settings(asdict(loaded), settings, source)
        rest = {k: v for k, v in kwargs.items() if k not in ("num_inference_steps", "guidance_scale")}
        step1 = score_step1(
            self.pipe,
            list(prompts),
            generators=generator,
            steps=settings["steps"],
            guidance_scale=settings["guidance_scale"],
            wen=self.score == "wen",
            **rest,
        )
        return step1.score(self.score, self.layer)

    def __call__(self, prompt: str | list[str], **kwargs: Any) -> GuardOutput:
        if "prompt_embeds" in kwargs:
            raise MemattnError(
                "the guard needs prompts (it reads their token layouts); pass prompt=, not prompt_embeds"
            )
        if self.calibration is not None:
            loaded, source = self.calibration
            check_calibrated_settings(asdict(loaded), call_settings(self.pipe, kwargs), source)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
        row_prompts = [p for p in prompts for _ in range(per_prompt)]
        user_callback = kwargs.pop("callback_on_step_end", None)
        if user_callback is None and kwargs.get("callback") is not None:  # PixArt's older step callback
            legacy, steps_between = kwargs.pop("callback"), int(kwargs.pop("callback_steps", 1) or 1)

            def user_callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                if step % steps_between == 0:
                    legacy(step, timestep, tensors["latents"])
                return tensors

        state: dict[str, Any] = {}
        noise = NoiseDifference(self.pipe, max_calls=1) if self.score == "wen" else nullcontext()
        state["noise"] = noise
        session = AttentionSession.acquire(self.pipe)
        # The guard adds a recorder for the first step and, in continue mode, an edit for the flagged rows
        # after it; it removes exactly those, so an enclosing trace or mitigation keeps what it had.
        # Inside ``memattn.mitigate`` every row is already edited: the guard then only reports.
        recorder = Recorder(session.layer_names, session.heads, role="guard")
        own_edit: EditListener | None = None
        state["outer"] = any(
            isinstance(listener, EditListener) and listener.edits_every_row for listener in session.editors
        )

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            nonlocal own_edit
            if step == 0:
                self._decide(recorder, state)
                session.remove(recorder)  # the rest of the run needs no recording
                if self.mode == "continue" and state["flagged"].any() and not state["outer"]:
                    own_edit = EditListener(
                        self.edit,
                        rows=torch.as_tensor(state["flagged"], device=session.model.device),
                        role="guard",
                    )
                    session.add(own_edit)
            return user_callback(pipe, step, timestep, tensors) if user_callback else tensors

        try:
            session.add(recorder)
            with patched(self.pipe, "prepare_latents", _keeping_initial_noise(self.pipe, state)), noise:
                output = self.pipe(prompt, **step_end_kwargs(self.pipe, on_step_end), **kwargs)
        finally:
            session.remove(recorder)
            if own_edit is not None:
                session.remove(own_edit)
            session.release()
        if "flagged" not in state:
            raise MemattnError("the pipeline made no denoising step: nothing to score")
        images = output.images
        flagged = state["flagged"]
        if self.mode == "restart" and flagged.any() and not state["outer"]:
            images = self._restart(images, row_prompts, flagged, state["latents"], kwargs)
        verdicts = [
            Verdict(
                prompt=row_prompts[i],
                score=float(state["scores"][i]),
                threshold=self.threshold,
                flagged=bool(flagged[i]),
                mitigated=bool(flagged[i]) or state["outer"],  # inside mitigate: every row
                mode=self.mode,
                trigger_tokens=[(t.token, round(t.share, 4)) for t in state["triggers"][i]],
            )
            for i in range(len(row_prompts))
        ]
        return GuardOutput(images=images, verdicts=verdicts)

    # ---- pieces -------------------------------------------------------------------------------
    def _decide(self, recorder: Recorder, state: dict) -> None:
        wen = state["noise"].wen(1) if self.score == "wen" else None
        step1 = Step1(recorder.records()[-1], wen)
        scores = step1.score(self.score, self.layer)
        state["scores"] = scores
        state["flagged"] = scores > self.threshold
        state["triggers"] = step1.triggers(3)

    def _restart(
        self, images: Any, row_prompts: list[str], flagged: np.ndarray, latents: Any, kwargs: dict
    ) -> Any:
        rows = np.flatnonzero(flagged)
        again = {
            k: v for k, v in kwargs.items() if k not in ("generator", "latents", "num_images_per_prompt")
        }
        negative = again.pop("negative_prompt", None)
        if isinstance(negative, list):
            per_prompt = len(row_prompts) // len(negative)
            again["negative_prompt"] = [negative[i // per_prompt] for i in rows]
        elif negative is not None:
            again["negative_prompt"] = negative
        with Mitigation(self.pipe, self.edit):
            redo = self.pipe(
                [row_prompts[i] for i in rows], latents=latents[torch.as_tensor(rows)], **again
            ).images
        if isinstance(images, np.ndarray):
            images = images.copy()
            images[rows] = redo
        elif isinstance(images, torch.Tensor):
            images = images.clone()
            images[torch.as_tensor(rows)] = redo
        else:  # list of PIL images
            images = list(images)
            for j, i in enumerate(rows):
                images[i] = redo[j]
        return images


def _keeping_initial_noise(pipe: Any, state: dict) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A ``prepare_latents`` wrapper that keeps the initial noise (restart mode regenerates from it)."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def prepare_latents(*args: Any, **kwargs: Any) -> Any:
            latents = original(*args, **kwargs)
            # SD-style schedulers scale given latents by init_noise_sigma; flow matching (SD3) has none
            state["latents"] = latents / getattr(pipe.scheduler, "init_noise_sigma", 1.0)
            return latents

        return prepare_latents

    return wrap
