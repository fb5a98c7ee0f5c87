"""How much does ``memattn.trace`` slow down Stable Diffusion generation, and does it change images?

The probe recomputes ``softmax(QKᵀ/√d)`` of every cross-attention layer for the conditional rows (SDPA
never exposes probabilities), so it costs extra work per step. This script measures that cost end to end
on a pipeline with random weights (``memattn.testing``; ``--family``: SD1's UNet, the default, PixArt-α/Σ's
transformer with T5 text, or SD3/SD3.5's MMDiT with CLIP + T5 text in joint attention, where the probe also
computes the text share with one more fused kernel call): full ``pipe(...)`` calls without
and with the probe, interleaved in alternating order (ABBA...) so that drift and other load on the machine
hit both sides alike, after one warm-up of each. It also checks that images are identical and reports the
record's size per image.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import memattn.attention.joint
import memattn.attention.layers
import memattn.attention.recorder
import memattn.attention.trace
from memattn.testing import tiny_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "an oil painting of a lighthouse at dusk",
    "a bowl of ramen, studio lighting",
    "a red fox in the snow, wildlife photography",
)
# One float32 per (step, layer, head, token) and image, at each family's real shape and default steps:
# SD1.x 512 px (50 steps, 16 attn2 layers, 8 heads, 77 tokens); PixArt-α 512/1024 (20 steps, 28 blocks,
# 16 heads, max_sequence_length 120) and PixArt-Σ (300 tokens); SD3-medium (28 steps, 24 joint blocks,
# 24 heads, 77 CLIP + 256 T5 tokens) and SD3.5-large (38 blocks, 38 heads); the latent size does not enter.
REAL_SHAPES = {
    "sd1": (50, 16, 8, 77),
    "pixart-alpha": (20, 28, 16, 120),
    "pixart-sigma": (20, 28, 16, 300),
    "sd3": (28, 24, 24, 333),
    "sd3.5": (28, 38, 38, 333),
}
JOINT = ("sd3", "sd3.5")  # with --text-share the record adds one text share per (step, layer, head)
FAMILIES = tuple(REAL_SHAPES)
QUICK = dict(sample_size=16, channels=(32, 32, 64, 64), steps=2, repeats=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="sd1", help="pipeline family (default sd1)")
    parser.add_argument(
        "--sample-size",
        type=int,
        default=None,
        help="latent height/width (default: SD1 56, SD3 64; PixArt has one size, 32)",
    )
    parser.add_argument(
        "--channels",
        type=lambda s: tuple(int(c) for c in s.split(",")),
        default=(64, 64, 128, 128),
        help="4 UNet block widths, multiples of 8 (default 64,64,128,128)",
    )
    parser.add_argument("--steps", type=int, default=10, help="inference steps per call (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved plain/probe pairs (default 5)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per pipeline call (default 1)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    parser.add_argument(
        "--text-share",
        action="store_true",
        help="SD3: also record the text share (trace(text_share=True): one more kernel call per layer)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for CI smoke runs (< 20 s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.sample_size is None:
        args.sample_size = 64 if args.family in JOINT else 56
    if len(args.channels) != 4 or any(c % 8 for c in args.channels):
        parser.error("--channels needs 4 comma-separated multiples of 8")
    return args


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def time_observe(spent: list[float]) -> Callable[[], None]:
    """Add the wall time of every ``Recorder.observe`` call (the probe's extra QKᵀ, softmax and mean) to
    ``spent[-1]``; returns the function that undoes the patch. Valid on the CPU, where ops are synchronous.

    End-to-end pairs on a shared machine vary by a few percent, as much as the effect; the time inside the
    probe varies far less, so it is a steadier estimate of the probe's main cost (it leaves out the fixed
    cost of installing the probes and reading the record, a few ms per ``with`` block).
    """
    original = memattn.attention.recorder.Recorder.observe
    share = memattn.attention.joint.text_share  # joint attention (SD3): the text-share kernel call

    def observe(self: memattn.attention.recorder.Recorder, *args: Any) -> None:
        start = time.perf_counter()
        try:
            original(self, *args)
        finally:
            spent[-1] += time.perf_counter() - start

    def text_share(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return share(*args)
        finally:
            spent[-1] += time.perf_counter() - start

    memattn.attention.recorder.Recorder.observe = observe  # type: ignore[method-assign]
    memattn.attention.joint.text_share = text_share

    def restore() -> None:
        memattn.attention.recorder.Recorder.observe = original  # type: ignore[method-assign]
        memattn.attention.joint.text_share = share

    return restore


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    gc.collect()
    start = time.perf_counter()
    images = fn()
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    info = machine()
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    if args.family == "sd1":
        pipe = tiny_pipeline("sd1", sample_size=args.sample_size, channels=args.channels)
    elif args.family in JOINT:  # the tiny SD3 has no channel option
        pipe = tiny_sd3_pipeline(args.family, sample_size=args.sample_size)
    else:  # the tiny PixArt has one size (its 256-px resolution bin) and no channel option
        pipe = tiny_pixart_pipeline(args.family.removeprefix("pixart-"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    _, denoiser = memattn.attention.layers.find_denoiser(pipe)
    n_layers = len(memattn.attention.layers.cross_attention_layers(denoiser))
    print(
        f"config: family={args.family} sample_size={args.sample_size} "
        f"channels={','.join(map(str, args.channels))} "
        f"steps={args.steps} batch={args.batch} guidance={args.guidance} repeats={args.repeats} "
        f"cross-attention layers={n_layers}"
    )

    def generate() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            output_type="np",
        ).images

    record: dict[str, Any] = {}  # shape [step, layer, image, head, token] and bytes per image, last call
    observe_s: list[float] = []  # per probed call: seconds inside Recorder.observe

    def probed() -> np.ndarray:
        observe_s.append(0.0)
        with memattn.attention.trace.trace(pipe, text_share=args.text_share) as tr:
            images = generate()
            attention = tr.record.attention  # reading the record (stack + copy to CPU) is part of the cost
        share = tr.record.text_share
        record["shape"] = tuple(attention.shape)
        record["bytes"] = (attention[:, :, 0].numel() + (0 if share is None else share[:, :, 0].numel())) * 4
        return images

    times: dict[str, list[float]] = {"plain": [], "probe": []}
    max_diff = 0.0
    restore_observe = time_observe(observe_s)
    try:
        warm_plain, reference = timed(generate)
        warm_probe, _ = timed(probed)
        print(f"warm-up: plain {warm_plain:.3f} s, probe {warm_probe:.3f} s")
        for i in range(args.repeats):
            order = ("plain", "probe") if i % 2 == 0 else ("probe", "plain")
            for name in order:
                seconds, images = timed(generate if name == "plain" else probed)
                times[name].append(seconds)
                max_diff = max(max_diff, float(np.abs(images - reference).max()))
            ratio = times["probe"][-1] / times["plain"][-1]
            print(
                f"pair {i + 1}/{args.repeats} ({' then '.join(order)}): plain {times['plain'][-1]:.3f} s, "
                f"probe {times['probe'][-1]:.3f} s, ratio {ratio:.3f}"
            )
    finally:
        restore_observe()

    in_probe = observe_s[1:]  # without the warm-up
    shares = [o / a for a, o in zip(times["plain"], in_probe, strict=True)]
    ratios = [p / a for a, p in zip(times["plain"], times["probe"], strict=True)]
    median_ratio = statistics.median(ratios)
    shape, per_image = record["shape"], record["bytes"]
    real = REAL_SHAPES[args.family]
    steps, layers, heads, tokens = real
    with_share = args.family in JOINT and args.text_share
    real_bytes = steps * layers * heads * (tokens + (1 if with_share else 0)) * 4
    results: dict[str, Any] = {
        "command": command,
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "times_s": times,
        "median_plain_s": statistics.median(times["plain"]),
        "median_probe_s": statistics.median(times["probe"]),
        "pair_ratios": ratios,
        "median_ratio": median_ratio,
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "observe_s": in_probe,
        "median_observe_share": statistics.median(shares),
        "max_abs_image_diff": max_diff,
        "record_shape": list(shape),
        "record_bytes_per_image": per_image,
        "real_shape": {"family": args.family, "steps_layers_heads_tokens": list(real)},
        "real_record_bytes_per_image": real_bytes,
    }
    print(
        f"median wall time: plain {results['median_plain_s']:.3f} s, probe {results['median_probe_s']:.3f} s"
    )
    print(f"pair ratios probe/plain: min {min(ratios):.3f}, max {max(ratios):.3f}")
    print(
        f"time inside the probe's extra QKT/softmax/mean (Recorder.observe): median "
        f"{statistics.median(in_probe) * 1e3:.1f} ms per call = "
        f"{statistics.median(shares) * 100:.2f}% of a plain call"
    )
    print(f"max abs image difference, probe vs plain: {max_diff}")
    share_note = " (+1 text share)" if with_share else ""
    print(
        f"record size per image: {per_image:,} bytes here ({shape[0]} steps x {shape[1]} layers x "
        f"{shape[3]} heads x {shape[4]} tokens{share_note} x 4 B float32); {args.family} at its real shape: "
        f"{real_bytes:,} bytes ({' x '.join(map(str, real[:3]))} x {real[3]}{share_note} x 4 B = "
        f"{real_bytes / 2**20:.2f} MiB)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    label = f"probe overhead ratio (median of {args.repeats} interleaved pairs)"
    print(f"{label}: {median_ratio:.3f} (target <= 1.03)")
    return results


if __name__ == "__main__":
    main()
