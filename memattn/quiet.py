"""Silence diffusers/transformers loading bars and info logs: they would bury memattn's own output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def quiet_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


@contextmanager
def pipeline_bar_off(pipe: Any) -> Iterator[None]:
    """The pipeline's per-call bar off while memattn shows its own; the caller's setting comes back after.

    diffusers keeps the setting in ``pipe._progress_bar_config`` (replaced, never merged, by
    ``set_progress_bar_config``), so saving and restoring that dict restores exactly what was there.
    """
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    missing = not hasattr(pipe, "_progress_bar_config")
    saved = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        if missing:
            del pipe._progress_bar_config
        else:
            pipe.set_progress_bar_config(**saved)
