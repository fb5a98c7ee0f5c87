"""The command line (typer + rich, the ``cli`` extra): one module per command or group, registered on
the root app in ``root.py``. Nothing here is imported by the library."""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    """The ``memattn`` entry point; without the ``cli`` extra, one line says what to install."""
    try:
        from memattn.cli.root import main as run
    except ModuleNotFoundError as error:
        from memattn.extras import missing_extra

        message = missing_extra(error)
        if message is None:
            raise
        sys.stderr.write(f"error: the memattn command needs its extra: {message}\n")
        raise SystemExit(2) from None
    run()


def __getattr__(name: str) -> Any:
    if name == "app":  # ``from memattn.cli import app`` (tests, embedding the CLI)
        from memattn.cli.root import app

        return app
    raise AttributeError(f"module 'memattn.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
