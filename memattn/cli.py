"""The ``memattn`` command line: thin typer commands over the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from memattn._version import __version__
from memattn.attention.edit import PAPER_C
from memattn.attention.layers import parse_layer
from memattn.console import print_table, stdout, table
from memattn.console import stderr as err
from memattn.defaults import GUIDANCE_HELP, STEPS_HELP, announce, note_guidance, resolve_settings
from memattn.errors import MemattnError, run_cli
from memattn.paths import writable_directory
from memattn.quiet import quiet_loading

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # click's help: wraps to the terminal and never cuts an option name
    no_args_is_help=True,
    help="Find training-data memorization in text-to-image diffusion models through their cross-attention.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"memattn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """memattn command line."""


@app.command()
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
    from memattn.detect import detect as run_detect
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
            _warn_truncated_prompt(result.prompt)
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


@app.command()
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

    from memattn.guard import (
        CALIBRATION_FILE,
        Calibration,
        call_settings,
        min_clean_prompts,
        threshold_at_fpr,
    )
    from memattn.loading import load_pipeline, resolve_model
    from memattn.prompts_io import read_prompts
    from memattn.step1 import check_kind, score_step1

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
    package = Path(__file__).resolve().parent
    if out is None and package in path.resolve().parents:
        raise MemattnError(
            f"{model} is bundled inside the memattn package, which calibrate never writes into: pass "
            "--out FILE, then --calibration FILE to scan and generate"
        )
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


@app.command()
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

    from memattn import methods
    from memattn.detect import check_prompts
    from memattn.guard import Guard
    from memattn.loading import load_pipeline

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
    _warn_truncated(pipe, prompts)
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


def _warn_truncated(pipe: object, prompts: list[str]) -> None:
    """The text encoder sees 77 tokens: say which prompts lose their end, as `detect` does."""
    from memattn.attention.tokens import tokenize_layouts

    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    for prompt, layout in zip(prompts, tokenize_layouts(tokenizer, prompts), strict=True):
        if layout.truncated:
            _warn_truncated_prompt(prompt)


def _warn_truncated_prompt(prompt: str) -> None:
    err.print(f"[yellow]warning:[/] prompt truncated to 77 tokens: {prompt[:60]!r}")


def _add_subcommands() -> None:
    """Commands that live in their own modules: scan, report, finetune, bench (detect, mitigate)."""
    from memattn.bench.app import register as register_bench
    from memattn.finetune_command import register as register_finetune
    from memattn.report_command import register as register_report
    from memattn.scan_command import register as register_scan

    register_scan(app)
    register_report(app)
    register_finetune(app)
    app.add_typer(register_bench(), name="bench")


_add_subcommands()

testbed_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="The CPU-scale memorization testbed."
)
app.add_typer(testbed_app, name="testbed")


@testbed_app.command("train")
def testbed_train(
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints/ and the exported pipeline/.")],
    fast: Annotated[bool, typer.Option(help="The small recipe (a few minutes; used by CI).")] = False,
    detail: Annotated[
        bool, typer.Option(help="Testbed v1 (fine-detail memorization, 'testbed-detail') instead of v2.")
    ] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the recipe's number of steps.")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, help="Override the recipe's seed (data and weights).")
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(help="Override the text encoder: random, contrastive or contrastive-eoscopy."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = True,
) -> None:
    """Train the testbed model (seeded, resumable); writes OUT/pipeline, loadable with from_pretrained."""
    from dataclasses import replace

    from memattn.testbed.train import DETAIL, DETAIL_FAST, OBJECTS, OBJECTS_FAST, train, with_steps

    recipes = {
        (False, False): OBJECTS,
        (True, False): OBJECTS_FAST,
        (False, True): DETAIL,
        (True, True): DETAIL_FAST,
    }
    config = with_steps(recipes[(fast, detail)], steps)
    if steps is not None and steps < 1:
        raise MemattnError(f"--steps must be >= 1, got {steps}")
    if seed is not None:
        if seed < 0:
            raise MemattnError(f"--seed must be >= 0, got {seed}")
        config = replace(config, seed=seed)
    if text_encoder is not None:
        pretrain = config.text_pretrain_steps or OBJECTS.text_pretrain_steps
        config = replace(
            config, text_encoder=text_encoder, text_pretrain_steps=0 if text_encoder == "random" else pretrain
        )
    target = train(config, out, resume=resume)
    stdout.print(f"testbed pipeline written to {target}")


@testbed_app.command("info")
def testbed_info(
    model: Annotated[
        str, typer.Argument(help="A testbed pipeline directory, or 'testbed' (bundled).")
    ] = "testbed",
) -> None:
    """Print a testbed pipeline's manifest: recipe, training time and ground-truth groups."""
    from memattn.loading import resolve_model
    from memattn.testbed.evaluate import load_manifest

    path = Path(resolve_model(model))
    data = load_manifest(path)
    view = table(f"testbed {path}", ("group", "prompts", "duplication counts", "example"), overflow="fold")
    sizes = data.get("summary", {}).get("items", {})
    for name, items in data["groups"].items():
        counts = sorted({item["duplication"] for item in items})
        view.add_row(
            name,
            str(sizes.get(name, len(items))),
            ", ".join(map(str, counts)),
            items[0]["caption"] if items else "",
        )
    print_table(stdout, view)
    stdout.print(
        f"memattn {data['memattn_version']}, seed {data['seed']}, {data['training_seconds']} s of training "
        f"({data['config']['steps']} steps) on {data['machine']}\ncommand: {data['command']}"
    )


