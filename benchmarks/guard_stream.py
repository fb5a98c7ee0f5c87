"""The guard on a mixed stream of testbed prompts: copies prevented, clean prompts touched, cost.

Calibration: the threshold that flags 1 % of 400 clean calibration prompts (seen once + never seen).
Stream (disjoint from calibration): the 128-copy matching items and 32 template items (memorized),
and rare-word + novel-composition prompts (clean), 2 seeds each; on testbed v2 (no templates, no novel
compositions) the clean half is rare-word + never-seen prompts not used for calibration. For each score
(E in the default layer, E in ``--layer`` if given, Wen) and mode
(continue, restart): share flagged per kind, copy rate of memorized generations with and without the
guard, attribute alignment of clean generations, the largest change of an unflagged clean image, and
the stream's wall time relative to the unguarded pipeline (measured in the same run), and the AUC of the
step-1 score on the stream (memorized vs clean).

``--edit`` picks what the guard does to flagged rows: ``paper`` (C = 1.25, padding masked; the
default), ``c8`` (C = 8, padding masked) or ``eos`` (C = 1.25, padding and EOS masked), the edits of the
mitigation sweep; ``--scores`` limits which step-1 scores are run.

Usage: .venv/bin/python benchmarks/guard_stream.py [--model testbed|testbed-detail] [--layer NAME]
       [--steps 25] [--guidance 2] [--edit paper|c8|eos] [--scores e,wen,layer] [--json F]
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

from memattn.detection.metrics import detection_metrics
from memattn.detection.step1 import score_step1
from memattn.loading import load_pipeline, resolve_model
from memattn.mitigation.guard import GUARD_EDITS, Guard, threshold_at_fpr
from memattn.testbed.alignment import CLASSIFIER_FILE, alignment, load_classifier
from memattn.testbed.manifest import dataset_for, scene_of
from memattn.testbed.measures import DetailMatcher, OwnImageMatcher, copy_threshold_for

EDITS = {**GUARD_EDITS, "c8": {"c": 8.0}}  # c8: the sweep's strongest BOS factor, padding masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", default="testbed", help="testbed (v2), testbed-detail (v1) or a directory")
    parser.add_argument("--layer", help="also guard with E in this layer (name or index)")
    parser.add_argument("--edit", choices=sorted(EDITS), default="paper", help="the edit of flagged rows")
    parser.add_argument("--scores", default="e,wen,layer", help="comma list of e, wen, layer (--layer's E)")
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    model = Path(resolve_model(args.model))
    dataset = dataset_for(model)
    scene = scene_of(model)
    pipe = load_pipeline(str(model))
    classifier, _ = load_classifier(model / CLASSIFIER_FILE)
    train_items = [item for item in dataset.items if item.duplication > 0]
    groups = dataset.prompt_groups()
    calibration = [i.caption for i in dataset.group("seen_once")[:300]] + [
        i.caption for i in dataset.group("never_seen")[:100]
    ]
    memorized = [i for i in dataset.group("memorized_matching") if i.duplication == 128]
    if "memorized_template" in groups:
        memorized += list(dataset.group("memorized_template")[:32])
    held_out = "novel_composition" if "novel_composition" in groups else "never_seen"
    start = 0 if held_out == "novel_composition" else 100  # never-seen prompts after the calibration ones
    clean = list(dataset.group("rare_word_seen_once")[:32]) + list(
        dataset.group(held_out)[start : start + 32]
    )
    stream = [(item, seed) for item in memorized + clean for seed in range(2)]
    is_memorized = np.array([item.group.startswith("memorized") for item, _ in stream])
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")

    def batches():
        for start in range(0, len(stream), 48):
            batch = stream[start : start + 48]
            gens = [torch.Generator().manual_seed(1000 * seed + item.item_id) for item, seed in batch]
            yield [item.caption for item, _ in batch], gens

    threshold_copy = copy_threshold_for(scene)
    if scene == "object":
        own = OwnImageMatcher(dataset, train_items, list(dataset.group("memorized_matching")))

        def similarity(generated: np.ndarray) -> np.ndarray:
            return own.match(generated, [item.item_id for item, _ in stream]).similarity
    else:
        detail = DetailMatcher.for_items(dataset, train_items)

        def similarity(generated: np.ndarray) -> np.ndarray:
            return detail.match(generated).similarity

    def measure(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        generated = images.transpose(0, 3, 1, 2) * 2 - 1
        copies = similarity(generated) > threshold_copy
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
    wanted = set(args.scores.split(","))
    if not wanted <= {"e", "wen", "layer"} or ("layer" in wanted and not args.layer and len(wanted) == 1):
        parser.error("--scores takes a comma list of e, wen, layer (layer needs --layer)")
    guards = [(s, None) for s in ("e", "wen") if s in wanted]
    guards += [("e", args.layer)] if args.layer and "layer" in wanted else []
    print(f"edit of flagged rows: {args.edit} {EDITS[args.edit]}")
    results["edit"] = {"name": args.edit, **EDITS[args.edit]}
    for score, layer in guards:
        clean_scores = np.concatenate(
            [
                score_step1(
                    pipe,
                    calibration[i : i + 64],
                    seeds=[i + k for k in range(len(calibration[i : i + 64]))],
                    steps=args.steps,
                    guidance_scale=args.guidance,
                    wen=score == "wen",
                ).score(score, layer)
                for i in range(0, len(calibration), 64)
            ]
        )
        threshold = threshold_at_fpr(clean_scores, 0.01)
        for mode in ("continue", "restart"):
            guard = Guard(
                pipe, threshold=threshold, score=score, mode=mode, layer=layer, mitigation=EDITS[args.edit]
            )
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
            name = score if layer is None else f"e@{layer}"
            results[f"{name}/{mode}"] = row
            print(
                f"{name:3} {mode:8} flagged memorized {row['flagged_memorized']:.2f} "
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
