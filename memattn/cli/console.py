"""The CLI's two consoles and its tables, set up once so every command prints the same way.

``soft_wrap`` keeps a printed line whole (a path or a command to copy is never broken mid-word; the
terminal wraps it). :func:`table` keeps each header word whole and :func:`print_table` never cuts a
number: a table that cannot fit the terminal is printed at the width it needs (the terminal wraps it,
a log file keeps it intact) rather than with cells cut to "0.5…".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def table(title: str, headers: Sequence[str], **column_options: Any) -> Table:
    """A rich table whose columns are never narrower than their longest header word."""
    view = Table(title=title)
    for header in headers:
        words = header.split() or [""]
        view.add_column(header, min_width=max(len(word) for word in words), **column_options)
    return view


def print_table(console: Console, view: Table) -> None:
    """Print ``view`` at the console's width, or wider when its narrowest layout needs more."""
    # rich's minimum under-counts padding and no-wrap cells (it would still crop at that width), so
    # the fallback is the natural width, at which every cell is whole.
    needed = Measurement.get(console, console.options.update_width(10_000), view).maximum
    if needed <= console.width or _fits(console, view):
        console.print(view)
        return
    width = console.width
    console.width = needed  # rich caps a print's width at the console's: widen the console for it
    try:
        console.print(view)
    finally:
        console.width = width


def _fits(console: Console, view: Table) -> bool:
    """Whether ``view`` laid out at the console's width stays inside it (rich crops what does not)."""
    from rich.segment import Segment

    lines = list(Segment.split_lines(console.render(view, console.options)))
    cut = any("…" in segment.text for line in lines for segment in line)  # rich's ellipsis: a cut cell
    return not cut and all(Segment.get_line_length(line) <= console.width for line in lines)


def warn_truncated(pipe: object, prompts: list[str]) -> None:
    """The text encoder sees 77 tokens: say which prompts lose their end, as `detect` does."""
    from memattn.attention.tokens import tokenize_layouts

    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    for prompt, layout in zip(prompts, tokenize_layouts(tokenizer, prompts), strict=True):
        if layout.truncated:
            warn_truncated_prompt(prompt)


def warn_truncated_prompt(prompt: str) -> None:
    stderr.print(f"[yellow]warning:[/] prompt truncated to 77 tokens: {prompt[:60]!r}")
