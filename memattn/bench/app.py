"""The ``memattn bench`` typer group; each command lives in its own module and registers here."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    rich_markup_mode=None, no_args_is_help=True, help="Benchmarks: detection scores and mitigation methods."
)


def register() -> typer.Typer:
    """Import the command modules (they add themselves to ``bench_app``) and return the group."""
    from memattn.bench import detect_command, mitigate_command  # noqa: F401

    return bench_app
