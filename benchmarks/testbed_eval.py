"""Evaluate a trained testbed pipeline: copy rate per group and duplication count, detection AUCs
(D, E, E per layer; memorized vs seen-once + never-seen), BOS / summary-token attention shares.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--per-group", type=int, default=48)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    runs = []
    for guidance in args.guidance:
        started = time.time()
        result = evaluate(
            args.model,
            guidance_scale=guidance,
            steps=args.steps,
            per_group=args.per_group,
            copy_threshold=args.threshold,
            progress=False,
        )
        result["seconds"] = round(time.time() - started, 1)
        runs.append(result)
        print(f"\n== guidance {guidance}, {args.steps} DDIM steps, copy: corr > {args.threshold}")
        print(f"{'group':22} {'n':>4} {'copy':>6} {'med sim':>8} {'BOS':>6} {'summary':>8}")
        for name, g in result["groups"].items():
            print(
                f"{name:22} {g['n']:>4} {g['copy_rate']:>6.2f} {g['median_similarity']:>8.3f} "
                f"{g['bos_share']:>6.3f} {g['summary_share']:>8.3f}"
            )
            if "copy_rate_by_duplication" in g:
                print(f"{'':22} copy rate by duplication: {g['copy_rate_by_duplication']}")
        for key, value in result["auc_vs_seen_once_and_never_seen"].items():
            shown = ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else f"{value:.3f}"
            print(f"AUC {key}: {shown}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
