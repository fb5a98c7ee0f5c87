"""A combined step-1 detector: logistic regression over features that are free at the first CFG call.

Fitted with scikit-learn (standardised features, L2-regularised logistic regression) on a labelled
calibration split and saved as plain JSON (feature names, scaler, coefficients, model id) — never a
pickle, so a detector file from elsewhere cannot run code. Scores are the decision function (log-odds),
higher = memorized, like every other memattn score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from memattn.errors import MemattnError

DETECTOR_FILE = "memattn_detector.json"


@dataclass
class CombinedDetector:
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    model: str = ""
    n_train: int = 0

    @classmethod
    def fit(
        cls, x: np.ndarray, labels: np.ndarray, features: list[str], model: str = "", c: float = 1.0
    ) -> CombinedDetector:
        x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels).astype(int)
        if x.ndim != 2 or x.shape[1] != len(features) or len(x) != len(labels):
            raise MemattnError(
                f"features {x.shape} do not match {len(features)} names and {len(labels)} labels"
            )
        if len(set(labels.tolist())) != 2:
            raise MemattnError("the combined detector needs memorized and non-memorized calibration prompts")
        if not np.isfinite(x).all():
            raise MemattnError("calibration features contain NaN or infinity (fp16 overflow?)")
        scaler = StandardScaler().fit(x)
        regression = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x), labels)
        return cls(
            features=list(features),
            mean=scaler.mean_.tolist(),
            scale=scaler.scale_.tolist(),
            coef=regression.coef_[0].tolist(),
            intercept=float(regression.intercept_[0]),
            model=model,
            n_train=len(labels),
        )

    def score(self, x: np.ndarray, features: list[str]) -> np.ndarray:
        if list(features) != self.features:
            raise MemattnError(
                f"this detector was fitted on features {self.features}, got {list(features)} "
                "(another model or memattn version?): refit it"
            )
        z = (np.asarray(x, dtype=np.float64) - np.array(self.mean)) / np.array(self.scale)
        return z @ np.array(self.coef) + self.intercept

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> CombinedDetector:
        path = Path(path)
        if not path.is_file():
            raise MemattnError(f"no combined detector at {path}: fit one with `memattn bench detect`")
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
            raise MemattnError(f"{path} is not a memattn detector file ({error})") from None
