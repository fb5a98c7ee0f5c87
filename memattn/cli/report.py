"""The ``memattn report`` command: thin typer wrapper over :func:`memattn.report.write_scan_report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memattn.quiet import quiet_loading


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app`` (memattn's CLI calls this once)."""

    @app.command("report")
    def report(
        results: Annotated[
            Path, typer.Argument(help="Output of `memattn scan`: a Parquet file or a directory of parts.")
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
        model: Annotated[
            str | None,
            typer.Option(
                "--model",
                "-m",
                help="Pipeline to regenerate the selected prompts with, for heat maps and entropy curves "
                "(default: the scan's model if it is a local directory or 'testbed'; 'none': skip).",
            ),
        ] = None,
        top: Annotated[int, typer.Option(min=1, help="Flagged prompts listed in the table.")] = 20,
        maps: Annotated[
            int, typer.Option(help="Flagged prompts (and as many clean ones) regenerated for heat maps.")
        ] = 4,
        steps: Annotated[
            int | None, typer.Option(min=1, help="Denoising steps of the regeneration (default: the scan's).")
        ] = None,
        guidance: Annotated[
            float | None,
            typer.Option(min=0.0, help="Guidance scale of the regeneration (default: the scan's)."),
        ] = None,
        score: Annotated[
            str | None, typer.Option(help="Score column to rank by (default: the thresholded one, else E).")
        ] = None,
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    ) -> None:
        """One self-contained HTML report of a scan: score distributions, ROC (with labels), top flagged
        prompts with trigger tokens, per-token attention heat maps and entropy curves."""
        from memattn.cli.console import stdout
        from memattn.paths import writable_file
        from memattn.report import write_scan_report

        quiet_loading()
        writable_file(out, "--out")
        path = write_scan_report(
            results,
            out,
            model=model,
            top=top,
            maps=maps,
            steps=steps,
            guidance_scale=guidance,
            score=score,
            device=device,
            dtype=dtype,
        )
        stdout.print(f"report: {path}")
