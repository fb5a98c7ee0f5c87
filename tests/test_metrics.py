"""Detection metrics: AUC and TPR at a fixed FPR (nearest ROC point at or below it)."""

from __future__ import annotations

import numpy as np
import pytest

from memattn.detection.metrics import detection_metrics, tpr_at_fpr
from memattn.errors import MemattnError


def test_tpr_at_fpr_takes_the_best_point_at_or_below_the_fpr():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.05, 0.0]
    # Threshold above 0.85 keeps FPR 0 with TPR 1/4; everything else costs a false positive.
    assert tpr_at_fpr(labels, scores, 0.01) == 0.25
    assert tpr_at_fpr(labels, scores, 0.25) == 1.0  # threshold 0.2: one false positive (0.85)
    metrics = detection_metrics(labels, scores)
    assert metrics["auc"] == pytest.approx(13 / 16)
    assert (metrics["positives"], metrics["negatives"]) == (4, 4)


def test_perfect_and_inverted_scores():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50), np.zeros(50)].astype(int)
    perfect = np.r_[rng.uniform(1, 2, 50), rng.uniform(0, 1, 50)]
    assert detection_metrics(labels, perfect) == {
        **detection_metrics(labels, perfect),
        "auc": 1.0,
        "tpr_at_fpr": 1.0,
    }
    assert detection_metrics(labels, -perfect)["auc"] == 0.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(MemattnError, match="both memorized and non-memorized"):
        detection_metrics([1, 1], [0.1, 0.2])
    with pytest.raises(MemattnError, match="NaN"):
        detection_metrics([1, 0], [float("nan"), 0.2])
    with pytest.raises(MemattnError, match="2 labels but 3 scores"):
        detection_metrics([1, 0], [0.1, 0.2, 0.3])


def test_bootstrap_roc_equals_scikit_learn_with_ties_and_duplicates():
    from sklearn.metrics import roc_auc_score, roc_curve

    from memattn.detection.metrics import bootstrap_auc_and_tpr, bootstrap_roc, tpr_at_fpr

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]  # both classes, as every bootstrap sample has
        scores = rng.normal(size=n)
        if trial % 2:
            scores = np.round(scores, 1)  # many ties, as resampled prompts repeat
        sample = rng.integers(0, n, n)
        sample[:2] = [0, 1]
        y, s = labels[sample], scores[sample]
        expected_fpr, expected_tpr, _ = roc_curve(y, s)
        fpr, tpr = bootstrap_roc(y, s)
        np.testing.assert_array_equal(fpr, expected_fpr)
        np.testing.assert_array_equal(tpr, expected_tpr)
        auc, tpr1 = bootstrap_auc_and_tpr(y, s, 0.1)
        assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert tpr1 == tpr_at_fpr(y, s, 0.1)
