"""The ``memattn`` command line: the root typer app; every command lives in its own module and
registers itself here through its ``register(app)`` (the only place typer is imported is ``memattn.cli``)."""

from __future__ import annotations

from typing import Annotated

import typer

from memattn._version import __version__
from memattn.errors import run_cli

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


def _register_commands() -> None:
    """One registration style: every command module has ``register(app)``."""
    from memattn.cli import bench, detect, finetune, generate, report, scan, testbed

    for command in (detect, generate, scan, report, finetune, bench, testbed):
        command.register(app)


_register_commands()


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 2."""
    run_cli(app)


if __name__ == "__main__":
    main()
