"""The command line (typer + rich): one module per command or group, registered on the app in ``app.py``."""

from memattn.cli.app import app, main

__all__ = ["app", "main"]
