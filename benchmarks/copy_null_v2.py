"""Is a v2 "own copy" a copy of the background, or only the object on a flat background?

The v2 copy threshold (0.8) was fixed on fresh renders: two independent renders of one object on
random backgrounds. A generation that draws the right object on a smooth, mean background can
correlate with its own training image above that null without reproducing the background. This
script measures, per generation: the whole-image correlation with the own image (the first v2 copy
measure); the correlation over background pixels only (the object's mask, dilated by one pixel,
left out); and the same two against 16 fresh renders of the same object on other backgrounds (the
null for this very generation).

Usage: .venv/bin/python benchmarks/copy_null_v2.py --model testbed [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from memattn.loading import resolve_model
from memattn.testbed.evaluate import evaluate
from memattn.testbed.manifest import dataset_for
from memattn.testbed.measures import background_mask, masked_correlation
from memattn.testbed.objects import render_objects

NULL_RENDERS = 16


def corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    return masked_correlation(a, b, np.ones(a.shape[-2:], bool) if mask is None else mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--per-group", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = Path(resolve_model(args.model))
    dataset = dataset_for(model)
    ev = evaluate(
        model, guidance_scale=2.0, steps=25, per_group=args.per_group, seeds=args.seeds, progress=False
    )
    rng = np.random.default_rng(7)
    rows = []
    for row, image in zip(ev.rows, ev.generated, strict=True):
        item = dataset.items[row["item_id"]]
        a = item.attributes
        size = image.shape[-1]
        background = background_mask([a], size)
        own = dataset.image(item)
        nulls = render_objects(
            [a] * NULL_RENDERS, [int(s) for s in rng.integers(2**62, size=NULL_RENDERS)], size
        )
        rows.append(
            {
                "group": row["group"],
                "whole": corr(image, own),
                "background": corr(image, own, background),
                "null_whole_max": max(corr(image, n) for n in nulls),
                "null_background_max": max(corr(image, n, background) for n in nulls),
                "trained": item.duplication > 0,
            }
        )
    summary = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        g = [r for r in rows if r["group"] == group]
        summary[group] = {
            "n": len(g),
            "whole_gt_0.8": float(np.mean([r["whole"] > 0.8 for r in g])),
            "background_gt_0.8": float(np.mean([r["background"] > 0.8 for r in g])),
            "median_background": float(np.median([r["background"] for r in g])),
            "null_whole_max_gt_0.8": float(np.mean([r["null_whole_max"] > 0.8 for r in g])),
            "null_background_max_median": float(np.median([r["null_background_max"] for r in g])),
            "null_background_max_p99": float(np.quantile([r["null_background_max"] for r in g], 0.99)),
        }
    print(f"model {model}")
    print(
        f"{'group':22} {'n':>3} {'whole>.8':>9} {'bg>.8':>6} {'med bg':>7} {'null whole>.8':>14} "
        f"{'null bg med':>11} {'null bg p99':>11}"
    )
    for group, s in summary.items():
        print(
            f"{group:22} {s['n']:>3} {s['whole_gt_0.8']:>9.2f} {s['background_gt_0.8']:>6.2f} "
            f"{s['median_background']:>7.3f} {s['null_whole_max_gt_0.8']:>14.2f} "
            f"{s['null_background_max_median']:>11.3f} {s['null_background_max_p99']:>11.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
