"""Merge train_mitigation.py result files and draw what each rule buys against blind dropping.

Several invocations of ``train_mitigation.py`` on the same ``--out`` share the monitor run, base model,
seed and evaluation, so their rows are comparable; each row's time ratio is against the ``none`` timed
side by side in its own invocation (kept as is). Later files override earlier ones for the same rule.
The verdicts, including the random-drop control at each rule's drop rate, are recomputed on the merged
rows. Writes the merged JSON, a two-panel PNG (copy rate of the most duplicated items, and clean
alignment, against the share of captioned samples dropped; the random-drop control as a line) and
prints the markdown table RESULTS.md holds.

Usage: .venv/bin/python benchmarks/train_mitigation_figure.py RESULTS.json [MORE.json ...] \\
    --json MERGED.json --out FIGURE.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from train_mitigation import verdicts

FAMILY_COLOURS = {
    "none": "black",
    "entropy": "tab:blue",
    "noise-norm": "tab:orange",
    "caption-aug": "tab:green",
    "random-drop": "tab:gray",
}


def merge(paths: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"invocations": [], "results": {}, "timing_side_by_side": {}}
    for path in paths:
        report = json.loads(path.read_text())
        merged["invocations"].append(
            {k: report[k] for k in ("date", "machine", "command", "total_seconds", "recipe")}
        )
        recipes = {i["recipe"] for i in merged["invocations"]}
        if len(recipes) > 1:
            raise SystemExit(f"{path}: mixes recipes {sorted(recipes)}; merge one recipe at a time")
        for key in ("recipe", "recipe_config", "evaluation", "monitor_signal_analysis", "calibration"):
            merged[key] = report[key]
        merged["targets"], merged["monitor"] = report["targets"], report["monitor"]
        for name, row in report["results"].items():
            merged["results"][name] = row
            merged["timing_side_by_side"][name] = {
                **report["timing_side_by_side"][name],
                "invocation": report["command"],
            }
    merged["verdicts"] = verdicts(merged["results"], merged["timing_side_by_side"])
    return merged


def number(value: float, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(merged: dict[str, Any]) -> str:
    lines = [
        "| rule | copy 128× | copy templates | clean alignment | final loss | dropped | dropped of 128× / "
        "seen-once samples | precision / recall | time × none | random drop at the same rate: copy / "
        "alignment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in merged["results"].items():
        v = merged["verdicts"][name]
        top = str(r["top_duplication"])
        by_dup, by_group = r["drop_rate_matching_by_duplication"], r["drop_rate_by_group"]
        lines.append(
            f"| {name} | {r['copy_rate_top']:.2f} | {r['copy_rate_template']:.2f} | "
            f"{r['alignment_clean']:.3f} | {r['final_loss']:.4f} | {r['drop_rate_captioned']:.1%} | "
            f"{by_dup.get(top, 0.0):.0%} / {by_group.get('seen_once', 0.0):.0%} | "
            f"{number(r['precision'])} / {number(r['recall'])} | {number(v['overhead'], 3)} | "
            f"{number(v['random_drop_copy_rate_at_same_drop_rate'])} / "
            f"{number(v['random_drop_alignment_at_same_drop_rate'], 3)} |"
        )
    return "\n".join(lines)


def figure(merged: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = merged["results"]
    control = sorted(
        [(0.0, results["none"])]
        + [(r["drop_rate_captioned"], r) for n, r in results.items() if n.startswith("random-drop")],
        key=lambda p: p[0],
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, measure, label in (
        (axes[0], "copy_rate_top", "copy rate of the most duplicated items"),
        (axes[1], "alignment_clean", "alignment on clean prompts"),
    ):
        if len(control) > 1:  # `none` alone is no curve: no control was run
            ax.plot(
                [p[0] for p in control],
                [p[1][measure] for p in control],
                "--",
                color="tab:gray",
                label="random drop (control)",
            )
        for i, (name, r) in enumerate(results.items()):
            kind = r["mitigation"]["kind"]
            x, y = r["drop_rate_captioned"], r[measure]
            ax.scatter(x, y, color=FAMILY_COLOURS.get(kind, "tab:red"), s=30)
            if kind != "random-drop":  # staggered: several rules sit at (0, none's value)
                ax.annotate(name, (x, y), fontsize=7, xytext=(4, 8 * (i % 3) - 8), textcoords="offset points")
        ax.set_xlabel("share of captioned samples dropped")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for kind, colour in FAMILY_COLOURS.items():
        axes[1].scatter([], [], color=colour, label=kind)
    if len(control) > 1:
        axes[0].legend(loc="lower left")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle(
        f"training-time mitigation on the memattn testbed ({merged['recipe']} recipe, same seed and budget)"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, required=True, help="merged results")
    parser.add_argument("--out", type=Path, required=True, help="the PNG")
    args = parser.parse_args()
    merged = merge(args.inputs)
    args.json.write_text(json.dumps(merged, indent=1))
    figure(merged, args.out)
    print(table(merged))
    print(f"wrote {args.json} and {args.out}")


if __name__ == "__main__":
    main()
