"""Notes the commands print on stderr before long work: what a setting means for the results."""

from __future__ import annotations

import sys


def guidance_note(guidance: float) -> str | None:
    """Why a guidance scale <= 1 gives the same results as 1 (diffusers skips the unconditional pass)."""
    if guidance > 1:
        return None
    return (
        f"note: guidance {guidance:g} <= 1 runs no unconditional branch (diffusers' rule): images, D and E "
        "are those of guidance 1, and the noise-norm scores (Wen, bright ending) are unavailable"
    )


def note_guidance(guidance: float) -> None:
    note = guidance_note(guidance)
    if note:
        sys.stderr.write(note + "\n")
