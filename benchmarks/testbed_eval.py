"""Evaluate a trained testbed pipeline per ground-truth group: copy rate (detail similarity, and the old
whole-image pixel correlation for comparison), alignment, detection (D, E, E per layer; AUC and TPR at
1 % FPR, memorized vs all non-memorized groups) and the attention shares on BOS / prompt / summary tokens.

Usage: .venv/bin/python benchmarks/testbed_eval.py MODEL_DIR [--guidance 1 2 3] [--per-group 48]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from memattn.testbed.evaluate import evaluate
from memattn.testbed.measures import DEFAULT_COPY_THRESHOLD


def print_summary(summary: dict) -> None:
    print(
        f"\n== guidance {summary['guidance_scale']}, {summary['steps']} DDIM steps, "
        f"copy: detail similarity > {summary['copy_threshold']}"
    )
    header = f"{'group':22} {'n':>4} {'copy':>6} {'med det':>8} {'pix>.9':>7} {'align':>6} {'all5':>5}"
    print(header + f" {'BOS':>6} {'prompt':>7} {'summary':>8}")
    for name, g in summary["groups"].items():
        print(
            f"{name:22} {g['n']:>4} {g['copy_rate']:>6.2f} {g['median_copy_similarity']:>8.3f} "
            f"{g.get('pixel_copy_rate_0.9', float('nan')):>7.2f} {g['alignment']:>6.3f} "
            f"{g['all_attributes_right']:>5.2f} "
            f"{g['bos_share']:>6.3f} {g['prompt_share']:>7.3f} {g['summary_share']:>8.3f}"
        )
        if "copy_rate_by_duplication" in g:
            print(f"{'':22} copy rate by duplication: {g['copy_rate_by_duplication']}")
    print(f"non-memorized detail similarity: {summary['non_memorized_copy_similarity']}")
    for key, value in summary["detection_vs_non_memorized"].items():
        if isinstance(value, list):
            print(f"{key}: " + ", ".join(f"{v:.3f}" for v in value))
        else:
            print(f"{key}: AUC {value['auc']:.3f}, TPR@{value['fpr']:.0%}FPR {value['tpr_at_fpr']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--per-group", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=DEFAULT_COPY_THRESHOLD)
    parser.add_argument("--json", type=Path, help="write the summaries and per-image rows here")
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    runs = []
    for guidance in args.guidance:
        started = time.time()
        evaluation = evaluate(
            args.model,
            guidance_scale=guidance,
            steps=args.steps,
            per_group=args.per_group,
            seeds=args.seeds,
            copy_threshold=args.threshold,
            progress=False,
        )
        summary = evaluation.summary()
        summary["seconds"] = round(time.time() - started, 1)
        print_summary(summary)
        runs.append({"summary": summary, "rows": evaluation.rows})
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
