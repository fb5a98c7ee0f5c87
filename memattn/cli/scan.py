"""``memattn scan``: the typer command over :func:`memattn.scan.scan` (registered by ``memattn.cli``).

Kept apart from ``memattn/cli/root.py`` so the command can be registered on any typer app (tests build their
own). Heavy imports (torch, diffusers) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memattn.attention.layers import parse_layer
from memattn.defaults import note_guidance, resolve_settings
from memattn.quiet import quiet_loading


def register(app: typer.Typer) -> None:
    """Add the ``scan`` command to ``app`` (the main CLI calls this once)."""
    app.command("scan")(scan)


def scan(
    prompts: Annotated[
        Path,
        typer.Argument(help="Prompt file: .txt (one per line), .jsonl/.csv/.parquet (prompt or caption)."),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Pipeline directory or hub id ('testbed').")],
    out: Annotated[
        Path,
        typer.Option(help="Output: a directory of Parquet parts (read it with pyarrow.parquet.read_table)."),
    ],
    batch_size: Annotated[
        int, typer.Option(min=1, help="Prompts per UNet call; fixes the batches (resume needs it).")
    ] = 8,
    full: Annotated[
        bool, typer.Option("--full", help="Run all steps: adds score D (slower by about --steps times).")
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Denoising steps (default: the calibration's, the testbed's 25, else 50)."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(min=0.0, help="Guidance scale (default: the calibration's, the testbed's 2, else 7.5)."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Base seed; input row i uses seed + i.")] = 0,
    layer: Annotated[str | None, typer.Option(help="Layer for score E (default: the paper's).")] = None,
    too_long: Annotated[
        str,
        typer.Option(
            help="Prompts over 77 tokens: truncate (score the first 77, as generation does) or skip."
        ),
    ] = "truncate",
    top_k: Annotated[int, typer.Option(min=0, help="Trigger tokens kept per prompt (0: none).")] = 3,
    calibration: Annotated[
        str | None,
        typer.Option(
            help="Guard calibration JSON for `flagged` (default: memattn_guard.json next to the "
            "model); 'none' turns flagging off."
        ),
    ] = None,
    part_rows: Annotated[
        int, typer.Option(help="Rows per Parquet part (a crash loses at most one part).")
    ] = 2048,
    part_seconds: Annotated[float, typer.Option(min=0.0, help="Write a part at least this often.")] = 60.0,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    progress: Annotated[bool, typer.Option(help="Show a progress bar (prompts/s, ETA) on stderr.")] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="local (this process) or ray (a pool of Ray actors; needs ray[data]). Same rows either "
            "way, so a scan may be resumed with the other engine."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster: auto, HOST:6379 or ray://HOST:10001 (default: $RAY_ADDRESS if set, else a "
            "new local cluster)."
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1, help="Ray actors, each holding the pipeline (default: one per GPU with cuda, else 2)."
        ),
    ] = None,
    cpus_per_actor: Annotated[
        int, typer.Option(help="CPU actors: CPUs (and torch threads) each reserves.")
    ] = 1,
) -> None:
    """Score every prompt of a file (step-1 detection; --full for all steps) into Parquet, resumably.

    Rerun the same command after a crash: it continues where it stopped. docs/scan.md has the schema.
    """
    from memattn.cli.console import stderr
    from memattn.scan import ScanSettings, load_calibration
    from memattn.scan import scan as run_scan

    quiet_loading()
    calibrated = load_calibration(model, calibration) if steps is None or guidance is None else None
    stored = (calibrated.settings or {}) if calibrated else {}
    fallback = {"steps": stored.get("steps"), "guidance": calibrated.guidance_scale if calibrated else None}
    steps, guidance, settings_line = resolve_settings(model, steps, guidance, fallback=fallback)
    note_guidance(guidance)
    settings = ScanSettings(
        model=model,
        seed=seed,
        batch_size=batch_size,
        full=full,
        steps=steps,
        guidance_scale=float(guidance),
        layer=None if layer is None else parse_layer(layer),
        device=device,
        dtype=dtype,
        too_long=too_long,
        top_k=top_k,
    )
    summary = run_scan(
        prompts,
        out,
        settings,
        calibration=calibration,
        rows_per_part=part_rows,
        seconds_per_part=part_seconds,
        progress=progress,
        engine=engine,
        ray_address=ray_address,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
    )
    flagged = f", flagged {summary.flagged}" if summary.calibrated else " (no calibration: flagged is null)"
    resumed = f"; resumed after {summary.resumed_rows} rows" if summary.resumed_rows else ""
    if summary.engine_info.get("actors"):
        resumed += f" ({summary.engine_info['actors']} Ray actors)"
    stderr.print(
        f"{summary.rows} rows in {summary.out}: ok {summary.ok}, skipped {summary.skipped}, truncated "
        f"{summary.truncated}{flagged}{resumed}; {summary.scanned_rows} scanned in {summary.seconds:.1f} s "
        f"({summary.prompts_per_second:.1f} prompts/s); {settings_line}",
        highlight=False,
    )
