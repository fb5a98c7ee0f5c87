"""The guard on a mixed stream of testbed prompts: copies prevented, clean prompts touched, cost.

Calibration: the threshold that flags 1 % of 400 clean calibration prompts (seen once + never seen).
Stream (disjoint from calibration): the 128-copy matching items and 32 template items (memorized),
and rare-word + novel-composition prompts (clean), 2 seeds each. For each score (E, Wen) and mode
(continue, restart): share flagged per kind, copy rate of memorized generations with and without the
guard, attribute alignment of clean generations, the largest change of an unflagged clean image, and
the stream's wall time relative to the unguarded pipeline (measured in the same run), and the AUC of the
step-1 score on the stream (memorized vs clean).

Usage: .venv/bin/python benchmarks/guard_stream.py [--steps 25] [--guidance 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memattn.guard import Guard, threshold_at_fpr
from memattn.loading import BUNDLED_TESTBED, load_pipeline
from memattn.metrics import detection_metrics
from memattn.testbed.alignment import CLASSIFIER_FILE, alignment, load_classifier
from memattn.testbed.evaluate import dataset_for
from memattn.testbed.measures import DEFAULT_COPY_THRESHOLD, DetailMatcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    dataset = dataset_for(BUNDLED_TESTBED)
    pipe = load_pipeline(str(BUNDLED_TESTBED))
    classifier, _ = load_classifier(BUNDLED_TESTBED / CLASSIFIER_FILE)
    train_items = [item for item in dataset.items if item.duplication > 0]
    matcher = DetailMatcher.for_items(dataset, train_items)
    calibration = [i.caption for i in dataset.group("seen_once")[:300]] + [
        i.caption for i in dataset.group("never_seen")[:100]
    ]
    memorized = [i for i in dataset.group("memorized_matching") if i.duplication == 128]
    memorized += list(dataset.group("memorized_template")[:32])
    clean = list(dataset.group("rare_word_seen_once")[:32]) + list(dataset.group("novel_composition")[:32])
    stream = [(item, seed) for item in memorized + clean for seed in range(2)]
    is_memorized = np.array([item.group.startswith("memorized") for item, _ in stream])
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")

    def batches():
        for start in range(0, len(stream), 48):
            batch = stream[start : start + 48]
            gens = [torch.Generator().manual_seed(1000 * seed + item.item_id) for item, seed in batch]
            yield [item.caption for item, _ in batch], gens

    def measure(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        generated = images.transpose(0, 3, 1, 2) * 2 - 1
        copies = matcher.match(generated).similarity > DEFAULT_COPY_THRESHOLD
        aligned = alignment(classifier, generated, [item.attributes for item, _ in stream]).accuracy
        return copies, aligned

    started = time.perf_counter()
    plain = np.concatenate([pipe(prompts, generator=g, **kwargs).images for prompts, g in batches()])
    plain_seconds = time.perf_counter() - started
    plain_copies, plain_alignment = measure(plain)
    print(
        f"unguarded: copy rate memorized {plain_copies[is_memorized].mean():.2f}, clean alignment "
        f"{plain_alignment[~is_memorized].mean():.3f}, {plain_seconds:.1f} s"
    )
    results = {
        "plain": {"seconds": plain_seconds, "copy_rate_memorized": float(plain_copies[is_memorized].mean())}
    }
    for score in ("e", "wen"):
        scorer = Guard(pipe, threshold=float("inf"), score=score)
        clean_scores = np.concatenate(
            [
                scorer.score_prompts(
                    calibration[i : i + 64],
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=[
                        torch.Generator().manual_seed(i + k) for k in range(len(calibration[i : i + 64]))
                    ],
                )
                for i in range(0, len(calibration), 64)
            ]
        )
        threshold = threshold_at_fpr(clean_scores, 0.01)
        for mode in ("continue", "restart"):
            guard = Guard(pipe, threshold=threshold, score=score, mode=mode)
            started = time.perf_counter()
            outputs = [guard(prompts, generator=g, **kwargs) for prompts, g in batches()]
            seconds = time.perf_counter() - started
            images = np.concatenate([o.images for o in outputs])
            flagged = np.array([v.flagged for o in outputs for v in o.verdicts])
            stream_scores = np.array([v.score for o in outputs for v in o.verdicts])
            auc = detection_metrics(is_memorized.astype(int), stream_scores)["auc"]
            copies, aligned = measure(images)
            unflagged_clean = ~flagged & ~is_memorized
            max_change = (
                float(np.abs(images - plain)[unflagged_clean].max()) if unflagged_clean.any() else 0.0
            )
            row = {
                "threshold": threshold,
                "flagged_memorized": float(flagged[is_memorized].mean()),
                "flagged_clean": float(flagged[~is_memorized].mean()),
                "copy_rate_memorized": float(copies[is_memorized].mean()),
                "clean_alignment": float(aligned[~is_memorized].mean()),
                "clean_alignment_unguarded": float(plain_alignment[~is_memorized].mean()),
                "max_abs_change_unflagged_clean": max_change,
                "time_ratio": seconds / plain_seconds,
                "score_auc_memorized_vs_clean": auc,
            }
            results[f"{score}/{mode}"] = row
            print(
                f"{score:3} {mode:8} flagged memorized {row['flagged_memorized']:.2f} "
                f"clean {row['flagged_clean']:.2f} | "
                f"copy rate {plain_copies[is_memorized].mean():.2f} -> {row['copy_rate_memorized']:.2f} | "
                f"clean alignment {row['clean_alignment_unguarded']:.3f} -> {row['clean_alignment']:.3f} | "
                f"unflagged clean max change {max_change:.2e} | time x{row['time_ratio']:.3f} | "
                f"score AUC {auc:.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
