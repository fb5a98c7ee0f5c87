"""Wall time of the mitigation and the guard relative to plain generation, measured side by side.

Arms, each a full ``pipe(...)`` call on an SD1-architecture pipeline with random weights
(``memattn.testing``), run in a rotating order every round after one warm-up each:
- ``plain``: the unmodified pipeline;
- ``mitigate``: ``memattn.mitigate(pipe, c=1.25)`` (padding mask + BOS x C on every step and layer);
- ``guard, clean``: ``Guard(threshold=+inf)``: step-1 scoring, nothing flagged (a clean stream);
- ``guard, flagged``: ``Guard(threshold=-inf, mode="continue")``: every image edited from step 2;
- ``guard, restart``: ``Guard(threshold=-inf, mode="restart")``: every image generated twice;
- with ``--methods``: every other method of ``memattn.mitigation.registry`` at its default strength
  (``wen`` at target 0: always its 10 optimisation steps, the worst case).
Prints median seconds and the median of per-round ratios to plain; ``--quick`` is a CI smoke run.
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
from memattn.mitigation.guard import Guard
from memattn.mitigation.registry import METHODS, prepare
from memattn.testing import tiny_pipeline

PROMPTS = ("a photo of an astronaut riding a horse on mars", "an oil painting of a lighthouse at dusk")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-size", type=int, default=56)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="16x16 latents, 2 steps, 2 rounds")
    parser.add_argument("--methods", action="store_true", help="also every registered method")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.sample_size, args.steps, args.rounds = 16, 2, 2
    channels = (32, 32, 64, 64) if args.quick else (64, 64, 128, 128)
    pipe = tiny_pipeline("sd1", seed=0, sample_size=args.sample_size, channels=channels)
    print(f"$ {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    size = f"{args.sample_size}x{args.sample_size}"
    print(f"SD1 layout, {size} latents, channels {channels}, {args.steps} steps, CFG 7.5")

    def call(**extra):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return dict(
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=generators,
            output_type="np",
            **extra,
        )

    def plain():
        pipe(list(PROMPTS), **call())

    def mitigated():
        with memattn.mitigate(pipe, c=1.25):
            pipe(list(PROMPTS), **call())

    guards = {
        "guard, clean": Guard(pipe, threshold=float("inf")),
        "guard, flagged": Guard(pipe, threshold=float("-inf"), mode="continue"),
        "guard, restart": Guard(pipe, threshold=float("-inf"), mode="restart"),
    }
    arms = {"plain": plain, "mitigate": mitigated}
    for name, guard in guards.items():
        arms[name] = lambda guard=guard: guard(list(PROMPTS), **call())
    if args.methods:
        for method in METHODS:
            if method in ("none", "ren2024"):
                continue
            strength = 0.0 if method == "wen" else None

            def run(method=method, strength=strength):
                prepared = prepare(pipe, method, list(PROMPTS), strength, steps=args.steps)
                with prepared.context:
                    pipe(prepared.prompts, **call())

            arms[f"method {method}"] = run
    names = list(arms)
    for name in names:  # warm-up
        arms[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            started = time.perf_counter()
            arms[name]()
            seconds[name].append(time.perf_counter() - started)
    result = {"settings": vars(args) | {"json": str(args.json)}, "arms": {}}
    for name in names:
        ratios = [s / p for s, p in zip(seconds[name], seconds["plain"], strict=True)]
        result["arms"][name] = {
            "median_seconds": statistics.median(seconds[name]),
            "median_ratio_to_plain": statistics.median(ratios),
            "seconds": seconds[name],
        }
        median = statistics.median(seconds[name])
        print(f"{name:26} median {median:7.3f} s   ratio to plain {statistics.median(ratios):.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
