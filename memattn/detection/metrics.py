"""Detection metrics on labelled scores: ROC AUC and TPR at a fixed false-positive rate (scikit-learn)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from memattn.errors import MemattnError


def tpr_at_fpr(labels: Sequence[int], scores: Sequence[float], fpr: float = 0.01) -> float:
    """Highest TPR among ROC points whose FPR is at most ``fpr`` (the nearest-point convention).

    With fewer than ``1 / fpr`` negatives the only such point may be FPR = 0: that is what it reports.
    """
    false_positive, true_positive, _ = roc_curve(labels, scores)
    return float(true_positive[false_positive <= fpr + 1e-12].max())


def bootstrap_roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` exactly as ``sklearn.metrics.roc_curve`` computes them (ties grouped, collinear
    points dropped), without its input validation: a bootstrap calls it thousands of times, where
    scikit-learn's checks cost a hundred times the curve. Inputs must already be valid (both classes)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked, truth = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), truth.size - 1]  # the last item of each tied group
    tps = np.cumsum(truth)[last]
    fps = 1 + last - tps
    if fps.size > 2:
        corners = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[corners], tps[corners]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1]


def bootstrap_auc_and_tpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """ROC AUC and :func:`tpr_at_fpr` of one bootstrap sample, from one :func:`bootstrap_roc`."""
    false_positive, true_positive = bootstrap_roc(labels, scores)
    auc = float(np.trapezoid(true_positive, false_positive))
    return auc, float(true_positive[false_positive <= fpr + 1e-12].max())


def detection_metrics(labels: Sequence[int], scores: Sequence[float], fpr: float = 0.01) -> dict[str, float]:
    """``auc`` and ``tpr_at_fpr`` (higher score = memorized); both classes must be present."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or len(labels) != len(scores):
        raise MemattnError(f"{len(labels)} labels but {len(scores)} scores")
    if not (labels.any() and (~labels.astype(bool)).any()):
        raise MemattnError("detection metrics need both memorized and non-memorized examples")
    if not np.isfinite(scores).all():
        raise MemattnError("scores contain NaN or infinity; check the record (fp16 overflow?)")
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_fpr": tpr_at_fpr(labels, scores, fpr),
        "fpr": fpr,
        "positives": int(labels.sum()),
        "negatives": int(len(labels) - labels.sum()),
    }
