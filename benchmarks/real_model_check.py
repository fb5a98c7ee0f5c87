"""Real-weights check of one pipeline: traced = untraced, the record, D/E, the edit, the probe's cost.

For a GPU with real weights (``benchmarks/real_models.sh`` lists the commands per family; CI runs it on
tiny saved pipelines on the CPU, whose numbers say nothing about real models). Loads ``--model`` (a
local directory or a hub id, safetensors only) through ``memattn.loading.load_pipeline`` and:

1. generates ``--prompts`` once plainly and once inside ``memattn.trace`` from the same seeds and reports
   the largest pixel difference (the probe must not change images: 0.0 where memattn calls the same
   kernel);
2. reports the record's shape and bytes per image, and D and E per image (finite or not);
3. generates under the family's edit — the paper's (BOS x 1.25, padding masked) where the tokenizer adds
   a BOS, the EOS mask where it does not (T5: PixArt; docs/models.md) — and reports how far the images
   moved, and that the pipeline's processors were put back;
4. times ``--rounds`` interleaved plain/traced pairs (ABBA order) and reports the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import memattn
from memattn.attention.edit import PAPER_C
from memattn.attention.layers import find_denoiser
from memattn.attention.tokens import adds_bos
from memattn.errors import MemattnError
from memattn.loading import load_pipeline
from memattn.quiet import quiet_loading

PROMPTS = ("a photo of an astronaut riding a horse on mars", "an oil painting of a lighthouse at dusk")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pipeline directory or hub id")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--steps", type=int, default=20, help="inference steps (default 20)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the pipeline's own")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="prompts (default: two)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved plain/traced pairs (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be at least 2 (D needs two) and --rounds at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_loading()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")]
    pipe = load_pipeline(args.model, dtype=dtype, device=device, progress_bar=False)
    _, denoiser = find_denoiser(pipe)
    extra = {} if args.guidance is None else {"guidance_scale": args.guidance}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def generate() -> np.ndarray:
        generators = [torch.Generator(device="cpu").manual_seed(i) for i in range(len(args.prompts))]
        images = pipe(
            list(args.prompts),
            num_inference_steps=args.steps,
            generator=generators,
            output_type="np",
            **extra,
        ).images
        sync()
        return np.asarray(images, dtype=np.float32)

    def traced() -> tuple[np.ndarray, Any]:
        with memattn.trace(pipe) as tr:
            images = generate()
            record = tr.record
        return images, record

    print(f"model: {args.model} ({type(pipe).__name__}, {type(denoiser).__name__}) on {device}, {dtype}")
    plain = generate()
    images, record = traced()
    trace_diff = float(np.abs(images - plain).max())
    d, e = memattn.score_d(record).numpy(), memattn.score_e(record).numpy()
    per_image = record.attention[:, :, 0].numel() * record.attention.element_size()
    print(f"traced vs plain: max abs pixel difference {trace_diff}")
    print(
        f"record {tuple(record.attention.shape)} [step, layer, image, head, token]: {per_image:,} B per image"
    )
    print(f"D per image {[round(float(x), 4) for x in d]}, E per image {[round(float(x), 4) for x in e]}")

    bos = adds_bos(pipe.tokenizer)
    edit = {"c": PAPER_C} if bos else {"c": 1.0, "mask_eos": True}
    before = dict(denoiser.attn_processors)
    with memattn.mitigate(pipe, **edit):
        mitigated = generate()
    restored = all(denoiser.attn_processors[name] is proc for name, proc in before.items())
    edit_diff = float(np.abs(mitigated - plain).mean())
    print(
        f"edit {edit} ({'BOS' if bos else 'no BOS'}): mean abs pixel change {edit_diff:.4f}; "
        f"restored {restored}"
    )

    times: dict[str, list[float]] = {"plain": [], "traced": []}
    for i in range(args.rounds):
        for arm in ("plain", "traced") if i % 2 == 0 else ("traced", "plain"):
            start = time.perf_counter()
            generate() if arm == "plain" else traced()
            times[arm].append(time.perf_counter() - start)
    ratios = [t / p for p, t in zip(times["plain"], times["traced"], strict=True)]
    print(
        f"traced/plain wall time per pair: {[round(r, 3) for r in ratios]}, "
        f"median {statistics.median(ratios):.3f}"
    )
    results = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "pipeline": type(pipe).__name__,
        "device": device,
        "dtype": str(dtype),
        "steps": args.steps,
        "max_abs_trace_diff": trace_diff,
        "record_shape": list(record.attention.shape),
        "record_bytes_per_image": per_image,
        "score_d": d.tolist(),
        "score_e": e.tolist(),
        "scores_finite": bool(np.isfinite(d).all() and np.isfinite(e).all()),
        "edit": edit,
        "edit_mean_abs_change": edit_diff,
        "restored": restored,
        "times_s": times,
        "median_ratio": statistics.median(ratios),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    try:
        main()
    except MemattnError as error:  # an unsupported family or a bad path: one line, exit 2
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
