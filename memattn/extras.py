"""Optional extras: which ``pip install 'memattn[...]'`` provides which package.

Tracing, scoring, mitigating and the guard need only torch, diffusers, transformers, safetensors, numpy
and tqdm; the command line, benchmarks, scans, reports and training each bring their own packages. A
missing one is reported as one line naming the extra to install, never as a bare traceback.
"""

from __future__ import annotations

EXTRA_OF = {
    "typer": "cli",
    "rich": "cli",
    "click": "cli",
    "sklearn": "bench",
    "matplotlib": "bench",
    "pyarrow": "scan",
    "jinja2": "report",
    "accelerate": "train",
    "ray": "ray",
}


def missing_extra(error: ImportError) -> str | None:
    """The one-line fix for an import of an optional package that is not installed; None otherwise."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    extra = EXTRA_OF.get(name)
    if extra is None:
        return None
    package = "scikit-learn" if name == "sklearn" else name
    return f"{package} is not installed; it comes with pip install 'memattn[{extra}]' (or 'memattn[all]')"