@testbed_app.command("prompts")
def testbed_prompts(
    group: Annotated[str, typer.Argument(help="Ground-truth group, e.g. never_seen or memorized_matching.")],
    model: Annotated[str, typer.Option(help="Testbed pipeline directory ('testbed': bundled).")] = "testbed",
    duplication: Annotated[int | None, typer.Option(min=0, help="Only items seen this many times.")] = None,
) -> None:
    """Print one ground-truth group's prompts, one per line (e.g. clean prompts for `memattn calibrate`)."""
    from memattn.loading import resolve_model
    from memattn.testbed.evaluate import load_manifest

    groups = load_manifest(Path(resolve_model(model)))["groups"]
    if group not in groups:
        raise MemattnError(f"unknown group {group!r}; the groups are {', '.join(groups)}")
    chosen = [item for item in groups[group] if duplication is None or item["duplication"] == duplication]
    if not chosen:
        counts = sorted({item["duplication"] for item in groups[group]})
        raise MemattnError(
            f"group {group!r} has no item seen {duplication} times; its duplication counts: "
            f"{', '.join(map(str, counts))}"
        )
    for item in chosen:
        sys.stdout.write(item["caption"] + "\n")


@testbed_app.command("report")
def testbed_report(
    model: Annotated[
        str, typer.Option(help="Testbed pipeline directory; 'testbed' is the bundled one.")
    ] = "testbed",
    out: Annotated[
        Path, typer.Option(help="Directory for report.html, PNGs, summary.json, rows.jsonl.")
    ] = Path("artifacts/testbed-report"),
    per_group: Annotated[int, typer.Option(min=1, help="Prompts per ground-truth group.")] = 24,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per prompt.")] = 2,
    guidance: Annotated[
        float,
        typer.Option(min=0.0, help="Classifier-free guidance scale; 1 = no CFG (one conditional pass)."),
    ] = 2.0,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 25,
    mitigation: Annotated[
        bool, typer.Option(help="Also generate the 128x and never-seen prompts under the paper's mitigation.")
    ] = True,
) -> None:
    """Generate every ground-truth group, score every detector, measure copies and alignment, report."""
    import time

    quiet_loading()
    from memattn.loading import resolve_model
    from memattn.testbed.evaluate import evaluate, load_manifest
    from memattn.testbed.report import write_report

    if per_group < 1 or seeds < 1 or steps < 2:
        raise MemattnError("--per-group and --seeds must be at least 1 and --steps at least 2 (D needs two)")
    if guidance < 1:
        raise MemattnError(
            f"--guidance {guidance}: must be at least 1 (1 turns classifier-free guidance off)"
        )
    console = stdout
    path = Path(resolve_model(model))
    manifest = load_manifest(path)
    console.print(
        f"testbed model: {path}\n  trained by `{manifest['command']}` "
        f"(memattn {manifest['memattn_version']}, seed {manifest['seed']}, "
        f"{manifest['config']['steps']} steps, {manifest['training_seconds']} s)"
    )
    started = time.time()
    evaluation = evaluate(path, guidance_scale=guidance, steps=steps, per_group=per_group, seeds=seeds)
    mitigated = None
    if mitigation:
        console.print(
            f"the paper's mitigation (padding masked, BOS x {PAPER_C:g}) on the 128x and never-seen prompts"
        )
        mitigated = evaluate(
            path,
            guidance_scale=guidance,
            steps=steps,
            per_group=per_group,
            seeds=seeds,
            groups=("memorized_matching", "never_seen"),
            mitigation={"c": PAPER_C},
        )
    seconds = time.time() - started
    report = write_report(evaluation, out, extra={"wall time (s)": round(seconds, 1)}, mitigated=mitigated)
    summary = json.loads((out / "summary.json").read_text())
    groups = table(
        f"generations per group (copy: {summary['copy_measure']} > {summary['copy_threshold']})",
        ("group", "n", "copy rate", "own copies", "leakage", "align", "all attrs", "BOS", "summary"),
    )
    for name, g in summary["groups"].items():
        groups.add_row(
            name,
            str(g["n"]),
            f"{g['copy_rate']:.2f}",
            f"{g['own_copy_rate']:.2f}",
            f"{g['leakage_rate']:.2f}",
            f"{g['alignment']:.3f}",
            f"{g['all_attributes_right']:.2f}",
            f"{g['bos_share']:.3f}",
            f"{g['summary_share']:.3f}",
        )
    print_table(console, groups)
    from memattn.testbed.report import detection_ranking

    negatives = list(summary["detection_auc_by_negative_group"])
    detection = table(
        "detection, best first: memorized_matching vs non-memorized (higher = memorized)",
        ("score", "UNet calls", "AUC", "TPR@1%FPR", *(f"vs {g}" for g in negatives)),
    )
    for r in detection_ranking(summary):
        detection.add_row(
            r["score"],
            "1" if r["step1"] else "all",
            f"{r['auc']:.3f}",
            "" if r["tpr_at_fpr"] is None else f"{r['tpr_at_fpr']:.3f}",
            *("" if r["by_group"].get(g) is None else f"{r['by_group'][g]:.3f}" for g in negatives),
        )
    print_table(console, detection)
    if mitigated is not None:
        m = summary["mitigation"]
        console.print(
            f"mitigation {m['settings']}: copies of 128x prompts {m['plain']['copy_rate_128']:.2f} -> "
            f"{m['mitigated']['copy_rate_128']:.2f}; never-seen prompts with all attributes right "
            f"{m['plain']['all_attributes_clean']:.2f} -> {m['mitigated']['all_attributes_clean']:.2f}"
        )
    console.print(f"report: {report}  ({seconds:.0f} s of generation and scoring)")


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 2."""
    run_cli(app)


if __name__ == "__main__":
    main()
