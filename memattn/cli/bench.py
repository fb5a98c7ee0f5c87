"""The ``memattn bench`` typer group: ``bench detect`` and ``bench mitigate``, one module each."""

from __future__ import annotations

import typer

from memattn.cli import bench_detect, bench_mitigate

bench_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Benchmarks: detection scores and mitigation methods."
)
bench_detect.register(bench_app)
bench_mitigate.register(bench_app)


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group to ``app``."""
    app.add_typer(bench_app, name="bench")
