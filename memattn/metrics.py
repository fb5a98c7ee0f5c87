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
