"""Generation settings a command runs at when the user gives none (the model's own, else the paper's),
and the notes the commands print about them.

A testbed pipeline (it carries ``memattn_testbed.json``) is evaluated at 25 DDIM steps and guidance 2
everywhere in memattn; any other model gets the paper's Stable Diffusion setting, 50 steps at 7.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAPER = {"steps": 50, "guidance": 7.5}
TESTBED = {"steps": 25, "guidance": 2.0}
# memattn.testbed.manifest.MANIFEST, written out: importing the testbed would slow every command's start
TESTBED_MANIFEST = "memattn_testbed.json"


STEPS_HELP = "Denoising steps (default: the testbed's 25, else the paper's 50)."
GUIDANCE_HELP = "Classifier-free guidance scale (default: the testbed's 2, else the paper's 7.5)."


def is_testbed(model: str | Path) -> bool:
    """Whether ``model`` (a path, hub id or 'testbed') is a testbed pipeline (it has the manifest)."""
    from memattn.loading import resolve_model

    try:
        path = Path(resolve_model(str(model))).expanduser()
    except Exception:  # an unknown name: loading reports it
        return False
    return (path / TESTBED_MANIFEST).is_file()


def model_defaults(model: str | Path) -> tuple[dict[str, float], str]:
    """``({"steps", "guidance"}, where they come from)`` for ``model`` (a path, hub id or 'testbed')."""
    if is_testbed(model):
        return dict(TESTBED), "the testbed's evaluation setting"
    return dict(PAPER), "the paper's setting"


def resolve_settings(
    model: str | Path,
    steps: int | None,
    guidance: float | None,
    *,
    fallback: dict[str, float | None] | None = None,
) -> tuple[int, float, str]:
    """The step count and guidance a run uses: given > ``fallback`` (e.g. a calibration's) > model's,
    and the line that says so (``settings: steps 25 (...), guidance 2 (...)``), which commands print on
    stderr once the model has loaded (a bad model name stays a one-line error)."""
    defaults, origin = model_defaults(model)
    chosen: dict[str, tuple[float, str]] = {}
    for name, given in (("steps", steps), ("guidance", guidance)):
        stored = (fallback or {}).get(name)
        if given is not None:
            chosen[name] = (given, "given")
        elif stored is not None:
            chosen[name] = (stored, "the calibration's")
        else:
            chosen[name] = (defaults[name], origin)
    parts = [f"{name} {value:g} ({source})" for name, (value, source) in chosen.items()]
    line = "settings: " + ", ".join(parts)
    return int(chosen["steps"][0]), float(chosen["guidance"][0]), line


def announce(line: str) -> None:
    sys.stderr.write(line + "\n")


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
