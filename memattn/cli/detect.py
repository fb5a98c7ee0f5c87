"""``memattn detect`` and ``memattn calibrate``: the paper's scores per prompt, and the guard's threshold."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from memattn.attention.layers import parse_layer
from memattn.cli.console import print_table, stdout, table, warn_truncated_prompt
from memattn.defaults import GUIDANCE_HELP, STEPS_HELP, announce, note_guidance, resolve_settings
from memattn.errors import MemattnError
from memattn.quiet import quiet_loading


def detect(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to score.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Local diffusers pipeline directory or hub id.")
    ],
    scores: Annotated[
        str, typer.Option(help="Comma-separated scores: d (full generation), e (first step).")
    ] = "d,e",
    steps: Annotated[int | None, typer.Option(min=1, help=STEPS_HELP)] = None,
    guidance: Annotated[float | None, typer.Option(min=0.0, help=GUIDANCE_HELP)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Base seed; prompt i uses seed + i.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per pipeline call.")] = 8,
    layer: Annotated[
        str | None, typer.Option(help="Layer for score E: forward index or diffusers name.")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
) -> None:
    """Score prompts with the paper's detection scores D and E (higher = more memorized)."""
    from memattn.detection.detect import detect as run_detect
    from memattn.loading import load_pipeline, parse_dtype

    quiet_loading()
    steps, guidance, settings_line = resolve_settings(model, steps, guidance)
    note_guidance(guidance)
    pipe = load_pipeline(model, dtype=parse_dtype(dtype), device=device)
    announce(settings_line)
    results = run_detect(
        pipe,
        prompts,
        which=[s.strip().lower() for s in scores.split(",") if s.strip()],
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        batch_size=batch_size,
        layer=None if layer is None else parse_layer(layer),
        progress=not as_json,
    )
    for result in results:
        if result.truncated:
            warn_truncated_prompt(result.prompt)
    if as_json:
        for result in results:
            sys.stdout.write(json.dumps({"model": model, **result.to_dict()}) + "\n")
        return
    headers = ("#", "prompt", "D", "E", "tokens", "trigger tokens")
    view = table(f"memattn detect — {model}", headers, overflow="fold")
    for i, result in enumerate(results):
        view.add_row(
            str(i),
            result.prompt,
            "-" if result.score_d is None else f"{result.score_d:.4f}",
            "-" if result.score_e is None else f"{result.score_e:.4f}",
            f"{result.n_tokens}{'+' if result.truncated else ''}",
            ", ".join(f"{token} {share:.1%}" for token, share in result.triggers),
        )
    print_table(stdout, view)


def calibrate(
    model: Annotated[str, typer.Option("--model", "-m", help="Pipeline directory ('testbed': bundled).")],
    clean: Annotated[Path, typer.Option(help="Known-clean prompts: .txt, .jsonl, .csv or .parquet.")],
    fpr: Annotated[float, typer.Option(help="Share of clean prompts the threshold may flag.")] = 0.01,
    score: Annotated[str, typer.Option(help="Step-1 score: e (the paper's) or wen (noise norm).")] = "e",
    layer: Annotated[str | None, typer.Option(help="Layer for E (default: the paper's).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help=STEPS_HELP)] = None,
    guidance: Annotated[float | None, typer.Option(min=0.0, help=GUIDANCE_HELP)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per pipeline call.")] = 16,
    seed: Annotated[int, typer.Option(min=0, help="Base seed; prompt i uses seed + i.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the JSON (default: memattn_guard.json in the model).")
    ] = None,
) -> None:
    """Pick the guard threshold that flags at most --fpr of known-clean prompts; store it with the model."""
    from tqdm.auto import tqdm

    from memattn.detection.step1 import check_kind, score_step1
    from memattn.loading import load_pipeline, resolve_model
    from memattn.mitigation.guard import (
        CALIBRATION_FILE,
        Calibration,
        call_settings,
        min_clean_prompts,
        threshold_at_fpr,
    )
    from memattn.paths import writable_file
    from memattn.prompts import read_prompts

    quiet_loading()
    check_kind(score)
    steps, guidance, settings_line = resolve_settings(model, steps, guidance)
    note_guidance(guidance)
    prompts = read_prompts(clean)
    needed = min_clean_prompts(fpr)
    if len(prompts) < needed:
        raise MemattnError(
            f"--fpr {fpr:g} needs at least {needed} clean prompts, {clean} has {len(prompts)}: with fewer, "
            "the threshold is a clean prompt's own score (it can flag that prompt itself); pass more "
            f"clean prompts or a larger --fpr (>= {1 / len(prompts):.3g})"
        )
    path = Path(resolve_model(model))
    target = out or path / CALIBRATION_FILE
    if out is None and not path.is_dir():
        raise MemattnError(f"{model} is not a local directory: pass --out FILE for the calibration JSON")
    package = Path(__file__).resolve().parents[1]  # memattn/ (this file is memattn/cli/detect.py)
    if out is None and package in path.resolve().parents:
        raise MemattnError(
            f"{model} is bundled inside the memattn package, which calibrate never writes into: pass "
            "--out FILE, then --calibration FILE to scan and generate"
        )
    writable_file(target, "--out" if out is not None else "the calibration file")  # before the scoring
    pipe = load_pipeline(str(path), progress_bar=False)
    announce(settings_line)
    e_layer = None if layer is None else parse_layer(layer)
    scores = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="calibrate", unit="batch"):
        batch = prompts[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        step1 = score_step1(
            pipe, batch, seeds=seeds, steps=steps, guidance_scale=guidance, wen=score == "wen"
        )
        scores += step1.score(score, e_layer).tolist()
    threshold = threshold_at_fpr(scores, fpr)
    flagged = sum(x > threshold for x in scores)
    settings = call_settings(pipe, {"num_inference_steps": steps, "guidance_scale": guidance})
    calibration = Calibration(
        score=score,
        threshold=threshold,
        fpr=fpr,
        n_clean=len(scores),
        layer=layer,
        model=str(model),
        empirical_fpr=flagged / len(scores),
        **settings,
    )
    try:
        calibration.save(target)
    except OSError as error:
        raise MemattnError(f"cannot write {target} ({error.strerror}); pass --out FILE") from None
    stdout.print(
        f"threshold {threshold:.6g} on score {score}: flags {flagged} of {len(scores)} clean prompts "
        f"({flagged / len(scores):.2%}) at {settings['steps']} steps, guidance {guidance:g}, "
        f"{settings['scheduler']}, {settings['resolution']}, {settings['dtype']}; written to {target}"
    )


def register(app: typer.Typer) -> None:
    """Add ``detect`` and ``calibrate`` to ``app``."""
    app.command()(detect)
    app.command()(calibrate)
