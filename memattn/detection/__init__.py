"""Detection: the paper's scores (pure functions of a record), the one step-1 scorer, ``detect``, the
baselines (Wen's noise norm, bright ending), the combined step-1 detector and detection metrics."""

from memattn.detection.detect import Detection, detect
from memattn.detection.scores import score_d, score_e
from memattn.detection.step1 import STEP1_KINDS, Step1, score_step1

__all__ = ["STEP1_KINDS", "Detection", "Step1", "detect", "score_d", "score_e", "score_step1"]
