"""The guard as rows of the mitigation benchmark, on the benchmark's own prompts and seeds.

Each guard setting (a step-1 score's layer and the edit of flagged rows) is calibrated first: the
threshold that flags ``fpr`` of held-out clean prompts (the testbed's seen-once captions, which the
benchmark never generates from), one UNet call each. Then the guard generates every benchmark prompt,
so its copies and clean alignment sit on the same Pareto figure as every method, with the share of
memorized and clean generations it flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memattn.attention.layers import parse_layer
from memattn.detection.step1 import score_step1
from memattn.errors import MemattnError
from memattn.mitigation.guard import GUARD_EDITS, Guard, threshold_at_fpr

CALIBRATION_PROMPTS = 300  # seen-once captions: training captions seen once, never benchmark prompts
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class GuardSetting:
    """``LAYER[:EDIT]`` on the command line: E in ``layer`` decides, ``edit`` mitigates the flagged."""

    layer: int | str
    edit: str = "paper"
    fpr: float = 0.01

    def __post_init__(self) -> None:
        if self.edit not in GUARD_EDITS:
            raise MemattnError(f"guard edit {self.edit!r}: choose one of {', '.join(GUARD_EDITS)}")

    @property
    def label(self) -> str:
        return f"guard E@{self.layer} ({self.edit})"


def parse_guards(values: list[str] | None) -> list[GuardSetting]:
    """``--guard up_blocks.0.attentions.1:eos`` items (the edit defaults to the paper's)."""
    out = []
    for text in values or ():
        layer, _, edit = text.partition(":")
        if not layer.strip():
            raise MemattnError(
                f"--guard {text!r}: give a layer (name or index), e.g. up_blocks.0.attentions.1:eos"
            )
        out.append(GuardSetting(parse_layer(layer.strip()), edit.strip() or "paper"))
    return out


def calibrate(
    pipe: Any, dataset: Any, setting: GuardSetting, *, steps: int, guidance: float
) -> tuple[float, np.ndarray]:
    """The threshold at ``setting.fpr`` on held-out clean prompts, and their scores."""
    captions = [item.caption for item in dataset.group("seen_once")[:CALIBRATION_PROMPTS]]
    if not captions:
        raise MemattnError("the guard rows are calibrated on the testbed's seen-once captions; it has none")
    scores = np.concatenate(
        [
            score_step1(
                pipe,
                captions[i : i + CALIBRATION_BATCH],
                seeds=list(range(i, i + len(captions[i : i + CALIBRATION_BATCH]))),
                steps=steps,
                guidance_scale=guidance,
            ).score("e", setting.layer)
            for i in range(0, len(captions), CALIBRATION_BATCH)
        ]
    )
    return threshold_at_fpr(scores, setting.fpr), scores


def guarded_evaluation(
    path: Path,
    pipe: Any,
    setting: GuardSetting,
    *,
    groups: tuple[str, ...],
    seeds: int,
    steps: int,
    guidance: float,
    per_group: int,
    progress: bool = False,
) -> tuple[Any, float, float]:
    """Calibrate ``setting`` on held-out clean prompts, then let its guard generate ``groups``.

    Returns the testbed evaluation (rows carry ``guard_score``/``guard_flagged``), the threshold and
    the seconds of generation (calibration excluded: it is paid once per deployment, not per image).
    """
    import time

    from memattn.testbed.evaluate import evaluate
    from memattn.testbed.manifest import dataset_for

    threshold, _ = calibrate(pipe, dataset_for(path), setting, steps=steps, guidance=guidance)
    guard = Guard(
        pipe, threshold=threshold, score="e", layer=setting.layer, mitigation=GUARD_EDITS[setting.edit]
    )
    started = time.perf_counter()
    evaluation = evaluate(
        path,
        guidance_scale=guidance,
        steps=steps,
        per_group=per_group,
        seeds=seeds,
        groups=groups,
        pipe=pipe,
        guard=guard,
        progress=progress,
    )
    return evaluation, threshold, time.perf_counter() - started


def guard_rows(
    path: Path,
    pipe: Any,
    settings: list[GuardSetting],
    *,
    groups: tuple[str, ...],
    seeds: int,
    steps: int,
    guidance: float,
    per_group: int,
) -> list[dict[str, Any]]:
    """One benchmark row per guard setting (``mitigation_measures`` columns + flag shares)."""
    from memattn.testbed.evaluate import mitigation_measures

    rows = []
    for setting in settings:
        evaluation, threshold, seconds = guarded_evaluation(
            path,
            pipe,
            setting,
            groups=groups,
            seeds=seeds,
            steps=steps,
            guidance=guidance,
            per_group=per_group,
        )
        heavy = [r for r in evaluation.rows if r["group"] == "memorized_matching" and r["duplication"] == 128]
        clean = [r for r in evaluation.rows if r["group"] in ("never_seen", "novel_composition")]
        rows.append(
            {
                "setting": setting.label,
                "method": "guard",
                "strength": None,
                "images": len(evaluation.rows),
                "seconds": seconds,
                **mitigation_measures(evaluation.rows, evaluation.settings["copy_threshold"]),
                "guard_threshold": threshold,
                "guard_fpr_target": setting.fpr,
                "flagged_128": _share_flagged(heavy),
                "flagged_clean": _share_flagged(clean),
            }
        )
    return rows


def _share_flagged(rows: list[dict[str, Any]]) -> float:
    return float(np.mean([row["guard_flagged"] for row in rows])) if rows else float("nan")
