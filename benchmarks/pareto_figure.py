"""One Pareto figure for every mitigation measured on the testbed: copy similarity vs clean alignment.

Reads the JSON files written by ``mitigation_sweep.py`` (ren2024 settings and ``--baselines``) and
plots, per setting, the mean detail similarity of the 128-copy items' generations (lower = fewer and
weaker copies) against the attribute alignment of clean prompts (higher = more faithful).

Usage: .venv/bin/python benchmarks/pareto_figure.py SWEEP.json [MORE.json ...] --out FIGURE.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family(setting: str) -> str:
    for prefix in ("ren2024", "BOS x C", "RTA", "RNA", "GNI", "plain"):
        if setting.startswith(prefix):
            return prefix
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for path in args.inputs for row in json.loads(path.read_text())]
    seen: set[str] = set()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"plain": "*", "ren2024": "o", "BOS x C": "^", "RTA": "s", "RNA": "D", "GNI": "v", "other": "x"}
    for row in rows:
        if row["setting"] in seen:
            continue
        seen.add(row["setting"])
        kind = family(row["setting"])
        ax.scatter(row["similarity_128"], row["alignment_clean"], marker=markers[kind], s=60, label=kind)
        ax.annotate(
            row["setting"],
            (row["similarity_128"], row["alignment_clean"]),
            fontsize=6,
            xytext=(4, 3),
            textcoords="offset points",
        )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.set_xlabel("mean detail similarity of 128-copy items' generations (lower = less copying)")
    ax.set_ylabel("attribute alignment of clean prompts (higher = more faithful)")
    ax.set_title("mitigations on the memattn testbed (guidance 2, 25 DDIM steps)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
