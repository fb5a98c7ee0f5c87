"""What carries a memorized testbed image: mask token groups, steps or layers and watch the copy rate.

Each setting is a ``memattn.mitigate`` edit. Memorized: the 128-copy matching items and the templates;
clean: never-seen captions; 48 prompts x 2 seeds per group, guidance 2, 25 DDIM steps.

Usage: .venv/bin/python benchmarks/mitigation_carriers.py [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memattn.loading import BUNDLED_TESTBED, load_pipeline
from memattn.testbed.evaluate import evaluate, mitigation_measures

STEPS = 25
SUMMARY = {"c": 1.0, "mask_eos": True}  # EOS and padding masked
PROMPT = {"c": 1.0, "mask_padding": False, "mask_prompt": True}  # prompt words masked
SETTINGS: list[tuple[str, dict | None]] = [
    ("plain", None),
    ("mask padding (EOS visible)", {"c": 1.0}),
    ("mask EOS + padding (all summary tokens)", SUMMARY),
    ("mask prompt words (BOS + summary visible)", PROMPT),
    ("mask summary, steps 0-4 only", {**SUMMARY, "steps": list(range(5))}),
    ("mask summary, steps 5-24 only", {**SUMMARY, "steps": list(range(5, STEPS))}),
    ("mask summary, down+mid layers (0-2)", {**SUMMARY, "layers": [0, 1, 2]}),
    ("mask summary, up layers (3-6)", {**SUMMARY, "layers": [3, 4, 5, 6]}),
    ("mask prompt words, steps 0-4 only", {**PROMPT, "steps": list(range(5))}),
] + [
    (f"prompt penalty {d}", {"c": 1.0, "mask_padding": False, "prompt_penalty": d})
    for d in (0.5, 1.0, 2.0, 4.0)
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pipe = load_pipeline(str(BUNDLED_TESTBED))
    out = []
    for name, mitigation in SETTINGS:
        started = time.perf_counter()
        evaluation = evaluate(
            BUNDLED_TESTBED,
            guidance_scale=2.0,
            steps=STEPS,
            per_group=48,
            seeds=2,
            groups=("memorized_matching", "memorized_template", "never_seen"),
            pipe=pipe,
            mitigation=mitigation,
            progress=False,
        )
        threshold = evaluation.settings["copy_threshold"]
        row = {"setting": name, **mitigation_measures(evaluation.rows, threshold, ("never_seen",))}
        out.append(row)
        print(
            f"{name:45} copy128 {row['copy_rate_128']:.2f} sim128 {row['similarity_128']:.3f} "
            f"align128 {row['alignment_128']:.3f} "
            f"| copyT {row['copy_rate_template']:.2f} simT {row['similarity_template']:.3f} "
            f"| clean align {row['alignment_clean']:.3f} all5 {row['all_attributes_clean']:.2f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
