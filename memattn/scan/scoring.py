"""Score one batch of prompts at step 1 (or over all steps): E, Wen, shares, triggers, flags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memattn.attention.layers import parse_layer
from memattn.attention.tokens import encode_length
from memattn.errors import MemattnError
from memattn.scan.inputs import sha
from memattn.scan.schema import ScanSettings

# ---- scoring -----------------------------------------------------------------------------------------


@contextmanager
def quiet_truncation_warnings() -> Iterator[None]:
    """diffusers warns about each truncated prompt with a wall of ``<|endoftext|>``, transformers about
    each over-long tokenization; the scan records truncation in its rows instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])


@dataclass
class Calibrated:
    """The threshold a row is flagged at, and which score it applies to."""

    threshold: float
    score: str
    layer: int | str | None
    path: str
    guidance_scale: float | None = None
    settings: dict[str, Any] | None = None  # what the threshold was measured at (steps, scheduler, ...)

    def identity(self) -> dict[str, Any]:
        return asdict(self)


def load_calibration(model: str, calibration: str | None) -> Calibrated | None:
    """``memattn_guard.json`` next to the model (or ``calibration``; ``"none"`` turns flagging off)."""
    from memattn.loading import resolve_model
    from memattn.mitigation.guard import CALIBRATION_FILE, Calibration

    if calibration is not None and calibration.lower() == "none":
        return None
    if calibration is not None:
        path = Path(calibration)
        if not path.is_file():
            raise MemattnError(f"calibration file {path} does not exist")
    else:
        source = Path(resolve_model(model)).expanduser()
        path = source / CALIBRATION_FILE
        if not path.is_file():
            return None
    loaded = Calibration.load(path)
    if loaded.score not in ("e", "wen"):
        raise MemattnError(f"{path}: unknown calibration score {loaded.score!r} (expected e or wen)")
    return Calibrated(
        float(loaded.threshold),
        loaded.score,
        None if loaded.layer is None else parse_layer(str(loaded.layer)),
        str(path.resolve()),
        loaded.guidance_scale,
        asdict(loaded),
    )


def check_calibration(calibrated: Calibrated | None, settings: ScanSettings) -> None:
    """A threshold measured under other settings would flag at random: refuse instead.

    The scheduler and resolution are the model's own in a scan; the pipeline-level check (``Guard``)
    covers them where a caller can change them.
    """
    if calibrated is None:
        return
    from memattn.mitigation.guard import check_calibrated_settings

    actual = {"steps": settings.steps, "dtype": settings.dtype}
    check_calibrated_settings(calibrated.settings or {}, actual, calibrated.path)
    if calibrated.guidance_scale is None:
        return
    if float(calibrated.guidance_scale) != float(settings.guidance_scale):
        raise MemattnError(
            f"the calibration {calibrated.path} was measured at guidance {calibrated.guidance_scale:g}, this "
            f"scan runs at {settings.guidance_scale:g}: pass --guidance {calibrated.guidance_scale:g} (the "
            "default when a calibration exists), or --calibration none to scan without flags"
        )


def load_detector(model: str) -> tuple[Any, str] | None:
    """The combined step-1 detector next to the model (``memattn_detector.json``), if any."""
    from memattn.detection.combined import DETECTOR_FILE, CombinedDetector
    from memattn.loading import resolve_model

    path = Path(resolve_model(model)).expanduser() / DETECTOR_FILE
    if not path.is_file():
        return None
    return CombinedDetector.load(path), sha(path.read_bytes())


class BatchScorer:
    """Scores the prompts of one batch: one traced pipeline call (step 1 only, or all steps)."""

    def __init__(
        self, pipe: Any, settings: ScanSettings, calibration: Calibrated | None, detector: Any | None
    ) -> None:
        self.pipe = pipe
        self.settings = settings
        self.calibration = calibration
        self.detector = detector
        self.layer = settings.layer
        if self.layer is None and calibration is not None and calibration.score == "e":
            self.layer = calibration.layer  # as the guard: E is read where it was calibrated
        self.max_length = encode_length(pipe)  # what the pipeline encodes (T5: max_sequence_length)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt with BOS and EOS, untruncated (what decides ``truncated``/``too_long``)."""
        ids = self.pipe.tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    def score(self, prompts: list[str], seeds: list[int]) -> list[dict[str, Any]]:
        from memattn.detection import scores
        from memattn.detection.step1 import score_step1

        s = self.settings
        step1 = (
            self._full_run(prompts, seeds)
            if s.full
            else score_step1(self.pipe, prompts, seeds=seeds, steps=s.steps, guidance_scale=s.guidance_scale)
        )
        record, wen = step1.record, step1.wen  # Wen's score only with CFG (guidance above 1)
        features, names = step1.features()
        column = {name: i for i, name in enumerate(names)}  # no bos_share column without a BOS (T5)
        n_layers = record.n_layers
        e = step1.e(self.layer).tolist()
        d = scores.score_d(record).tolist() if s.full else [None] * len(prompts)
        combined = self._combined(features, names)
        flag_scores = (
            None
            if self.calibration is None
            else step1.score(self.calibration.score, self._flag_layer(), finite=False)  # NaN: not flagged
        )
        triggers = scores.trigger_tokens(record, k=s.top_k) if s.top_k else [[] for _ in prompts]
        rows = []
        for i, layout in enumerate(record.require_layouts()):
            rows.append(
                {
                    "score_e": e[i],
                    "wen_step1": float(wen[i]) if wen is not None else None,
                    "bos_share": float(features[i, column["bos_share"]]) if "bos_share" in column else None,
                    "summary_share": float(features[i, column["summary_share"]]),
                    "e_layers": [float(x) for x in features[i, :n_layers]],
                    "score_d": d[i],
                    "score_combined": None if combined is None else float(combined[i]),
                    "flagged": None
                    if flag_scores is None
                    else bool(flag_scores[i] > self.calibration.threshold),
                    "threshold": None if self.calibration is None else self.calibration.threshold,
                    "trigger_tokens": [
                        {"token": t.token, "position": t.position, "share": float(t.share)}
                        for t in triggers[i]
                    ],
                    "n_tokens": layout.n_tokens,
                    "truncated": layout.truncated,
                }
            )
        return rows

    def _flag_layer(self) -> int | str | None:
        """The layer the calibration's E was measured in (the threshold applies there, not at --layer)."""
        return self.calibration.layer if self.calibration is not None else self.layer

    def _full_run(self, prompts: list[str], seeds: list[int]) -> Any:
        """Every step traced (D needs them all); the step-1 scores come from the same run's first call."""
        import torch

        from memattn.attention.trace import trace
        from memattn.detection.baselines import NoiseDifference
        from memattn.detection.step1 import Step1

        s = self.settings
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        noise = NoiseDifference(self.pipe, max_calls=1) if s.guidance_scale > 1 else None
        with torch.no_grad(), trace(self.pipe) as tr, noise or nullcontext():
            self.pipe(
                list(prompts),
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                generator=generators,
                output_type="latent",
            )
        return Step1(tr.record, noise.wen(1) if noise is not None else None)

    def _combined(self, features: Any, names: list[str]) -> Any:
        if self.detector is None:
            return None
        return self.detector.score(features, names)
