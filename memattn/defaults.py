"""Generation settings a command runs at when the user gives none: the model's own, else the paper's.

A testbed pipeline (it carries ``memattn_testbed.json``) is evaluated at 25 DDIM steps and guidance 2
everywhere in memattn; any other model gets the paper's Stable Diffusion setting, 50 steps at 7.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAPER = {"steps": 50, "guidance": 7.5}
TESTBED = {"steps": 25, "guidance": 2.0}
TESTBED_MANIFEST = "memattn_testbed.json"


def model_defaults(model: str | Path) -> tuple[dict[str, float], str]:
    """``({"steps", "guidance"}, where they come from)`` for ``model`` (a path, hub id or 'testbed')."""
    from memattn.loading import resolve_model

    try:
        path = Path(resolve_model(str(model))).expanduser()
    except Exception:  # an unknown name: loading reports it; the defaults are the paper's
        return dict(PAPER), "the paper's setting"
    if (path / TESTBED_MANIFEST).is_file():
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
