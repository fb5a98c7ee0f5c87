"""Prompts per second of each detector, measured side by side in one run.

Arms, each scoring the same batch of prompts (fresh seeds, ``output_type="latent"``):
- ``step-1`` (E, Wen's step-1 norm and the combined detector's features): one CFG UNet call, the run
  stops after the first step (``memattn detect --scores e`` / ``Guard.score_prompts``);
- ``full D``: a full generation under the trace (the paper's D);
- ``BE (memattn, 1 pass)``: a full generation keeping the per-step CFG differences and the last step's
  end-token maps;
- ``BE (official, 2 passes)``: the official code's cost, two full generations (the first for the mask).
Rounds rotate the arm order after one warm-up each; medians and ratios to step-1 are printed.
Models: the bundled testbed and an SD1-architecture pipeline with random weights (``memattn.testing``).

Usage: .venv/bin/python benchmarks/detect_cost.py [--rounds 3] [--steps 50] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import memattn
from memattn.detection.baselines import BE_LAYERS, NoiseDifference, bright_ending, step1_features
from memattn.detection.step1 import stop_after_first_step
from memattn.loading import BUNDLED_TESTBED, load_pipeline
from memattn.testing import tiny_pipeline

PROMPTS = (
    "a small red circle in the center on a gray background",
    "there is a large blue square in the top left against a white background",
    "a photo of an astronaut riding a horse on mars",
    "an oil painting of a lighthouse at dusk",
)


def arms(pipe, steps: int, guidance: float) -> dict:
    def call(**extra):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        pipe(
            list(PROMPTS),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="latent",
            **extra,
        )

    def step1():
        with memattn.trace(pipe) as tr, NoiseDifference(pipe, max_calls=1) as noise:
            call(callback_on_step_end=stop_after_first_step)
        memattn.score_e(tr.record)
        step1_features(tr.record, noise.wen(1))

    def full_d():
        with memattn.trace(pipe) as tr:
            call()
        memattn.score_d(tr.record)

    def be_one_pass():
        last = steps - 1
        with memattn.trace(pipe, map_steps=[last], map_layers=list(BE_LAYERS)) as tr:
            with NoiseDifference(pipe, keep="full") as noise:
                call()
        bright_ending(tr.record, noise)

    def be_official():
        with memattn.trace(pipe, map_steps=[steps - 1], map_layers=list(BE_LAYERS)):
            call()  # pass 1: the mask
        with NoiseDifference(pipe, keep="full"):
            call()  # pass 2: the masked magnitude

    return {
        "step-1 (E, Wen, combined)": step1,
        "full D": full_d,
        "BE (memattn, 1 pass)": be_one_pass,
        "BE (official, 2 passes)": be_official,
    }


def measure(name: str, pipe, steps: int, guidance: float, rounds: int) -> dict:
    runs = arms(pipe, steps, guidance)
    names = list(runs)
    for arm in names:
        runs[arm]()
    seconds: dict[str, list[float]] = {arm: [] for arm in names}
    for r in range(rounds):
        for arm in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            runs[arm]()
            seconds[arm].append(time.perf_counter() - started)
    base = statistics.median(seconds[names[0]])
    out = {}
    print(f"\n{name}: {len(PROMPTS)} prompts per call, {steps} steps, CFG {guidance}, {rounds} rounds")
    for arm in names:
        median = statistics.median(seconds[arm])
        out[arm] = {
            "median_seconds": median,
            "prompts_per_second": len(PROMPTS) / median,
            "times_slower_than_step1": median / base,
            "seconds": seconds[arm],
        }
        print(
            f"  {arm:28} {median:8.3f} s  {len(PROMPTS) / median:8.2f} prompts/s  "
            f"x{median / base:6.1f} the step-1 time"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 4 steps, 1 round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 4, 1
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {
        "testbed": measure(
            "testbed (bundled)", load_pipeline(str(BUNDLED_TESTBED)), args.steps, 2.0, args.rounds
        ),
        "sd1_tiny": measure(
            "SD1 architecture, random weights (memattn.testing, 16x16 latents)",
            tiny_pipeline("sd1", seed=0, sample_size=16),
            args.steps,
            7.5,
            args.rounds,
        ),
    }
    if args.json:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": str(args.json)}, **results}, indent=1)
        )
    return results


if __name__ == "__main__":
    main()
