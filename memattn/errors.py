"""Errors memattn raises on bad input: each message names the problem and the fix."""

from __future__ import annotations

import sys
from typing import Any


class MemattnError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class ModelNotFoundError(MemattnError):
    """A model path or hub id that cannot be loaded from here."""


class UnsupportedModelError(MemattnError):
    """A model without separate text cross-attention (nothing for the probe to read)."""


class LayoutError(MemattnError):
    """Token layouts are missing, malformed or do not match the recorded batch."""


class RecordError(MemattnError):
    """A record that cannot answer the question asked (too few steps, unknown layer, ...)."""


class Interrupted(MemattnError):
    """Ctrl-C during a long job: the message says what was kept and how to resume (exit code 130)."""

    exit_code = 130


def run_cli(app: Any) -> None:
    """Run a typer app so that library errors become one line on stderr and exit code 2."""
    try:
        app()
    except Interrupted as error:
        sys.stderr.write(f"interrupted: {error}\n")
        raise SystemExit(error.exit_code) from None
    except MemattnError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    except ModuleNotFoundError as error:
        from memattn.extras import missing_extra

        message = missing_extra(error)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2) from None
