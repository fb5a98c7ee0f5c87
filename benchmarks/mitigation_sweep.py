"""Sweep the paper's inference-time mitigation and its parts on a testbed model.

The variants `memattn bench mitigate` cannot express (it runs each registered method at its strengths):
BOS x C without the padding mask, the EOS masked too, the unconditional branch masked, and step and
layer windows. The other methods and their strengths: `memattn bench mitigate --strengths ...`.

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

from memattn.attention.layers import cross_attention_layers
from memattn.loading import load_pipeline, resolve_model
from memattn.testbed.evaluate import evaluate, mitigation_measures
from memattn.testbed.manifest import load_manifest

GROUPS = ("memorized_matching", "memorized_template", "never_seen", "novel_composition")  # those present
UP_BLOCKS = "up_blocks"  # a layer window: the decoder's cross-attention layers only


def settings(c_values: list[float]) -> list[tuple[str, dict | None]]:
    out: list[tuple[str, dict | None]] = [("plain", None)]
    out += [(f"ren2024 C={c}", {"c": c}) for c in c_values]
    out += [(f"BOS x C only, C={c}", {"c": c, "mask_padding": False}) for c in c_values if c != 1.0]
    out += [
        ("mask padding + EOS, C=1.25", {"c": 1.25, "mask_eos": True}),
        ("ren2024 C=1.25 + mask_uncond", {"c": 1.25, "mask_uncond": True}),
        ("ren2024 C=1.25, first 30% of steps", {"c": 1.25, "at_steps": "early"}),
        ("ren2024 C=1.25, last 70% of steps", {"c": 1.25, "at_steps": "late"}),
        ("ren2024 C=1.25, up-block layers only", {"c": 1.25, "layers": UP_BLOCKS}),
        ("ren2024 C=1.25, down/mid layers only", {"c": 1.25, "layers": "not-up"}),
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
    parser.add_argument("--only", nargs="+", help="run only settings whose name starts with one of these")
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
    runs = [(n, m, None) for n, m in settings(args.c)]
    groups = tuple(g for g in GROUPS if g in load_manifest(model)["groups"])  # v2: no templates
    layer_names = [name for name, _ in cross_attention_layers(pipe.unet)]
    if args.only:
        runs = [run for run in runs if run[0] == "plain" or run[0].startswith(tuple(args.only))]
    for name, mitigation, baseline in runs:
        if mitigation is not None and mitigation.get("at_steps") == "early":
            mitigation = {**mitigation, "at_steps": list(range(round(0.3 * args.steps)))}
        if mitigation is not None and mitigation.get("at_steps") == "late":
            mitigation = {**mitigation, "at_steps": list(range(round(0.3 * args.steps), args.steps))}
        if mitigation is not None and mitigation.get("layers") in (UP_BLOCKS, "not-up"):
            up = mitigation["layers"] == UP_BLOCKS
            chosen = [name for name in layer_names if name.startswith(UP_BLOCKS) == up]
            mitigation = {**mitigation, "layers": chosen}
        started = time.perf_counter()
        evaluation = evaluate(
            model,
            guidance_scale=args.guidance,
            steps=args.steps,
            per_group=args.per_group,
            seeds=args.seeds,
            groups=groups,
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
