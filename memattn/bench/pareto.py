"""The Pareto figure of a mitigation benchmark: copy similarity (lower is better) vs alignment."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memattn.mitigation import registry as methods

AXIS_LABELS = {
    "similarity_128": "mean copy similarity of 128-copy items' generations (lower = less copying)",
    "alignment_clean": "attribute alignment of clean prompts (higher = more faithful)",
    "sscd_gen": "SSCD similarity to the unmitigated generation, same seed [gen] (lower = changed more)",
    "sscd_train": "SSCD similarity to the training image [train] (lower = less copying)",
    "clip_score_clean": "CLIP score of clean prompts (higher = more faithful)",
}


def _finite(row: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(row.get(k), int | float) and math.isfinite(row[k]) for k in keys)


PARETO_TOLERANCE = 1e-9


def pareto_front(rows: Sequence[dict[str, Any]], x_key: str, y_key: str) -> list[int]:
    """Indices of the rows no other row beats on both axes (x: lower is better, y: higher is better).

    Values within ``PARETO_TOLERANCE`` count as ties, so rounding noise in means does not make a row
    look undominated.
    """
    points = [(i, row[x_key], row[y_key]) for i, row in enumerate(rows) if _finite(row, x_key, y_key)]
    eps = PARETO_TOLERANCE

    def beats(x2: float, y2: float, x: float, y: float) -> bool:
        return x2 <= x + eps and y2 >= y - eps and (x2 < x - eps or y2 > y + eps)

    return [i for i, x, y in points if not any(beats(x2, y2, x, y) for _, x2, y2 in points)]


def mark_pareto(rows: Sequence[dict[str, Any]], x_key: str, y_key: str) -> None:
    front = set(pareto_front(rows, x_key, y_key))
    for i, row in enumerate(rows):
        row["pareto"] = i in front


MARKERS = dict(
    zip(methods.METHODS, itertools.cycle(("*", "o", "s", "D", "v", "P", "X", "p", "^", "<")), strict=False)
)
FALLBACK_MARKERS = ("x", "h", ">", "8", "d", "H", "+", "1")


def pareto_figure(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    x_key: str,
    y_key: str,
    title: str,
    *,
    x_label: str | None = None,
    y_label: str | None = None,
    family: Callable[[dict[str, Any]], str] = lambda row: row["method"],
    label: Callable[[dict[str, Any]], str] = lambda row: row["setting"],
) -> Path | None:
    """Copy similarity vs alignment, one marker and colour per method family, every point labelled,
    the Pareto front dashed. Rows missing either value are left out; None if none has both."""
    import matplotlib

    from memattn.plotting import subplots

    points = [row for row in rows if _finite(row, x_key, y_key)]
    if not points:
        return None
    families = list(dict.fromkeys(family(row) for row in points))
    colors = matplotlib.colormaps["tab10"]
    fallback = iter(FALLBACK_MARKERS * (1 + len(families) // len(FALLBACK_MARKERS)))
    markers = {name: MARKERS.get(name) or next(fallback) for name in families}
    fig, ax = subplots(figsize=(8, 5.5))
    for k, name in enumerate(families):
        members = [row for row in points if family(row) == name]
        ax.scatter(
            [r[x_key] for r in members],
            [r[y_key] for r in members],
            marker=markers[name],
            color=colors(k % 10),
            s=90 if markers[name] == "*" else 55,
            label=name,
            zorder=3,
        )
    for row in points:
        ax.annotate(
            label(row), (row[x_key], row[y_key]), fontsize=6, xytext=(4, 3), textcoords="offset points"
        )
    front = sorted((points[i][x_key], points[i][y_key]) for i in pareto_front(points, x_key, y_key))
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), "--", color="grey", lw=1, zorder=2, label="Pareto front")
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(x_label or AXIS_LABELS.get(x_key, x_key), fontsize=9)
    ax.set_ylabel(y_label or AXIS_LABELS.get(y_key, y_key), fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
