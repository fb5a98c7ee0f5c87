"""One Pareto figure for every mitigation measured on the testbed: copy similarity vs clean alignment.

Reads the JSON files written by ``mitigation_sweep.py`` (ren2024 settings and ``--baselines``) and
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
    return next((prefix for prefix in FAMILIES if row["setting"].startswith(prefix)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, seen = [], set()
    for path in args.inputs:
        for row in json.loads(path.read_text()):
            if row["setting"] not in seen:
                seen.add(row["setting"])
                rows.append(row)
    title = "mitigations on the memattn testbed (guidance 2, 25 DDIM steps)"
    pareto_figure(rows, args.out, "similarity_128", "alignment_clean", title, family=family)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
