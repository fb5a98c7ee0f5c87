"""Figures without pyplot: memattn draws into ``matplotlib.figure.Figure`` objects and saves them.

A library must not switch the caller's matplotlib backend (``matplotlib.use("Agg")`` at import would, in
a notebook) nor leave figures in pyplot's global registry; a bare ``Figure`` renders PNG through Agg
on its own and is freed like any object.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure


def subplots(*grid: int, figsize: tuple[float, float], **options: Any) -> tuple[Figure, Any]:
    """``plt.subplots(*grid, figsize=..., **options)`` on a figure no backend or registry knows."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **options)
