"""Read a whole prompt file for the commands that score a list (calibrate, bench): the scan's reader.

Every command reads prompt files through ``memattn.scan.inputs`` (one rule for what a prompt is): a
bad line or record (not valid JSON or UTF-8, a null or a number where text belongs, an empty prompt, NUL
bytes) is skipped with its reason, which is printed once per file on stderr; a file with no usable
prompt, an unknown extension or no prompt column is a one-line error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from memattn.errors import MemattnError

_SHOWN_REASONS = 3  # skipped rows named in the note; the rest are counted


def read_prompts(path: str | Path, *, notes: TextIO | None = None) -> list[str]:
    """The usable prompts of a file, in order; skipped rows are noted on ``notes`` (default stderr).

    Blank .txt lines are layout, not prompts: they are dropped without a note.
    """
    from memattn.scan.inputs import iter_prompts

    path = Path(path)
    prompts: list[str] = []
    skipped: list[str] = []
    blank_is_layout = path.suffix.lower() == ".txt"
    unit = "line" if path.suffix.lower() in (".txt", ".jsonl") else "record"
    try:
        for row in iter_prompts(path):
            if row.reason is None and row.prompt is not None:
                prompts.append(row.prompt)
            elif not (blank_is_layout and row.reason in ("empty prompt", "empty line")):
                skipped.append(f"{unit} {row.row + 1}: {row.reason}")
    except OSError as error:
        raise MemattnError(f"{path} could not be read ({type(error).__name__}: {error})") from None
    detail = "; ".join(skipped[:_SHOWN_REASONS]) + ("; ..." if len(skipped) > _SHOWN_REASONS else "")
    if not prompts:
        reason = f" ({len(skipped)} rows skipped: {detail})" if skipped else ""
        raise MemattnError(f"{path} holds no usable prompts{reason}")
    if skipped:
        (notes or sys.stderr).write(
            f"note: {path}: skipped {len(skipped)} of {len(prompts) + len(skipped)} rows ({detail})\n"
        )
    return prompts
