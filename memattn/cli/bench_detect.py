"""``memattn bench detect``: the detection table (AUC, TPR at low FPR, CIs, cost) for one model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from memattn.cli.console import print_table, stdout
from memattn.cli.console import table as make_table
from memattn.defaults import GUIDANCE_HELP, STEPS_HELP
from memattn.errors import MemattnError

TESTBED_POSITIVE_GROUPS = ("memorized_template",)  # plus matching items with >= 32 copies
TESTBED_NEGATIVE_GROUPS = ("seen_once", "rare_word_seen_once", "never_seen", "novel_composition")


def testbed_prompts(model: Path, per_group: int) -> tuple[list[str], list[int], list[str]]:
    """The testbed's ground truth: copied items (>= 32 copies, templates) vs the non-memorized groups.

    Returns prompts, 0/1 labels and each prompt's group (detection is also reported per negative group).
    """
    import numpy as np

    from memattn.testbed.manifest import dataset_for

    dataset = dataset_for(model)
    rng = np.random.default_rng(0)

    def pick(items: list) -> list:
        if len(items) <= per_group:
            return items
        return [items[i] for i in sorted(rng.choice(len(items), per_group, replace=False))]

    positives = [it for it in dataset.group("memorized_matching") if it.duplication >= 32]
    positives = pick([it for it in positives if it.duplication == 128]) + pick(
        [it for it in positives if it.duplication == 32]
    )
    present = dataset.prompt_groups()
    for group in TESTBED_POSITIVE_GROUPS:
        if group in present:
            positives += pick(list(dataset.group(group)))
    negatives = [
        it for group in TESTBED_NEGATIVE_GROUPS if group in present for it in pick(list(dataset.group(group)))
    ]
    prompts = [it.caption for it in positives + negatives]
    groups = [it.group for it in positives + negatives]
    return prompts, [1] * len(positives) + [0] * len(negatives), groups


def roc_figure(per_prompt: dict[str, Any], labels: Any, path: Path, title: str) -> Path:
    from sklearn.metrics import roc_curve

    from memattn.plotting import subplots

    fig, ax = subplots(figsize=(6, 5))
    for name, values in per_prompt.items():
        fpr, tpr, _ = roc_curve(labels, values)
        ax.plot(fpr, tpr, label=name, lw=1.5 if not name.startswith("e_layer") else 0.7)
    chance = [i / 200 for i in range(201)]  # many points: a straight chance line bends on the symlog axis
    ax.plot(chance, chance, color="grey", lw=0.5, ls="--", label="chance")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("false-positive rate (symlog)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def per_negative_group(collected: Any, labels: list[int], groups: list[str], names: list[str]) -> dict:
    """Held-out AUC and TPR@1% FPR of every score, memorized prompts vs each non-memorized group alone."""
    import numpy as np

    from memattn.bench.detect import per_prompt_scores, score_table, split_prompts

    labels_array, group_array = np.asarray(labels), np.asarray(groups)
    held_out = ~split_prompts(labels)
    per_prompt = per_prompt_scores(collected.rows, names, len(labels))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for group in dict.fromkeys(g for g, label in zip(groups, labels, strict=True) if label == 0):
        mask = held_out & ((labels_array == 1) | (group_array == group))
        if len(set(labels_array[mask].tolist())) < 2:  # too few prompts: this group has none held out
            continue
        table = score_table({n: v[mask] for n, v in per_prompt.items()}, labels_array[mask], n_boot=200)
        out[group] = {
            row["score"]: {
                "auc": row["auc"],
                "auc_ci95": row["auc_ci95"],
                "tpr@1%fpr": row["tpr@1%fpr_interp"],
            }
            for row in table
        }
    return out


def bench_detect(
    model: Annotated[str, typer.Option("--model", "-m", help="Pipeline directory, hub id or 'testbed'.")] = (
        "testbed"
    ),
    memorized: Annotated[
        Path | None, typer.Option(help="Memorized prompts (.txt/.jsonl/.csv/.parquet).")
    ] = None,
    clean: Annotated[Path | None, typer.Option(help="Non-memorized prompts, same formats.")] = None,
    seeds: Annotated[
        int, typer.Option(min=1, help="Generations per prompt (seed = index in its file + 100000 * k).")
    ] = 3,
    steps: Annotated[int | None, typer.Option(min=1, help=STEPS_HELP)] = None,
    guidance: Annotated[float | None, typer.Option(min=0.0, help=GUIDANCE_HELP)] = None,
    per_group: Annotated[int, typer.Option(min=1, help="Testbed only: prompts per ground-truth group.")] = 32,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per pipeline call.")] = 8,
    scheduler: Annotated[
        str, typer.Option(help="ddim (the paper's setting; one UNet call per step) or model (keep its own).")
    ] = "ddim",
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    out: Annotated[Path, typer.Option(help="Directory for the CSV, rows, ROC figure and detector.")] = Path(
        "bench_detect"
    ),
) -> None:
    """Every detection score (D, E, E per layer, Wen, bright ending, combined step-1) in one pass."""
    from memattn.bench.detect import analyse, collect, per_prompt_scores
    from memattn.defaults import announce, is_testbed, resolve_settings
    from memattn.detection.combined import DETECTOR_FILE
    from memattn.loading import load_pipeline, resolve_model
    from memattn.paths import writable_directory
    from memattn.prompts import read_prompts
    from memattn.quiet import quiet_loading

    quiet_loading()
    writable_directory(out, "--out")  # before the work: the detector must have somewhere to go
    steps, guidance, settings_line = resolve_settings(model, steps, guidance)
    resolved = resolve_model(model)
    if memorized is None and clean is None:
        if not is_testbed(model):
            raise MemattnError(
                "give --memorized FILE and --clean FILE (only the testbed has built-in labels)"
            )
        prompts, labels, groups = testbed_prompts(Path(resolved), per_group)
    elif memorized is None or clean is None:
        raise MemattnError("give both --memorized and --clean prompt files")
    else:
        positives, negatives = read_prompts(memorized), read_prompts(clean)
        prompts, labels = positives + negatives, [1] * len(positives) + [0] * len(negatives)
        groups = ["memorized"] * len(positives) + ["clean"] * len(negatives)
    if seeds < 1:
        raise MemattnError(f"--seeds must be >= 1, got {seeds}")
    pipe = load_pipeline(model, device=device, progress_bar=False)
    announce(settings_line)
    if scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "model":
        raise MemattnError(f"--scheduler must be ddim or model, got {scheduler!r}")
    collected = collect(
        pipe, prompts, labels, seeds=seeds, steps=steps, guidance_scale=guidance, batch_size=batch_size
    )
    table, detector = analyse(collected, labels, steps, model=str(model))
    out.mkdir(parents=True, exist_ok=True)
    detector.save(out / DETECTOR_FILE)
    with (out / "detect_rows.jsonl").open("w") as handle:
        for row in collected.rows:
            handle.write(json.dumps(row) + "\n")
    columns = list(table[0])
    with (out / "detect_bench.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(
            {k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in table
        )
    main_scores = ["score_d", "score_e", "wen_step1", "wen_all_steps", "bright_ending", "combined"]
    import numpy as np

    from memattn.bench.detect import split_prompts

    held_out = ~split_prompts(labels)
    per_prompt = per_prompt_scores(collected.rows, main_scores, len(labels))
    roc_figure(
        {k: v[held_out] for k, v in per_prompt.items()},
        np.asarray(labels)[held_out],
        out / "roc.png",
        f"{model}: held-out prompts, {seeds} seed(s), {steps} steps, CFG {guidance}",
    )
    by_group = per_negative_group(collected, labels, groups, [row["score"] for row in table])
    summary = {
        "model": str(model),
        "prompts": len(prompts),
        "memorized": int(sum(labels)),
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "held_out_prompts": int(held_out.sum()),
        "seconds_full_pass": collected.seconds_full,
        "seconds_step1_pass": collected.seconds_step1,
        "table": table,
        "by_negative_group": by_group,
    }
    (out / "detect_bench.json").write_text(json.dumps(summary, indent=1))
    console = stdout
    view = make_table(
        f"detection on held-out prompts ({int(held_out.sum())} of {len(prompts)})",
        ("score", "AUC [95% CI]", "TPR@1% (interp / nearest)", "TPR@10%", "UNet calls", "s/image"),
    )
    for row in table:
        low, high = row["auc_ci95"]
        view.add_row(
            row["score"],
            f"{row['auc']:.3f} [{low:.2f}, {high:.2f}]",
            f"{row['tpr@1%fpr_interp']:.3f} / {row['tpr@1%fpr_nearest']:.3f}",
            f"{row['tpr@10%fpr_interp']:.3f}",
            str(row["unet_calls_per_image"]),
            f"{row['seconds_per_image']:.3f}",
        )
    print_table(console, view)
    if len(by_group) > 1:
        view = make_table(
            "AUC on held-out prompts: memorized vs each non-memorized group", ("score", *by_group)
        )
        for name in [row["score"] for row in table]:
            view.add_row(name, *(f"{by_group[g][name]['auc']:.3f}" for g in by_group))
        print_table(console, view)
    console.print(
        f"wrote {out}/detect_bench.csv, detect_bench.json, detect_rows.jsonl, roc.png, {DETECTOR_FILE}"
    )


def register(group: typer.Typer) -> None:
    """Add ``detect`` to the ``bench`` group."""
    group.command("detect")(bench_detect)
