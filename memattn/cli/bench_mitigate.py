"""``memattn bench mitigate``: a thin command over ``memattn.bench.mitigate.run_mitigation_bench``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from memattn.cli.console import print_table, stdout, table
from memattn.defaults import GUIDANCE_HELP, STEPS_HELP
from memattn.mitigation.registry import METHODS

COLUMN_FORMATS = {  # column -> (header, format); shown when any row has a finite value
    "copy_rate_128": ("copy 128×", "{:.2f}"),
    "similarity_128": ("sim 128×", "{:.3f}"),
    "copy_rate_template": ("copy tmpl", "{:.2f}"),
    "alignment_clean": ("align clean", "{:.3f}"),
    "all_attributes_clean": ("all attrs right", "{:.2f}"),
    "sscd_gen": (escape("SSCD [gen]"), "{:.3f}"),
    "sscd_train": (escape("SSCD [train]"), "{:.3f}"),
    "clip_score_clean": ("CLIP clean", "{:.2f}"),
    "clip_score_memorized": ("CLIP memorized", "{:.2f}"),
    "seconds": ("seconds", "{:.1f}"),
    "time_ratio": ("time ×none", "{:.2f}"),
}


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def _table(rows: list[dict[str, Any]]) -> Table:
    run = rows[0]
    shown = [
        key
        for key in COLUMN_FORMATS
        if any(isinstance(row.get(key), int | float) and math.isfinite(row[key]) for row in rows)
    ]
    title = f"memattn bench mitigate — {run['model']} ({run['mode']} measures)"
    view = table(title, ["setting", *(COLUMN_FORMATS[key][0] for key in shown), "Pareto"])
    view.columns[0].min_width = max(len(str(row["setting"])) for row in rows)  # one setting, one line
    for column in view.columns[1:-1]:
        column.justify = "right"
    for row in rows:
        cells = [_cell(row.get(key), COLUMN_FORMATS[key][1]) for key in shown]
        view.add_row(row["setting"], *cells, "yes" if row.get("pareto") else "")
    return view


def mitigate_command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Pipeline directory or hub id; 'testbed': the bundled one.")
    ] = "testbed",
    methods: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated methods (default: all): {', '.join(METHODS)}. 'none' always runs."
        ),
    ] = None,
    strengths: Annotated[
        list[str] | None,
        typer.Option(
            "--strengths",
            help="Strengths to sweep instead of the defaults: METHOD=V[,V...] (repeatable, e.g. "
            "--strengths rta=1,4,10 --strengths ren2024=1.25,2) or a JSON object '{\"gni\": [0.1, 0.5]}'.",
        ),
    ] = None,
    memorized: Annotated[
        Path | None, typer.Option(help="Memorized prompts (.txt/.jsonl/.csv/.parquet); with --sscd/--clip.")
    ] = None,
    clean: Annotated[
        Path | None, typer.Option(help="Clean prompts, for the CLIP score (with --clip).")
    ] = None,
    sscd: Annotated[
        Path | None,
        typer.Option(help="SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt): copy similarity."),
    ] = None,
    clip: Annotated[
        Path | None,
        typer.Option(help="Local CLIP directory (save_pretrained layout): CLIP score of prompts."),
    ] = None,
    reference_dir: Annotated[
        Path | None,
        typer.Option(help="Training images of the memorized prompts, named i.png or 0000.png (with --sscd)."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per prompt (prompt i, seed s: 1000·s + i).")] = 1,
    per_group: Annotated[
        int | None, typer.Option(min=1, help="Testbed only: prompts per ground-truth group (default 48).")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help=STEPS_HELP)] = None,
    guidance: Annotated[float | None, typer.Option(min=0.0, help=GUIDANCE_HELP)] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per pipeline call (SSCD/CLIP batches too).")
    ] = 8,
    device: Annotated[str, typer.Option(help="torch device for the pipeline, SSCD and CLIP.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Pipeline dtype: float32, float16 or bfloat16.")] = "float32",
    guard: Annotated[
        list[str] | None,
        typer.Option(
            "--guard",
            help="Testbed only: also the guard, LAYER[:EDIT] (repeatable; edit paper or eos, default "
            "paper), e.g. --guard up_blocks.0.attentions.1:eos; calibrated at 1 % FPR on held-out "
            "clean prompts.",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for mitigation_bench.csv/.json and pareto.png.")
    ] = Path("artifacts/mitigation-bench"),
) -> None:
    """Copy similarity vs prompt alignment (and wall time) for every mitigation method, with a Pareto figure.

    On a testbed pipeline: the testbed's own copy and alignment measures. On any other model (or with
    --sscd/--clip): SSCD similarity of each memorized prompt's mitigated generation to its unmitigated
    generation with the same seed (--sscd; also to training images with --reference-dir) and the CLIP
    score of clean prompts (--clip). 'none' runs first: the reference for SSCD and the time ratio.
    """
    from memattn.bench.guarded import parse_guards
    from memattn.bench.mitigate import run_mitigation_bench
    from memattn.bench.mitigate_outputs import bench_notes, write_outputs
    from memattn.bench.mitigate_settings import parse_strengths
    from memattn.loading import parse_dtype
    from memattn.paths import writable_directory
    from memattn.quiet import quiet_loading

    guards = parse_guards(guard)
    writable_directory(out, "--out")  # before the work
    quiet_loading()
    rows = run_mitigation_bench(
        model,
        method_names=methods,
        strengths=parse_strengths(strengths),
        memorized=memorized,
        clean=clean,
        sscd=sscd,
        clip=clip,
        reference_dir=reference_dir,
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        per_group=per_group,
        batch_size=batch_size,
        device=device,
        dtype=parse_dtype(dtype),
        guards=guards,
    )
    written = write_outputs(rows, out)
    console = stdout
    print_table(console, _table(rows))
    for row in rows:
        if row["method"] == "guard":
            console.print(
                f"{escape(row['setting'])}: flagged {row['flagged_128']:.0%} of the 128x items' generations, "
                f"{row['flagged_clean']:.0%} of the clean ones (threshold {row['guard_threshold']:.4f})"
            )
    for note in bench_notes(rows):
        console.print(f"note: {note}")
    if "png" not in written:
        console.print("note: pareto.png not written: it needs both a copy and an alignment measure")
    console.print("written: " + ", ".join(str(path) for path in written.values()))


def register(group: typer.Typer) -> None:
    """Add ``mitigate`` to the ``bench`` group."""
    group.command("mitigate")(mitigate_command)
