"""GPU check: probe and mitigation overhead, and peak GPU memory, on an SD1.4-sized UNet in fp16.

One short run (well under 8 minutes on a CUDA machine) on a ``UNet2DConditionModel`` with SD1.4's exact
config (859.5M parameters, 16 cross-attention layers, 8 heads, 768-wide text states) and random, seeded
weights: no hub access is needed. Inputs have real shapes: a classifier-free-guidance batch of 2·B
64×64 latents ([B unconditional, B conditional] rows) and 77×768 random text embeddings.

Arms, each a block of ``--calls`` UNet forward calls (one per denoising step, timesteps 999 → 1), run
in a rotating order every round after one warm-up each:
- ``plain``: the unmodified UNet;
- ``probe``: inside ``memattn.trace(unet, cfg=True, lengths=...)``, reading ``tr.record`` at the end
  (one device→host copy), as a pipeline call would;
- ``mitigate``: inside ``memattn.mitigate(unet, c=1.25, lengths=...)`` (padding mask + BOS × C on the
  conditional rows of every layer and step).
Each block gets a fresh ``with`` (the bare-UNet recorder counts one step per UNet call and keeps them
until the block ends, so nothing accumulates across blocks). Prints the median block time per arm and the
median of per-round ratios to plain; then one call per arm for peak GPU memory
(``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``) and for the largest output difference
between the probe and plain arms (the probe must not change outputs).

Without CUDA (or with ``--device cpu``) CUDA is skipped and a reduced UNet (same layout and 16
cross-attention layers, narrow channels, 16×16 latents, fp32) runs instead: a CPU smoke run that CI
executes; its numbers say nothing about a GPU. ``--quick`` shrinks it further (8×8 latents, 2 rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from probe_overhead import machine as probe_machine  # noqa: E402  (benchmarks/ is the script's path)

import memattn
from memattn.attention.layers import cross_attention_layers
from memattn.testing import sd1_unet

# SD1.4's UNet (CompVis/stable-diffusion-v1-4, unet/config.json); all other settings are diffusers'
# defaults, which match that config. 859,520,964 parameters.
SD14 = dict(
    sample_size=64, channels=(320, 640, 1280, 1280), heads=8, cross_attention_dim=768, norm_num_groups=32
)
# CPU smoke runs: same layout, narrow channels; text states stay 77×768.
CPU = dict(sample_size=16, channels=(32, 64, 64, 64), heads=8, cross_attention_dim=768, norm_num_groups=8)
CPU_QUICK = CPU | dict(sample_size=8, channels=(32, 32, 64, 64))
TOKENS = 77
LENGTHS = (12, 30, 8, 50)  # token counts (BOS and EOS included) of the B prompts, cycled
ARMS = ("plain", "probe", "mitigate")
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: auto")
    parser.add_argument("--batch", type=int, default=2, help="images B; the UNet batch is 2B (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all arms (default 7 CUDA, 5 CPU)")
    parser.add_argument(
        "--calls", type=int, default=None, help="UNet calls per timed block (default 10 CUDA, 3 CPU)"
    )
    parser.add_argument("--c", type=float, default=1.25, help="mitigation's BOS factor C (default 1.25)")
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run: 2 rounds x 2 calls, smaller CPU UNet"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    cuda = args.device == "cuda"
    if args.rounds is None:
        args.rounds = 2 if args.quick else (7 if cuda else 5)
    if args.calls is None:
        args.calls = 2 if args.quick else (10 if cuda else 3)
    if args.batch < 1 or args.rounds < 1 or args.calls < 1:
        parser.error("--batch, --rounds and --calls must be >= 1")
    return args


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {**probe_machine(), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        info["device_name"] = f"CPU ({info['processor']})"
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info = machine(device)
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if not cuda:
        print(
            "CUDA SKIPPED: "
            + ("--device cpu" if torch.cuda.is_available() else "no CUDA device")
            + "; CPU smoke run on a reduced UNet (fp32): these numbers say nothing about a GPU"
        )

    config = SD14 if cuda else (CPU_QUICK if args.quick else CPU)
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device (SD1.4 on a CPU takes a while)
        unet = sd1_unet(
            config["sample_size"],
            config["channels"],
            heads=config["heads"],
            cross_attention_dim=config["cross_attention_dim"],
            norm_num_groups=config["norm_num_groups"],
        )
    if dtype != torch.float32:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []": none in this UNet
        try:
            unet = unet.to(dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    unet = unet.eval().requires_grad_(False)
    n_layers = len(cross_attention_layers(unet))
    n_params = sum(p.numel() for p in unet.parameters())
    if n_layers != 16:
        raise SystemExit(f"expected 16 cross-attention layers (SD1 layout), found {n_layers}")

    b, size = args.batch, config["sample_size"]
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(b)]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2 * b, 4, size, size, generator=generator).to(device, dtype)
    text = torch.randn(2 * b, TOKENS, config["cross_attention_dim"], generator=generator).to(device, dtype)
    timesteps = [
        torch.tensor(round(999 - i * 998 / max(args.calls - 1, 1)), device=device) for i in range(args.calls)
    ]
    dtype_name = str(dtype).removeprefix("torch.")
    model = "SD1.4 (exact config)" if cuda else "reduced SD1 layout (CPU smoke run)"
    channels = ",".join(map(str, config["channels"]))
    print(
        f"model: {model}, random weights, {n_params / 1e6:.1f}M parameters, {dtype_name}, "
        f"channels {channels}, {n_layers} cross-attention layers, {size}x{size} latents, UNet batch {2 * b} "
        f"(CFG: {b} uncond + {b} cond), text {TOKENS}x{config['cross_attention_dim']}, prompt lengths "
        f"{lengths}, C={args.c}; {args.rounds} rounds x {args.calls} calls per arm"
    )

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def forward(t: torch.Tensor) -> torch.Tensor:
        return unet(latents, t, encoder_hidden_states=text).sample

    record_shape: list[int] = []
    record_finite = [True]

    def read_record(tr: memattn.Trace) -> None:
        attention = tr.record.attention  # stack + one copy to the host, as after a pipeline call
        record_shape[:] = list(attention.shape)
        record_finite[0] = bool(torch.isfinite(attention).all())

    def contexts() -> dict[str, Callable[[], Any]]:
        return {
            "plain": contextlib.nullcontext,
            "probe": lambda: memattn.trace(unet, cfg=True, lengths=lengths),
            "mitigate": lambda: memattn.mitigate(unet, c=args.c, lengths=lengths, cfg=True),
        }

    def block(arm: str, steps: list[torch.Tensor]) -> torch.Tensor:
        with contexts()[arm]() as ctx:
            for t in steps:
                out = forward(t)
            if arm == "probe":
                read_record(ctx)
        return out

    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with torch.no_grad():
        warm = {}
        for arm in ARMS:
            sync()
            start = time.perf_counter()
            block(arm, timesteps)
            sync()
            warm[arm] = time.perf_counter() - start
        print("warm-up: " + ", ".join(f"{arm} {s:.3f} s" for arm, s in warm.items()))
        for round_index in range(args.rounds):
            shift = round_index % len(ARMS)
            order = ARMS[shift:] + ARMS[:shift]
            for arm in order:
                sync()
                start = time.perf_counter()
                block(arm, timesteps)
                sync()
                seconds[arm].append(time.perf_counter() - start)
            print(
                f"round {round_index + 1}/{args.rounds} ({', '.join(order)}): "
                + ", ".join(f"{arm} {seconds[arm][-1]:.3f} s" for arm in ARMS)
            )

        timed_record = (list(record_shape), record_finite[0])  # a full block's record
        # One call per arm, same timestep: peak memory and outputs.
        outputs: dict[str, torch.Tensor] = {}
        peak: dict[str, float | None] = {}
        above_base: dict[str, float | None] = {}
        for arm in ARMS:
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            outputs[arm] = block(arm, timesteps[:1]).float()
            if cuda:
                sync()
                top = torch.cuda.max_memory_allocated(device)
                peak[arm], above_base[arm] = top / MIB, (top - base) / MIB
            else:
                peak[arm] = above_base[arm] = None

    diff_probe = float((outputs["probe"] - outputs["plain"]).abs().max())
    change = (outputs["mitigate"] - outputs["plain"]).abs()
    diff_mitigate, diff_mitigate_uncond = float(change[b:].max()), float(change[:b].max())
    finite = all(bool(torch.isfinite(out).all()) for out in outputs.values())
    arms: dict[str, Any] = {}
    for arm in ARMS:
        ratios = [s / p for s, p in zip(seconds[arm], seconds["plain"], strict=True)]
        arms[arm] = {
            "median_seconds": statistics.median(seconds[arm]),
            "median_ms_per_call": statistics.median(seconds[arm]) / args.calls * 1e3,
            "median_ratio_to_plain": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
            "seconds": seconds[arm],
            "peak_memory_mib": peak[arm],
            "peak_above_start_mib": above_base[arm],
            "peak_memory_ratio_to_plain": None if peak[arm] is None else peak[arm] / peak["plain"],
        }
    results: dict[str, Any] = {
        "command": command,
        "machine": info,
        "device": device.type,
        "device_name": info["device_name"],
        "cuda_skipped": not cuda,
        "note": "SD1.4-sized UNet on CUDA"
        if cuda
        else "CUDA skipped: CPU smoke run on a reduced UNet, numbers say nothing about a GPU",
        "config": {
            "model": model,
            "channels": list(config["channels"]),
            "sample_size": size,
            "dtype": dtype_name,
            "parameters": n_params,
            "cross_attention_layers": n_layers,
            "heads": config["heads"],
            "tokens": TOKENS,
            "text_dim": config["cross_attention_dim"],
            "images": b,
            "unet_batch": 2 * b,
            "lengths": lengths,
            "c": args.c,
            "rounds": args.rounds,
            "calls": args.calls,
            "quick": args.quick,
        },
        "warmup_seconds": warm,
        "arms": arms,
        "peak_memory_ratio_probe_to_plain": arms["probe"]["peak_memory_ratio_to_plain"],
        "max_abs_diff_probe_vs_plain": diff_probe,
        "max_abs_diff_mitigate_vs_plain": diff_mitigate,
        "max_abs_diff_mitigate_vs_plain_uncond_rows": diff_mitigate_uncond,
        "outputs_finite": finite,
        "record_shape": timed_record[0],
        "record_finite": timed_record[1],
    }

    print(f"{'arm':10} {'median s':>9} {'ms/call':>9} {'ratio':>7} {'min':>7} {'max':>7} {'peak MiB':>10}")
    for arm, row in arms.items():
        memory = "n/a (CPU)" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        print(
            f"{arm:10} {row['median_seconds']:9.4f} {row['median_ms_per_call']:9.2f} "
            f"{row['median_ratio_to_plain']:7.3f} {row['min_ratio']:7.3f} {row['max_ratio']:7.3f} "
            f"{memory:>10}"
        )
    if cuda:
        increments = ", ".join(f"{arm} {above_base[arm]:.0f}" for arm in ARMS)
        print(
            f"peak GPU memory ratio probe/plain: {results['peak_memory_ratio_probe_to_plain']:.4f}, "
            f"mitigate/plain: {arms['mitigate']['peak_memory_ratio_to_plain']:.4f}; "
            f"peak above the memory held before the call (MiB): {increments}"
        )
    else:
        print("peak GPU memory: n/a (CPU)")
    print(
        f"probe record of one block [step, layer, image, head, token]: {timed_record[0]}, "
        f"finite: {timed_record[1]}"
    )
    print(f"max abs output difference probe vs plain: {diff_probe} (must be 0 or tiny)")
    print(
        f"max abs output difference mitigate vs plain: conditional rows {diff_mitigate} (the edit's effect, "
        f"> 0), unconditional rows {diff_mitigate_uncond} (not edited: 0)"
    )
    if not finite or not math.isfinite(diff_probe):
        print("WARNING: non-finite UNet outputs (random fp16 weights overflowed?)")
    results["elapsed_seconds"] = time.perf_counter() - started
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    summary = ", ".join(f"{arm} {arms[arm]['median_ratio_to_plain']:.3f}" for arm in ARMS[1:])
    print(f"overhead ratios to plain (median of {args.rounds} rounds): {summary}")
    print(f"total {results['elapsed_seconds']:.1f} s" + ("" if cuda else " (CUDA skipped: CPU smoke run)"))
    return results


if __name__ == "__main__":
    main()
