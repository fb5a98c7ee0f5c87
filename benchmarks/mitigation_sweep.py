"""Sweep the paper's inference-time mitigation (and its parts) on a testbed model.

For each setting: copy rate and mean detail similarity of memorized prompts (128-copy matching items
and templates), alignment of non-memorized prompts (never seen, novel compositions), and the wall time
of the whole evaluation relative to plain generation, all measured in one run on the same prompts,
seeds and machine.

Usage: .venv/bin/python benchmarks/mitigation_sweep.py [MODEL] [--guidance 2] [--seeds 4] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from memattn.loading import load_pipeline, resolve_model
from memattn.testbed.evaluate import evaluate, mitigation_measures

GROUPS = ("memorized_matching", "memorized_template", "never_seen", "novel_composition")


def baseline_settings() -> list[tuple[str, dict | None, dict | None]]:
    """Somepalli et al.'s inference-time baselines at the official defaults and a few strengths."""
    out: list[tuple[str, dict | None, dict | None]] = [("plain", None, None)]
    out += [(f"RTA n={n}", None, {"method": "rta", "n": n}) for n in (1, 4, 10)]
    out += [(f"RNA n={n}", None, {"method": "rna", "n": n}) for n in (4, 10)]
    out += [(f"GNI lambda={lam}", None, {"method": "gni", "lam": lam}) for lam in (0.1, 0.5, 1.0)]
    return out


def settings(c_values: list[float]) -> list[tuple[str, dict | None]]:
    out: list[tuple[str, dict | None]] = [("plain", None)]
    out += [(f"ren2024 C={c}", {"c": c}) for c in c_values]
    out += [(f"BOS x C only, C={c}", {"c": c, "mask_padding": False}) for c in c_values if c != 1.0]
    out += [
        ("mask padding + EOS, C=1.25", {"c": 1.25, "mask_eos": True}),
        ("ren2024 C=1.25 + mask_uncond", {"c": 1.25, "mask_uncond": True}),
        ("ren2024 C=1.25, first 30% of steps", {"c": 1.25, "steps": "early"}),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="testbed")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--per-group", type=int, default=48)
    parser.add_argument("--c", type=float, nargs="+", default=[1.0, 1.1, 1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--baselines", action="store_true", help="RTA / RNA / GNI instead of ren2024")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    model = Path(resolve_model(args.model))
    pipe = load_pipeline(str(model))
    results = []
    plain_seconds = None
    header = f"{'setting':36} {'copy128':>8} {'sim128':>7} {'copyT':>6} {'simT':>6}"
    print(header + f" {'align':>6} {'all5':>5} {'time':>6}")
    runs = baseline_settings() if args.baselines else [(n, m, None) for n, m in settings(args.c)]
    for name, mitigation, baseline in runs:
        if mitigation is not None and mitigation.get("steps") == "early":
            mitigation = {**mitigation, "steps": list(range(round(0.3 * args.steps)))}
        started = time.perf_counter()
        evaluation = evaluate(
            model,
            guidance_scale=args.guidance,
            steps=args.steps,
            per_group=args.per_group,
            seeds=args.seeds,
            groups=GROUPS,
            pipe=pipe,
            mitigation=mitigation,
            baseline=baseline,
            progress=False,
        )
        seconds = time.perf_counter() - started
        plain_seconds = plain_seconds or seconds
        row = {"setting": name, "mitigation": mitigation, "baseline": baseline, "seconds": round(seconds, 1)}
        row.update(mitigation_measures(evaluation.rows, evaluation.settings["copy_threshold"]))
        row["time_ratio"] = round(seconds / plain_seconds, 3)
        results.append(row)
        print(
            f"{name:36} {row['copy_rate_128']:>8.2f} {row['similarity_128']:>7.3f} "
            f"{row['copy_rate_template']:>6.2f} {row['similarity_template']:>6.3f} "
            f"{row['alignment_clean']:>6.3f} "
            f"{row['all_attributes_clean']:>5.2f} {row['time_ratio']:>6.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
