"""One Pareto figure for every mitigation measured on the testbed: copy similarity vs clean alignment.

Reads the JSON files written by ``mitigation_sweep.py`` (the paper's edit and its variants) and by
``memattn bench mitigate`` (every method, the guard rows; ``mitigation_bench.json``) and
plots, per setting, the mean detail similarity of the 128-copy items' generations (lower = fewer and
weaker copies) against the attribute alignment of clean prompts (higher = more faithful), with the
Pareto front dashed (``memattn.bench.pareto``, the same figure ``memattn bench mitigate`` draws).

Usage: .venv/bin/python benchmarks/pareto_figure.py SWEEP.json [MORE.json ...] --out FIGURE.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memattn.bench.pareto import pareto_figure

FAMILIES = ("ren2024", "mask padding", "BOS x C", "RTA", "RNA", "GNI", "Wen", "Kim&No", "Jain", "plain")


def family(row: dict) -> str:
    """bench mitigate rows name their method; sweep rows are grouped by the start of their label."""
    if row.get("method"):
        return "plain" if row["method"] == "none" else row["method"]
    return next((prefix for prefix in FAMILIES if row["setting"].startswith(prefix)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, seen = [], set()
    for path in args.inputs:
        data = json.loads(path.read_text())
        for row in data["rows"] if isinstance(data, dict) else data:  # bench mitigate: {"rows": [...]}
            if row["setting"] not in seen:
                seen.add(row["setting"])
                rows.append(row)
    title = "mitigations on the memattn testbed (guidance 2, 25 DDIM steps)"
    pareto_figure(rows, args.out, "similarity_128", "alignment_clean", title, family=family)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
