"""Seconds of `bench detect`'s bootstrap confidence intervals: scikit-learn per resample vs memattn's
exact numpy ROC (``memattn.detection.metrics.bootstrap_auc_and_tpr``), side by side on the same resamples.

Both arms draw the same resamples (one seeded generator each, same order), so their CIs must be equal;
the script checks that and prints the time of each and the ratio.

Usage: .venv/bin/python benchmarks/bootstrap_ci.py [--scores 30] [--prompts 200] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from memattn.detection.metrics import bootstrap_auc_and_tpr, tpr_at_fpr


def intervals(values: np.ndarray, labels: np.ndarray, n_boot: int, fast: bool) -> list[float]:
    rng = np.random.default_rng(0)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    aucs, tprs = [], []
    for _ in range(n_boot):
        sample = np.concatenate(
            [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        )
        if fast:
            auc, tpr = bootstrap_auc_and_tpr(labels[sample], values[sample], 0.01)
        else:
            auc = roc_auc_score(labels[sample], values[sample])
            tpr = tpr_at_fpr(labels[sample], values[sample], 0.01)
        aucs.append(auc)
        tprs.append(tpr)
    return [*np.percentile(aucs, [2.5, 97.5]), *np.percentile(tprs, [2.5, 97.5])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=int, default=30, help="score columns (bench detect: ~30)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    labels = (np.arange(args.prompts) % 2).astype(int)
    columns = [np.round(rng.normal(size=args.prompts) + 0.7 * labels, 2) for _ in range(args.scores)]
    seconds = {}
    results = {}
    for fast in (False, True):
        began = time.perf_counter()
        results[fast] = [intervals(values, labels, args.n_boot, fast) for values in columns]
        seconds[fast] = time.perf_counter() - began
    np.testing.assert_allclose(results[True], results[False], rtol=0, atol=1e-12)
    print(f"{platform.machine()}, {args.scores} scores x {args.prompts} prompts x {args.n_boot} resamples")
    print(
        f"scikit-learn per resample: {seconds[False]:.1f} s; numpy ROC: {seconds[True]:.1f} s; "
        f"ratio {seconds[False] / seconds[True]:.0f}x; CIs equal"
    )


if __name__ == "__main__":
    main()
