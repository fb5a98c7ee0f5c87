"""``memattn generate``: images with a mitigation method or the guard, and one verdict per image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memattn.attention.edit import PAPER_C
from memattn.cli.console import stdout, warn_truncated
from memattn.defaults import GUIDANCE_HELP, STEPS_HELP, announce, note_guidance, resolve_settings
from memattn.errors import MemattnError
from memattn.paths import writable_directory
from memattn.quiet import quiet_loading


def generate(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to generate.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Pipeline directory or hub id ('testbed').")],
    out: Annotated[Path, typer.Option(help="Directory for the PNGs and verdicts.json.")] = Path("generated"),
    guard: Annotated[bool, typer.Option(help="Score at step 1 and mitigate flagged images.")] = False,
    mode: Annotated[str, typer.Option(help="Guard mode: continue or restart.")] = "continue",
    c: Annotated[
        float | None, typer.Option(hidden=True, help="Old name of --strength for the paper's C.")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="Mitigation for every image (not with --guard): none, ren2024, rta, rna, gni, wen, "
            "pad-replace, pad-mask, stp, opposite-guidance (docs/mitigation.md)."
        ),
    ] = "none",
    strength: Annotated[
        float | None,
        typer.Option(
            help="The mitigation's one number: ren2024 and --guard: C (1.25); rta/rna: inserted items; gni: "
            "λ; wen: target norm; pad-mask: share; stp: share of steps; opposite-guidance: scale."
        ),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Guard threshold (default: calibrated).")] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Guard calibration JSON from `memattn calibrate --out` (default: the model's)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help=STEPS_HELP)] = None,
    guidance: Annotated[float | None, typer.Option(min=0.0, help=GUIDANCE_HELP)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Base seed; prompt i uses seed + i.")] = 0,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Generate images; with --guard, each gets a verdict (score, flagged, mitigated, trigger tokens)."""

    import torch

    from memattn.detection.detect import check_prompts
    from memattn.loading import load_pipeline
    from memattn.mitigation import registry as methods
    from memattn.mitigation.guard import Guard

    quiet_loading()
    steps, guidance, settings_line = resolve_settings(model, steps, guidance)
    note_guidance(guidance)
    prompts = check_prompts(prompts)
    if method not in methods.METHODS:
        raise MemattnError(f"unknown --method {method!r}; choose one of {', '.join(methods.METHODS)}")
    if c is not None:
        if strength is not None and strength != c:
            raise MemattnError(
                f"--c {c:g} and --strength {strength:g} set the same number: give --strength only"
            )
        strength = c
    if guard and method != "none":
        raise MemattnError(
            "--guard applies the paper's edit to flagged images only; do not combine it with --method"
        )
    registered = methods.get(method)
    if not guard:
        registered.check(strength, guidance)
    if calibration is not None and not calibration.is_file():
        raise MemattnError(f"--calibration {calibration} does not exist; write one with `memattn calibrate`")
    writable_directory(out, "--out")  # before the work: a run must not end with nowhere to put its images
    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(desc="generate", unit="step")  # the CLI's own pipeline: named, per step
    announce(settings_line)
    warn_truncated(pipe, prompts)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": generators}
    value = registered.default_strength if strength is None else strength
    if not guard:
        prepared = registered.prepare(
            pipe, prompts, strength, seed=seed, steps=steps, guidance_scale=guidance
        )
        context, generated_prompts = prepared.context, prepared.prompts
    if guard:
        paper_c = PAPER_C if strength is None else strength
        checker = Guard(
            pipe, threshold=threshold, mode=mode, mitigation={"c": paper_c}, calibration=calibration
        )  # type: ignore[arg-type]
        result = checker(prompts, **kwargs)
        images, verdicts = result.images, [v.to_dict() for v in result.verdicts]
    else:
        with context:
            images = pipe(generated_prompts, **kwargs).images
        verdicts = [
            {"prompt": p, "generated_prompt": g, "method": method, "strength": value, "guarded": False}
            for p, g in zip(prompts, generated_prompts, strict=True)
        ]
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, verdict) in enumerate(zip(images, verdicts, strict=True)):
        name = f"{i:04d}.png"
        image.save(out / name)
        verdict.update(image=name, seed=seed + i, model=model)
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1))
    if guard:
        flagged = sum(bool(v.get("flagged")) for v in verdicts)
        outcome = f"guard: {flagged} flagged and mitigated"
    else:
        outcome = f"every image mitigated by {method} (strength {value})"
        outcome = "no mitigation" if method == "none" else outcome
    stdout.print(f"{len(verdicts)} images in {out}; {outcome}")


def register(app: typer.Typer) -> None:
    """Add ``generate`` to ``app``."""
    app.command()(generate)
