"""``memattn bench detect``: every detection score from one generation per prompt and seed, one table.

Per image, one full generation under a trace (with the last step's maps of the bright-ending layers) and
a :class:`memattn.detection.baselines.NoiseDifference` gives D, BE and Wen over all steps; the first
UNet call of the same run gives E, E per layer, BOS/summary shares and Wen's step-1 norm. A second,
step-1-only pass is timed to report what the step-1 scores cost on their own. Scores are averaged over a
prompt's seeds (as Wen et al. average over generations); the combined step-1 detector is fitted on a
seeded, label-stratified half of the prompts and every score is reported on the other half.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm.auto import tqdm

from memattn.attention.trace import trace
from memattn.detection import scores
from memattn.detection.baselines import BE_LAYERS, NoiseDifference, bright_ending
from memattn.detection.combined import CombinedDetector
from memattn.detection.detect import check_prompts
from memattn.detection.metrics import bootstrap_auc_and_tpr, tpr_at_fpr
from memattn.detection.step1 import score_step1
from memattn.errors import MemattnError

FPRS = (0.01, 0.03, 0.05, 0.10)
SEED_STRIDE = 100_000  # image seed = index in its own file + SEED_STRIDE * seed number (0: the paper's)
STEP1_SCORES = ("score_e", "wen_step1", "combined")


@dataclass
class Collected:
    rows: list[dict[str, Any]]  # one per image
    features: np.ndarray  # [image, feature] at step 1
    feature_names: list[str]
    seconds_full: float
    seconds_step1: float


def collect(
    pipe: Any,
    prompts: Sequence[str],
    labels: Sequence[int],
    *,
    seeds: int = 3,
    steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    be_layers: Sequence[int] = BE_LAYERS,
    progress: bool = True,
) -> Collected:
    """Generate every prompt with ``seeds`` seeds and read every score (see the module docstring)."""
    prompts = check_prompts(prompts)
    if len(labels) != len(prompts):
        raise MemattnError(f"{len(labels)} labels for {len(prompts)} prompts")
    if guidance_scale <= 1:
        raise MemattnError(
            f"guidance {guidance_scale} has no unconditional branch: Wen's and BE scores need guidance > 1"
        )
    if steps < 2:
        raise MemattnError(f"score D needs at least 2 denoising steps, got {steps}")
    jobs = [(i, s) for s in range(seeds) for i in range(len(prompts))]
    # the official code seeds each prompt file from 0 (line index + seed): memorized and clean alike
    in_file = [sum(1 for other in labels[:i] if other == label) for i, label in enumerate(labels)]
    rows: list[dict[str, Any]] = []
    features: list[np.ndarray] = []
    names: list[str] = []
    seconds_full = seconds_step1 = 0.0
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="bench detect", unit="batch", disable=not progress):
        batch = jobs[start : start + batch_size]
        texts = [prompts[i] for i, _ in batch]
        image_seeds = [in_file[i] + SEED_STRIDE * s for i, s in batch]

        def call(texts: list[str] = texts, image_seeds: list[int] = image_seeds, **extra: Any) -> None:
            pipe(
                texts,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in image_seeds],
                output_type="latent",
                **extra,
            )

        began = time.perf_counter()
        quick = score_step1(
            pipe, texts, seeds=image_seeds, steps=steps, guidance_scale=guidance_scale, wen=True
        )
        seconds_step1 += time.perf_counter() - began
        began = time.perf_counter()
        last = steps - 1
        with (
            trace(pipe, map_steps=[last], map_layers=list(be_layers)) as tr,
            NoiseDifference(pipe, "full") as nd,
        ):
            call()
        seconds_full += time.perf_counter() - began
        record = tr.record
        if record.n_steps != steps:
            raise MemattnError(
                f"the scheduler made {record.n_steps} UNet calls for {steps} steps; bench detect needs one "
                "call per step (DDIM/DDPM/Euler-style schedulers)"
            )
        d = scores.score_d(record).numpy()
        e = quick.e()
        wen1 = quick.wen
        wen_all = nd.wen(len(nd.norms))
        be = bright_ending(record, nd, be_layers)
        x, names = quick.features()
        features.append(x)
        for j, (index, seed_number) in enumerate(batch):
            rows.append(
                {
                    "prompt_index": index,
                    "prompt": prompts[index],
                    "label": int(labels[index]),
                    "seed": image_seeds[j],
                    "seed_number": seed_number,
                    "score_d": float(d[j]),
                    "score_e": float(e[j]),
                    "wen_step1": float(wen1[j]),
                    "wen_all_steps": float(wen_all[j]),
                    "bright_ending": float(be[j]),
                    **{name: float(value) for name, value in zip(names, x[j], strict=True)},
                }
            )
            if "bos_share" in rows[-1]:  # memorized prompts move attention off BOS (no BOS: no column)
                rows[-1]["minus_bos_share"] = -rows[-1]["bos_share"]
    return Collected(rows, np.concatenate(features), names, seconds_full, seconds_step1)


def split_prompts(labels: Sequence[int], seed: int = 0) -> np.ndarray:
    """Bool per prompt: True = calibration half (stratified by label, seeded)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    calibration = np.zeros(len(labels), dtype=bool)
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        chosen = rng.permutation(members)[: len(members) // 2]
        calibration[chosen] = True
    return calibration


def _interpolated_tpr(labels: np.ndarray, values: np.ndarray, fpr: float) -> float:
    false_positive, true_positive, _ = roc_curve(labels, values)
    return float(np.interp(fpr, false_positive, true_positive))


def score_table(
    per_prompt: dict[str, np.ndarray], labels: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """AUC and TPR at each FPR (interpolated and nearest ROC point) with prompt-bootstrap 95 % CIs."""
    if len(set(labels.tolist())) != 2:
        raise MemattnError("the held-out split needs memorized and non-memorized prompts: give more prompts")
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    table = []
    for name, values in per_prompt.items():
        row: dict[str, Any] = {"score": name, "auc": float(roc_auc_score(labels, values))}
        for fpr in FPRS:
            row[f"tpr@{fpr:.0%}fpr_interp"] = _interpolated_tpr(labels, values, fpr)
            row[f"tpr@{fpr:.0%}fpr_nearest"] = tpr_at_fpr(labels, values, fpr)
        aucs, tprs = [], []
        for _ in range(n_boot):
            sample = np.concatenate(
                [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
            )
            auc, tpr = bootstrap_auc_and_tpr(labels[sample], values[sample], 0.01)
            aucs.append(auc)
            tprs.append(tpr)
        row["auc_ci95"] = [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]
        row["tpr@1%fpr_nearest_ci95"] = [float(np.percentile(tprs, 2.5)), float(np.percentile(tprs, 97.5))]
        table.append(row)
    return table


def per_prompt_scores(
    rows: list[dict[str, Any]], names: Sequence[str], n_prompts: int
) -> dict[str, np.ndarray]:
    """Mean of each score over a prompt's seeds."""
    out = {}
    for name in names:
        total, count = np.zeros(n_prompts), np.zeros(n_prompts)
        for row in rows:
            total[row["prompt_index"]] += row[name]
            count[row["prompt_index"]] += 1
        out[name] = total / np.maximum(count, 1)
    return out


def analyse(
    collected: Collected, labels: Sequence[int], steps: int, model: str = "", split_seed: int = 0
) -> tuple[list[dict[str, Any]], CombinedDetector]:
    """Fit the combined detector on the calibration half; table of every score on the held-out half."""
    labels = np.asarray(labels).astype(int)
    calibration = split_prompts(labels, split_seed)
    image_prompt = np.array([row["prompt_index"] for row in collected.rows])
    fit_rows = calibration[image_prompt]
    detector = CombinedDetector.fit(
        collected.features[fit_rows], labels[image_prompt][fit_rows], collected.feature_names, model=model
    )
    combined = detector.score(collected.features, collected.feature_names)
    for row, value in zip(collected.rows, combined, strict=True):
        row["combined"] = float(value)
    layer_names = [n for n in collected.feature_names if n.startswith("e_layer")]
    names = [
        "score_d",
        "score_e",
        *layer_names,
        "bos_share",
        "minus_bos_share",
        "summary_share",
        "wen_step1",
        "wen_all_steps",
        "bright_ending",
        "combined",
    ]
    names = [name for name in names if name in collected.rows[0]]  # bos_share exists only with a BOS
    per_prompt = per_prompt_scores(collected.rows, names, len(labels))
    held_out = ~calibration
    table = score_table({n: v[held_out] for n, v in per_prompt.items()}, labels[held_out])
    n_images = len(collected.rows)
    step1_seconds = collected.seconds_step1 / n_images
    full_seconds = collected.seconds_full / n_images
    for row in table:
        full = row["score"] in ("score_d", "wen_all_steps", "bright_ending")
        row["unet_calls_per_image"] = steps if full else 1
        row["seconds_per_image"] = full_seconds if full else step1_seconds
        row["auc_all_prompts"] = (
            float(roc_auc_score(labels, per_prompt[row["score"]])) if row["score"] != "combined" else None
        )
    return table, detector
