"""``memattn testbed``: train, inspect and evaluate the CPU-scale memorization testbed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from memattn.attention.edit import PAPER_C
from memattn.cli.console import print_table, stdout, table
from memattn.errors import MemattnError
from memattn.quiet import quiet_loading

testbed_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="The CPU-scale memorization testbed."
)


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

    from memattn.paths import writable_directory

    writable_directory(out, "--out")  # before the text encoder's pre-training
    quiet_loading()  # before transformers is imported: its import-time notices are not the user's concern
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
    from memattn.testbed.manifest import load_manifest

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
    from memattn.testbed.manifest import load_manifest

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
    guard: Annotated[
        bool | None,
        typer.Option(
            help="Also let the guard generate them: E in the testbed's pre-registered layer at step 1, "
            "calibrated at 1 % FPR on seen-once captions, flagged images get the EOS-masking edit "
            "(default: on where the testbed has a pre-registered layer)."
        ),
    ] = None,
) -> None:
    """Generate every ground-truth group, score every detector, measure copies and alignment, report."""
    import time

    quiet_loading()
    from memattn.loading import load_pipeline, resolve_model
    from memattn.mitigation.guard import GUARD_EDITS
    from memattn.paths import writable_directory
    from memattn.testbed.evaluate import PRE_REGISTERED_E_LAYER, evaluate
    from memattn.testbed.manifest import load_manifest, scene_of
    from memattn.testbed.report import write_report

    if per_group < 1 or seeds < 1 or steps < 2:
        raise MemattnError("--per-group and --seeds must be at least 1 and --steps at least 2 (D needs two)")
    if guidance < 1:
        raise MemattnError(
            f"--guidance {guidance}: must be at least 1 (1 turns classifier-free guidance off)"
        )
    console = stdout
    writable_directory(out, "--out")  # before minutes of generation
    path = Path(resolve_model(model))
    manifest = load_manifest(path)
    guard_layer = PRE_REGISTERED_E_LAYER.get(scene_of(path))
    if guard and guard_layer is None:
        raise MemattnError(
            f"--guard: the {scene_of(path)!r} testbed has no pre-registered E layer to guard with; "
            "use --no-guard (or `memattn bench mitigate --guard LAYER:EDIT` to try a layer)"
        )
    guard = guard_layer is not None if guard is None else guard
    console.print(
        f"testbed model: {path}\n  trained by `{manifest['command']}` "
        f"(memattn {manifest['memattn_version']}, seed {manifest['seed']}, "
        f"{manifest['config']['steps']} steps, {manifest['training_seconds']} s)"
    )
    started = time.time()
    pipe = load_pipeline(str(path), progress_bar=False)
    evaluation = evaluate(
        path, guidance_scale=guidance, steps=steps, per_group=per_group, seeds=seeds, pipe=pipe
    )
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
            pipe=pipe,
        )
    guarded, guard_settings = None, None
    if guard:
        from memattn.bench.guarded import CALIBRATION_PROMPTS, GuardSetting, guarded_evaluation

        setting = GuardSetting(guard_layer, "eos")
        console.print(
            f"the guard (E in {guard_layer} at step 1, flagged images get {GUARD_EDITS['eos']}) on the "
            f"128x and never-seen prompts; calibrating on {CALIBRATION_PROMPTS} seen-once captions first"
        )
        guarded, threshold, _ = guarded_evaluation(
            path,
            pipe,
            setting,
            groups=("memorized_matching", "never_seen"),
            seeds=seeds,
            steps=steps,
            guidance=guidance,
            per_group=per_group,
            progress=True,
        )
        guard_settings = {
            "layer": guard_layer,
            "edit": GUARD_EDITS["eos"],
            "threshold": threshold,
            "calibration": f"{setting.fpr:.0%} FPR on {CALIBRATION_PROMPTS} seen-once captions",
        }
    seconds = time.time() - started
    report = write_report(
        evaluation,
        out,
        extra={"wall time (s)": round(seconds, 1)},
        mitigated=mitigated,
        guarded=guarded,
        guard_settings=guard_settings,
    )
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
    if guarded is not None:
        g = summary["guard"]
        console.print(
            f"guard {g['settings']['edit']}: copies of 128x prompts {g['plain']['copy_rate_128']:.2f} -> "
            f"{g['guarded']['copy_rate_128']:.2f}; never-seen prompts with all attributes right "
            f"{g['plain']['all_attributes_clean']:.2f} -> {g['guarded']['all_attributes_clean']:.2f}; "
            f"flagged {g['flagged_128']:.0%} of the 128x and {g['flagged_clean']:.0%} of the never-seen"
        )
    console.print(f"report: {report}  ({seconds:.0f} s of generation and scoring)")


def register(app: typer.Typer) -> None:
    """Add the ``testbed`` group to ``app``."""
    app.add_typer(testbed_app, name="testbed")
